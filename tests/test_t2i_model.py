"""Caption-conditional GPT (model_type="t2i"): upstream weight compatibility, golden logits and greedy generations,
masks, KV cache, null caption, per-sample validity, and the parity CLI on t2i fixtures of any size."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from masc_llamagen.models.gpt import (
    GPT,
    GPTConfig,
    caption_attention_mask,
    gpt_config,
    right_align_captions,
    rope_2d_table,
)
from masc_llamagen.models.sampling import SamplingConfig, SamplingError, generate
from masc_llamagen.parity import main as parity_main
from masc_llamagen.train.optim import build_optimizer
from masc_llamagen.weights import CheckpointError, load_gpt

T2I = Path(__file__).parent / "fixtures" / "llamagen_t2i"
C2I = Path(__file__).parent / "fixtures" / "llamagen"
NULL = "cls_embedding.uncond_embedding"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ref() -> dict:
    return json.loads((T2I / "gpt_t2i_tiny.json").read_text())


@pytest.fixture(scope="module")
def tiny(ref):
    return load_gpt(T2I / "gpt_t2i_tiny.safetensors", GPTConfig.from_dict(ref["config"]))


def _inputs(ref):
    return (torch.tensor(ref["input_tokens"]), torch.tensor(ref["caption_features"]), torch.tensor(ref["emb_mask"]))


def _model(seed=0, slots=120, width=8, vocab=37, block=16, **kw):
    torch.manual_seed(seed)
    cfg = gpt_config("GPT-nano", model_type="t2i", vocab_size=vocab, block_size=block, cls_token_num=slots,
                     caption_dim=width, zero_init_head=False, token_dropout_p=0.0, resid_dropout_p=0.0,
                     ffn_dropout_p=0.0, **kw)
    return GPT(cfg).eval()


def _captions(lengths, slots, width, seed=0):
    g = torch.Generator().manual_seed(seed)
    return right_align_captions([torch.randn(n, width, generator=g) for n in lengths], slots)


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


# -- weight compatibility -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["GPT-XL", "GPT-B"])
def test_released_t2i_state_dict_and_param_count(name):
    ref = json.loads((T2I / "t2i_shapes.json").read_text())["t2i"][name]
    with torch.device("meta"):
        model = GPT(gpt_config(name, model_type="t2i", vocab_size=16384, caption_dim=2048))
    assert model.config.cls_token_num == 120  # upstream's caption slots are the t2i default
    sd = model.state_dict()
    assert {k: list(v.shape) for k, v in sd.items()} == ref["state_dict"]
    assert model.num_params() == ref["params"]
    params = dict(model.named_parameters())
    assert sorted(set(sd) - set(params)) == ref["buffers_in_state_dict"] == [NULL]
    assert all(t.is_meta for t in sd.values())


def test_eval_logits_match_upstream(tiny, ref):
    idx, feats, mask = _inputs(ref)
    with torch.no_grad():
        logits, _ = tiny(idx, feats, caption_mask=mask)
    expected = torch.tensor(ref["eval_forward"]["logits"])
    assert logits.shape == expected.shape == (3, 16, 48)
    assert _rel(logits, expected) < 1e-5


@pytest.mark.parametrize("scale", ["1.0", "3.0", "7.5"])
@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_generation_matches_upstream(tiny, ref, scale, use_cache):
    _, feats, mask = _inputs(ref)
    expected = torch.tensor(ref["greedy_generation"]["tokens"][scale])
    out = generate(tiny, feats, 16, SamplingConfig(cfg_scale=float(scale), greedy=True), use_cache=use_cache,
                   caption_mask=mask)
    assert torch.equal(out, expected)


def test_training_mask_is_upstreams_construction(ref):
    """README: lower-triangular S x S, first 120 columns times emb_mask, diagonal back to 1, drop last row/col."""
    mask = torch.tensor(ref["emb_mask"])
    t, n = mask.shape[1], ref["config"]["block_size"]
    s = t + n
    expected = torch.tril(torch.ones(mask.shape[0], s, s))
    expected[:, :, :t] *= mask[:, None, :]
    expected[:, torch.arange(s), torch.arange(s)] = 1
    expected = expected.bool()[:, :-1, :-1]
    got = caption_attention_mask(mask, s - 1)
    assert got.shape == (3, 1, s - 1, s - 1) and torch.equal(got[:, 0], expected)
    assert got.any(-1).all()  # no query row is empty (the diagonal), even on padded slots


def test_loader_refuses_a_t2i_state_dict_without_the_null_caption(ref, tmp_path):
    sd = load_file(str(T2I / "gpt_t2i_tiny.safetensors"))
    cfg = GPTConfig.from_dict(ref["config"])
    model = load_gpt(T2I / "gpt_t2i_tiny.safetensors", cfg)
    assert torch.equal(model.cls_embedding.uncond_embedding, sd[NULL])  # loaded, not the random init
    by_name = load_gpt(T2I / "gpt_t2i_tiny.safetensors", "GPT-nano", model_type="t2i", vocab_size=48, block_size=16,
                       caption_dim=32)  # registry name + overrides: 120 slots by default
    assert by_name.config.cls_token_num == 120 and torch.equal(by_name.output.weight, sd["output.weight"])
    save_file({k: v for k, v in sd.items() if k != NULL}, str(tmp_path / "no_null.safetensors"))
    with pytest.raises(CheckpointError, match=NULL):
        load_gpt(tmp_path / "no_null.safetensors", cfg)


# -- null caption, dropout, slots ---------------------------------------------------------------------------

def test_null_caption_is_a_buffer_the_optimizer_never_sees():
    model = _model(slots=6, width=8, block=4).train()
    null = model.cls_embedding.uncond_embedding
    assert NULL in model.state_dict() and NULL not in dict(model.named_parameters())
    assert all(p is not null for p in model.parameters())
    opt = build_optimizer(model, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.05)
    in_opt = [p for g in opt.param_groups for p in g["params"]]
    assert len(in_opt) == len(list(model.parameters())) and all(p is not null for p in in_opt)
    before, fc1 = null.clone(), model.cls_embedding.cap_proj.fc1.weight.clone()
    feats, mask = _captions([2, 6, 1], 6, 8)
    tokens = torch.randint(0, 37, (3, 4))
    torch.manual_seed(0)
    _, loss = model(tokens[:, :-1], feats, targets=tokens, caption_mask=mask)
    loss.backward()
    opt.step()
    assert torch.equal(null, before) and not torch.equal(model.cls_embedding.cap_proj.fc1.weight, fc1)


def test_caption_dropout_swaps_the_whole_null_caption_in_training_only():
    torch.manual_seed(0)
    model = _model(slots=3, width=4, block=4, class_dropout_prob=0.1)
    emb = model.cls_embedding
    feats = torch.randn(20000, 3, 4)
    null_out = emb.cap_proj(emb.uncond_embedding)
    emb.train()
    with torch.no_grad():
        out = emb(feats)
    dropped = (out == null_out).flatten(1).all(-1)
    assert abs(dropped.float().mean().item() - 0.1) < 0.01
    kept = torch.isclose(out[~dropped], emb.cap_proj(feats[~dropped])).flatten(1).all(-1)
    assert kept.all()  # a sample is either its caption or the whole null caption, never a mix
    emb.eval()
    with torch.no_grad():
        assert not (emb(feats) == null_out).flatten(1).all(-1).any()


def test_cls_token_num_sets_slots_rope_and_cache():
    model = _model(slots=7, width=5, block=9)
    table = rope_2d_table(model.config)
    assert table.shape[0] == 7 + 9 and torch.all(table[:7] == 0) and not torch.all(table[7] == 0)
    assert model.cls_embedding.uncond_embedding.shape == (7, 5)
    feats, mask = _captions([3, 7], 7, 5)
    with torch.no_grad():
        logits, _ = model(torch.randint(0, 37, (2, 8)), feats, caption_mask=mask)
        assert logits.shape == (2, 9, 37)  # the outputs at positions 6 .. 14
        with pytest.raises(ValueError, match=r"\(B, 7, 5\)"):
            model(None, torch.randn(2, 120, 5))
    seen = []
    setup = model.setup_caches
    model.setup_caches = lambda b, n, dtype=None: (seen.append(n), setup(b, n, dtype))
    generate(model, feats, 9, SamplingConfig(greedy=True), caption_mask=mask)
    del model.setup_caches
    assert seen == [7 + 9]


def test_config_accepts_t2i_and_keeps_c2i_rules():
    assert GPTConfig(model_type="t2i", cls_token_num=120).caption_dim == 2048
    assert gpt_config("GPT-B", model_type="t2i", cls_token_num=16).cls_token_num == 16
    assert gpt_config("GPT-B").model_type == "c2i" and gpt_config("GPT-B").cls_token_num == 1
    with pytest.raises(ValueError, match="not supported"):
        GPTConfig(model_type="t2v")
    with pytest.raises(ValueError, match="cls_token_num must be 1"):
        GPTConfig(cls_token_num=120)
    with pytest.raises(ValueError, match="caption_dim"):
        GPTConfig(model_type="t2i", cls_token_num=120, caption_dim=0)
    with pytest.raises(ValueError, match="null caption"):
        GPTConfig(model_type="t2i", cls_token_num=120, null_class=False)


# -- KV cache, padding, CFG ---------------------------------------------------------------------------------

LENGTHS = [1, 2, 57, 119, 120]


@pytest.mark.parametrize("cfg", [False, True])
def test_kv_cache_decode_equals_teacher_forcing_for_mixed_caption_lengths(cfg):
    model = _model(1)
    feats, mask = _captions(LENGTHS, 120, 8)
    if cfg:  # the doubled CFG batch: null caption under the paired caption's mask
        feats = torch.cat([feats, model.cls_embedding.uncond_embedding.expand(len(LENGTHS), -1, -1)])
        mask = torch.cat([mask, mask])
    b = feats.shape[0]
    tokens = torch.randint(0, 37, (b, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full, _ = model(tokens[:, :-1], feats, caption_mask=mask)
        model.setup_caches(b, 120 + 16)
        step = [model(None, feats, torch.arange(120), caption_mask=mask)[0][:, -1]]
        for t in range(15):
            step.append(model(tokens[:, t : t + 1], None, torch.tensor([120 + t]))[0][:, -1])
        model.clear_caches()
    cached = torch.stack(step, dim=1)
    assert cached.shape == full.shape == (b, 16, 37)
    torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-5)


def test_padding_rows_do_not_reach_the_logits_and_the_mask_does():
    model = _model(2)
    feats, mask = _captions(LENGTHS, 120, 8)
    tokens = torch.randint(0, 37, (5, 15))
    noisy = torch.where(mask[..., None], feats, torch.randn_like(feats) * 5)
    with torch.no_grad():
        a, _ = model(tokens, feats, caption_mask=mask)
        b, _ = model(tokens, noisy, caption_mask=mask)
        c, _ = model(tokens, noisy)  # no mask: the noise is read as caption
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(a[:-1], c[:-1], atol=1e-3)  # the full-length row 4 has no padding
    torch.testing.assert_close(a[-1], c[-1], rtol=1e-5, atol=1e-5)


def test_cfg_generation_matches_brute_force_with_interval():
    """Greedy decoding by hand: full forwards on caption and null caption (same mask), mixed for tokens 0..i+1."""
    model = _model(3)
    feats, mask = _captions([1, 40, 120], 120, 8)
    null = model.cls_embedding.uncond_embedding.expand(3, -1, -1)
    scale, interval, n = 4.0, 3, 10
    seq = torch.empty(3, 0, dtype=torch.long)
    with torch.no_grad():
        for t in range(n):
            cond = model(seq, feats, caption_mask=mask)[0][:, -1]
            uncond = model(seq, null, caption_mask=mask)[0][:, -1]
            mixed = uncond + scale * (cond - uncond) if t <= interval + 1 else cond
            seq = torch.cat([seq, mixed.argmax(-1, keepdim=True)], dim=1)
    for use_cache in (True, False):
        out = generate(model, feats, n, SamplingConfig(cfg_scale=scale, cfg_interval=interval, greedy=True),
                       use_cache=use_cache, caption_mask=mask)
        assert torch.equal(out, seq)


def test_seeded_caption_sampling_is_reproducible_cache_agnostic_and_per_sample():
    model = _model(4)
    feats, mask = _captions([5, 120, 33, 1], 120, 8)
    sc = SamplingConfig(cfg_scale=2.5, temperature=1.3, top_k=20, top_p=0.9)
    a = generate(model, feats, 16, sc, generator=torch.Generator().manual_seed(7), caption_mask=mask)
    b = generate(model, feats, 16, sc, generator=torch.Generator().manual_seed(7), caption_mask=mask,
                 use_cache=False)
    c = generate(model, feats, 16, sc, generator=torch.Generator().manual_seed(8), caption_mask=mask)
    assert torch.equal(a, b) and not torch.equal(a, c)
    u = torch.rand(4, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    whole = generate(model, feats, 16, sc, uniforms=u, caption_mask=mask)
    part = generate(model, feats[2:], 16, sc, uniforms=u[2:], caption_mask=mask[2:])
    assert torch.equal(whole[2:], part)  # a row depends on its own caption and uniforms only
    assert a.dtype == torch.long and a.shape == (4, 16) and a.min() >= 0 and a.max() < 37


def test_bad_caption_inputs_are_refused():
    model = _model(slots=6, width=8, block=4)
    feats, mask = _captions([2, 6], 6, 8)
    with pytest.raises(SamplingError, match=r"\(B, 6, 8\)"):
        generate(model, feats[:, :5], 4, caption_mask=mask[:, :5])
    with pytest.raises(SamplingError, match="caption_mask has shape"):
        generate(model, feats, 4, caption_mask=mask[:1])
    with pytest.raises(SamplingError, match="right-aligned"):
        generate(model, feats, 4, caption_mask=mask.flip(1))
    with pytest.raises(SamplingError, match="labels|caption"):
        generate(model, torch.tensor([0, 1]), 4)
    c2i = GPT(gpt_config("GPT-nano", vocab_size=8, block_size=4, num_classes=3))
    with pytest.raises(SamplingError, match="caption_mask"):
        generate(c2i, torch.tensor([0]), 4, caption_mask=mask[:1])
    with pytest.raises(ValueError, match="caption_mask"):
        c2i(torch.zeros(1, 3, dtype=torch.long), torch.tensor([0]), caption_mask=mask[:1])
    with pytest.raises(ValueError, match="right_align|caption 1"):
        right_align_captions([torch.randn(2, 8), torch.randn(7, 8)], 6)


# -- per-sample validity ------------------------------------------------------------------------------------

def _grads(model, tokens, feats, mask, valid):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)  # the same caption-dropout draws every call
    _, loss = model(tokens[:, :-1], feats, targets=tokens, caption_mask=mask, valid=valid)
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}


def test_invalid_sample_contributes_exactly_zero_gradient_and_does_not_dilute_the_mean():
    model = _model(5, slots=10, width=6).train()
    feats, mask = _captions([3, 10, 1, 7], 10, 6)
    tokens = torch.randint(0, 37, (4, 16), generator=torch.Generator().manual_seed(3))
    valid = torch.tensor([True, False, True, True])
    loss, g = _grads(model, tokens, feats, mask, valid)
    feats2, tokens2 = feats.clone(), tokens.clone()
    feats2[1] = float("nan")  # corrupt features
    tokens2[1] = torch.randint(0, 37, (16,))
    loss2, g2 = _grads(model, tokens2, feats2, mask, valid)
    assert torch.equal(loss, loss2) and all(torch.equal(g[k], g2[k]) for k in g)  # bit for bit
    _, g_all = _grads(model, tokens, feats, mask, torch.ones(4, dtype=torch.bool))
    _, g_all2 = _grads(model, tokens2, torch.where(torch.isnan(feats2), 0.0, feats2), mask, torch.ones(4))
    assert not all(torch.equal(g_all[k], g_all2[k]) for k in g)  # valid, the same change does matter
    model.cls_embedding.dropout_prob = 0.0  # a smaller batch draws other caption dropouts
    loss, g = _grads(model, tokens, feats, mask, valid)
    keep = torch.tensor([0, 2, 3])
    loss3, g3 = _grads(model, tokens[keep], feats[keep], mask[keep], None)  # the valid samples alone
    torch.testing.assert_close(loss, loss3, rtol=1e-6, atol=1e-6)
    for k in g:
        torch.testing.assert_close(g[k], g3[k], rtol=1e-4, atol=1e-6)
    loss4, g4 = _grads(model, tokens, feats, mask, valid.float())  # 0/1 floats work the same
    assert torch.equal(loss, loss4) and all(torch.equal(g[k], g4[k]) for k in g)


def test_no_valid_sample_gives_a_zero_loss_on_the_graph():
    model = _model(6, slots=4, width=6).train()
    feats, mask = _captions([1, 4], 4, 6)
    tokens = torch.randint(0, 37, (2, 16))
    loss, g = _grads(model, tokens, feats, mask, torch.zeros(2))
    assert loss.item() == 0.0
    assert all(torch.count_nonzero(v) == 0 for v in g.values())


def test_initial_loss_is_uniform_with_zero_init_head():
    torch.manual_seed(0)
    model = GPT(gpt_config("GPT-nano", model_type="t2i", vocab_size=64, block_size=16, cls_token_num=5,
                           caption_dim=6))
    feats, mask = _captions([2, 5], 5, 6)
    tokens = torch.randint(0, 64, (2, 16))
    _, loss = model(tokens[:, :-1], feats, targets=tokens, caption_mask=mask)
    assert abs(loss.item() - math.log(64)) < 1e-5


# -- parity CLI ---------------------------------------------------------------------------------------------

def _parity(path, capsys):
    rc = parity_main([str(path)])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_parity_cli_passes_on_both_golden_fixture_dirs(capsys):
    rc, out, err = _parity(T2I, capsys)
    assert rc == 0, out + err
    assert "7/7 checks passed" in out
    for name in ("t2i eval logits", "t2i greedy cfg=1.0", "t2i greedy cfg=3.0", "t2i greedy cfg=7.5",
                 "t2i strict load w/o null caption", "t2i GPT-XL state dict", "t2i GPT-B state dict"):
        assert f"ok    {name}" in out, out
    rc, out, err = _parity(C2I, capsys)
    assert rc == 0, out + err
    assert "c2i GPT-3B state dict" in out and "vq VQ-16 state dict" in out


def _write_t2i_fixture(d: Path, model, feats, mask, lengths, tokens, logits, greedy, shapes):
    d.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(d / "gpt_t2i_tiny.safetensors"))
    cfg = model.config
    keys = ("dim", "n_layer", "n_head", "vocab_size", "block_size", "caption_dim", "cls_token_num", "model_type",
            "class_dropout_prob", "token_dropout_p", "resid_dropout_p", "ffn_dropout_p", "attn_dropout_p")
    (d / "gpt_t2i_tiny.json").write_text(json.dumps({
        "config": {k: getattr(cfg, k) for k in keys}, "caption_lengths": lengths,
        "caption_features": feats.tolist(), "emb_mask": mask.int().tolist(), "input_tokens": tokens.tolist(),
        "eval_forward": {"logits_shape": list(logits.shape), "logits": logits.tolist()},
        "greedy_generation": {"tokens": greedy},
    }))
    (d / "t2i_shapes.json").write_text(json.dumps({"t2i": shapes}))


def test_parity_cli_is_generic_over_sizes_and_fails_on_a_perturbed_reference(tmp_path, capsys):
    """Another seed, grid, caption width, slot count, lengths, batch and cfg set in the same format passes."""
    torch.manual_seed(11)
    cfg = GPTConfig(dim=32, n_layer=1, n_head=2, vocab_size=23, block_size=9, model_type="t2i", cls_token_num=10,
                    caption_dim=12, token_dropout_p=0, resid_dropout_p=0, ffn_dropout_p=0, zero_init_head=False)
    model = GPT(cfg).eval()
    lengths = [1, 10, 4, 7]
    feats, mask = _captions(lengths, 10, 12, seed=5)
    tokens = torch.randint(0, 23, (4, 8))
    with torch.no_grad():
        logits = model(tokens, feats, caption_mask=mask)[0]
    greedy = {s: generate(model, feats, 9, SamplingConfig(cfg_scale=float(s), greedy=True), caption_mask=mask).tolist()
              for s in ("1.0", "2.0", "5.0")}
    with torch.device("meta"):
        nano = GPT(gpt_config("GPT-nano", model_type="t2i", vocab_size=23, cls_token_num=10, caption_dim=12))
    shapes = {"GPT-nano": {"params": nano.num_params(), "buffers_in_state_dict": [NULL],
                           "state_dict": {k: list(v.shape) for k, v in nano.state_dict().items()}}}
    _write_t2i_fixture(tmp_path / "ok", model, feats, mask, lengths, tokens, logits, greedy, shapes)
    rc, out, err = _parity(tmp_path / "ok", capsys)
    assert rc == 0, out + err
    assert "6/6 checks passed" in out and "t2i greedy cfg=5.0" in out and "t2i GPT-nano state dict" in out

    greedy["2.0"][3][5] = (greedy["2.0"][3][5] + 1) % 23
    bad_shapes = json.loads(json.dumps(shapes))
    bad_shapes["GPT-nano"]["state_dict"][NULL] = [120, 12]
    _write_t2i_fixture(tmp_path / "bad", model, feats, mask, lengths, tokens, logits * 1.001, greedy, bad_shapes)
    rc, out, _ = _parity(tmp_path / "bad", capsys)
    assert rc == 1
    assert "FAIL  t2i eval logits" in out and "FAIL  t2i greedy cfg=2.0" in out
    assert "ok    t2i greedy cfg=1.0" in out and "ok    t2i greedy cfg=5.0" in out


def test_parity_cli_fails_when_one_weight_is_perturbed(tmp_path, capsys):
    for f in T2I.iterdir():
        shutil.copy(f, tmp_path / f.name)
    sd = load_file(str(tmp_path / "gpt_t2i_tiny.safetensors"))
    sd["layers.1.feed_forward.w2.weight"][3, 7] += 0.05
    save_file(sd, str(tmp_path / "gpt_t2i_tiny.safetensors"))
    rc, out, _ = _parity(tmp_path, capsys)
    assert rc == 1, out
    assert "FAIL  t2i eval logits" in out


def test_parity_cli_fails_in_one_line_without_golden_files(tmp_path, capsys):
    (tmp_path / "README.md").write_text("not a fixture")
    rc, out, err = _parity(tmp_path, capsys)
    assert rc != 0 and out == ""
    assert len(err.strip().splitlines()) == 1 and "none of the golden files" in err
    (tmp_path / "gpt_t2i_tiny.json").write_text("{}")  # half a pair is an error, not silently skipped
    rc, _, err = _parity(tmp_path, capsys)
    assert rc != 0 and "without gpt_t2i_tiny.safetensors" in err
