"""The COCO-30k protocol's image transform, shared by its FID and its CLIP score (so both see the same pixels)."""

from __future__ import annotations

import os

import numpy as np

from masc_llamagen.eval.metrics import EvalError

EVAL_RESOLUTION = 256


def center_crop_lanczos(image: np.ndarray, size: int = EVAL_RESOLUTION) -> np.ndarray:
    """The protocol's transform: a centred square crop on the short side, then PIL Lanczos to ``size`` x ``size``.

    Takes and returns uint8 ``H x W x 3`` arrays, which is what clean-fid's ``custom_image_tranform`` receives.
    """
    from PIL import Image

    arr = np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise EvalError(f"expected a uint8 H x W x 3 image, got {arr.dtype} {arr.shape}")
    h, w = arr.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    square = Image.fromarray(np.ascontiguousarray(arr[top : top + s, left : left + s]))
    if s != size:
        square = square.resize((size, size), resample=Image.LANCZOS)
    return np.asarray(square, dtype=np.uint8)


def read_rgb(path: str | os.PathLike) -> np.ndarray:
    """An image file as uint8 RGB (grayscale, palette and CMYK images converted), as clean-fid reads it."""
    from PIL import Image

    with Image.open(path) as im:
        return np.array(im.convert("RGB"))
