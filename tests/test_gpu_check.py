"""scripts/gpu_check.sh: the CPU dry run passes every stage and prints every row; failures are recorded, not fatal."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import gpu_check  # noqa: E402

TRAIN_ROWS = ("train-small", "train-small-resume", "train-t2i", "train-b", "train-b-compile")
# the CPU plan's bench: vocab=256 k=[128], parts head and step
BENCH_ROWS = ("bench head flat 256", "bench head masc 128", "bench step flat 256", "bench step masc 128")


def _run(tmp_path, *args, timeout=600):
    out = tmp_path / "out"
    cmd = ["bash", str(REPO / "scripts" / "gpu_check.sh"), "--device", "cpu", "--workdir", str(tmp_path / "work"),
           "--out", str(out), *args]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    res = json.loads((out / "gpu_check.json").read_text()) if (out / "gpu_check.json").is_file() else None
    table = (out / "gpu_check.md").read_text() if (out / "gpu_check.md").is_file() else ""
    return p, res, table


@pytest.mark.slow
def test_cpu_dry_run_passes_every_stage_and_prints_every_row(tmp_path):
    p, res, table = _run(tmp_path)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-2000:]
    rows = {r["stage"]: r for r in res["rows"]}
    assert list(rows) == [*gpu_check.STAGES, *BENCH_ROWS]
    failed = {s: r["notes"] for s, r in rows.items() if not r["ok"]}
    assert not failed
    for stage in rows:
        assert f"| {stage} | pass |" in table
    assert table.count("\n| ") == len(rows) + 1  # header + one line per row, nothing else in table form
    for s in gpu_check.STAGES:
        assert rows[s]["wall_s"] > 0
    for s in TRAIN_ROWS:  # read from each run's metrics.jsonl
        assert rows[s]["step_ms"] > 0 and rows[s]["tokens_per_s"] > 0
    for s in ("sample-small", "sample-t2i", "sample-b"):  # read from the sampler's progress bar
        assert rows[s]["images_per_s"] > 0
    for s in BENCH_ROWS:
        assert rows[s]["step_ms"] > 0 and rows[s]["peak"].endswith("MiB")
    assert "resumed from ckpt-00000003.pt" in rows["train-small-resume"]["notes"]
    assert "FID" in rows["eval"]["notes"]
    assert "task=t2i" in rows["train-t2i"]["notes"] and "t2i codes" in rows["prepare"]["notes"]
    assert "images/%06d.png + captions.txt + result.jsonl" in rows["sample-t2i"]["notes"]
    assert "coco30k protocol: FID" in rows["eval-t2i"]["notes"] and "CLIP score absent" in rows["eval-t2i"]["notes"]
    assert "not compiled on cpu" in rows["train-b-compile"]["notes"]
    assert (tmp_path / "out" / "gpu_check_logs.txt").is_file()


@pytest.mark.slow
def test_a_failing_stage_is_recorded_and_the_next_still_runs(tmp_path):
    """Without `prepare` there are no codes: train-small fails, sample-small still runs (and fails: no checkpoint)."""
    p, res, table = _run(tmp_path, "--stages", "train-small,sample-small", timeout=300)
    assert p.returncode == 1
    rows = {r["stage"]: r for r in res["rows"]}
    assert list(rows) == ["train-small", "sample-small"]
    assert not rows["train-small"]["ok"] and "train.py exit" in rows["train-small"]["notes"]
    assert rows["train-small"]["wall_s"] > 0  # it did run
    assert not rows["sample-small"]["ok"] and "no checkpoint" in rows["sample-small"]["notes"]
    assert "| train-small | FAIL |" in table and "| sample-small | FAIL |" in table
    assert "2 of 2 rows failed" in table


@pytest.mark.slow
def test_spent_budget_skips_stages_as_failures(tmp_path):
    p, res, _ = _run(tmp_path, "--stages", "prepare,train-b", "--budget", "1", timeout=120)
    assert p.returncode == 1
    assert [(r["stage"], r["ok"]) for r in res["rows"]] == [("prepare", False), ("train-b", False)]
    assert all("budget" in r["notes"] for r in res["rows"])


def test_summarise_train_skips_the_first_interval_and_takes_medians():
    rows = [{"step": 5, "train/images_per_s": 1.0, "train/tokens_per_s": 10.0, "train/mfu": 0.01,
             "train/step_time_s": 9.0},
            {"step": 10, "train/images_per_s": 100.0, "train/tokens_per_s": 1000.0, "train/mfu": 0.3,
             "train/step_time_s": 0.5},
            {"step": 15, "train/images_per_s": 300.0, "train/tokens_per_s": 3000.0, "train/mfu": 0.5,
             "train/peak_memory_gib": 2.5, "train/step_time_s": 0.1},
            {"step": 20, "train/images_per_s": 200.0, "train/tokens_per_s": 2000.0, "train/mfu": 0.4,
             "train/peak_memory_gib": 3.0, "train/step_time_s": 0.2},
            {"step": 20, "eval/fid": 3.0}]
    s = gpu_check.summarise_train(rows, batch=64)
    assert s["step_ms"] == pytest.approx(200.0)
    assert s["tokens_per_s"] == 2000.0 and s["mfu"] == 0.4
    assert s["peak"] == "3.00 GiB"
    assert gpu_check.summarise_train(rows[:2], batch=1)["peak"] is None
    # without train/step_time_s: global batch / images per second; another memory key is shown with its name
    rates_only = [{k: v for k, v in r.items() if k != "train/step_time_s"} for r in rows[:4]]
    assert gpu_check.summarise_train(rates_only, batch=64)["step_ms"] == pytest.approx(64 / 200.0 * 1e3)
    other = gpu_check.summarise_train([{**rates_only[0], "train/max_mem_mib": 512.0}], batch=1)
    assert other["peak"] == "512.00 MiB (train/max_mem_mib)" and other["step_ms"] == 1e3


def test_sampler_rate_reads_the_last_finished_progress_bar():
    log = ("sample:   0%|          | 0/4 [00:00<?, ?it/s]\rsample:  50%|#####     | 2/4 [00:01<00:01,  1.90it/s]\r"
           "sample: 100%|##########| 4/4 [00:02<00:00,  2.50it/s]\nwrote 256 samples\n")
    assert gpu_check.sampler_rate(log, 64) == pytest.approx(160.0)
    assert gpu_check.sampler_rate("sample: 100%|##########| 1/1 [00:08<00:00,  8.00s/it]", 8) == pytest.approx(1.0)
    assert gpu_check.sampler_rate("sample:  50%|#####     | 1/2 [00:01<00:01,  1.00it/s]", 8) is None


def _fake_run(d: Path, resumed_from, ckpts, steps):
    (d / "checkpoints").mkdir(parents=True)
    for s in ckpts:
        (d / "checkpoints" / f"ckpt-{s:08d}.pt").write_bytes(b"")
    (d / "run.json").write_text(json.dumps({"resumed_from": resumed_from}))
    (d / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "train/loss": 1.0}) + "\n" for s in steps))


def test_check_resume_accepts_a_resumed_run_and_rejects_a_restart(tmp_path):
    good = tmp_path / "good"
    _fake_run(good, str(good / "checkpoints" / "ckpt-00000020.pt"), [20, 40], [5, 10, 15, 20, 25, 30, 35, 40])
    assert gpu_check.check_resume(good, 20, 40) == []
    restarted = tmp_path / "restarted"  # second invocation started from step 0 again
    _fake_run(restarted, None, [20, 40], [5, 10, 15, 20, 5, 10, 15, 20, 25, 30, 35, 40])
    problems = gpu_check.check_resume(restarted, 20, 40)
    assert any("resumed_from" in p for p in problems) and any("not increasing" in p for p in problems)
    short = tmp_path / "short"
    _fake_run(short, str(short / "checkpoints" / "ckpt-00000020.pt"), [20], [5, 10, 15, 20])
    assert any("last at step 40" in p for p in gpu_check.check_resume(short, 20, 40))


def _coco_folder(d: Path, prompts: list[str], size: int = 16) -> Path:
    from PIL import Image

    (d / "images").mkdir(parents=True)
    for i in range(len(prompts)):
        Image.new("RGB", (size, size)).save(d / "images" / f"{i:06d}.png")
    (d / "captions.txt").write_text("".join(q + "\n" for q in prompts))
    (d / "result.jsonl").write_text("".join(json.dumps({"index": i, "image": f"images/{i:06d}.png", "caption": q})
                                            + "\n" for i, q in enumerate(prompts)))
    return d


def test_check_coco_layout_wants_one_image_per_prompt_in_order(tmp_path):
    prompts = ["a small red apple", "a big blue car", "a small red apple", "a big white star"]  # repeats allowed
    good = _coco_folder(tmp_path / "good", prompts)
    assert gpu_check.check_coco_layout(good, prompts, 16) == []
    assert any("expected 32x32" in p for p in gpu_check.check_coco_layout(good, prompts, 32))
    (good / "images" / "000003.png").unlink()
    assert any("images/ holds" in p for p in gpu_check.check_coco_layout(good, prompts, 16))
    swapped = _coco_folder(tmp_path / "swapped", prompts[::-1])
    problems = gpu_check.check_coco_layout(swapped, prompts, 16)
    assert any("captions.txt" in p for p in problems) and any("result.jsonl" in p for p in problems)


def test_random_text_encoder_is_read_by_the_wordllama_encoder(tmp_path):
    """Each caption word is its own row of the random table (no unknown words), looked up by WordLlamaEncoder."""
    from safetensors.numpy import load_file

    from masc_llamagen.text import build_text_encoder
    from masc_llamagen.text.encoders import WORDLLAMA_KEY, WORDLLAMA_TOKENIZER, WORDLLAMA_WEIGHTS
    from tokenizers import Tokenizer

    captions = gpu_check._captions(12)
    assert len(set(captions)) == 12
    root = gpu_check._random_text_encoder(tmp_path / "enc", captions)
    enc = build_text_encoder("wordllama", root)
    table = load_file(str(root / WORDLLAMA_WEIGHTS))[WORDLLAMA_KEY]
    vocab = Tokenizer.from_file(str(root / WORDLLAMA_TOKENIZER)).get_vocab()
    for caption, feats in zip(captions, enc.encode_tokens(captions), strict=True):
        ids = [vocab[w] for w in caption.split()]
        assert 0 not in ids  # [UNK]
        np.testing.assert_array_equal(feats.numpy(), table[ids].astype(np.float32))
