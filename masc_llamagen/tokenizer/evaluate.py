"""Held-out scoring of a trained tokenizer: PSNR/SSIM on uint8 images, codebook usage and perplexity, and rFID.

rFID needs an Inception network, which lives in ``masc_llamagen.eval`` above the tokenizer in the pipeline, so it
is passed in (``rfid=compute_metrics``) rather than imported: the tokenizer package never reaches up to eval.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from masc_llamagen.tokenizer.metrics import codebook_stats, psnr, ssim
from masc_llamagen.tokenizer.vq import VQModel
from masc_llamagen.utils.images import to_uint8

PSNR_CAP_DB = 100.0  # identical images have infinite PSNR; capped so the JSON report stays valid

# ``rfid(generated, reference, device=...)`` on uint8 (N, H, W, C) arrays -> {"fid": ..., "feature_extractor": ...,
# "feature_layer": ...}: masc_llamagen.eval.metrics.compute_metrics has this shape.
RFIDScorer = Callable[..., Mapping[str, Any]]


@torch.no_grad()
def evaluate_reconstruction(
    model: VQModel,
    dataset,
    eval_images: int,
    rfid_images: int = 0,
    batch_size: int = 250,
    device: str | torch.device = "cpu",
    progress: bool = False,
    rfid: RFIDScorer | None = None,
) -> dict[str, Any]:
    """PSNR/SSIM (means over images, on uint8), codebook usage and perplexity of the held-out codes, and rFID.

    Usage is the fraction of the N codes that encoding the first ``eval_images`` held-out images hits at least once.
    rFID compares reconstructions with originals on the first ``rfid_images`` through ``rfid``; without one (or
    when it fails for want of weights) ``rfid`` is None and ``rfid_note`` says why.
    """
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    n_eval = min(int(eval_images), len(dataset))
    n_rfid = min(int(rfid_images), len(dataset))
    counts = torch.zeros(model.codebook_size, dtype=torch.long)
    psnrs, ssims, origs, recons = [], [], [], []
    loader = DataLoader(Subset(dataset, range(max(n_eval, n_rfid))), batch_size=batch_size, shuffle=False)
    seen = 0
    for x, _ in tqdm(loader, desc="tokenizer eval", disable=not progress, leave=False):
        x = x.to(device)
        idx = model.encode(x)
        a, b = to_uint8(x).cpu(), to_uint8(model.decode_code(idx)).cpu()
        k = max(0, min(len(x), n_eval - seen))
        if k:
            counts += torch.bincount(idx[:k].flatten().cpu(), minlength=model.codebook_size)
            psnrs.append(psnr(a[:k], b[:k]).clamp(max=PSNR_CAP_DB))
            ssims.append(ssim(a[:k], b[:k]))
        r = max(0, min(len(x), n_rfid - seen))
        if r:
            origs.append(a[:r])
            recons.append(b[:r])
        seen += len(x)
    model.train(was_training)
    out: dict[str, Any] = {
        "heldout_images": n_eval,
        "psnr": float(torch.cat(psnrs).mean()) if psnrs else None,
        "ssim": float(torch.cat(ssims).mean()) if ssims else None,
        **codebook_stats(counts),
        "rfid": None,
        "rfid_images": n_rfid,
    }
    if n_rfid <= 0:
        out["rfid_note"] = "skipped: rfid_images=0"
        return out
    if rfid is None:
        out["rfid_note"] = "skipped: no rFID scorer given (pass rfid=masc_llamagen.eval.metrics.compute_metrics)"
        return out
    out.update(_score_rfid(rfid, torch.cat(recons).numpy(), torch.cat(origs).numpy(), str(device)))
    return out


def _score_rfid(rfid: RFIDScorer, recons: np.ndarray, origs: np.ndarray, device: str) -> dict[str, Any]:
    t0 = time.time()
    try:
        res = rfid(recons, origs, device="cuda" if device.startswith("cuda") else "cpu")
    except (ImportError, OSError, RuntimeError, ValueError) as e:  # missing weights / torch-fidelity: say so
        text = str(e).strip()
        return {"rfid_note": f"skipped: {type(e).__name__}: {text.splitlines()[0] if text else ''}"}
    n = len(recons)
    return {"rfid": float(res["fid"]), "rfid_time_s": round(time.time() - t0, 1),
            "rfid_note": f"FID of {n} reconstructions vs their originals ({res.get('feature_extractor', '')}, "
                         f"layer {res.get('feature_layer', '2048')}); few images bias FID upwards"}
