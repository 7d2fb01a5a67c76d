"""Turning decoder outputs into uint8 images and grids (LlamaGen's mapping: clamp(127.5 x + 128))."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in about [-1, 1] -> (B, H, W, 3) uint8."""
    return torch.clamp(127.5 * images.float() + 128.0, 0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def save_grid(images: torch.Tensor, path: Path, nrow: int = 8) -> Path:
    from PIL import Image

    arr = to_uint8(images)
    b, h, w, c = arr.shape
    rows = (b + nrow - 1) // nrow
    grid = np.full((rows * h, nrow * w, c), 255, dtype=np.uint8)
    for i in range(b):
        r, col = divmod(i, nrow)
        grid[r * h : (r + 1) * h, col * w : (col + 1) * w] = arr[i]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path)
    return path
