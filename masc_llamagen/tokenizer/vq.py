"""LlamaGen's VQ image tokenizer, weight-compatible with the released ``vq_ds16_c2i.pt`` / ``vq_ds8_c2i.pt``.

State-dict keys, shapes and parameter counts equal upstream's (tested against
``tests/fixtures/llamagen/shapes.json``), including the 65,536-entry ``quantize.codebook_used`` buffer, so the
released checkpoints load with strict checking. Eval-mode codes and decodings reproduce upstream's (tested
against ``vq_tiny``).

The public API is index-oriented, as the GPT and MASC need it: ``encode`` gives a ``(B, h, w)`` LongTensor,
``decode_code`` turns indices back into images in [-1, 1] (not clamped), ``forward`` trains the tokenizer.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

NORM_GROUPS = 32  # GroupNorm(32) everywhere, as upstream: every channel width must be a multiple of it
NORM_EPS = 1e-6
USAGE_WINDOW = 65536  # length of ``codebook_used``; part of the released state dicts, so not configurable
ENTROPY_TEMPERATURE = 0.01


@dataclass
class VQConfig:
    """One VQ tokenizer; fields up to dropout_p mirror upstream ``ModelArgs`` so its configs load."""

    codebook_size: int = 16384
    codebook_embed_dim: int = 8
    codebook_l2_norm: bool = True
    codebook_show_usage: bool = True
    commit_loss_beta: float = 0.25
    entropy_loss_ratio: float = 0.0
    encoder_ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    decoder_ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    z_channels: int = 256
    dropout_p: float = 0.0
    # Fixed upstream (not in its ModelArgs); exposed so small CPU configs can shrink them.
    ch: int = 128
    encoder_num_res_blocks: int = 2
    decoder_num_res_blocks: int = 3
    in_channels: int = 3

    def __post_init__(self) -> None:
        # JSON gives lists; tuples keep the config hashable and comparable.
        self.encoder_ch_mult = tuple(int(m) for m in self.encoder_ch_mult)
        self.decoder_ch_mult = tuple(int(m) for m in self.decoder_ch_mult)
        if not 1 <= self.codebook_size <= 2**24:
            raise ValueError(
                f"codebook_size={self.codebook_size} must be in [1, 2**24] (float32 usage buffer)"
            )
        if self.codebook_embed_dim < 1 or self.z_channels < 1 or self.in_channels < 1:
            raise ValueError("codebook_embed_dim, z_channels and in_channels must all be >= 1")
        if not self.encoder_ch_mult or not self.decoder_ch_mult:
            raise ValueError("encoder_ch_mult and decoder_ch_mult must be non-empty, e.g. (1, 1, 2, 2, 4)")
        if min(self.encoder_ch_mult + self.decoder_ch_mult) < 1:
            raise ValueError(
                f"channel multipliers must be >= 1, got {self.encoder_ch_mult} / {self.decoder_ch_mult}"
            )
        if len(self.encoder_ch_mult) != len(self.decoder_ch_mult):
            raise ValueError(
                "encoder_ch_mult and decoder_ch_mult need the same length (same down/upsample factor)"
            )
        if self.ch < 1 or self.ch % NORM_GROUPS:
            raise ValueError(f"ch={self.ch} must be a positive multiple of {NORM_GROUPS} (GroupNorm groups)")
        if self.encoder_num_res_blocks < 1 or self.decoder_num_res_blocks < 1:
            raise ValueError("encoder_num_res_blocks and decoder_num_res_blocks must be >= 1")
        if not 0.0 <= self.dropout_p < 1.0:
            raise ValueError(f"dropout_p={self.dropout_p} must be in [0, 1)")
        if self.commit_loss_beta < 0 or self.entropy_loss_ratio < 0:
            raise ValueError("commit_loss_beta and entropy_loss_ratio must be >= 0")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.encoder_ch_mult) - 1)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["encoder_ch_mult"] = list(self.encoder_ch_mult)
        d["decoder_ch_mult"] = list(self.decoder_ch_mult)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> VQConfig:
        """Build from a JSON/checkpoint dict, refusing unknown keys so a typo is not silently ignored."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown VQConfig fields {unknown}; known fields are {sorted(known)}")
        return cls(**d)


