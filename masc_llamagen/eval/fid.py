"""Exact FID for sweeps that score many sample sets: Inception features once per set, no 2048x2048 square root.

torch-fidelity's FID takes ``sqrtm(S1 @ S2)`` of the 2048 x 2048 covariances (10-50 s on two CPU cores per score).
With n samples the covariances have rank below n, and ``tr sqrt(S1 S2)`` equals the nuclear norm of the n1 x n2 matrix
``A1 A2^T`` (A = centred features / sqrt(n - 1), so S = A^T A): one SVD of a 1000 x 1000 matrix, under a second.
The extractor, weights and input handling are torch-fidelity's (``inception-v3-compat``), as in ``compute_metrics``,
so a set scored here and there gets the same FID (tests/test_fid.py checks both the identity and the agreement).
"""

from __future__ import annotations

import os

import numpy as np
import torch

from masc_llamagen.eval.inception import load_inception, resolve_inception_weights
from masc_llamagen.eval.metrics import EvalError, as_uint8_nhwc

FEATURES_EXTRACTOR = "torch-fidelity inception-v3-compat, channels-last, float64 (masc_llamagen.eval.fid)"


def frechet_distance(features1: np.ndarray, features2: np.ndarray) -> float:
    """FID between two feature sets (rows are samples), float64, with torch-fidelity's unbiased covariances."""
    f1, f2 = np.asarray(features1, np.float64), np.asarray(features2, np.float64)
    if f1.ndim != 2 or f2.ndim != 2 or f1.shape[1] != f2.shape[1]:
        raise EvalError(f"feature sets must be (n, d) with the same d, got {f1.shape} and {f2.shape}")
    if min(len(f1), len(f2)) < 2:
        raise EvalError(f"need at least 2 samples per side for a covariance, got {len(f1)} and {len(f2)}")
    a1 = (f1 - f1.mean(0)) / np.sqrt(len(f1) - 1)
    a2 = (f2 - f2.mean(0)) / np.sqrt(len(f2) - 1)
    cross = np.linalg.svd(a1 @ a2.T, compute_uv=False).sum()  # tr sqrt(S1 S2)
    diff = f1.mean(0) - f2.mean(0)
    return float(diff @ diff + (a1 * a1).sum() + (a2 * a2).sum() - 2.0 * cross)


class InceptionFeatures:
    """torch-fidelity's FID Inception (pool3, 2048-d) on uint8 images, channels-last (about 1.5x faster on CPU).

    The weights are read with ``weights_only=True`` (:func:`load_inception`); reference features are cached as
    data-only npz keyed on the reference's content (see :func:`masc_llamagen.eval.metrics.cached_features`).
    """

    def __init__(self, weights: str | os.PathLike | None = None, device: str = "cpu", batch_size: int = 100,
                 feature_layer: str = "2048"):
        self.weights = resolve_inception_weights(weights)
        self.layer, self.device, self.batch_size = feature_layer, torch.device(device), batch_size
        net, self.weights_sha256 = load_inception(self.weights, [feature_layer])
        self.net = net.eval().to(self.device, memory_format=torch.channels_last)

    @property
    def key(self) -> str:
        """Identifies features: the weights file and the layer."""
        return f"{self.weights_sha256[:12]}-{self.layer}"

    @torch.inference_mode()
    def __call__(self, images) -> np.ndarray:
        arr = as_uint8_nhwc(images)
        out = []
        for s in range(0, len(arr), self.batch_size):
            x = torch.from_numpy(np.ascontiguousarray(arr[s : s + self.batch_size])).permute(0, 3, 1, 2)
            out.append(self.net(x.contiguous().to(self.device))[0].double().cpu().numpy())
        return np.concatenate(out)

    def cached(self, images_npz: str | os.PathLike, cache: str | os.PathLike | None = None) -> np.ndarray:
        """Features of an image npz (e.g. a dataset reference), cached by file content, weights and layer."""
        from masc_llamagen.eval.metrics import cached_features, image_source

        source = image_source(images_npz)
        feats, _ = cached_features(source, lambda s: self(s.load()), weights_sha256=self.weights_sha256,
                                   layer=self.layer, extractor=FEATURES_EXTRACTOR, cache=cache)
        return feats
