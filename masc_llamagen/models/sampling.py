"""Autoregressive sampling with a static KV cache, classifier-free guidance, temperature, top-k and top-p.

Prefill the class position, then decode one token per step. CFG doubles the batch with the null class
(conditional half first) and mixes ``uncond + s * (cond - uncond)`` before temperature; after an optional
interval only the conditional half is run. The sampler works on any vocabulary size: for MASC heads it returns
cluster ids that a head's decoder turns into tokens.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from masc_llamagen.models.gpt import GPT


@dataclass
class SamplingConfig:
    cfg_scale: float = 1.0
    cfg_interval: int = -1  # -1: guidance on every token; t >= 0: only tokens 0..t+1 are guided (as upstream)
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    greedy: bool = False  # argmax after filtering (used by the parity fixtures)

    def __post_init__(self) -> None:
        if self.cfg_scale < 1.0:
            raise ValueError(f"cfg_scale={self.cfg_scale} < 1; use 1.0 for no guidance")
        if self.temperature <= 0:
            raise ValueError(f"temperature={self.temperature} must be > 0 (use greedy=True for argmax)")
        if self.top_k < 0 or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_k={self.top_k} must be >= 0 and top_p={self.top_p} in (0, 1]")


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


def pick_tokens(logits: torch.Tensor, sc: SamplingConfig, generator: torch.Generator | None) -> torch.Tensor:
    logits = filter_logits(logits.float() / sc.temperature, sc.top_k, sc.top_p)
    probs = F.softmax(logits, dim=-1)
    if sc.greedy:
        return torch.topk(probs, k=1, dim=-1).indices[:, 0]
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def _guide(logits: torch.Tensor, scale: float, guided: bool) -> torch.Tensor:
    cond, uncond = logits.chunk(2, dim=0)
    return uncond + scale * (cond - uncond) if guided else cond


@torch.no_grad()
def generate(model: GPT, labels: torch.Tensor, num_tokens: int | None = None,
             sampling: SamplingConfig | None = None, generator: torch.Generator | None = None,
             dtype: torch.dtype = torch.float32, use_cache: bool = True) -> torch.Tensor:
    """Sample ``num_tokens`` (default: the model's block size) ids per label; returns (B, num_tokens) int64.

    ``dtype=torch.bfloat16`` runs the model under autocast with bf16 caches; logits stay float32.
    ``use_cache=False`` recomputes the whole prefix every step (the baseline the benchmark compares against).
    """
    sc = sampling or SamplingConfig()
    cfg = model.config
    n = num_tokens or cfg.block_size
    if not 1 <= n <= cfg.block_size:
        raise ValueError(f"num_tokens={n} must be in [1, block_size={cfg.block_size}]")
    if labels.dim() != 1 or (labels.numel() and (labels.min() < 0 or labels.max() >= cfg.num_classes)):
        raise ValueError(f"labels must be a 1-D tensor of class ids in [0, {cfg.num_classes})")
    device = model.output.weight.device
    labels = labels.to(device)
    b = labels.shape[0]
    use_cfg = sc.cfg_scale > 1.0
    if use_cfg:
        labels = torch.cat([labels, torch.full_like(labels, cfg.num_classes)])
    autocast = (torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext())
    was_training = model.training
    model.eval()
    out = torch.empty(b, n, dtype=torch.long, device=device)
    try:
        with autocast:
            if use_cache:
                model.setup_caches(labels.shape[0], cfg.cls_token_num + n, dtype=dtype)
                logits, _ = model(None, labels, torch.arange(cfg.cls_token_num, device=device))
            else:
                logits, _ = model(None, labels)
            nxt = pick_tokens(_guide(logits[:, -1], sc.cfg_scale, True) if use_cfg else logits[:, -1], sc, generator)
            out[:, 0] = nxt
            for t in range(1, n):
                guided = use_cfg and not (sc.cfg_interval > -1 and t - 1 > sc.cfg_interval)
                rows = 2 * b if guided else b  # after the interval only the conditional half runs
                if use_cache:
                    x = out[:, t - 1 : t].repeat(rows // b, 1)
                    pos = torch.tensor([cfg.cls_token_num + t - 1], device=device)
                    logits, _ = model(x, None, pos)
                else:
                    logits, _ = model(out[:, :t].repeat(rows // b, 1), labels[:rows])
                last = logits[:, -1]
                nxt = pick_tokens(_guide(last, sc.cfg_scale, True) if guided else last, sc, generator)
                out[:, t] = nxt
    finally:
        if use_cache:
            model.clear_caches()
        model.train(was_training)
    return out
