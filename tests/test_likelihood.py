"""Held-out diagnostics against a brute-force loop over every position in float64."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from masc_llamagen.eval.likelihood import heldout_diagnostics, normalized_entropy
from masc_llamagen.masc.vocabulary import build_vocabulary
from masc_llamagen.models.gpt import GPT, gpt_config

N, K, CLASSES, TOKENS = 24, 6, 3, 9


def _model(vocab_size: int) -> GPT:
    torch.manual_seed(0)
    cfg = gpt_config("GPT-nano", vocab_size=vocab_size, block_size=TOKENS, num_classes=CLASSES, zero_init_head=False,
                     token_dropout_p=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0)
    return GPT(cfg).eval()


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, N, (7, TOKENS), generator=g), torch.randint(0, CLASSES, (7,), generator=g)


def _probs(model, ids, y) -> np.ndarray:
    with torch.no_grad():
        return torch.softmax(model(ids[:, :-1], y)[0].double(), -1).numpy()


def test_coarse_head_matches_brute_force(data):
    codes, y = data
    mapping = np.arange(N) % K
    counts = np.arange(1, N + 1)
    vocabs = {"uniform": build_vocabulary("masc", N, mapping),
              "frequency": build_vocabulary("masc", N, mapping, decoder="frequency", counts=counts, smoothing=0.0)}
    model = _model(K)
    got = heldout_diagnostics(model, vocabs, codes, y, batch=3)  # batches of 3 over 7 rows: a ragged last batch
    p = _probs(model, torch.from_numpy(mapping)[codes], y)
    ce = nll_u = nll_f = ent = 0.0
    for n in range(codes.shape[0]):
        for t in range(TOKENS):
            f = int(codes[n, t])
            c = mapping[f]
            members = np.flatnonzero(mapping == c)
            ce -= math.log(p[n, t, c])
            nll_u -= math.log(p[n, t, c] / len(members))
            nll_f -= math.log(p[n, t, c] * counts[f] / counts[members].sum())
            ent -= (p[n, t] * np.log(p[n, t])).sum() / math.log(K)
    tok = codes.numel()
    assert got["tokens"] == tok
    assert got["coarse_ce"] == pytest.approx(ce / tok / math.log(2), rel=1e-5)
    assert got["fine_nll_uniform"] == pytest.approx(nll_u / tok / math.log(2), rel=1e-5)
    assert got["fine_nll_frequency"] == pytest.approx(nll_f / tok / math.log(2), rel=1e-5)
    assert got["entropy_norm"] == pytest.approx(ent / tok, rel=1e-5)


def test_flat_head_marginal_ce_matches_brute_force(data):
    codes, y = data
    mapping = np.arange(N) % K
    model = _model(N)
    got = heldout_diagnostics(model, {"uniform": build_vocabulary("flat", N)}, codes, y,
                              mappings={"masc-k6": torch.from_numpy(mapping)})
    p = _probs(model, codes, y)
    ce = marg = 0.0
    for n in range(codes.shape[0]):
        for t in range(TOKENS):
            f = int(codes[n, t])
            ce -= math.log(p[n, t, f])
            marg -= math.log(p[n, t, mapping == mapping[f]].sum())
    tok = codes.numel()
    assert got["coarse_ce"] == pytest.approx(ce / tok / math.log(2), rel=1e-5)
    assert got["fine_nll_uniform"] == got["coarse_ce"]  # flat: the fine token is the coarse one
    assert got["marginal_ce/masc-k6"] == pytest.approx(marg / tok / math.log(2), rel=1e-5)
    assert got["marginal_ce/masc-k6"] < got["coarse_ce"]  # summing over a cluster can only raise the probability


def test_normalized_entropy_bounds():
    assert normalized_entropy(torch.zeros(2, 5)).tolist() == pytest.approx([1.0, 1.0])
    assert normalized_entropy(torch.tensor([[1e4, 0.0, 0.0]])).item() == pytest.approx(0.0, abs=1e-6)
