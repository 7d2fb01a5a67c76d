"""FSDP2 glue: full (unsharded) tensors in checkpoints, sharded state in memory.

Checkpoints always hold full tensors, so an FSDP run's checkpoint loads anywhere (``load_gpt``, DDP, one GPU) and
resume works with any process count. Everything here is collective: every rank must call it.
"""

from __future__ import annotations

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor, distribute_tensor


def full_tensors(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu() for k, v in sd.items()}


def shard_like(full: dict[str, torch.Tensor], like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Shard each full tensor the way the matching model tensor is sharded (plain tensors stay as they are)."""
    out = {}
    for k, v in full.items():
        ref = like[k]
        if isinstance(ref, DTensor):
            out[k] = distribute_tensor(v.to(ref.device), ref.device_mesh, ref.placements)
        else:
            out[k] = v.to(ref.device)
    return out


def full_optimizer_state(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict:
    return get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_optimizer_state(model: torch.nn.Module, opt: torch.optim.Optimizer, state: dict) -> None:
    set_optimizer_state_dict(model, opt, optim_state_dict=state, options=StateDictOptions(full_state_dict=True))
