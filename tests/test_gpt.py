"""GPT parity with upstream LlamaGen: released shapes, golden logits and greedy generations, KV cache."""

import math

import pytest
import torch

from masc_llamagen.models.gpt import GPT, GPT_CONFIGS, GPTConfig, gpt_config, rope_2d_table
from masc_llamagen.models.sampling import SamplingConfig, filter_logits, generate
from masc_llamagen.weights import load_gpt

RELEASED = ["GPT-B", "GPT-L", "GPT-XL", "GPT-XXL", "GPT-XXXL", "GPT-3B"]


@pytest.mark.parametrize("name", RELEASED)
def test_released_state_dict_and_param_count(name, shapes):
    ref = shapes["gpt"][name]
    with torch.device("meta"):
        model = GPT(gpt_config(name))
    sd = model.state_dict()
    assert {k: list(v.shape) for k, v in sd.items()} == ref["state_dict"]
    assert model.num_params() == ref["params"]
    assert all(p.is_meta for p in model.parameters())  # nothing was allocated


def test_registry_has_cpu_sized_configs():
    small = [n for n in GPT_CONFIGS if n not in RELEASED]
    assert small
    for n in small:
        assert GPT(gpt_config(n, vocab_size=1024, block_size=64, num_classes=10)).num_params() < 10_000_000


@pytest.fixture(scope="module")
def tiny(fixture_dir, gpt_ref):
    return load_gpt(fixture_dir / "gpt_tiny.safetensors", GPTConfig.from_dict(gpt_ref["config"]))


def test_eval_logits_match_upstream(tiny, gpt_ref):
    idx = torch.tensor(gpt_ref["input_tokens"])
    labels = torch.tensor(gpt_ref["class_labels"])
    with torch.no_grad():
        logits, _ = tiny(idx, labels, torch.arange(16))
    ref = torch.tensor(gpt_ref["eval_forward"]["logits"])
    assert logits.shape == tuple(gpt_ref["eval_forward"]["logits_shape"])
    assert ((logits - ref).abs().max() / ref.abs().max()).item() < 1e-5


@pytest.mark.parametrize("scale", ["1.0", "1.75", "4.0"])
@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_generation_matches_upstream(tiny, gpt_ref, scale, use_cache):
    labels = torch.tensor(gpt_ref["class_labels"])
    expected = torch.tensor(gpt_ref["greedy_generation"]["tokens"][scale])
    out = generate(tiny, labels, 16, SamplingConfig(cfg_scale=float(scale), greedy=True), use_cache=use_cache)
    assert torch.equal(out, expected)


def _random_model(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = gpt_config("GPT-nano", vocab_size=37, block_size=25, num_classes=5, zero_init_head=False,
                     token_dropout_p=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0, **kw)
    return GPT(cfg).eval()


def test_kv_cache_equals_full_forward_at_every_position():
    model = _random_model()
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 37, (3, 25), generator=g)
    labels = torch.tensor([0, 4, 2])
    with torch.no_grad():
        full, _ = model(tokens[:, :-1], labels)
        model.setup_caches(3, 26)
        step = [model(None, labels, torch.arange(1))[0][:, -1]]
        for t in range(24):
            step.append(model(tokens[:, t : t + 1], None, torch.tensor([t + 1]))[0][:, -1])
        model.clear_caches()
    cached = torch.stack(step, dim=1)
    assert cached.shape == full.shape == (3, 25, 37)
    torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-5)


