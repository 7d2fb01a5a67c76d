"""Heads: encode/decode, member decoders, and the fine-NLL identity checked against explicit distributions."""

import math

import numpy as np
import pytest
import torch

from masc_llamagen.masc.linkage import TreeError
from masc_llamagen.masc.members import cluster_members
from masc_llamagen.masc.vocabulary import HeadError, Vocabulary, build_vocabulary, marginal_coarse_nll, member_log_probs

N, K = 30, 7


@pytest.fixture()
def mapping():
    rng = np.random.default_rng(0)
    m = np.concatenate([np.arange(K), rng.integers(0, K, N - K)])  # every cluster non-empty, unequal sizes
    rng.shuffle(m)
    return m


@pytest.fixture()
def counts():
    c = np.random.default_rng(1).integers(0, 50, N)
    c[3] = 0  # an unseen code
    return c


@pytest.mark.parametrize("decoder", ["uniform", "frequency"])
def test_fine_nll_equals_brute_force_fine_distribution(mapping, counts, decoder):
    voc = build_vocabulary("masc", N, mapping, decoder=decoder, counts=counts, smoothing=0.5)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 5, K, generator=g)
    targets = torch.randint(0, N, (4, 5), generator=g)
    # explicit fine distribution: p(t) = p_coarse(C(t)) * p(t | C(t)), built member by member
    p_coarse = logits.double().softmax(-1)
    sizes = np.bincount(mapping, minlength=K)
    p_fine = torch.zeros(4, 5, N, dtype=torch.float64)
    for t in range(N):
        c = mapping[t]
        members = np.flatnonzero(mapping == c)
        if decoder == "uniform":
            p_member = 1.0 / sizes[c]
        else:
            w = counts[members] + 0.5
            p_member = (counts[t] + 0.5) / w.sum()
        p_fine[..., t] = p_coarse[..., c] * p_member
    assert torch.allclose(p_fine.sum(-1), torch.ones(4, 5, dtype=torch.float64))
    expected = -p_fine.gather(-1, targets.unsqueeze(-1)).squeeze(-1).log()
    got = voc.fine_nll(logits, targets)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


def test_uniform_fine_nll_is_coarse_ce_plus_log_cluster_size(mapping):
    voc = build_vocabulary("masc", N, mapping)
    logits = torch.randn(6, K)
    targets = torch.randint(0, N, (6,))
    ce = torch.nn.functional.cross_entropy(logits, torch.as_tensor(mapping)[targets], reduction="none")
    size = torch.as_tensor(np.bincount(mapping, minlength=K))[torch.as_tensor(mapping)[targets]]
    torch.testing.assert_close(voc.fine_nll(logits, targets), ce + size.float().log())


def test_flat_head_is_identity_and_plain_ce():
    voc = build_vocabulary("flat", N)
    assert voc.vocab_size == N and voc.is_flat
    tokens = torch.randint(0, N, (3, 4))
    assert torch.equal(voc.encode(tokens), tokens) and torch.equal(voc.decode(tokens), tokens)
    logits = torch.randn(3, 4, N)
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, N), tokens.reshape(-1), reduction="none")
    torch.testing.assert_close(voc.fine_nll(logits, tokens).reshape(-1), ce)


def test_marginal_coarse_nll_matches_brute_force(mapping):
    logits = torch.randn(3, 4, N) * 3
    targets = torch.randint(0, N, (3, 4))
    got = marginal_coarse_nll(logits, targets, torch.as_tensor(mapping))
    p = logits.double().softmax(-1)
    for i in range(3):
        for j in range(4):
            members = np.flatnonzero(mapping == mapping[targets[i, j]])
            assert math.isclose(got[i, j].item(), -math.log(p[i, j, members].sum().item()), rel_tol=1e-5)


def test_uniform_decoder_draws_members_uniformly(mapping):
    voc = build_vocabulary("masc", N, mapping)
    ids = torch.full((60000,), int(np.bincount(mapping).argmax()))
    out = voc.decode(ids, generator=torch.Generator().manual_seed(0))
    members = np.flatnonzero(mapping == ids[0].item())
    assert set(out.unique().tolist()) == set(members.tolist())
    freq = np.bincount(out.numpy(), minlength=N)[members] / len(out)
    assert np.abs(freq - 1 / len(members)).max() < 0.01


def test_frequency_decoder_follows_counts_and_never_leaves_the_cluster(mapping, counts):
    voc = build_vocabulary("masc", N, mapping, decoder="frequency", counts=counts, smoothing=0.0)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, K, (200000,), generator=g)
    out = voc.decode(ids, generator=g)
    assert torch.equal(torch.as_tensor(mapping)[out], ids)
    assert (out != 3).all()  # zero count, zero smoothing: never emitted
    for c in range(K):
        members = np.flatnonzero(mapping == c)
        if counts[members].sum() == 0:
            continue
        got = np.bincount(out[ids == c].numpy(), minlength=N)[members] / (ids == c).sum().item()
        assert np.abs(got - counts[members] / counts[members].sum()).max() < 0.02


def test_decode_is_seeded():
    voc = build_vocabulary("masc", N, np.arange(N) % K)
    ids = torch.randint(0, K, (50,))
    a = voc.decode(ids, torch.Generator().manual_seed(3))
    b = voc.decode(ids, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_member_table_and_state_roundtrip(tmp_path, mapping, counts):
    voc = build_vocabulary("kmeans", N, mapping, decoder="frequency", counts=counts)
    assert voc.k == K and int(voc.sizes().sum()) == N
    for c in range(K):
        assert voc.table[c].tolist() == np.flatnonzero(mapping == c).tolist()
    torch.save(voc.to_state(), tmp_path / "h.pt")
    back = Vocabulary.from_state(torch.load(tmp_path / "h.pt", weights_only=True))
    assert back.k == K and back.name == "kmeans" and torch.equal(back.mapping, voc.mapping)
    torch.testing.assert_close(back.member_log_prob, voc.member_log_prob)


def test_bad_mappings_raise_clear_errors(mapping):
    with pytest.raises(TreeError, match=r"head=masc mapping has shape \(29,\) but the codebook has N=30 tokens"):
        build_vocabulary("masc", N, mapping[:-1])
    gap = mapping.copy()
    gap[gap == 2] = 1
    with pytest.raises(TreeError, match=r"leaves 1 of k=7 clusters empty \(e.g. 2\)"):
        build_vocabulary("masc", N, gap)
    state = build_vocabulary("masc", N, mapping).to_state()
    with pytest.raises(TreeError, match="empty"):  # a checkpoint's head goes through the same validator
        Vocabulary.from_state({**state, "mapping": torch.as_tensor(gap)})
    with pytest.raises(HeadError, match="unknown member decoder"):
        member_log_probs(cluster_members(mapping, N), "mode")
    with pytest.raises(HeadError, match="needs token counts"):
        member_log_probs(cluster_members(mapping, N), "frequency")
