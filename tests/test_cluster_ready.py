"""The GPU path's defects, caught on CPU: device placement, compile, ImageNet layout, CFG null row, metrics.

Each test here failed on the code before the fix it names (the EMA built before ``accelerate.prepare``, a compiled
model's ``_orig_mod.`` keys, ``data.root`` at ``imagenet/train``, no null row at class dropout 0, an FID curve that
restarted empty on resume, SXM peaks for PCIe cards, checkpoint time counted as training time, a host sync per step).
"""

import json
import types

import pytest
import torch
from train_utils import compose_cfg, make_assets

from masc_llamagen.checkpoint import TrainingCheckpoint
from masc_llamagen.train import build
from masc_llamagen.train.checkpointing import list_checkpoints
from masc_llamagen.train.loop import train
from masc_llamagen.weights import load_gpt

BASE = ["head=random", "head.k=16", "train.global_batch_size=8", "train.log_every=1", "train.ckpt_every=4"]
NO_DROPOUT = ["model.token_dropout_p=0", "model.resid_dropout_p=0", "model.ffn_dropout_p=0"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("assets"))


class _MetaAccelerator:
    """Stands in for a GPU: ``prepare`` moves the model to another device (meta), as Accelerate moves it to CUDA."""

    device = torch.device("meta")

    def prepare(self, model, opt):
        return model.to("meta"), opt

    def unwrap_model(self, model):
        return model


def test_ema_lives_where_the_prepared_model_lives(tmp_path, assets):
    cfg = compose_cfg(tmp_path, assets, [*BASE, "train.ema=true"])
    model = build.build_model(cfg, types.SimpleNamespace(vocab_size=16, is_flat=False), 16, 4)
    opt = torch.optim.AdamW(model.parameters())
    shadow = {k: torch.zeros_like(v) for k, v in model.state_dict().items() if v.is_floating_point()}
    ck = TrainingCheckpoint(step=3, ema_updates=3, model={}, optimizer={}, rng=[], ema=shadow)
    for resume in (None, ck):
        _, _, raw, ema = build.prepare_model(_MetaAccelerator(), cfg, model, opt, resume)
        devices = {v.device.type for v in ema.shadow.values()}
        assert devices == {"meta"}, f"EMA shadows on {devices}, model on meta"
        assert set(ema.shadow) == {k for k, v in raw.state_dict().items() if v.is_floating_point()}


def test_fused_adamw_when_training_on_cuda():
    from masc_llamagen.train.optim import build_optimizer

    model = torch.nn.Linear(4, 4)  # still on the CPU, as when the loop builds the optimizer before prepare
    assert build_optimizer(model, 1e-4, (0.9, 0.95), 1e-8, 0.05, device=torch.device("cuda")).defaults["fused"]
    assert not build_optimizer(model, 1e-4, (0.9, 0.95), 1e-8, 0.05, device=torch.device("cpu")).defaults["fused"]


@pytest.mark.slow
def test_compiled_training_resumes_exactly_and_writes_plain_keys(tmp_path, assets):
    over = [*BASE, *NO_DROPOUT, "train.compile=true", "train.steps=6"]
    full = train(compose_cfg(tmp_path, assets, over, run="full"))
    part = train(compose_cfg(tmp_path, assets, [*over, "train.stop_after=3"], run="cut"))
    rest = train(compose_cfg(tmp_path, assets, over, run="cut"))
    # Inductor may regenerate (and re-fuse) kernels in a new invocation: equal to float rounding, not bit for bit
    # (measured: 1 ulp at one step of six); the uncompiled loop is bit-exact (test_train.py).
    torch.testing.assert_close(part["losses"] + rest["losses"], full["losses"], rtol=1e-6, atol=0)
    ck = TrainingCheckpoint.load(tmp_path / "cut" / "checkpoints" / "ckpt-00000006.pt")
    assert not [k for k in [*ck.model, *ck.ema] if "_orig_mod" in k]
    load_gpt(tmp_path / "cut" / "checkpoints" / "ckpt-00000006.pt")  # strict


