"""Tokenizer training: a real (short) run on Fashion-MNIST, exact resume after a stop or a kill, dead-code
re-seeding, the output's loaders, the up-to-date skip (old reports included), one-line config errors, and the
PSNR/SSIM metrics against hand computations and skimage."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from masc_llamagen.data.images import build_image_dataset, default_root
from masc_llamagen.errors import ConfigError, TrainingError
from masc_llamagen.tokenizer.losses import (
    PERCEPTUAL_LOSSES,
    PatchDiscriminator,
    PerceptualUnavailableError,
    VGGPerceptual,
    hinge_d_loss,
    register_perceptual,
)
from masc_llamagen.tokenizer.metrics import codebook_stats, psnr, ssim
from masc_llamagen.tokenizer.reseed import reseed_dead_codes
from masc_llamagen.tokenizer.vq import VectorQuantizer, VQModel
from masc_llamagen.train.tokenizer import report_path, train_tokenizer, up_to_date_report
from masc_llamagen.train.tokenizer_config import build_vq_config, config_record, resolve_config, run_dir_of
from masc_llamagen.weights import load_vq

ROOT = Path(__file__).resolve().parents[1]
HAVE_FASHION = (default_root("fashion_mnist") / "train-images-idx3-ubyte.gz").is_file()
needs_fashion = pytest.mark.skipif(
    not HAVE_FASHION, reason="Fashion-MNIST absent (sudo apt-get install -y dataset-fashion-mnist)")

# A few-second run: enough steps for the loss to fall well below a fresh model's, on real images.
SMALL = {"steps": 20, "batch_size": 16, "lr": 2e-3, "warmup_steps": 2, "reseed_every": 5, "eval_images": 48,
         "rfid_images": 0, "eval_batch_size": 48, "num_threads": 1, "progress": False, "seed": 0,
         "logger": {"kind": "none"}}
# Resume runs: a handful of images per step, every optional term on, so each piece of state must come back.
TINY = {**SMALL, "steps": 9, "batch_size": 4, "warmup_steps": 1, "reseed_every": 3, "eval_images": 8,
        "eval_batch_size": 8, "ckpt_every": 3, "log_every": 1, "adversarial_weight": 0.5, "disc_start": 2,
        "disc_ch": 8, "data": {"random_flip": True}}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[dict, dict]:
    if not HAVE_FASHION:
        pytest.skip("Fashion-MNIST absent (sudo apt-get install -y dataset-fashion-mnist)")
    cfg = {**SMALL, "out": str(tmp_path_factory.mktemp("vq") / "vq.safetensors")}
    return cfg, train_tokenizer(cfg)


# ----------------------------------------------------------------------------------------------------------------
# Metrics


def test_psnr_matches_hand_computation():
    a = np.zeros((2, 12, 12, 3), dtype=np.uint8)
    b = a.copy()
    b[0, 0, 0, 0] = 10  # one pixel off by 10: MSE = 100 / 432
    b[1] = 255  # all off by 255: PSNR 0 dB
    got = psnr(a, b)
    assert got[0].item() == pytest.approx(10 * np.log10(255**2 / (100 / 432)), rel=1e-12)
    assert got[1].item() == pytest.approx(0.0, abs=1e-12)
    assert psnr(a, a)[0].item() == float("inf")


def test_ssim_matches_skimage():
    structural_similarity = pytest.importorskip("skimage.metrics").structural_similarity
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:32, :32]
    smooth = (127 + 100 * np.sin(xx / 4.0) * np.cos(yy / 5.0)).astype(np.uint8)
    a = np.stack([np.stack([smooth] * 3, -1), rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)])
    b = np.clip(a.astype(int) + rng.integers(-30, 30, a.shape), 0, 255).astype(np.uint8)
    ours = ssim(a, b)
    for i in range(2):
        ref = structural_similarity(a[i], b[i], channel_axis=-1, data_range=255, gaussian_weights=True, sigma=1.5,
                                    use_sample_covariance=False)
        assert ours[i].item() == pytest.approx(ref, abs=1e-10)
    assert ssim(a, a).tolist() == pytest.approx([1.0, 1.0])


def test_codebook_stats():
    s = codebook_stats(torch.tensor([5, 5, 5, 5, 0, 0, 0, 0]))
    assert s["codebook_usage"] == 0.5 and s["codes_used"] == 4 and s["perplexity"] == pytest.approx(4.0)


# ----------------------------------------------------------------------------------------------------------------
# Dead-code re-seeding


def test_reseed_moves_dead_codes_onto_encoder_outputs():
    torch.manual_seed(0)
    q = VectorQuantizer(64, 8)
    latents = torch.randn(2, 8, 4, 4)  # 32 encoder outputs, all in the half-space x0 > 0
    latents[:, 0] = latents[:, 0].abs() + 3.0
    z = F.normalize(latents.permute(0, 2, 3, 1).reshape(-1, 8), dim=-1)
    with torch.no_grad():  # force codes 8..63 dead: collapsed onto -e0, behind every output; 0..7 near outputs
        q.embedding.weight[8:] = -F.one_hot(torch.tensor(0), 8).float()
        q.embedding.weight[:8] = F.normalize(z[:8] + 0.05 * torch.randn(8, 8), dim=-1)
    opt = torch.optim.Adam(q.parameters(), lr=1e-3)
    zq, _, losses = q(latents)
    (losses.codebook_loss + zq.sum() * 0).backward()
    opt.step()
    before = q.embedding.weight.detach().clone()
    used = torch.bincount(q.nearest(latents).flatten(), minlength=64)
    assert used[8:].sum() == 0  # the hand-made case: only the first 8 codes are used

    dead = torch.zeros(64, dtype=torch.bool)
    dead[8:28] = True  # 20 dead codes, fewer than the 32 outputs: distinct positions
    n = reseed_dead_codes(q, latents, dead, torch.Generator().manual_seed(0), opt)
    assert n == 20
    w = q.embedding.weight.detach()
    dist = (w[8:28, None] - z[None]).norm(dim=-1)  # exact (cdist's matmul path is off by ~1e-4)
    assert dist.min(1).values.max() < 1e-6  # every re-seeded code sits on an encoder output ...
    assert len(set(dist.argmin(1).tolist())) == 20  # ... a different one each
    assert torch.equal(w[:8], before[:8]) and torch.equal(w[28:], before[28:])  # the others are untouched
    assert opt.state[q.embedding.weight]["exp_avg"][8:28].abs().sum() == 0
    revived = torch.bincount(q.nearest(latents).flatten(), minlength=64)[8:28]
    assert (revived > 0).sum() == 20  # and the search uses them at once

    dead = torch.zeros(64, dtype=torch.bool)
    dead[28:] = True  # 36 dead codes, more than the 32 outputs: repeats are jittered apart
    assert reseed_dead_codes(q, latents, dead, torch.Generator().manual_seed(1)) == 36
    w = q.embedding.weight.detach()
    assert (w[28:, None] - z[None]).norm(dim=-1).min(1).values.max() < 1e-2
    assert torch.unique(w[28:], dim=0).shape[0] == 36
    assert w[8:].norm(dim=1).sub(1).abs().max() < 1e-5  # on the sphere the quantiser searches


# ----------------------------------------------------------------------------------------------------------------
# A real run


@pytest.mark.slow
@needs_fashion
def test_training_reduces_loss_on_real_images(trained):
    cfg, report = trained
    assert report["skipped"] is False and report["steps"] == 20
    test = build_image_dataset("fashion_mnist", "test", image_size=32)
    x = torch.stack([test[i][0] for i in range(32)])
    torch.manual_seed(cfg["seed"])
    fresh = VQModel(build_vq_config(resolve_config(cfg).vq)).eval()
    model = load_vq(cfg["out"])
    with torch.no_grad():
        before = F.mse_loss(fresh.decode_code(fresh.encode(x)), x).item()
        after = F.mse_loss(model.decode_code(model.encode(x)), x).item()
    assert after < 0.5 * before, (before, after)
    for key in ("wall_time_s", "psnr", "ssim", "codebook_usage", "perplexity", "final_losses", "rfid_note"):
        assert key in report
    assert report["heldout_images"] == 48 and report["rfid"] is None and "rfid_images=0" in report["rfid_note"]
    assert 0 < report["codebook_usage"] <= 1 and report["reseeded_codes_total"] > 0
    assert json.loads(Path(cfg["out"] + ".json").read_text())["weights_sha256"] == report["weights_sha256"]


@needs_fashion
def test_output_loads_and_tree_build_accepts_it(trained, tmp_path):
    from masc_llamagen.masc.tree_cli import TreeJob, load_codebook, run

    cfg, report = trained
    model = load_vq(cfg["out"])  # no config flag: the file describes itself
    assert model.config.to_dict() == report["vq_config"] and model.codebook_size == 1024
    cb = load_codebook(cfg["out"])
    assert cb.shape == (1024, 8)
    assert np.allclose(cb, model.quantize.embedding.weight.detach().numpy())
    assert run(TreeJob(action="build", codebook=cfg["out"], tree=str(tmp_path / "tree.npz"))).is_file()


@needs_fashion
def test_skip_if_up_to_date(trained):
    cfg, report = trained
    mtime = os.stat(cfg["out"]).st_mtime_ns
    again = train_tokenizer(cfg)
    assert again["skipped"] is True and again["weights_sha256"] == report["weights_sha256"]
    assert os.stat(cfg["out"]).st_mtime_ns == mtime
    assert train_tokenizer({**cfg, "progress": True})["skipped"] is True  # runtime-only keys do not count
    assert up_to_date_report({**cfg, "steps": 21}) is None  # a different config is not up to date
    assert up_to_date_report({**cfg, "vq": {"codebook_size": 512}}) is None


# ----------------------------------------------------------------------------------------------------------------
# Exact resume


def _same_weights(a, b) -> bool:
    """Tensor for tensor: the files' bytes (and SHA-256) may differ, safetensors orders its metadata at random."""
    sa, sb = load_vq(a).state_dict(), load_vq(b).state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[dict, dict]:
    if not HAVE_FASHION:
        pytest.skip("Fashion-MNIST absent (sudo apt-get install -y dataset-fashion-mnist)")
    cfg = {**TINY, "out": str(tmp_path_factory.mktemp("whole") / "vq.safetensors")}
    return cfg, train_tokenizer(cfg)


