"""Per-sample randomness: inverse-cdf draws, batch- and split-independent tokens, no generator on a foreign device.

There is no GPU here, so device bugs are caught on the ``meta`` device: with a model whose weights and logits live
there, sampling must not run a single op that pairs a generator with tensors on another device (the bug that
crashed every CUDA sample: a CPU generator handed to ``torch.multinomial`` over CUDA probabilities), must feed the
model inputs on its device, and must return tokens on it. (The GPT itself cannot run on meta: its cached forward
reads a position back with ``int()``; a stand-in with its interface returns meta logits instead.)
"""

import copy
import math

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

from masc_llamagen.masc.vocabulary import build_vocabulary
from masc_llamagen.models.gpt import GPT, gpt_config
from masc_llamagen.models.sampling import SamplingConfig, check_null_class, generate, inverse_cdf
from masc_llamagen.sample import sample_seed, sample_tokens, sample_uniforms

CODES, K, CLASSES, TOKENS = 48, 12, 5, 16
SC = SamplingConfig(cfg_scale=2.0, temperature=1.2, top_k=8, top_p=0.95)


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = gpt_config("GPT-nano", vocab_size=K, block_size=TOKENS, num_classes=CLASSES, zero_init_head=False,
                     token_dropout_p=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0, **kw)
    return GPT(cfg).eval()


@pytest.fixture(scope="module")
def model():
    return _model()


@pytest.fixture(scope="module")
def vocab():
    counts = np.random.default_rng(0).integers(0, 6, CODES)
    counts[[3, 15, 16]] = 0  # never seen, no smoothing: must never be emitted
    return build_vocabulary("masc", CODES, np.arange(CODES) % K, decoder="frequency", counts=counts, smoothing=0.0)


class GeneratorDevices(TorchFunctionMode):
    """Records every torch call that takes a generator, with the devices of its tensors, ``device=`` and result."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        g = kwargs.get("generator")
        if isinstance(g, torch.Generator):
            flat = [*args, *kwargs.values(), out]
            devs = {t.device for t in flat if isinstance(t, torch.Tensor)}
            if kwargs.get("device") is not None:
                devs.add(torch.device(kwargs["device"]))
            self.calls.append((getattr(func, "__name__", str(func)), g.device, devs))
        return out

    def foreign(self):
        return [c for c in self.calls if c[2] != {c[1]}]


class MetaGPT(torch.nn.Module):
    """The GPT interface ``generate`` uses, on the meta device: checks its inputs' device, returns meta logits."""

    def __init__(self, real: GPT):
        super().__init__()
        self.config, self.cls_embedding = real.config, copy.deepcopy(real.cls_embedding).to("meta")
        self.output = copy.deepcopy(real.output).to("meta")
        self.inputs = []

    def setup_caches(self, batch, max_len, dtype=None):
        pass

    def clear_caches(self):
        pass

    def forward(self, idx, cond_idx, input_pos=None):
        given = [t for t in (idx, cond_idx, input_pos) if t is not None]
        self.inputs += [t.device for t in given]
        b, t = given[0].shape[0], 1 if idx is None else idx.shape[1]
        return torch.randn(b, t, self.config.vocab_size, device="meta"), None


def test_inverse_cdf_follows_the_distribution_and_never_picks_a_zero():
    w = torch.tensor([[0.0, 0.1, 0.0, 0.3, 0.6, 0.0], [0.0, 2.0, 0.0, 0.0, 6.0, 0.0]])  # row 2: unnormalised
    m = 10_000
    grid = (torch.arange(m, dtype=torch.float64) + 0.5) / m
    for row in w:
        got = inverse_cdf(row.expand(m, -1), grid)
        counts = torch.bincount(got, minlength=6).double()
        ref = row.double() / row.double().sum() * m  # a uniform grid through the cdf: counts = p * m up to 1
        assert (counts - ref).abs().max() <= 1, (counts, ref)
    edges = torch.tensor([0.0, math.nextafter(1.0, 0.0)], dtype=torch.float64)
    assert inverse_cdf(w[:1].expand(2, -1), edges).tolist() == [1, 4]  # first and last non-zero, in range
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(4000, 50, generator=g) * (torch.rand(4000, 50, generator=g) < 0.3)
    probs[:, 7] = 1e-30  # tiny but positive everywhere
    got = inverse_cdf(probs.softmax(-1) * (probs > 0), torch.rand(4000, dtype=torch.float64, generator=g))
    assert (probs.gather(1, got[:, None]) > 0).all()


