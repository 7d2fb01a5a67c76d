"""Training loop contracts: exact resume, accumulation, multi-process equivalence, safe checkpoints, clear stops."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from train_utils import compose_cfg, make_assets

from masc_llamagen import checkpoint
from masc_llamagen.checkpoint import TrainingCheckpoint
from masc_llamagen.errors import TrainingError
from masc_llamagen.eval.likelihood import heldout_diagnostics
from masc_llamagen.train.checkpointing import list_checkpoints
from masc_llamagen.train.loop import train
from masc_llamagen.weights import load_gpt, load_vq

REPO = Path(__file__).resolve().parents[1]
BASE = ["head=random", "head.k=16", "train.global_batch_size=8", "train.log_every=1", "train.ckpt_every=4"]
NO_DROPOUT = ["model.token_dropout_p=0", "model.resid_dropout_p=0", "model.ffn_dropout_p=0"]


def _cli_overrides(tmp_path, assets, *extra):
    """Overrides pointing `train.py`, run as a subprocess, at the test assets (CPU, GPT-nano, no logger)."""
    return [f"tokenizer.checkpoint={assets['tokenizer']}", f"data.codes={assets['codes']}", "model=gpt_nano",
            "train=cpu", "logger=none", *BASE, f"paths.root={tmp_path}", f"paths.artifacts={tmp_path / 'artifacts'}",
            *extra]


def _assert_same_weights(actual, expected, prefer_ema=False):
    a, b = load_gpt(actual, prefer_ema=prefer_ema), load_gpt(expected, prefer_ema=prefer_ema)
    for (k, v1), v2 in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(v1, v2, rtol=1e-4, atol=1e-6, msg=k)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    return make_assets(root)


def test_resume_after_interruption_reproduces_losses_exactly(tmp_path, assets):
    """Dropout, class dropout and drop-path on: interrupted at step 5 and resumed == uninterrupted, bit for bit."""
    over = [*BASE, "train.steps=12", "model.drop_path_rate=0.3"]
    full = train(compose_cfg(tmp_path, assets, over, run="full"))
    part1 = train(compose_cfg(tmp_path, assets, [*over, "train.stop_after=5"], run="cut"))
    assert part1["stopped_early"] and part1["step"] == 5
    assert [s for s, _ in list_checkpoints(tmp_path / "cut" / "checkpoints")] == [4, 5]
    part2 = train(compose_cfg(tmp_path, assets, over, run="cut"))
    assert part2["resumed_from"].endswith("ckpt-00000005.pt")
    assert part1["losses"] + part2["losses"] == full["losses"]
    a = TrainingCheckpoint.load(tmp_path / "full" / "checkpoints" / "ckpt-00000012.pt")
    b = TrainingCheckpoint.load(tmp_path / "cut" / "checkpoints" / "ckpt-00000012.pt")
    assert all(torch.equal(a.model[k], b.model[k]) for k in a.model)
    assert all(torch.equal(a.ema[k], b.ema[k]) for k in a.ema)


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_matches_uninterrupted(tmp_path, assets):
    """A real kill of the training process: the last good checkpoint survives and resume continues exactly."""
    args = _cli_overrides(tmp_path, assets, "train.steps=40", "train.ckpt_every=2")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    run_dir = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), *args, f"hydra.run.dir={run_dir}"],
                            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list_checkpoints(run_dir / "checkpoints")) < 2:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    found = list_checkpoints(run_dir / "checkpoints")
    assert found, "no checkpoint was written before the kill"
    killed_at = found[-1][0]
    assert killed_at < 40
    TrainingCheckpoint.load(found[-1][1])  # readable: the kill did not corrupt it
    resumed = subprocess.run([sys.executable, str(REPO / "train.py"), *args, f"hydra.run.dir={run_dir}"],
                             cwd=tmp_path, env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    full = train(compose_cfg(tmp_path, assets, [*BASE, "train.steps=40", "train.ckpt_every=2"], run="ref"))
    got = TrainingCheckpoint.load(run_dir / "checkpoints" / "ckpt-00000040.pt")
    ref = TrainingCheckpoint.load(tmp_path / "ref" / "checkpoints" / "ckpt-00000040.pt")
    assert all(torch.equal(got.model[k], ref.model[k]) for k in ref.model)
    assert full["step"] == 40


def test_grad_accumulation_equals_one_big_batch(tmp_path, assets):
    common = [*BASE, *NO_DROPOUT, "model.class_dropout_prob=0", "train.steps=3", "train.global_batch_size=16"]
    one = train(compose_cfg(tmp_path, assets, [*common, "train.grad_accum=1"], run="a1"))
    four = train(compose_cfg(tmp_path, assets, [*common, "train.grad_accum=4"], run="a4"))
    torch.testing.assert_close(torch.tensor(four["losses"]), torch.tensor(one["losses"]), rtol=1e-5, atol=1e-6)
    _assert_same_weights(tmp_path / "a4" / "checkpoints" / "ckpt-00000003.pt",
                         tmp_path / "a1" / "checkpoints" / "ckpt-00000003.pt")


@pytest.mark.slow
def test_two_processes_equal_one_process_with_double_batch(tmp_path, assets):
    """torchrun x 2 (gloo, per-process batch 4) vs 1 process with batch 8: same parameters."""
    common = _cli_overrides(tmp_path, assets, *NO_DROPOUT, "train.steps=4")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        "29533", str(REPO / "train.py"), *common, f"hydra.run.dir={tmp_path / 'ddp'}"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    train(compose_cfg(tmp_path, assets, [*BASE, *NO_DROPOUT, "train.steps=4"], run="single"))
    ddp = tmp_path / "ddp" / "checkpoints" / "ckpt-00000004.pt"
    assert TrainingCheckpoint.load(ddp).config["train"]["global_batch_size"] == 8
    _assert_same_weights(ddp, tmp_path / "single" / "checkpoints" / "ckpt-00000004.pt")


def test_failed_save_keeps_the_last_good_checkpoint(tmp_path, assets, monkeypatch):
    train(compose_cfg(tmp_path, assets, [*BASE, "train.steps=4"], run="r"))
    good = list_checkpoints(tmp_path / "r" / "checkpoints")
    assert [s for s, _ in good] == [4]

    def broken_save(obj, f):
        f.write(b"partial bytes")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        train(compose_cfg(tmp_path, assets, [*BASE, "train.steps=8"], run="r"))
    monkeypatch.undo()
    names = sorted(p.name for p in (tmp_path / "r" / "checkpoints").iterdir())
    assert names == ["ckpt-00000004.pt"]  # no temp file left, the good one untouched
    assert TrainingCheckpoint.load(good[0][1]).step == 4


def test_non_finite_loss_stops_with_a_clear_message(tmp_path, assets, monkeypatch):
    from masc_llamagen.models import gpt as gpt_module

    train(compose_cfg(tmp_path, assets, [*BASE, "train.steps=4"], run="n"))
    real_forward = gpt_module.GPT.forward

    def nan_forward(self, *a, **kw):
        logits, loss = real_forward(self, *a, **kw)
        return logits, loss * float("nan")

    monkeypatch.setattr(gpt_module.GPT, "forward", nan_forward)
    with pytest.raises(TrainingError, match=r"loss became nan at step 5.*ckpt-00000004\.pt"):
        train(compose_cfg(tmp_path, assets, [*BASE, "train.steps=8"], run="n"))


def test_resume_with_another_k_is_refused(tmp_path, assets):
    train(compose_cfg(tmp_path, assets, [*BASE, "train.steps=4"], run="k"))
    with pytest.raises(TrainingError, match=r"cannot resume ckpt-00000004\.pt: head\.k: 16 -> 8 would change"):
        train(compose_cfg(tmp_path, assets, [*BASE, "head.k=8", "train.steps=8"], run="k"))


def test_checkpoint_is_self_describing_and_keeps_last_n(tmp_path, assets):
    train(compose_cfg(tmp_path, assets, [*BASE, "train.steps=12", "train.ckpt_every=2", "train.keep_last=2"],
                      run="s"))
    found = list_checkpoints(tmp_path / "s" / "checkpoints")
    assert [s for s, _ in found] == [10, 12]
    ck = TrainingCheckpoint.load(found[-1][1])
    assert ck.head["name"] == "random" and ck.head["k"] == 16 and ck.head["mapping"].shape == (64,)
    assert ck.model_config["vocab_size"] == 16 and ck.tokenizer.codebook_sha256
    assert (tmp_path / "s" / "config_resolved.yaml").is_file() and (tmp_path / "s" / "run.json").is_file()
    model = load_gpt(found[-1][1])  # EMA weights, config from the file: no flags
    assert model.config.vocab_size == 16


def test_codes_from_another_tokenizer_are_refused(tmp_path, assets):
    other = make_assets(tmp_path / "other", codebook_size=64)
    torch.manual_seed(1)
    from masc_llamagen.weights import load_vq, save_weights

    vq = load_vq(other["tokenizer"])
    with torch.no_grad():
        vq.quantize.embedding.weight.add_(1.0)
    save_weights(tmp_path / "changed.safetensors", vq, vq.config, kind="vq")
    cfg = compose_cfg(tmp_path, assets, [*BASE, "train.steps=2"], run="t")
    cfg.tokenizer.checkpoint = str(tmp_path / "changed.safetensors")
    with pytest.raises(TrainingError, match="were extracted with tokenizer"):
        train(cfg)


@pytest.mark.slow
def test_in_training_fid_grids_and_acceleration_are_logged(tmp_path, monkeypatch):
    """eval_every: FID/KID of EMA samples vs held-out Fashion-MNIST; a baseline curve gives acceleration."""
    import json

    from masc_llamagen.data.images import DatasetNotFoundError, build_image_dataset
    from masc_llamagen.eval.inception import random_inception_weights

    try:
        build_image_dataset("fashion_mnist", "test")
    except DatasetNotFoundError as e:
        pytest.skip(str(e))
    monkeypatch.setenv("MASC_INCEPTION_WEIGHTS", str(random_inception_weights(tmp_path / "inc.pth")))
    assets = make_assets(tmp_path / "assets", classes=10)  # Fashion-MNIST's classes, for its held-out images
    baseline = tmp_path / "baseline.jsonl"
    baseline.write_text("\n".join(json.dumps({"step": s, "eval/fid": f}) for s, f in [(2, 1e9), (4, 1e8)]))
    cfg = compose_cfg(tmp_path, assets, [*BASE, "train.steps=4", "train.eval_every=2", "train.eval_samples=8",
                                         "train.eval_reference=8", "train.eval_feature_layer=192",
                                         "train.sample_every=4", "data.image_size=16", "train.eval_heldout=6",
                                         f"train.baseline_curve={baseline}"], run="e")
    train(cfg)
    rows = [json.loads(x) for x in (tmp_path / "e" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/fid" in r]
    assert [r["step"] for r in evals] == [2, 4]
    assert all(r["eval/fid"] > 0 and "eval/kid_mean" in r and r["eval/wall_clock_s"] > 0 for r in evals)
    assert evals[-1]["eval/acceleration"] == pytest.approx(1 - 2 / 4)  # below the baseline's final FID at step 2
    assert (tmp_path / "e" / "samples" / "step00000004.png").is_file()

    # held-out likelihood (train.eval_heldout=6): recomputed from the final checkpoint's EMA weights, with the
    # first 6 held-out images encoded one by one here
    path = tmp_path / "e" / "checkpoints" / "ckpt-00000004.pt"
    ck = TrainingCheckpoint.load(path)
    model, vq = load_gpt(path, prefer_ema=True).eval(), load_vq(assets["tokenizer"]).eval()
    ds = build_image_dataset("fashion_mnist", "test", image_size=16)
    with torch.no_grad():
        codes = torch.cat([vq.encode(ds[i][0][None]).reshape(1, -1) for i in range(6)])
    labels = torch.tensor([int(ds[i][1]) for i in range(6)])
    want = heldout_diagnostics(model, {"uniform": ck.vocabulary("uniform")}, codes, labels)
    got = {k.removeprefix("eval/heldout/"): v for k, v in evals[-1].items() if k.startswith("eval/heldout/")}
    assert got == pytest.approx({k: float(v) for k, v in want.items()}, rel=1e-6)


@pytest.mark.slow
def test_sigterm_saves_and_exits_cleanly_then_resumes(tmp_path, assets):
    """Cluster pre-emption: SIGTERM -> checkpoint at the current step, exit code 0; rerun finishes the run."""
    args = _cli_overrides(tmp_path, assets, "train.steps=100000", "train.ckpt_every=1000")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    run_dir = tmp_path / "term"
    proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), *args, f"hydra.run.dir={run_dir}"],
                            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    metrics = run_dir / "metrics.jsonl"
    while time.time() < deadline and (not metrics.is_file() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    found = list_checkpoints(run_dir / "checkpoints")
    assert len(found) == 1 and 3 <= found[0][0] < 1000  # saved at the step it stopped, not a scheduled one
    resumed = train(compose_cfg(tmp_path, assets, [*BASE, f"train.steps={found[0][0] + 2}"], run="term"))
    assert resumed["resumed_from"].endswith(found[0][1].name) and resumed["step"] == found[0][0] + 2


def test_ema_warms_up_so_short_runs_are_not_the_initialisation():
    from masc_llamagen.train.ema import EMA

    model = torch.nn.Linear(3, 3, bias=False)
    with torch.no_grad():
        model.weight.zero_()
    ema = EMA(model, decay=0.999)
    with torch.no_grad():
        model.weight.fill_(1.0)
    for _ in range(600):
        ema.update(model)
    # hand computation of the warmed-up product of decays
    keep = 1.0
    for n in range(600):
        keep *= min(0.999, (1 + n) / (10 + n))
    assert ema.shadow["weight"][0, 0].item() == pytest.approx(1 - keep, rel=1e-5)
    assert keep < 0.6 * 0.999**600  # far less of the initialisation than a constant decay would keep


@pytest.mark.slow
def test_fsdp_two_processes_with_resume_match_one_process(tmp_path, assets):
    """FSDP2 (gloo, 2 ranks), interrupted after 2 steps and resumed, ends where 1 process x 8 does after 4."""
    common = _cli_overrides(tmp_path, assets, *NO_DROPOUT, "train.distributed=fsdp", "train.steps=4",
                            f"hydra.run.dir={tmp_path / 'f'}")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for i, extra in enumerate((["train.stop_after=2"], [])):
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                            str(29560 + i), str(REPO / "train.py"), *common, *extra],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
    assert [s for s, _ in list_checkpoints(tmp_path / "f" / "checkpoints")] == [2, 4]
    train(compose_cfg(tmp_path, assets, [*BASE, *NO_DROPOUT, "train.steps=4"], run="one"))
    for ema in (False, True):
        _assert_same_weights(tmp_path / "f" / "checkpoints" / "ckpt-00000004.pt",
                             tmp_path / "one" / "checkpoints" / "ckpt-00000004.pt", prefer_ema=ema)


@pytest.mark.slow
def test_cli_user_errors_are_one_line(tmp_path, assets):
    args = [f"tokenizer.checkpoint={assets['tokenizer']}", f"data.codes={assets['codes']}", "debug=default",
            "head=masc", "head.k=65", f"paths.root={tmp_path}", f"paths.artifacts={tmp_path / 'a'}",
            f"hydra.run.dir={tmp_path / 'r'}"]
    r = subprocess.run([sys.executable, str(REPO / "train.py"), *args], cwd=tmp_path, capture_output=True, text=True,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1] == ("error: k=65 is out of range: a codebook of N=64 tokens can be cut "
                                                 "into 1 <= k <= 64 clusters")
    assert "Traceback" not in r.stderr


def test_flat_head_logs_marginal_coarse_ce_on_masc_clusters(tmp_path, assets):
    import json

    train(compose_cfg(tmp_path, assets, ["head=flat", "head.compare_k=16", "train.global_batch_size=8",
                                         "train.log_every=1", "train.steps=3"], run="m"))
    rows = [json.loads(x) for x in (tmp_path / "m" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3
    for r in rows:
        # summing a distribution over a cluster can only raise the target's probability
        assert 0 < r["train/marginal_coarse_ce_bits"] <= r["train/fine_nll_bits"] + 1e-6
    assert rows[0]["train/fine_nll_bits"] == pytest.approx(6.0, abs=0.05)  # zero-init head: log2(64) at start


def test_warmup_cosine_is_torchs_linear_warmup_then_cosine_annealing():
    from masc_llamagen.train.optim import build_scheduler

    def lrs(make):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2e-4)
        sched, out = make(opt), []
        for _ in range(100):
            out.append(sched.get_last_lr()[0])
            opt.step()
            sched.step()
        return out

    ours = lrs(lambda o: build_scheduler(o, 100, "cosine", 10, 2e-4, 2e-5))
    ref = lrs(lambda o: torch.optim.lr_scheduler.SequentialLR(o, [
        torch.optim.lr_scheduler.LinearLR(o, start_factor=1 / 10, end_factor=1.0, total_iters=9),
        torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=90, eta_min=2e-5)], milestones=[10]))
    torch.testing.assert_close(torch.tensor(ours, dtype=torch.float64), torch.tensor(ref, dtype=torch.float64),
                               rtol=1e-9, atol=0)


def test_checkpoint_older_than_an_option_resumes_only_at_the_value_its_run_had():
    """model.drop_path_rate came after runs existed: a checkpoint without it resumes at 0, not at another rate."""
    from masc_llamagen.train.checkpointing import resume_differences

    saved = {"model": {"arch": "GPT-nano"}}
    assert resume_differences(saved, {"model": {"arch": "GPT-nano", "drop_path_rate": 0.0}}, 1, 1) == ([], [])
    refused, _ = resume_differences(saved, {"model": {"arch": "GPT-nano", "drop_path_rate": 0.1}}, 1, 1)
    assert refused == ["model.drop_path_rate: '<absent>' -> 0.1"]
