"""The throughput model behind MFU (torch only, so GPU checks run without Hydra or W&B)."""

from __future__ import annotations

import torch

# Dense bf16 peak FLOP/s per device, for the MFU estimate; unknown devices report no MFU rather than a guess.
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A6000": 155e12, "4090": 165e12}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def flops_per_token(cfg, n_params: int) -> float:
    """Training FLOPs per token: 6 x (non-embedding params) + attention scores (12 x layers x dim x seq)."""
    non_embedding = n_params - cfg.vocab_size * cfg.dim - (cfg.num_classes + 1) * cfg.dim
    return 6 * non_embedding + 12 * cfg.n_layer * cfg.dim * (cfg.block_size + cfg.cls_token_num)
