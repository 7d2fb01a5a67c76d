"""Exponential moving average of the weights, on by default and used for sampling (as DiT).

Hand-written rather than torch's ``AveragedModel`` + ``get_ema_multi_avg_fn`` or timm's ``ModelEmaV3``: both
deep-copy the module (a second wrapped or sharded model, ``module.``/``n_averaged`` keys in the checkpoint) and
decay at a fixed rate or timm's own warm-up curve, so the saved EMA keys and values would change.
"""

from __future__ import annotations

import torch
from torch import nn


class EMA:
    """Float copies of every floating-point tensor of the model's state dict, updated with one fused lerp.

    The decay warms up as ``min(decay, (1 + n) / (10 + n))`` after n updates: with a constant 0.9999 a short run's
    EMA would still be mostly the random initialisation (0.999 ** 600 = 55% of it after 600 steps), and its samples
    noise. Long runs are unaffected (the warm-up is over after a few thousand steps).
    """

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema_decay={decay} must be in [0, 1)")
        self.decay = decay
        self.num_updates = 0
        self.shadow = {k: v.detach().clone().float() for k, v in model.state_dict().items() if v.is_floating_point()}

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        sd = model.state_dict()
        keys = list(self.shadow)
        weight = 1.0 - self.current_decay()
        torch._foreach_lerp_([self.shadow[k] for k in keys], [sd[k].detach().float() for k in keys], weight)
        self.num_updates += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, sd: dict[str, torch.Tensor], num_updates: int) -> None:
        self.num_updates = int(num_updates)
        missing = set(self.shadow) ^ set(sd)
        if missing:
            raise ValueError(f"EMA state does not match the model: differing keys {sorted(missing)[:5]}")
        for k, v in sd.items():
            self.shadow[k].copy_(v)

    def model_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """A full state dict for ``model`` with EMA weights in the model's dtypes (non-float buffers copied)."""
        sd = model.state_dict()
        return {k: (self.shadow[k].to(v.dtype) if k in self.shadow else v.detach().clone()) for k, v in sd.items()}