VQ_CONFIGS: dict[str, VQConfig] = {
    # Released upstream tokenizers (71,883,403 and 70,109,835 parameters).
    "VQ-16": VQConfig(encoder_ch_mult=(1, 1, 2, 2, 4), decoder_ch_mult=(1, 1, 2, 2, 4)),
    "VQ-8": VQConfig(encoder_ch_mult=(1, 2, 2, 4), decoder_ch_mult=(1, 2, 2, 4)),
    # CPU-sized, for 32x32 images (e.g. 28x28 padded to 32): downsample 4 -> 8x8 = 64 tokens.
    # 897,323 parameters; codebook 1024 x 8.
    "VQ-tiny": VQConfig(
        codebook_size=1024,
        encoder_ch_mult=(1, 2, 2),
        decoder_ch_mult=(1, 2, 2),
        z_channels=64,
        ch=32,
        encoder_num_res_blocks=1,
        decoder_num_res_blocks=1,
    ),
    # Larger CPU/small-GPU model, for 32x32 (-> 8x8) or 64x64 (-> 16x16) images: downsample 4.
    # 5,035,851 parameters; codebook 4096 x 8.
    "VQ-small": VQConfig(
        codebook_size=4096,
        encoder_ch_mult=(1, 2, 2),
        decoder_ch_mult=(1, 2, 2),
        z_channels=128,
        ch=64,
        encoder_num_res_blocks=2,
        decoder_num_res_blocks=2,
    ),
}


def get_vq_config(name_or_config: str | VQConfig | Mapping[str, Any]) -> VQConfig:
    if isinstance(name_or_config, VQConfig):
        return replace(name_or_config)
    if isinstance(name_or_config, Mapping):
        return VQConfig.from_dict(name_or_config)
    if name_or_config not in VQ_CONFIGS:
        raise ValueError(f"unknown VQ config {name_or_config!r}; choose one of {sorted(VQ_CONFIGS)}")
    return replace(VQ_CONFIGS[name_or_config])


def build_vq(name_or_config: str | VQConfig | Mapping[str, Any]) -> VQModel:
    """A fresh VQModel from a registry name, a config, or a config dict (e.g. a checkpoint's model_config)."""
    return VQModel(get_vq_config(name_or_config))


# ----------------------------------------------------------------------------------------------------
# Building blocks. Attribute names are the state-dict contract; do not rename them.


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(NORM_GROUPS, channels, eps=NORM_EPS, affine=True)


class ResBlock(nn.Module):
    """Pre-activation residual block; a 1x1 ``nin_shortcut`` only where the width changes."""

    def __init__(self, in_ch: int, out_ch: int, dropout_p: float = 0.0) -> None:
        super().__init__()
        self.norm1 = _norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = _norm(out_ch)
        self.dropout = nn.Dropout(dropout_p)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return skip + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1-conv projections and a residual."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = _norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hh, ww = x.shape
        h = self.norm(x)

        def tokens(t: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, 1, HW, C)
            return t.reshape(b, c, hh * ww).transpose(1, 2).unsqueeze(1)

        out = F.scaled_dot_product_attention(tokens(self.q(h)), tokens(self.k(h)), tokens(self.v(h)))
        out = out.squeeze(1).transpose(1, 2).reshape(b, c, hh, ww)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Stride-2 3x3 conv after zero-padding only the right and bottom edges (upstream's exact geometry)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 conv (no checkerboard artefacts of transposed convs)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: res blocks, attention after each (lowest resolution only), then a resample."""

    def __init__(self, res: list[ResBlock], attn: bool, resample: nn.Module | None, name: str) -> None:
        super().__init__()
        self.res = nn.ModuleList(res)
        if attn:
            self.attn = nn.ModuleList(AttnBlock(r.conv2.out_channels) for r in res)
        else:
            self.attn = None
        if resample is not None:
            setattr(self, name, resample)
        self._resample_name = name if resample is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.res):
            x = block(x)
            if self.attn is not None:
                x = self.attn[i](x)
        if self._resample_name is not None:
            x = getattr(self, self._resample_name)(x)
        return x


