"""Exponential moving average of the weights, on by default and used for sampling (as DiT)."""

from __future__ import annotations

import torch
from torch import nn


class EMA:
    """Float copies of every floating-point tensor of the model's state dict, updated with one fused lerp."""

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema_decay={decay} must be in [0, 1)")
        self.decay = decay
        self.shadow = {k: v.detach().clone().float() for k, v in model.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        sd = model.state_dict()
        keys = list(self.shadow)
        torch._foreach_lerp_([self.shadow[k] for k in keys], [sd[k].detach().float() for k in keys], 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        missing = set(self.shadow) ^ set(sd)
        if missing:
            raise ValueError(f"EMA state does not match the model: differing keys {sorted(missing)[:5]}")
        for k, v in sd.items():
            self.shadow[k].copy_(v)

    def model_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """A full state dict for ``model`` with EMA weights in the model's dtypes (non-float buffers copied)."""
        sd = model.state_dict()
        return {k: (self.shadow[k].to(v.dtype) if k in self.shadow else v.detach().clone()) for k, v in sd.items()}