def test_imagenet_config_finds_train_and_val_splits(tmp_path):
    from hydra import compose, initialize_config_dir
    from PIL import Image
    from train_utils import CONFIGS

    from masc_llamagen.config import register
    from masc_llamagen.data.images import build_image_dataset, heldout_split

    for split in ("train", "val"):
        (tmp_path / "imagenet" / split / "n01440764").mkdir(parents=True)
        Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / "imagenet" / split / "n01440764" / f"{split}.png")
    register()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIGS)):
        cfg = compose("train", overrides=["data=imagenet", f"paths.data={tmp_path}", "tokenizer=llamagen_vq16"])
    train_ds = build_image_dataset(cfg.data.name, "train", 8, root=cfg.data.root)
    held = build_image_dataset(cfg.data.name, heldout_split(cfg.data.name), 8, root=cfg.data.root)
    assert [p.name for p, _ in train_ds.samples] == ["train.png"] and [p.name for p, _ in held.samples] == ["val.png"]


def test_cfg_sampling_works_without_class_dropout(tmp_path, assets):
    from masc_llamagen.models.sampling import SamplingConfig, generate

    train(compose_cfg(tmp_path, assets, [*BASE, "model.class_dropout_prob=0", "train.steps=1"], run="z"))
    model = load_gpt(tmp_path / "z" / "checkpoints" / "ckpt-00000001.pt")
    assert model.cls_embedding.embedding_table.num_embeddings == model.config.num_classes + 1
    out = generate(model, torch.arange(4), sampling=SamplingConfig(cfg_scale=2.0), generator=torch.Generator())
    assert out.shape == (4, 16)


def test_released_layout_keeps_upstream_rule_for_the_null_row():
    from masc_llamagen.models.gpt import GPT, gpt_config

    for p, rows in ((0.1, 11), (0.0, 10)):
        m = GPT(gpt_config("GPT-nano", vocab_size=8, block_size=4, num_classes=10, class_dropout_prob=p))
        assert m.cls_embedding.embedding_table.num_embeddings == rows


