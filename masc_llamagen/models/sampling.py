"""Autoregressive sampling with a static KV cache, classifier-free guidance, temperature, top-k and top-p.

Prefill the condition (the class position, or a t2i model's ``cls_token_num`` caption slots), then decode one token
per step. CFG doubles the batch with the null class (t2i: the null caption ``uncond_embedding``, under its paired
caption's mask), conditional half first, and mixes ``uncond + s * (cond - uncond)`` before temperature; after an
optional interval only the conditional half is run. The sampler works on any vocabulary size: for MASC heads it returns
cluster ids that a head's decoder turns into tokens.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from masc_llamagen.errors import MascError
from masc_llamagen.models.gpt import GPT


class SamplingError(MascError, ValueError):
    """Sampling options or a model that cannot be sampled as asked; the message names the problem and the fix."""


@dataclass
class SamplingConfig:
    cfg_scale: float = 1.0
    cfg_interval: int = -1  # -1: guidance on every token; t >= 0: only tokens 0..t+1 are guided (as upstream)
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    greedy: bool = False  # argmax after filtering (used by the parity fixtures)

    def __post_init__(self) -> None:
        if not math.isfinite(self.cfg_scale) or self.cfg_scale < 1.0:
            raise SamplingError(f"cfg_scale={self.cfg_scale} must be >= 1: use cfg_scale=1.0 for no guidance")
        if self.cfg_interval < -1:
            raise SamplingError(f"cfg_interval={self.cfg_interval} must be >= -1: use -1 to guide every token")
        if not math.isfinite(self.temperature) or self.temperature <= 0:
            hint = ("greedy=true already takes the argmax; leave temperature=1.0" if self.greedy
                    else "use a positive temperature, or greedy=true for argmax decoding")
            raise SamplingError(f"temperature={self.temperature} must be > 0: {hint}")
        if self.top_k < 0:
            raise SamplingError(f"top_k={self.top_k} must be >= 0: use top_k=0 to keep every token")
        if not 0.0 < self.top_p <= 1.0:
            raise SamplingError(f"top_p={self.top_p} must be in (0, 1]: use top_p=1.0 to turn nucleus filtering off")


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set to -inf everything outside the top-k, then outside the smallest set with mass >= top_p."""
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cum > top_p
        drop_sorted[..., 1:] = drop_sorted[..., :-1].clone()  # keep the token that crosses top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One draw per row of ``probs`` (B, V) from uniforms ``u`` (B,) in [0, 1): the first index whose cumulative
    probability exceeds ``u * total``, the total being the cdf's own last entry. Cumulative sums of non-negative
    numbers never decrease, so a zero-probability index (a flat step of the cdf) is never returned, and ``u -> 1``
    is held just below the total so the draw stays in range. Runs in ``u``'s dtype, on ``probs``' device."""
    cdf = probs.to(u.dtype).cumsum(-1)
    total = cdf[..., -1:]
    x = torch.minimum(u.to(cdf.device).unsqueeze(-1) * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, x, right=True).squeeze(-1)


def pick_tokens(logits: torch.Tensor, sc: SamplingConfig, u: torch.Tensor | None = None) -> torch.Tensor:
    """Filtered, tempered draw per row; ``u`` (B,) are the row's uniforms (drawn here on logits' device if None)."""
    logits = filter_logits(logits.float() / sc.temperature, sc.top_k, sc.top_p)
    probs = F.softmax(logits, dim=-1)
    if sc.greedy:
        return torch.topk(probs, k=1, dim=-1).indices[:, 0]
    if u is None:
        u = torch.rand(probs.shape[0], dtype=torch.float64, device=probs.device)
    return inverse_cdf(probs, u)


def check_null_class(model: GPT, cfg_scale: float) -> None:
    """CFG runs the null class (row ``num_classes``): a model trained with class_dropout_prob=0 has none.
    A t2i model always has its null caption (``cls_embedding.uncond_embedding``, loaded from the checkpoint)."""
    if getattr(model.config, "model_type", "c2i") == "t2i":
        return
    if cfg_scale > 1.0 and model.cls_embedding.embedding_table.num_embeddings <= model.config.num_classes:
        raise SamplingError("this model has no null class (trained with class_dropout_prob=0): use cfg_scale=1.0")


def _col(u: torch.Tensor | None, t: int) -> torch.Tensor | None:
    return None if u is None else u[:, t]


def _guide(logits: torch.Tensor, scale: float, guided: bool) -> torch.Tensor:
    cond, uncond = logits.chunk(2, dim=0)
    return uncond + scale * (cond - uncond) if guided else cond


def check_captions(model: GPT, captions: torch.Tensor, caption_mask: torch.Tensor | None) -> torch.Tensor:
    """Validate t2i caption features (B, T, C) and their mask (B, T); returns the mask as bool (all True if None).

    Captions must be right-aligned (left-padded): in each row the mask is 0 .. 0 then 1 .. 1, so the last slot,
    whose output predicts the first image token, is a caption slot whenever the caption is not empty."""
    cfg = model.config
    t, c = cfg.cls_token_num, cfg.caption_dim
    if not torch.is_tensor(captions) or captions.dim() != 3 or tuple(captions.shape[1:]) != (t, c) \
            or not captions.is_floating_point():
        shape = tuple(captions.shape) if torch.is_tensor(captions) else type(captions).__name__
        raise SamplingError(f"caption features have shape {shape}; a t2i model needs float (B, {t}, {c}) features, "
                            f"right-aligned in its cls_token_num={t} slots")
    b = captions.shape[0]
    if caption_mask is None:
        return torch.ones(b, t, dtype=torch.bool, device=captions.device)
    if tuple(caption_mask.shape) != (b, t):
        raise SamplingError(f"caption_mask has shape {tuple(caption_mask.shape)}; need ({b}, {t}), 1 on caption slots")
    if not ((caption_mask == 0) | (caption_mask == 1)).all():
        raise SamplingError("caption_mask must hold only 0/1 (or bool): 1 on caption slots, 0 on padding")
    m = caption_mask.to(torch.bool)
    if b and t > 1 and (m[:, 1:].int() < m[:, :-1].int()).any():
        raise SamplingError("captions must be right-aligned (left-padded): each caption_mask row is 0 .. 0, 1 .. 1")
    return m


@torch.no_grad()
def generate(model: GPT, labels: torch.Tensor, num_tokens: int | None = None,
             sampling: SamplingConfig | None = None, generator: torch.Generator | None = None,
             dtype: torch.dtype = torch.float32, use_cache: bool = True,
             uniforms: torch.Tensor | None = None, caption_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Sample ``num_tokens`` (default: the model's block size) ids per label; returns (B, num_tokens) int64.

    ``labels``: class ids (B,) for a c2i model; for a t2i model the caption features (B, T, caption_dim),
    right-aligned in its T = ``cls_token_num`` slots, with ``caption_mask`` (B, T), 1 on caption slots (None: every
    slot is caption). With CFG the null caption runs under its paired caption's mask, as upstream.

    Token ``t`` of row ``b`` is the inverse-cdf draw of ``uniforms[b, t]`` (B, num_tokens) in [0, 1), so a row's
    tokens depend on its own uniforms only, not on the batch it runs in. Without ``uniforms`` they are drawn up
    front from ``generator`` on the generator's own device (default: the global RNG on the model's device) and
    moved to the model's device. Greedy sampling uses no randomness.

    ``dtype=torch.bfloat16`` runs the model under autocast with bf16 caches; logits stay float32.
    ``use_cache=False`` recomputes the whole prefix every step (the baseline the benchmark compares against).
    """
    sc = sampling or SamplingConfig()
    cfg = model.config
    t2i = getattr(cfg, "model_type", "c2i") == "t2i"
    n = num_tokens or cfg.block_size
    if not 1 <= n <= cfg.block_size:
        raise SamplingError(f"num_tokens={n} must be in [1, block_size={cfg.block_size}]")
    if t2i:
        caption_mask = check_captions(model, labels, caption_mask)
    elif caption_mask is not None:
        raise SamplingError("caption_mask is for caption-conditional (t2i) models; a c2i model takes class ids only")
    elif labels.dim() != 1 or (labels.numel() and (labels.min() < 0 or labels.max() >= cfg.num_classes)):
        raise SamplingError(f"labels must be a 1-D tensor of class ids in [0, {cfg.num_classes})")
    device = model.output.weight.device
    b = labels.shape[0]
    use_cfg = sc.cfg_scale > 1.0
    if use_cfg:
        check_null_class(model, sc.cfg_scale)
    u = None
    if not sc.greedy:
        if uniforms is None:
            gen_device = generator.device if generator is not None else device
            uniforms = torch.rand(b, n, generator=generator, dtype=torch.float64, device=gen_device)
        elif uniforms.dim() != 2 or uniforms.shape[0] != b or uniforms.shape[1] < n:
            raise SamplingError(f"uniforms have shape {tuple(uniforms.shape)}; need ({b}, >= {n}), one per token")
        u = uniforms.to(device)
    labels = labels.to(device)
    if t2i:
        caption_mask = caption_mask.to(device)
    if use_cfg:
        if t2i:  # the null caption, all T rows, under the paired caption's mask
            null = model.cls_embedding.uncond_embedding.to(device, labels.dtype).expand(b, -1, -1)
            labels = torch.cat([labels, null])
            caption_mask = torch.cat([caption_mask, caption_mask])
        else:
            labels = torch.cat([labels, torch.full_like(labels, cfg.num_classes)])

    def cond_kw(rows: int) -> dict:  # c2i models are called exactly as before (no extra keyword)
        return {"caption_mask": caption_mask[:rows]} if t2i else {}

    autocast = (torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext())
    was_training = model.training
    model.eval()
    out = torch.empty(b, n, dtype=torch.long, device=device)
    try:
        with autocast:
            if use_cache:
                model.setup_caches(labels.shape[0], cfg.cls_token_num + n, dtype=dtype)
                logits, _ = model(None, labels, torch.arange(cfg.cls_token_num, device=device),
                                  **cond_kw(labels.shape[0]))
            else:
                logits, _ = model(None, labels, **cond_kw(labels.shape[0]))
            nxt = pick_tokens(_guide(logits[:, -1], sc.cfg_scale, True) if use_cfg else logits[:, -1], sc, _col(u, 0))
            out[:, 0] = nxt
            for t in range(1, n):
                guided = use_cfg and not (sc.cfg_interval > -1 and t - 1 > sc.cfg_interval)
                rows = 2 * b if guided else b  # after the interval only the conditional half runs
                if use_cache:
                    x = out[:, t - 1 : t].repeat(rows // b, 1)
                    pos = torch.tensor([cfg.cls_token_num + t - 1], device=device)
                    logits, _ = model(x, None, pos)
                else:
                    logits, _ = model(out[:, :t].repeat(rows // b, 1), labels[:rows], **cond_kw(rows))
                last = logits[:, -1]
                nxt = pick_tokens(_guide(last, sc.cfg_scale, True) if guided else last, sc, _col(u, t))
                out[:, t] = nxt
    finally:
        if use_cache:
            model.clear_caches()
        model.train(was_training)
    return out