def test_tokens_are_the_same_for_any_batch_size_or_split(model, vocab):
    labels = torch.arange(8) % CLASSES
    ref = sample_tokens(model, vocab, labels, SC, seed=11)
    for bs in (1, 3, 8):
        chunks = [torch.arange(s, min(s + bs, 8)) for s in range(0, 8, bs)]
        got = torch.cat([sample_tokens(model, vocab, labels[c], SC, seed=11, indices=c) for c in chunks])
        assert torch.equal(got, ref), bs
    for part in (torch.arange(0, 8, 2), torch.arange(1, 8, 2), torch.arange(4), torch.arange(4, 8)):
        assert torch.equal(sample_tokens(model, vocab, labels[part], SC, seed=11, indices=part), ref[part])
    assert not torch.equal(sample_tokens(model, vocab, labels, SC, seed=12), ref)  # the seed matters
    assert len({tuple(r) for r in ref.tolist()}) == 8  # and every sample has its own draws
    assert ref.min() >= 0 and ref.max() < CODES and not torch.isin(ref, torch.tensor([3, 15, 16])).any()
    tok_u, _ = sample_uniforms(11, torch.arange(8), TOKENS)
    assert torch.equal(vocab.encode(ref), generate(model, labels, TOKENS, SC, uniforms=tok_u))  # members of the ids


def test_sample_uniforms_come_from_one_generator_per_sample():
    tok, member = sample_uniforms(3, torch.tensor([5, 0]), TOKENS)
    assert tok.shape == member.shape == (2, TOKENS) and tok.dtype == torch.float64
    ref = torch.rand(2, TOKENS, dtype=torch.float64, generator=torch.Generator().manual_seed(sample_seed(3, 5)))
    assert torch.equal(tok[0], ref[0]) and torch.equal(member[0], ref[1])
    assert sample_seed(3, 5) != sample_seed(5, 3) and sample_seed(-1, 0) != sample_seed(0, 0)


def test_sampling_on_another_device_pairs_no_generator_with_foreign_tensors(model, vocab):
    probe = GeneratorDevices()
    with probe:  # the check sees the original bug: a CPU generator over probabilities elsewhere
        torch.multinomial(torch.rand(2, 5, device="meta"), 1, generator=torch.Generator())
    assert probe.foreign()
    meta = MetaGPT(model)
    labels = torch.arange(4) % CLASSES
    for seed in (7, torch.Generator().manual_seed(7)):  # per-sample seeds, and an older caller's CPU generator
        probe = GeneratorDevices()
        with probe:
            tokens = sample_tokens(meta, vocab, labels, SC, seed=seed)
        assert tokens.device.type == "meta" and tokens.shape == (4, TOKENS)
        assert probe.calls and not probe.foreign(), probe.foreign()
    probe = GeneratorDevices()
    with probe:
        ids = generate(meta, labels, TOKENS, SC)  # global RNG, on the model's device
        assert vocab.decode(ids).device.type == "meta"
        assert vocab.decode(ids, generator=torch.Generator().manual_seed(0)).device.type == "meta"
        assert vocab.decode(ids, uniforms=torch.rand(ids.shape, device="meta", dtype=torch.float64)).is_meta
    assert not probe.foreign(), probe.foreign()
    assert meta.inputs and set(meta.inputs) == {torch.device("meta")}  # labels, tokens and positions moved


def test_decode_picks_the_member_its_uniform_points_at(vocab):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, K, (3000,), generator=g)
    u = torch.rand(3000, dtype=torch.float64, generator=g)
    u[:K], ids[:K] = 0.0, torch.arange(K)
    u[K : 2 * K], ids[K : 2 * K] = math.nextafter(1.0, 0.0), torch.arange(K)
    got = vocab.decode(ids, uniforms=u)
    p = vocab.member_log_prob.exp()
    for c, x, t in zip(ids.tolist(), u.tolist(), got.tolist(), strict=True):
        members = vocab.table[c].tolist()  # ascending token id
        cum = np.cumsum([p[m].item() for m in members])
        want = members[min(int(np.searchsorted(cum, x * cum[-1], side="right")), len(members) - 1)]
        assert t == want, (c, x, t, want)
    assert not torch.isin(got, torch.tensor([3, 15, 16])).any()
    g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    assert torch.equal(vocab.decode(ids.reshape(60, 50), generator=g1),
                       vocab.decode(ids.reshape(60, 50), uniforms=torch.rand(60, 50, dtype=torch.float64,
                                                                             generator=g2)))


def test_cfg_on_a_model_without_a_null_class_is_refused():
    model = _model(class_dropout_prob=0.0)
    assert model.cls_embedding.embedding_table.num_embeddings == CLASSES
    msg = "this model has no null class (trained with class_dropout_prob=0): use cfg_scale=1.0"
    for sc in (SamplingConfig(cfg_scale=2.0), SamplingConfig(cfg_scale=1.5, greedy=True)):
        with pytest.raises(ValueError) as e:
            generate(model, torch.tensor([0, 1]), 4, sc)
        assert str(e.value) == msg
    assert generate(model, torch.tensor([0, 1]), 4, SamplingConfig(cfg_scale=1.0)).shape == (2, 4)
    check_null_class(_model(), 4.0)  # the default model has its null row
