"""The fast FID (masc_llamagen.eval.fid) against torch-fidelity's own formula and its full pipeline."""

import numpy as np
import pytest
import torch
from test_eval import real_images
from torch_fidelity.metric_fid import fid_statistics_to_metric

from masc_llamagen.eval import inception as inc
from masc_llamagen.eval.fid import InceptionFeatures, frechet_distance
from masc_llamagen.eval.metrics import EvalError, compute_metrics


def _tf_fid(f1: np.ndarray, f2: np.ndarray) -> float:
    stats = [{"mu": f.mean(0), "sigma": np.cov(f, rowvar=False)} for f in (f1, f2)]
    return fid_statistics_to_metric(stats[0], stats[1], verbose=False)["frechet_inception_distance"]


@pytest.mark.parametrize("n1,n2,d", [(400, 300, 32), (40, 60, 128), (50, 50, 50)])
def test_nuclear_norm_identity_matches_torch_fidelity_formula(n1, n2, d):
    rng = np.random.default_rng(n1 + d)
    mix = rng.normal(size=(d, d))  # correlated features, unequal spectra: not a near-identity case
    f1 = rng.normal(size=(n1, d)) @ mix
    f2 = rng.normal(size=(n2, d)) @ (mix + 0.3 * rng.normal(size=(d, d))) + 0.5
    ours, ref = frechet_distance(f1, f2), _tf_fid(f1, f2)
    assert ours == pytest.approx(ref, rel=1e-7)
    assert frechet_distance(f1, f1) == pytest.approx(0.0, abs=1e-8 * ref)


def test_bad_feature_shapes_are_one_line_errors():
    with pytest.raises(EvalError, match="same d"):
        frechet_distance(np.zeros((5, 3)), np.zeros((5, 4)))
    with pytest.raises(EvalError, match="at least 2"):
        frechet_distance(np.zeros((1, 3)), np.zeros((5, 3)))


@pytest.mark.slow
def test_agrees_with_compute_metrics_on_images(tmp_path):
    weights = inc.random_inception_weights(tmp_path / "random-inception.pth", seed=0)
    gen, ref = real_images(40, 2000), real_images(40, 0)
    np.savez(tmp_path / "ref.npz", arr_0=ref)
    fe = InceptionFeatures(weights, feature_layer="64", batch_size=16)
    ours = frechet_distance(fe(gen), fe.cached(tmp_path / "ref.npz", cache=tmp_path / "cache"))
    assert list((tmp_path / "cache" / "features").glob("ref-*.npz")), "reference features were not cached"
    full = compute_metrics(gen, tmp_path / "ref.npz", weights_path=weights, cache_dir=tmp_path / "tf", device="cpu",
                           feature_layer="64")
    assert full["fid"] > 0
    assert ours == pytest.approx(full["fid"], rel=1e-5)
    # features of a channels-last network equal the plain one's (layout is not allowed to change the numbers)
    plain = InceptionFeatures(weights, feature_layer="64")
    plain.net = plain.net.to(memory_format=torch.contiguous_format)
    assert np.allclose(plain(gen[:4]), fe(gen[:4]), rtol=1e-4, atol=1e-5)