def _mid(channels: int, dropout_p: float) -> nn.ModuleList:
    res = [ResBlock(channels, channels, dropout_p) for _ in range(2)]
    return nn.ModuleList([res[0], AttnBlock(channels), res[1]])


class Encoder(nn.Module):
    def __init__(self, cfg: VQConfig) -> None:
        super().__init__()
        mults = cfg.encoder_ch_mult
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        levels = []
        block_in = cfg.ch
        for i, mult in enumerate(mults):
            block_out = cfg.ch * mult
            res = []
            for _ in range(cfg.encoder_num_res_blocks):
                res.append(ResBlock(block_in, block_out, cfg.dropout_p))
                block_in = block_out
            last = i == len(mults) - 1
            down = None if last else Downsample(block_in)
            levels.append(_Level(res, attn=last, resample=down, name="downsample"))
        self.conv_blocks = nn.ModuleList(levels)
        self.mid = _mid(block_in, cfg.dropout_p)
        self.norm_out = _norm(block_in)
        self.conv_out = nn.Conv2d(block_in, cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.conv_blocks:
            h = level(h)
        for block in self.mid:
            h = block(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: VQConfig) -> None:
        super().__init__()
        mults = tuple(reversed(cfg.decoder_ch_mult))
        block_in = cfg.ch * mults[0]
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, 3, padding=1)
        self.mid = _mid(block_in, cfg.dropout_p)
        levels = []
        for i, mult in enumerate(mults):
            block_out = cfg.ch * mult
            res = []
            for _ in range(cfg.decoder_num_res_blocks):
                res.append(ResBlock(block_in, block_out, cfg.dropout_p))
                block_in = block_out
            last = i == len(mults) - 1
            up = None if last else Upsample(block_in)
            levels.append(_Level(res, attn=i == 0, resample=up, name="upsample"))
        self.conv_blocks = nn.ModuleList(levels)
        self.norm_out = _norm(block_in)
        self.conv_out = nn.Conv2d(block_in, cfg.in_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        for block in self.mid:
            h = block(h)
        for level in self.conv_blocks:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


# ----------------------------------------------------------------------------------------------------
# Quantiser


class VQLosses(NamedTuple):
    """Training terms of the quantiser; a tuple so it unpacks like upstream's, with names for logging."""

    codebook_loss: torch.Tensor  # pulls codes towards (detached) encoder outputs
    commit_loss: torch.Tensor  # beta-weighted: pulls encoder outputs towards (detached) codes
    entropy_loss: torch.Tensor  # ratio-weighted; zero when entropy_loss_ratio == 0
    codebook_usage: torch.Tensor  # fraction of codes used (recent window when tracked, else this batch)


def entropy_loss(logits: torch.Tensor, temperature: float = ENTROPY_TEMPERATURE) -> torch.Tensor:
    """Per-sample entropy minus entropy of the batch-mean assignment.

    Low per-sample entropy makes assignments confident; high batch entropy spreads them over the codebook.
    """
    logits = logits.reshape(-1, logits.shape[-1]).float() / temperature
    probs = logits.softmax(-1)
    log_probs = logits.log_softmax(-1)
    sample_entropy = -(probs * log_probs).sum(-1).mean()
    mean_probs = probs.mean(0)
    batch_entropy = -(mean_probs * torch.log(mean_probs + 1e-5)).sum()
    return sample_entropy - batch_entropy


class VectorQuantizer(nn.Module):
    """Nearest-code quantiser with a straight-through estimator.

    With ``l2_norm`` the inputs and the codebook are projected on the unit sphere before the search (cosine
    similarity), which is what keeps usage high with LlamaGen's 16384 x 8 codebook.
    """

    def __init__(
        self,
        codebook_size: int,
        embed_dim: int,
        beta: float = 0.25,
        entropy_loss_ratio: float = 0.0,
        l2_norm: bool = True,
        show_usage: bool = True,
    ) -> None:
        super().__init__()
        self.codebook_size = codebook_size
        self.embed_dim = embed_dim
        self.beta = beta
        self.entropy_loss_ratio = entropy_loss_ratio
        self.l2_norm = l2_norm
        self.show_usage = show_usage
        self.embedding = nn.Embedding(codebook_size, embed_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / codebook_size, 1.0 / codebook_size)
        if l2_norm:
            with torch.no_grad():
                self.embedding.weight.copy_(F.normalize(self.embedding.weight, dim=-1))
        # Rolling window of the last USAGE_WINDOW assigned codes, float32 as in the released checkpoints.
        # -1 marks never-written slots (upstream starts from zeros, counting code 0 as used before training).
        self.register_buffer("codebook_used", torch.full((USAGE_WINDOW,), -1.0))

    def codebook(self) -> torch.Tensor:
        """The codebook as the search and the decoder see it (normalised when l2_norm)."""
        w = self.embedding.weight
        return F.normalize(w, dim=-1) if self.l2_norm else w

    def _prepare(self, z: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, H, W, C), normalised when l2_norm."""
        if z.dim() != 4 or z.shape[1] != self.embed_dim:
            raise ValueError(f"expected latents (B, {self.embed_dim}, H, W), got {tuple(z.shape)}")
        z = z.permute(0, 2, 3, 1)
        return F.normalize(z, dim=-1) if self.l2_norm else z

    def _distances(self, z_flat: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Squared Euclidean distances (N, K), in float32 so bf16 autocast cannot flip assignments."""
        with torch.autocast(device_type=z_flat.device.type, enabled=False):
            z_flat, codes = z_flat.float(), codes.float()
            return z_flat.pow(2).sum(1, keepdim=True) + codes.pow(2).sum(1) - 2.0 * (z_flat @ codes.t())

    @torch.no_grad()
    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """Code indices (B, H, W) for latents (B, C, H, W); touches neither losses nor the usage window."""
        zp = self._prepare(z)
        d = self._distances(zp.reshape(-1, self.embed_dim), self.codebook())
        return d.argmin(1).reshape(zp.shape[:-1])

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Code vectors (..., C) for integer indices of any shape."""
        if indices.is_floating_point():
            raise TypeError(f"code indices must be integers, got {indices.dtype}")
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.codebook_size):
            lo, hi = int(indices.min()), int(indices.max())
            raise ValueError(f"code indices must be in [0, {self.codebook_size}), got [{lo}, {hi}]")
        return F.embedding(indices.long(), self.codebook())

    @torch.no_grad()
    def record_usage(self, indices: torch.Tensor) -> None:
        """Append codes to the rolling usage window (oldest entries drop out)."""
        new = indices.reshape(-1).to(self.codebook_used.dtype)[-USAGE_WINDOW:]
        n = new.numel()
        if n == 0:
            return
        if n < USAGE_WINDOW:
            self.codebook_used[:-n] = self.codebook_used[n:].clone()
        self.codebook_used[-n:] = new

    @torch.no_grad()
    def usage(self) -> float:
        """Fraction of the codebook seen in the usage window (0.0 before anything was recorded)."""
        seen = self.codebook_used[self.codebook_used >= 0]
        return float(torch.unique(seen).numel()) / self.codebook_size

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, VQLosses]:
        """(quantised latents with straight-through gradients (B, C, H, W), indices (B, H, W), losses)."""
        zp = self._prepare(z)
        codes = self.codebook()
        d = self._distances(zp.reshape(-1, self.embed_dim), codes)
        indices = d.argmin(1)
        zq = F.embedding(indices, codes).reshape(zp.shape).to(zp.dtype)
        indices = indices.reshape(zp.shape[:-1])

        codebook_loss = F.mse_loss(zq, zp.detach())
        commit_loss = self.beta * F.mse_loss(zp, zq.detach())
        if self.entropy_loss_ratio > 0:
            ent = self.entropy_loss_ratio * entropy_loss(-d)
        else:
            ent = zp.new_zeros(())
        if self.show_usage and self.training:
            self.record_usage(indices)
            used = self.usage()
        else:
            used = float(torch.unique(indices).numel()) / self.codebook_size
        usage = torch.tensor(used, device=zp.device)

        zq = zp + (zq - zp).detach()  # straight-through: decoder gradients reach the encoder unchanged
        return zq.permute(0, 3, 1, 2).contiguous(), indices, VQLosses(codebook_loss, commit_loss, ent, usage)


# ----------------------------------------------------------------------------------------------------
# Full model


class VQModel(nn.Module):
    """Encoder -> quant_conv -> quantiser -> post_quant_conv -> decoder, with upstream's module names."""

    def __init__(self, config: VQConfig | Mapping[str, Any] | str) -> None:
        super().__init__()
        # Accept dicts and registry names too, so configs read back from checkpoints work unconverted.
        config = config if isinstance(config, VQConfig) else get_vq_config(config)
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quantize = VectorQuantizer(
            config.codebook_size,
            config.codebook_embed_dim,
            beta=config.commit_loss_beta,
            entropy_loss_ratio=config.entropy_loss_ratio,
            l2_norm=config.codebook_l2_norm,
            show_usage=config.codebook_show_usage,
        )
        self.quant_conv = nn.Conv2d(config.z_channels, config.codebook_embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.codebook_embed_dim, config.z_channels, 1)

    @property
    def downsample_factor(self) -> int:
        return self.config.downsample_factor

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    @property
    def last_layer(self) -> torch.Tensor:
        """Decoder output weight, for the adaptive GAN-loss weight in tokenizer training."""
        return self.decoder.conv_out.weight

    def num_tokens_hw(self, image_size: int | Sequence[int]) -> tuple[int, int]:
        """Token grid (h, w) for an image size (int for square, or (H, W))."""
        hw = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        f = self.downsample_factor
        if len(hw) != 2 or any(s < 1 or s % f for s in hw):
            raise ValueError(
                f"image size {image_size} must be positive and divisible by the downsample factor {f}"
            )
        return hw[0] // f, hw[1] // f

    def _check_images(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(
                f"expected images (B, {self.config.in_channels}, H, W) in [-1, 1], got {tuple(x.shape)}"
            )
        self.num_tokens_hw(tuple(x.shape[-2:]))

    def _latents(self, x: torch.Tensor) -> torch.Tensor:
        self._check_images(x)
        return self.quant_conv(self.encoder(x))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Code indices (B, h, w), int64, for images (B, 3, H, W) in [-1, 1]."""
        return self.quantize.nearest(self._latents(x))

    def decode(self, zq: torch.Tensor) -> torch.Tensor:
        """Images from quantised latents (B, C, h, w); output is not clamped."""
        return self.decoder(self.post_quant_conv(zq))

    def decode_code(self, indices: torch.Tensor, shape: Sequence[int] | None = None) -> torch.Tensor:
        """Images from code indices.

        ``indices`` may be (B, h, w), or flat (B*h*w,) / (B, h*w) together with upstream's
        ``shape=(B, embed_dim, h, w)``; (B, L) with square L is also accepted without ``shape``.
        """
        c = self.config.codebook_embed_dim
        if shape is not None:
            b, sc, h, w = (int(s) for s in shape)
            if sc != c:
                raise ValueError(f"shape[1]={sc} must equal codebook_embed_dim={c} (shape is (B, C, h, w))")
            if indices.numel() != b * h * w:
                raise ValueError(f"{indices.numel()} indices do not fill shape (B={b}, h={h}, w={w})")
            indices = indices.reshape(b, h, w)
        elif indices.dim() == 2:
            side = math.isqrt(indices.shape[1])
            if side * side != indices.shape[1]:
                raise ValueError(
                    f"cannot infer a square grid from {indices.shape[1]} tokens; pass shape=(B, C, h, w)"
                )
            indices = indices.reshape(indices.shape[0], side, side)
        elif indices.dim() != 3:
            raise ValueError(f"indices of shape {tuple(indices.shape)} need shape=(B, C, h, w)")
        zq = self.quantize.lookup(indices).permute(0, 3, 1, 2).contiguous()
        return self.decode(zq.to(self.post_quant_conv.weight.dtype))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, VQLosses]:
        """(reconstruction, quantiser losses) for tokenizer training; train mode updates the usage window."""
        zq, _, losses = self.quantize(self._latents(x))
        return self.decode(zq), losses

    @torch.no_grad()
    def codebook_usage(self) -> float:
        """Fraction of codes seen in the last 65,536 training assignments."""
        return self.quantize.usage()