@needs_fashion
def test_stopped_and_resumed_run_is_bit_identical(uninterrupted, tmp_path):
    ref_cfg, ref = uninterrupted
    cfg = {**TINY, "out": str(tmp_path / "vq.safetensors")}
    first = train_tokenizer({**cfg, "stop_after": 5})  # between checkpoints, after a re-seed and the GAN's start
    assert first["stopped"] is True and first["step"] == 5 and not Path(cfg["out"]).exists()
    assert up_to_date_report(cfg) is None
    done = train_tokenizer(cfg)
    assert done["resumed_from"] == 5 and _same_weights(cfg["out"], ref_cfg["out"])
    assert done["final_losses"] == ref["final_losses"] and done["reseeded_codes_total"] == ref["reseeded_codes_total"]
    assert not (run_dir_of(resolve_config(cfg)) / "train_state.pt").exists()  # finished: nothing left to resume
    ref_rows = (run_dir_of(resolve_config(ref_cfg)) / "metrics.jsonl").read_text().splitlines()
    rows = (run_dir_of(resolve_config(cfg)) / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in rows] == [json.loads(r)["step"] for r in ref_rows]


@needs_fashion
def test_killed_run_resumes_from_its_last_checkpoint(uninterrupted, tmp_path):
    """A kill loses the steps after the last periodic checkpoint; they are trained again, to the same weights."""
    ref_cfg, ref = uninterrupted
    cfg = {**TINY, "out": str(tmp_path / "vq.safetensors")}
    state = run_dir_of(resolve_config(cfg)) / "train_state.pt"
    train_tokenizer({**cfg, "stop_after": 3})  # the periodic checkpoint at step 3 ...
    at_3 = state.read_bytes()
    train_tokenizer({**cfg, "stop_after": 4})  # ... then 4 more steps logged; killed before the next checkpoint
    state.write_bytes(at_3)
    done = train_tokenizer(cfg)
    assert done["resumed_from"] == 3 and _same_weights(cfg["out"], ref_cfg["out"])
    assert done["final_losses"] == ref["final_losses"]
    steps = [json.loads(r)["step"] for r in (state.parent / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and len(set(steps)) == len(steps) - 1  # only the eval row shares the last step


@needs_fashion
def test_resume_refuses_a_state_of_another_config(tmp_path):
    cfg = {**TINY, "out": str(tmp_path / "vq.safetensors")}
    train_tokenizer({**cfg, "stop_after": 2})
    with pytest.raises(TrainingError, match=r"lr: 0\.002 -> 0\.001.*resume=false"):
        train_tokenizer({**cfg, "lr": 1e-3})
    assert train_tokenizer({**cfg, "lr": 1e-3, "resume": False, "stop_after": 1})["step"] == 1


@pytest.mark.slow
@needs_fashion
def test_two_processes_train_what_one_does(tmp_path):
    """DDP on 2 CPU processes (gloo) sees the same global batches and re-seeds the same codes as 1 process."""
    cfg = {**TINY, "adversarial_weight": 0.0, "data": {"random_flip": False}, "device": "cpu",
           "out": str(tmp_path / "one.safetensors")}
    one = train_tokenizer(cfg)
    args = [f"{k}={v}" for k, v in cfg.items() if k not in ("logger", "data", "out")]
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m",
                          "masc_llamagen.train.tokenizer", *args, "logger.kind=none",
                          f"out={tmp_path / 'two.safetensors'}"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    two = json.loads(report_path(tmp_path / "two.safetensors").read_text())
    assert two["processes"] == 2 and two["reseeded_codes_total"] == one["reseeded_codes_total"]
    a = dict(load_vq(cfg["out"]).named_parameters())
    b = dict(load_vq(tmp_path / "two.safetensors").named_parameters())
    assert all(torch.allclose(a[k], b[k], atol=1e-3) for k in a)  # gradients averaged in another order only


@pytest.mark.slow  # a subprocess: the slow tier
@needs_fashion
def test_cli_reports_up_to_date(trained):
    cfg, _ = trained
    args = [f"{k}={v}" for k, v in cfg.items() if k != "logger"] + ["logger.kind=none"]
    res = subprocess.run([sys.executable, "-m", "masc_llamagen.train.tokenizer", *args], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "up to date" in res.stdout and "PSNR" in res.stdout


@needs_fashion
def test_force_retrains_and_optional_terms_plug_in(tmp_path):
    calls = []

    @register_perceptual("test_l1")
    def _l1(cfg):  # what a user with LPIPS weights would register
        class L1(torch.nn.Module):
            def forward(self, recon, target):
                calls.append(1)
                return (recon - target).abs().mean()

        return L1()

    cfg = {**SMALL, "steps": 2, "batch_size": 4, "eval_images": 4, "eval_batch_size": 4, "reseed_every": 0,
           "adversarial_weight": 0.5, "disc_start": 1, "perceptual": "test_l1", "perceptual_weight": 0.1,
           "out": str(tmp_path / "g.safetensors")}
    try:
        first = train_tokenizer(cfg)
    finally:
        PERCEPTUAL_LOSSES.pop("test_l1")
    assert first["adversarial"] is True and first["perceptual"] == "test_l1" and len(calls) == 2
    assert {"g_adv", "d_adv", "perceptual"} <= set(first["final_losses"])
    PERCEPTUAL_LOSSES["test_l1"] = _l1  # the up-to-date check needs no net; the forced retrain does
    try:
        assert train_tokenizer(cfg)["skipped"] is True
        assert train_tokenizer({**cfg, "force": True})["skipped"] is False
    finally:
        PERCEPTUAL_LOSSES.pop("test_l1")


def test_vgg_perceptual_distance():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    p = VGGPerceptual(torchvision.models.vgg16(weights=None).features).eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert p(x, x).item() == 0.0 and p(x, x.flip(0)).item() > 0


def test_patch_discriminator_and_hinge():
    d = PatchDiscriminator(3, 16, n_layers=2)
    logits = d(torch.randn(2, 3, 32, 32))
    assert logits.shape[:2] == (2, 1) and logits.shape[-1] > 1  # a map of patch logits, not one number
    assert hinge_d_loss(torch.full((4,), 2.0), torch.full((4,), -2.0)).item() == 0.0
    assert hinge_d_loss(torch.zeros(4), torch.zeros(4)).item() == pytest.approx(1.0)


# ----------------------------------------------------------------------------------------------------------------
# Config and errors


def test_perceptual_without_weights_is_one_clear_line(tmp_path):
    cfg = {"perceptual_weight": 0.1, "perceptual_weights": str(tmp_path / "missing_vgg16.pth"),
           "out": str(tmp_path / "p.safetensors"), "progress": False}
    with pytest.raises(PerceptualUnavailableError) as e:
        train_tokenizer(cfg)
    msg = str(e.value)
    assert "\n" not in msg and "missing_vgg16.pth" in msg and "perceptual_weight=0" in msg
    with pytest.raises(PerceptualUnavailableError, match="not registered"):
        train_tokenizer({**cfg, "perceptual": "no_such_net"})
    assert not (tmp_path / "p.safetensors").exists()


def test_config_out_follows_artifacts_and_vq_overrides_apply(tmp_path, monkeypatch):
    monkeypatch.setenv("MASC_ARTIFACTS", str(tmp_path))
    cfg = resolve_config()
    assert cfg.out == f"{tmp_path}/tokenizers/fmnist_vq_tiny.safetensors"
    assert cfg.logger.mode == "offline"  # never online unasked
    base = build_vq_config(cfg.vq)
    vq = build_vq_config(resolve_config({"vq": {"codebook_size": 512, "overrides": {"z_channels": 32}}}).vq)
    assert (vq.codebook_size, vq.z_channels) == (512, 32) and vq.ch == base.ch  # the rest stays the arch's
    with pytest.raises(ConfigError, match="no_such_field"):
        build_vq_config(resolve_config({"vq": {"overrides": {"no_such_field": 1}}}).vq)


@pytest.mark.parametrize("bad, names", [
    ({"stepz": 3}, ["stepz"]),
    ({"steps": "many"}, ["steps"]),
    ({"steps": 0, "lr": -1.0}, ["steps=0", "lr=-1.0"]),
    ({"mixed_precision": "fp8", "recon_loss": "l3"}, ["mixed_precision", "recon_loss"]),
    ({"betas": [0.9]}, ["betas"]),
    ({"data": {"image_size": 0}, "logger": {"kind": "mlflow"}}, ["data.image_size", "logger.kind"]),
])
def test_bad_config_is_one_config_error(bad, names, tmp_path):
    with pytest.raises(ConfigError) as e:
        train_tokenizer({**bad, "out": str(tmp_path / "x.safetensors")})
    msg = str(e.value)
    assert "\n" not in msg and all(n in msg for n in names), msg
    assert not list(tmp_path.iterdir())


@pytest.mark.slow  # a subprocess: the slow tier
def test_cli_bad_value_is_one_line(tmp_path):
    res = subprocess.run([sys.executable, "-m", "masc_llamagen.train.tokenizer", "steps=0", "logger.kind=none",
                          f"out={tmp_path / 'x.safetensors'}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines() == ["error: steps=0 must be >= 1"]


def _reports() -> list[Path]:
    found = os.environ.get("MASC_ARTIFACTS", str(ROOT / "artifacts"))
    return sorted((Path(found) / "tokenizers").glob("*.safetensors.json"))


@pytest.mark.skipif(not _reports(), reason="no tokenizer report under artifacts/tokenizers (make train writes one)")
def test_reports_written_before_the_schema_stay_up_to_date():
    """Every stored report's config record goes through the schema unchanged, so the skip still recognises it."""
    for path in _reports():
        record = json.loads(path.read_text())["config"]
        assert config_record(resolve_config(record)) == record, path


@pytest.mark.skipif(not any(p.name == "fmnist_vq_tiny.safetensors.json" for p in _reports()),
                    reason="artifacts/tokenizers/fmnist_vq_tiny.safetensors.json absent (make train writes it)")
def test_default_config_is_the_default_tokenizers():
    """`make train` passes only out and rfid_images; the rest of the default tokenizer's record is the schema's."""
    path = next(p for p in _reports() if p.name == "fmnist_vq_tiny.safetensors.json")
    record = json.loads(path.read_text())["config"]
    passed = {k: record[k] for k in ("out", "rfid_images")}
    assert config_record(resolve_config(passed)) == record


def test_hydra_config_composes():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("vq_train", overrides=["steps=7", "vq.codebook_size=256", "+vq.overrides.ch=64"])
    assert cfg.steps == 7 and cfg.vq.codebook_size == 256 and cfg.vq.overrides.ch == 64
    assert build_vq_config(resolve_config(cfg).vq).ch == 64
    from hydra.errors import ConfigCompositionException

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        with pytest.raises(ConfigCompositionException, match="stepz"):  # the schema refuses typos at compose time
            compose("vq_train", overrides=["stepz=3"])
        appended = compose("vq_train", overrides=["+stepz=3"])  # Hydra's + opens the struct; the schema does not
    with pytest.raises(ConfigError, match="stepz"):
        resolve_config(appended)


@pytest.mark.slow  # a subprocess: the slow tier
def test_tokenizer_package_does_not_import_eval():
    """eval sits above the tokenizer: rFID comes in as a callable, so importing the trainer loads no eval module."""
    code = ("import sys, masc_llamagen.train.tokenizer; "
            "print(sorted(m for m in sys.modules if m.startswith('masc_llamagen.eval')))")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == "[]"
