"""The throughput model behind MFU (torch only, so GPU checks run without Hydra or W&B)."""

from __future__ import annotations

import torch

# Dense (no sparsity) bf16 peak FLOP/s per device from the vendors' data sheets, for the MFU estimate. Most specific
# name first: an "H100 PCIe" must not match the SXM entry. Unknown devices report no MFU rather than a guess
# (``train.peak_tflops`` sets it by hand).
PEAK_BF16 = (
    ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12), ("H800", 989e12),
    ("GH200", 989e12), ("B200", 2250e12), ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12), ("L40", 181e12),
    ("RTX 6000 Ada", 364e12), ("A6000", 155e12), ("RTX 4090", 165e12), ("A10G", 70e12), ("L4", 121e12),
)


def peak_flops_for_name(name: str) -> float | None:
    return next((v for k, v in PEAK_BF16 if k in name), None)


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return peak_flops_for_name(torch.cuda.get_device_name(device))


def flops_per_token(cfg, n_params: int) -> float:
    """Training FLOPs per token: 6 x (non-embedding params) + attention scores (12 x layers x dim x seq)."""
    non_embedding = n_params - cfg.vocab_size * cfg.dim - (cfg.num_classes + 1) * cfg.dim
    return 6 * non_embedding + 12 * cfg.n_layer * cfg.dim * (cfg.block_size + cfg.cls_token_num)
