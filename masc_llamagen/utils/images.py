"""The one mapping between model-space images ([-1, 1] floats) and uint8 pixels, used by every stage.

LlamaGen's mapping ``clamp(127.5 x + 128, 0, 255)`` truncated to uint8: round half up of ``(x + 1) 127.5``, so the
dataset's ``u / 127.5 - 1`` normalisation round-trips exactly and saved PNGs match upstream's byte for byte.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """``(..., C, H, W)`` floats in about [-1, 1] -> ``(..., H, W, C)`` uint8 on the same device (channels last, as
    PNG writers, FID tools and ADM ``.npz`` files want them)."""
    return torch.clamp(127.5 * x.detach().float() + 128.0, 0, 255).to(torch.uint8).movedim(-3, -1).contiguous()


def to_uint8_numpy(x: torch.Tensor) -> np.ndarray:
    """:func:`to_uint8` brought to host memory."""
    return to_uint8(x).cpu().numpy()


def from_uint8(u: np.ndarray | torch.Tensor) -> torch.Tensor:
    """``(..., H, W, C)`` uint8 -> ``(..., C, H, W)`` float32 in [-1, 1] (``u / 127.5 - 1``)."""
    if isinstance(u, np.ndarray):  # a read-only buffer (a PIL image's) is copied: torch cannot share it safely
        u = torch.from_numpy(np.ascontiguousarray(u) if u.flags.writeable else np.array(u))
    return u.movedim(-1, -3).float().div(127.5).sub(1.0)


def save_grid(images: torch.Tensor | np.ndarray, path: str | Path, nrow: int = 8) -> Path:
    """A PNG grid on a white background (torchvision lays it out) of ``(B, C, H, W)`` floats in [-1, 1] or of
    ``(B, H, W, C)`` uint8 images as the sampler returns them (uint8 round-trips exactly)."""
    from PIL import Image
    from torchvision.utils import make_grid

    if isinstance(images, np.ndarray) or images.dtype == torch.uint8:
        images = from_uint8(images)
    grid = make_grid(images.detach().float().cpu().clamp(-1, 1), nrow=nrow, padding=0, pad_value=1.0)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(to_uint8_numpy(grid)).save(path)
    return path