def test_mfu_peak_tells_pcie_from_sxm():
    from masc_llamagen.train.throughput import peak_flops_for_name

    assert peak_flops_for_name("NVIDIA H100 PCIe") == 756e12
    assert peak_flops_for_name("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops_for_name("NVIDIA H100 NVL") == 835e12
    assert peak_flops_for_name("NVIDIA L40S") == 362e12 and peak_flops_for_name("NVIDIA L40") == 181e12
    assert peak_flops_for_name("Some Future GPU") is None


def test_throughput_excludes_checkpoint_time(tmp_path, assets, monkeypatch):
    import time

    real = TrainingCheckpoint.save

    def slow_save(self, path):
        time.sleep(0.6)
        return real(self, path)

    monkeypatch.setattr(TrainingCheckpoint, "save", slow_save)
    train(compose_cfg(tmp_path, assets, [*BASE, "train.steps=4", "train.ckpt_every=1", "train.log_every=2"],
                      run="t"))
    rows = [json.loads(x) for x in (tmp_path / "t" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4]
    # every step saved (>= 0.6 s each, so counted in it would give >= 0.6 s/step); a GPT-nano step on 8 images
    # takes well under 0.1 s even on a busy 2-core machine
    assert all(r["train/step_time_s"] < 0.45 for r in rows), [r["train/step_time_s"] for r in rows]
    assert all(r["train/tokens_per_s"] == pytest.approx(r["train/images_per_s"] * 16) for r in rows)


def test_no_host_sync_on_steps_that_do_not_log(tmp_path, assets, monkeypatch):
    """Reads of a tensor's value (item, tolist, bool, float) happen per log, not per step.

    Not counted: torch.optim's own reads of its step counters, host tensors by design (fused CUDA AdamW reads none).
    """
    import traceback

    counts = {"n": 0}
    for name in ("item", "tolist", "__bool__", "__float__"):
        real = getattr(torch.Tensor, name)

        def counting(self, *a, _real=real, **kw):
            if "torch/optim/" not in traceback.extract_stack(limit=2)[0].filename:
                counts["n"] += 1
            return _real(self, *a, **kw)

        monkeypatch.setattr(torch.Tensor, name, counting)
    seen = []
    for steps in (10, 30):
        counts["n"] = 0
        train(compose_cfg(tmp_path, assets, [*BASE, f"train.steps={steps}", f"train.log_every={steps}",
                                             f"train.ckpt_every={steps}", "train.ema=false"], run=f"s{steps}"))
        seen.append(counts["n"])
    assert seen[0] == seen[1], f"value reads grew with the number of steps: {seen}"


def test_fid_curve_and_acceleration_continue_after_resume(tmp_path, assets, monkeypatch):
    """A resumed run computes acceleration over its whole FID curve, not only the points after the restart."""
    from masc_llamagen.train import evaluate

    fids = {2: 50.0, 4: 10.0, 6: 9.0}

    def fake_fid(self, raw, ema, step, wall_s):  # the curve bookkeeping, without Inception
        self.fid_curve.append((float(step), fids[step]))
        from masc_llamagen.eval.acceleration import acceleration

        return {"eval/fid": fids[step], **{f"eval/{k}": v for k, v in
                                            acceleration(self.fid_curve, self._baseline).items() if v is not None}}

    monkeypatch.setattr(evaluate.TrainingSampler, "fid", fake_fid)
    baseline = tmp_path / "baseline.jsonl"
    baseline.write_text("\n".join(json.dumps({"step": s, "eval/fid": f}) for s, f in [(2, 60.0), (6, 12.0)]))
    over = [*BASE, "train.steps=6", "train.eval_every=2", "train.eval_heldout=0", f"train.baseline_curve={baseline}"]
    train(compose_cfg(tmp_path, assets, [*over, "train.stop_after=4"], run="a"))
    train(compose_cfg(tmp_path, assets, over, run="a"))
    rows = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/fid" in r]
    assert [r["step"] for r in evals] == [2, 4, 6]  # no duplicates, none lost
    # the run reached the baseline's final FID (12) between steps 2 (50) and 4 (10): at 2 + 2 * 38/40 = 3.9
    assert evals[-1]["eval/acceleration"] == pytest.approx(1 - 3.9 / 6)
    assert [s for s, _ in list_checkpoints(tmp_path / "a" / "checkpoints")][-1] == 6


@pytest.mark.slow
def test_missing_default_dataset_is_one_line_with_the_command(tmp_path):
    """`make train` on a fresh machine: the set-up script installs the dataset or names the command, no traceback."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    (tmp_path / "bin").mkdir()
    fake = tmp_path / "bin" / "apt-get"
    fake.write_text("#!/bin/sh\nexit 100\n")  # a machine where the package cannot be installed
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}",
           "FASHION_MNIST_PROBE": str(tmp_path / "absent.gz"), "MASC_DATA": str(tmp_path / "data")}
    r = subprocess.run(["bash", str(repo / "scripts" / "ensure_data.sh")], env=env, capture_output=True, text=True)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1
    assert "apt-get install -y dataset-fashion-mnist" in r.stderr
    # The pipeline itself, pointed at an empty data folder, fails in one line as well.
    env = {**os.environ, "MASC_DATA": str(tmp_path / "data"), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    (tmp_path / "data" / "fashion_mnist").mkdir(parents=True)
    r = subprocess.run([sys.executable, "-m", "masc_llamagen.pipeline", "pipeline.stages=[tokenizer]",
                        f"paths.artifacts={tmp_path / 'a'}"], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1].startswith("error: ")
