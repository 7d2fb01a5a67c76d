"""VQ tokenizer: weight compatibility with upstream LlamaGen, fixture parity, quantiser, training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from masc_llamagen.tokenizer.vq import (
    VQ_CONFIGS,
    VectorQuantizer,
    VQConfig,
    VQModel,
    build_vq,
)
from masc_llamagen.weights import CheckpointError, load_strict, read_state_dict

FIXTURES = Path(__file__).parent / "fixtures" / "llamagen"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def vq_shapes() -> dict:
    return json.loads((FIXTURES / "shapes.json").read_text())["vq"]


@pytest.fixture(scope="module")
def tiny() -> tuple[VQModel, dict]:
    fx = json.loads((FIXTURES / "vq_tiny.json").read_text())
    model = VQModel(VQConfig(**fx["config"]))
    sd, _ = read_state_dict(FIXTURES / "vq_tiny.safetensors")
    load_strict(model, sd, "vq_tiny.safetensors", f"VQConfig({fx['config']})")
    return model.eval(), fx


@pytest.mark.parametrize("name", ["VQ-16", "VQ-8"])
def test_released_configs_match_upstream_state_dict(name: str, vq_shapes: dict) -> None:
    with torch.device("meta"):
        model = VQModel(VQ_CONFIGS[name])
    sd = model.state_dict()
    assert all(t.is_meta for t in sd.values())  # nothing allocated
    assert {k: list(v.shape) for k, v in sd.items()} == vq_shapes[name]["state_dict"]
    assert sum(p.numel() for p in model.parameters()) == vq_shapes[name]["params"]
    assert "quantize.codebook_used" not in dict(model.named_parameters())  # a buffer, not trained


@pytest.mark.parametrize(("name", "params", "factor"), [("VQ-tiny", 897_323, 4), ("VQ-small", 5_035_851, 4)])
def test_small_configs_match_their_documented_size(name: str, params: int, factor: int) -> None:
    with torch.device("meta"):
        model = build_vq(name)
    assert sum(p.numel() for p in model.parameters()) == params
    assert model.downsample_factor == factor and model.num_tokens_hw(32) == (8, 8)


def test_wrong_config_is_refused_by_strict_loading() -> None:
    with torch.device("meta"):
        vq16, vq8 = VQModel(VQ_CONFIGS["VQ-16"]), VQModel(VQ_CONFIGS["VQ-8"])
    with pytest.raises(CheckpointError, match="VQ-8"):
        load_strict(vq8, vq16.state_dict(), "vq_ds16_c2i.pt", "VQ-8")


def test_fixture_encode_indices_exact(tiny: tuple[VQModel, dict]) -> None:
    model, fx = tiny
    with torch.no_grad():
        indices = model.encode(torch.tensor(fx["image"]))
    assert indices.dtype == torch.long
    assert tuple(indices.shape) == (2, *fx["latent_hw"])
    assert indices.flatten().tolist() == fx["indices"]


def test_fixture_decode_code_matches(tiny: tuple[VQModel, dict]) -> None:
    model, fx = tiny
    ref = torch.tensor(fx["decoded"])
    flat = torch.tensor(fx["indices"])
    with torch.no_grad():
        out = model.decode_code(flat, shape=(2, 8, 8, 8))
        grid = model.decode_code(flat.reshape(2, 8, 8))
        rows = model.decode_code(flat.reshape(2, 64))
    assert out.shape == ref.shape
    assert ((out - ref).abs().max() / ref.abs().max()).item() < 1e-5
    torch.testing.assert_close(grid, out, rtol=0, atol=0)
    torch.testing.assert_close(rows, out, rtol=0, atol=0)


def test_fixture_forward_round_trip(tiny: tuple[VQModel, dict]) -> None:
    model, fx = tiny
    image = torch.tensor(fx["image"])
    with torch.no_grad():
        indices = model.encode(image)
        recon, losses = model(image)  # eval-mode forward: same codes, usage window untouched
        codes = model.quantize.lookup(indices)
    assert indices.flatten().tolist() == fx["indices"]
    torch.testing.assert_close(codes.norm(dim=-1), torch.ones(2, 8, 8))  # l2-normalised codes
    torch.testing.assert_close(recon, model.decode_code(indices))
    assert torch.equal(model.quantize.codebook_used, torch.zeros(65536))


def test_quantiser_nearest_neighbour_straight_through_and_usage() -> None:
    torch.manual_seed(0)
    vq = VectorQuantizer(codebook_size=16, embed_dim=4, beta=0.25, l2_norm=True, show_usage=True).train()
    with torch.no_grad():
        vq.embedding.weight.normal_()  # un-normalised on purpose: the search must normalise it
    z = torch.randn(3, 4, 5, 6, requires_grad=True)

    zq, indices, losses = vq(z)

    zn = F.normalize(z.detach().permute(0, 2, 3, 1).reshape(-1, 4), dim=-1)
    cn = F.normalize(vq.embedding.weight.detach(), dim=-1)
    brute = torch.cdist(zn, cn).argmin(1)
    assert torch.equal(indices.flatten(), brute)
    assert indices.shape == (3, 5, 6)
    expected = cn[brute].reshape(3, 5, 6, 4).permute(0, 3, 1, 2)
    torch.testing.assert_close(zq, expected)

    # Straight-through: d zq / d (normalised z) is the identity, so z receives d normalize(z) . g.
    g = torch.randn_like(zq)
    (zq * g).sum().backward()
    z2 = z.detach().clone().requires_grad_(True)
    (F.normalize(z2, dim=1) * g).sum().backward()
    torch.testing.assert_close(z.grad, z2.grad)

    # Losses: codebook term and beta-weighted commitment term on the normalised vectors.
    sq = (zn - cn[brute]).pow(2).mean()
    torch.testing.assert_close(losses.codebook_loss, sq)
    torch.testing.assert_close(losses.commit_loss, 0.25 * sq)
    assert losses.entropy_loss.item() == 0.0

    # Usage window: the newest entries are this batch's codes, oldest slots still empty.
    n = indices.numel()
    assert torch.equal(vq.codebook_used[-n:].long(), indices.flatten())
    assert bool((vq.codebook_used[:-n] == -1).all())
    assert vq.usage() == pytest.approx(indices.unique().numel() / 16)
    assert losses.codebook_usage.item() == pytest.approx(vq.usage())

    # Eval mode leaves the window alone.
    before = vq.codebook_used.clone()
    vq.eval()(torch.randn(1, 4, 2, 2))
    assert torch.equal(vq.codebook_used, before)


def test_quantiser_without_l2_norm_passes_gradient_unchanged() -> None:
    torch.manual_seed(1)
    vq = VectorQuantizer(codebook_size=8, embed_dim=3, l2_norm=False, show_usage=False)
    z = torch.randn(2, 3, 4, 4, requires_grad=True)
    zq, indices, _ = vq(z)
    brute = torch.cdist(z.detach().permute(0, 2, 3, 1).reshape(-1, 3), vq.embedding.weight.detach()).argmin(1)
    assert torch.equal(indices.flatten(), brute)
    g = torch.randn_like(zq)
    (zq * g).sum().backward()
    torch.testing.assert_close(z.grad, g)


def test_training_forward_and_backward_small_config() -> None:
    torch.manual_seed(0)
    cfg = VQConfig(**{**VQ_CONFIGS["VQ-tiny"].to_dict(), "entropy_loss_ratio": 0.1, "codebook_size": 64})
    model = build_vq(cfg).train()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    recon, losses = model(x)
    assert recon.shape == x.shape
    assert all(torch.isfinite(t).all() for t in losses)
    loss = F.mse_loss(recon, x) + losses.codebook_loss + losses.commit_loss + losses.entropy_loss
    loss.backward()
    assert model.encoder.conv_in.weight.grad is not None and model.encoder.conv_in.weight.grad.abs().sum() > 0
    assert model.quantize.embedding.weight.grad.abs().sum() > 0
    assert model.decoder.conv_out.weight.grad.abs().sum() > 0
    assert 0 < model.codebook_usage() <= 1
    assert model.num_tokens_hw(16) == (4, 4) and model.downsample_factor == 4


def test_config_accepts_json_lists_and_rejects_nonsense() -> None:
    fx = json.loads((FIXTURES / "vq_tiny.json").read_text())
    cfg = VQConfig(**fx["config"])
    assert cfg.encoder_ch_mult == (1, 1) and cfg.downsample_factor == 2
    assert VQConfig.from_dict(cfg.to_dict()) == cfg
    with torch.device("meta"):
        assert VQModel(fx["config"]).config == cfg  # a checkpoint's config dict works unconverted
    assert VQ_CONFIGS["VQ-16"].downsample_factor == 16 and VQ_CONFIGS["VQ-8"].downsample_factor == 8
    for bad in (
        {"codebook_size": 0},
        {"ch": 48},
        {"encoder_ch_mult": []},
        {"encoder_ch_mult": [1, 2], "decoder_ch_mult": [1, 2, 2]},
        {"dropout_p": 1.5},
    ):
        with pytest.raises(ValueError):
            VQConfig(**bad)
    with pytest.raises(ValueError, match="unknown VQConfig"):
        VQConfig.from_dict({"codebook_sise": 10})
    with pytest.raises(ValueError, match="unknown VQ config"):
        build_vq("VQ-32")


def test_bad_inputs_give_clear_errors(tiny: tuple[VQModel, dict]) -> None:
    model, _ = tiny
    with pytest.raises(ValueError, match="divisible"):
        model.encode(torch.zeros(1, 3, 15, 16))
    with pytest.raises(ValueError, match=r"\[0, 64\)"):
        model.decode_code(torch.full((1, 2, 2), 64))
    with pytest.raises(ValueError, match="shape"):
        model.decode_code(torch.zeros(12, dtype=torch.long))
