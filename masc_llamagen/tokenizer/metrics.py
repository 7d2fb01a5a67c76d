"""Reconstruction metrics for the tokenizer: PSNR and SSIM on uint8 images, as LlamaGen's tokenizer evaluation does.

Both work on ``(N, H, W, C)`` uint8 images (the layout of ADM ``.npz`` files and FID tools) and return one value per
image, so callers average however they report. Images are first mapped to uint8 with LlamaGen's
``clamp(127.5 x + 128, 0, 255)`` (masc_llamagen.utils.images.to_uint8), so the numbers are those of the saved PNGs.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

SSIM_SIGMA = 1.5  # Wang et al. (2004): 11 x 11 Gaussian window, sigma 1.5, K1 = 0.01, K2 = 0.03
SSIM_TRUNCATE = 3.5  # radius int(3.5 * 1.5 + 0.5) = 5 -> 11 taps, as skimage's gaussian_weights=True
SSIM_K1, SSIM_K2 = 0.01, 0.03
DATA_RANGE = 255.0


def _as_tensor(images) -> torch.Tensor:
    t = torch.from_numpy(np.asarray(images)) if not isinstance(images, torch.Tensor) else images
    if t.dtype != torch.uint8 or t.dim() != 4:
        raise ValueError(f"expected uint8 images (N, H, W, C), got {t.dtype} {tuple(t.shape)}")
    return t


def _pair(a, b) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = _as_tensor(a), _as_tensor(b)
    if a.shape != b.shape:
        raise ValueError(f"image batches differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    return a.double(), b.double()


def psnr(a, b) -> torch.Tensor:
    """Per-image PSNR in dB (data range 255, MSE over all pixels and channels); identical images give +inf."""
    x, y = _pair(a, b)
    mse = (x - y).pow(2).flatten(1).mean(1)
    return 10.0 * torch.log10(DATA_RANGE**2 / mse)  # mse == 0 -> +inf, as skimage's peak_signal_noise_ratio


def gaussian_window(sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """Normalised 1-D Gaussian taps, radius ``int(SSIM_TRUNCATE * sigma + 0.5)`` (scipy.ndimage's choice)."""
    radius = int(SSIM_TRUNCATE * sigma + 0.5)
    r = torch.arange(-radius, radius + 1, dtype=torch.float64)
    w = torch.exp(-0.5 * (r / sigma) ** 2)
    return w / w.sum()


def ssim(a, b, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """Per-image SSIM with a Gaussian window (Wang et al. 2004), averaged over channels and window positions.

    Statistics use population (not sample) covariance and only windows that lie fully inside the image, which is
    exactly what ``skimage.metrics.structural_similarity(..., gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=255, channel_axis=-1)`` averages (its reflected border is cropped).
    """
    x, y = _pair(a, b)
    n, h, w, c = x.shape
    win = gaussian_window(sigma)
    k = win.numel()
    if h < k or w < k:
        raise ValueError(f"SSIM needs images of at least {k} x {k} pixels, got {h} x {w}")
    x = x.permute(0, 3, 1, 2).reshape(n * c, 1, h, w)
    y = y.permute(0, 3, 1, 2).reshape(n * c, 1, h, w)

    def blur(t: torch.Tensor) -> torch.Tensor:  # separable 'valid' Gaussian filter
        t = F.conv2d(t, win.view(1, 1, k, 1))
        return F.conv2d(t, win.view(1, 1, 1, k))

    mx, my = blur(x), blur(y)
    vx = blur(x * x) - mx * mx
    vy = blur(y * y) - my * my
    cxy = blur(x * y) - mx * my
    c1, c2 = (SSIM_K1 * DATA_RANGE) ** 2, (SSIM_K2 * DATA_RANGE) ** 2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return s.reshape(n, c, -1).mean(dim=(1, 2))


def codebook_stats(counts: torch.Tensor) -> dict[str, float]:
    """Usage (fraction of codes hit at least once), codes used, and perplexity ``exp(H)`` of the code histogram.

    Perplexity equals the codebook size when every code is equally frequent, so it says how evenly the used codes
    share the data, which usage alone does not.
    """
    counts = counts.double()
    total = float(counts.sum())
    used = int((counts > 0).sum())
    if total == 0:
        return {"codebook_usage": 0.0, "codes_used": 0, "perplexity": 0.0}
    p = counts[counts > 0] / total
    entropy = float(-(p * p.log()).sum())
    return {"codebook_usage": used / counts.numel(), "codes_used": used, "perplexity": math.exp(entropy)}
