"""AdamW with weight decay on >= 2-D tensors only (LlamaGen), and the LR schedules of both recipes.

The schedules are closed forms run by torch's ``LambdaLR``, not ``LinearLR``/``CosineAnnealingLR``/``SequentialLR``
(recursive factors that drift from the closed form by rounding, and another state-dict layout than the one resume
loads) nor timm's ``CosineLRScheduler`` (a different warm-up ramp and its own step API).
"""

from __future__ import annotations

import math

import torch
from torch import nn


def build_optimizer(model: nn.Module, lr: float, betas, eps: float, weight_decay: float,
                    device: torch.device | None = None) -> torch.optim.AdamW:
    """``device``: where the parameters will live once prepared (the optimizer is built before they move there);
    fused AdamW on CUDA, one kernel for all tensors instead of a loop of small ones."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    cuda = (device.type if device is not None else next(model.parameters()).device.type) == "cuda"
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, fused=True if cuda else None)


def warmup_cosine(step: int, total: int, warmup: int, end_ratio: float) -> float:
    """LR multiplier at 0-based ``step``: linear warmup to 1 over ``warmup`` steps, then a cosine from 1 down to
    ``end_ratio`` at ``total``. The project's one warmup + cosine (the tokenizer trainer uses it too)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    span = max(1, total - warmup)
    t = min(1.0, (step - warmup) / span)
    return end_ratio + (1.0 - end_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))


def lr_factor(step: int, total: int, schedule: str, warmup: int, lr: float, final_lr: float) -> float:
    """Multiplier of the base LR at ``step`` (0-based optimizer step)."""
    if schedule == "constant":
        return (step + 1) / warmup if warmup > 0 and step < warmup else 1.0
    if schedule == "cosine":
        return warmup_cosine(step, total, warmup, final_lr / lr)
    raise ValueError(f"unknown LR schedule {schedule!r}; use 'constant' or 'cosine'")


def build_scheduler(opt: torch.optim.Optimizer, total: int, schedule: str, warmup: int, lr: float,
                    final_lr: float) -> torch.optim.lr_scheduler.LambdaLR:
    lr_factor(0, total, schedule, warmup, lr, final_lr)  # validate the name now, not at step 1
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, total, schedule, warmup, lr, final_lr))
