"""Semantic replacement test: identity mapping changes nothing; coarser mappings change more; numbers by hand."""

import numpy as np
import torch

from masc_llamagen.masc.replacement import replacement_scores
from masc_llamagen.tokenizer.vq import VQ_CONFIGS, VQConfig, VQModel


def _vq():
    torch.manual_seed(0)
    return VQModel(VQConfig.from_dict({**VQ_CONFIGS["VQ-tiny"].to_dict(), "codebook_size": 32})).eval()


def test_identity_mapping_leaves_images_unchanged():
    vq = _vq()
    images = torch.rand(4, 3, 16, 16) * 2 - 1
    r = replacement_scores(vq, images, np.arange(32))
    assert r["tokens_changed"] == 0 and r["psnr"] == float("inf") and abs(r["ssim"] - 1) < 1e-9


def test_one_cluster_changes_most_tokens_and_psnr_is_finite():
    vq = _vq()
    images = torch.rand(4, 3, 16, 16) * 2 - 1
    r = replacement_scores(vq, images, np.zeros(32, dtype=np.int64), seed=1)
    assert 0.85 < r["tokens_changed"] <= 1.0  # a uniform draw keeps the same token with probability 1/32
    assert np.isfinite(r["psnr"]) and r["ssim"] < 1


def test_changed_fraction_matches_expectation_for_a_pair_mapping():
    """The two most used tokens share a cluster, all others are singletons: those flip with probability 1/2."""
    vq = _vq()
    images = torch.rand(8, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        idx = vq.encode(images).numpy()
    a, b = np.argsort(np.bincount(idx.ravel(), minlength=32))[-2:]
    labels = np.arange(32)
    labels[b] = labels[a]
    mapping = np.unique(labels, return_inverse=True)[1]
    in_pair = np.isin(idx, [a, b]).mean()
    assert in_pair > 0.05
    r = replacement_scores(vq, images, mapping, seed=3)
    n = idx.size
    assert abs(r["tokens_changed"] - in_pair / 2) <= 4 * np.sqrt(in_pair * n * 0.25) / n