def test_rope_class_rows_are_zero_and_grid_is_row_major():
    cfg = gpt_config("GPT-nano", block_size=16)
    table = rope_2d_table(cfg)
    hd = cfg.head_dim
    assert table.shape == (17, hd // 2, 2)
    assert torch.all(table[0] == 0)
    # position 1 + r*4 + c: first half of the pairs rotates by r * freq, second half by c * freq
    freq0 = 1.0  # i = 0 -> base^0
    r, c = 2, 3
    row = table[1 + r * 4 + c]
    assert math.isclose(row[0, 0].item(), math.cos(r * freq0), abs_tol=1e-6)
    assert math.isclose(row[hd // 4, 1].item(), math.sin(c * freq0), abs_tol=1e-6)


def test_zero_init_head_gives_uniform_initial_loss():
    torch.manual_seed(0)
    model = GPT(gpt_config("GPT-nano", vocab_size=64, block_size=16, num_classes=3))
    tokens = torch.randint(0, 64, (2, 16))
    _, loss = model(tokens[:, :-1], torch.tensor([0, 1]), targets=tokens)
    assert abs(loss.item() - math.log(64)) < 1e-5


def test_class_dropout_uses_null_row_in_training_only():
    torch.manual_seed(0)
    model = GPT(gpt_config("GPT-nano", vocab_size=8, block_size=4, num_classes=3))
    emb = model.cls_embedding
    labels = torch.zeros(20000, dtype=torch.long)
    emb.train()
    out = emb(labels)[:, 0]
    null = emb.embedding_table.weight[3]
    frac = (out == null).all(-1).float().mean().item()
    assert abs(frac - 0.1) < 0.01
    emb.eval()
    assert not (emb(labels)[:, 0] == null).all(-1).any()


def test_filter_logits_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, generator=g)
    for k in (1, 5, 50):
        kept = torch.isfinite(filter_logits(logits, top_k=k))
        for row in range(4):
            assert set(kept[row].nonzero().flatten().tolist()) == set(logits[row].argsort(descending=True)[:k].tolist())
    for p in (0.1, 0.5, 0.9):
        kept = torch.isfinite(filter_logits(logits, top_p=p))
        probs = logits.softmax(-1)
        for row in range(4):
            order = probs[row].argsort(descending=True).tolist()
            n, mass = 0, 0.0
            while mass <= p and n < 50:  # smallest prefix whose mass exceeds p (the crossing token kept)
                mass += probs[row, order[n]].item()
                n += 1
            assert set(kept[row].nonzero().flatten().tolist()) == set(order[:n])


def test_cfg_interval_matches_brute_force():
    """Greedy decoding by hand: full forwards on cond and null halves, mix only for tokens 0..interval+1."""
    model = _random_model(3)
    labels = torch.tensor([1, 3])
    scale, interval, n = 3.0, 4, 12
    seq = torch.empty(2, 0, dtype=torch.long)
    null = torch.full_like(labels, 5)
    with torch.no_grad():
        for t in range(n):
            cond = model(seq if t else None, labels)[0][:, -1]
            uncond = model(seq if t else None, null)[0][:, -1]
            mixed = uncond + scale * (cond - uncond) if t <= interval + 1 else cond
            seq = torch.cat([seq, mixed.argmax(-1, keepdim=True)], dim=1)
    out = generate(model, labels, n, SamplingConfig(cfg_scale=scale, cfg_interval=interval, greedy=True))
    assert torch.equal(out, seq)


def test_seeded_sampling_is_reproducible_and_cache_agnostic():
    model = _random_model(5)
    labels = torch.tensor([0, 1, 2, 3])
    sc = SamplingConfig(cfg_scale=2.0, temperature=1.3, top_k=20, top_p=0.9)
    a = generate(model, labels, 20, sc, generator=torch.Generator().manual_seed(7))
    b = generate(model, labels, 20, sc, generator=torch.Generator().manual_seed(7))
    c = generate(model, labels, 20, sc, generator=torch.Generator().manual_seed(7), use_cache=False)
    d = generate(model, labels, 20, sc, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and torch.equal(a, c)
    assert not torch.equal(a, d)
    assert a.min() >= 0 and a.max() < 37


def test_bf16_sampling_runs_and_mostly_agrees_with_fp32():
    model = _random_model(6)
    labels = torch.arange(5)
    sc = SamplingConfig(cfg_scale=1.5, greedy=True)
    a = generate(model, labels, 8, sc)
    b = generate(model, labels, 8, sc, dtype=torch.bfloat16)
    assert b.shape == a.shape and b.dtype == torch.long
    assert (a[:, 0] == b[:, 0]).float().mean() >= 0.6  # first tokens: identical inputs, bf16 rounding only


def test_bad_sampling_arguments_raise():
    model = _random_model()
    with pytest.raises(ValueError, match="labels"):
        generate(model, torch.tensor([9]), 4)
    with pytest.raises(ValueError, match="num_tokens"):
        generate(model, torch.tensor([0]), 99)
    with pytest.raises(ValueError, match="cfg_scale"):
        SamplingConfig(cfg_scale=0.5)


def test_unknown_config_key_is_refused():
    with pytest.raises(ValueError, match="unknown GPT config keys"):
        GPTConfig.from_dict({"dim": 64, "n_layers": 2})


def test_valid_flag_zeroes_invalid_samples_in_class_conditional_training():
    """The per-sample ``valid`` flag works for c2i too: a bad label/tokens in an invalid sample are never read."""
    model = _random_model(7)
    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, 37, (3, 25), generator=g)
    labels = torch.tensor([0, 99, 2])  # 99: out of range, the sample is flagged invalid

    def grads(tok, lab, valid):
        model.zero_grad(set_to_none=True)
        _, loss = model(tok[:, :-1], lab, targets=tok, valid=valid)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    valid = torch.tensor([1.0, 0.0, 1.0])
    loss, g1 = grads(tokens, labels, valid)
    tokens2 = tokens.clone()
    tokens2[1] = torch.randint(0, 37, (25,), generator=g)
    loss2, g2 = grads(tokens2, labels, valid)
    assert torch.equal(loss, loss2) and all(torch.equal(a, b) for a, b in zip(g1, g2, strict=True))
    keep = torch.tensor([0, 2])
    loss3, g3 = grads(tokens[keep], labels[keep], None)
    torch.testing.assert_close(loss, loss3, rtol=1e-6, atol=1e-6)
    for a, b in zip(g1, g3, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_drop_path_keeps_keys_and_eval_output_and_drops_whole_residual_branches_in_training():
    """Stochastic depth (upstream's drop_path_rate) adds no state, is off in eval, and in training each sample's
    branch is either dropped or scaled by 1/keep, brute-forced against the block's two branches."""
    plain, dropped = _random_model(), _random_model(drop_path_rate=0.6)
    assert plain.state_dict().keys() == dropped.state_dict().keys()
    dropped.load_state_dict(plain.state_dict())
    idx, labels = torch.randint(0, 37, (3, 24)), torch.tensor([0, 1, 4])
    with torch.no_grad():
        assert torch.equal(plain(idx, labels)[0], dropped(idx, labels)[0])
    rates = [getattr(layer.drop_path, "drop_prob", 0.0) for layer in dropped.layers]
    assert rates == pytest.approx([0.0, 0.6])  # GPT-nano: 2 blocks, linear from 0 to the rate

    block = dropped.layers[1].train()
    keep = 1 - 0.6
    x = torch.randn(1, 6, block.attention_norm.weight.numel()).repeat(4000, 1, 1)
    rope = dropped.rope(x.device)[: 6]
    with torch.no_grad():
        a = block.attention(block.attention_norm(x[:1]), rope)
        combos = []
        for attn_kept in (False, True):
            h = x[:1] + (a / keep if attn_kept else 0)
            f = block.feed_forward(block.ffn_norm(h))
            combos += [h, h + f / keep]
        torch.manual_seed(1)
        y = block(x, rope)
    err = torch.stack([(y - c).abs().amax(dim=(1, 2)) for c in combos])  # (4 combos, samples)
    assert (err.min(0).values < 1e-5).all()  # every sample is exactly one of the four branch patterns
    which = err.argmin(0)
    attn_kept = (which >= 2).float().mean().item()
    assert abs(attn_kept - keep) < 0.03  # ~4 std of a Bernoulli(0.4) mean over 4000 draws


def test_drop_path_rate_out_of_range_is_refused():
    with pytest.raises(ValueError, match="drop_path_rate"):
        gpt_config("GPT-nano", drop_path_rate=1.0)
