"""The one evaluation of a trained GPT: held-out likelihood (coarse CE, fine NLL per member decoder, a flat model's
CE marginalised onto coarse clusters, predictive entropy) and sample quality (FID, KID, precision/recall).

In-training evaluation, the pipeline's eval stage and the benchmarks all call :func:`evaluate_model`, so a number in
W&B, in a run's report and in docs/benchmarks.md is computed the same way and carries the same name.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from masc_llamagen.data.images import build_image_dataset, heldout_split
from masc_llamagen.eval.fid import frechet_distance
from masc_llamagen.eval.likelihood import heldout_diagnostics
from masc_llamagen.eval.metrics import EvalError, compute_metrics
from masc_llamagen.masc.vocabulary import Vocabulary
from masc_llamagen.utils.io import atomic_savez
from masc_llamagen.weights import tokenizer_fingerprint

SAMPLE_METRICS = ("fid", "kid_mean", "kid_std", "precision", "recall")
FidFeatures = tuple[Callable[[np.ndarray], np.ndarray], np.ndarray]  # (images -> Inception features, reference's)


@dataclass(frozen=True)
class HeldoutCodes:
    """Fine codes (N, L) of the first N held-out images with their class ids: the likelihood's test set, which no
    training sequence is part of."""

    codes: torch.Tensor
    labels: torch.Tensor
    path: Path | None = None  # the cache file they were read from or written to

    @classmethod
    def encode(cls, vq: torch.nn.Module, dataset: str, n: int, *, image_size: int | None = None,
               root: str | os.PathLike | None = None, cache_dir: str | os.PathLike, batch: int = 250) -> HeldoutCodes:
        """Encode once per (tokenizer, dataset, size, n): cached as a data-only npz named by the tokenizer's codebook
        fingerprint, so another tokenizer's codes are never read back."""
        fp = tokenizer_fingerprint(vq)
        path = Path(cache_dir) / f"heldout-{dataset}-{image_size}-{n}-{fp[:16]}.npz"
        if path.is_file():
            with np.load(path, allow_pickle=False) as z:
                return cls(*(torch.from_numpy(z[k].astype(np.int64)) for k in ("codes", "labels")), path=path)
        ds = build_image_dataset(dataset, heldout_split(dataset), image_size=image_size, root=root)
        n = min(n, len(ds))
        device = next(vq.parameters()).device
        codes, labels = [], []
        with torch.no_grad():
            for s in range(0, n, batch):
                items = [ds[i] for i in range(s, min(n, s + batch))]
                x = torch.stack([x for x, _ in items]).to(device)
                codes.append(vq.encode(x).reshape(len(items), -1).cpu())
                labels += [int(y) for _, y in items]
        out = cls(torch.cat(codes), torch.tensor(labels, dtype=torch.int64), path=path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_savez(path, codes=out.codes.numpy().astype(np.int32), labels=out.labels.numpy().astype(np.int32))
        return out


def evaluate_model(model: torch.nn.Module | None = None, vocabs: Mapping[str, Vocabulary] | None = None, *,
                   heldout: HeldoutCodes | None = None,
                   mappings: Mapping[str, torch.Tensor] | None = None, images: Any = None,
                   reference: Any = None, fid_features: FidFeatures | None = None,
                   **metric_options: Any) -> dict[str, Any]:
    """Score what is given. ``heldout`` -> ``result["heldout"]``, in bits (see :func:`heldout_diagnostics`).
    ``images``, samples of ``model`` (uint8 NHWC, an npz or a folder) -> FID/KID/precision/recall against
    ``reference`` (a dataset name, folder or npz; ``metric_options`` go to :func:`compute_metrics`).

    ``fid_features``: a sweep scoring many sample sets passes a loaded Inception and the reference's features
    instead; it gets the FID alone, from the exact low-rank form (:mod:`masc_llamagen.eval.fid`), the same number.
    """
    out: dict[str, Any] = {}
    if heldout is not None:
        if model is None or not vocabs:
            raise ValueError("held-out likelihood needs the model and its vocabularies")
        classes = model.config.num_classes
        if len(heldout.labels) and int(heldout.labels.max()) >= classes:
            raise EvalError(f"held-out images have class ids up to {int(heldout.labels.max())} but the model has "
                            f"{classes} classes: its codes come from another dataset; drop the held-out evaluation "
                            "(train.eval_heldout=0 in training, heldout=0 for scripts/eval.sh)")
        out["heldout"] = heldout_diagnostics(model, vocabs, heldout.codes, heldout.labels, mappings)
    if images is not None:
        if fid_features is not None:
            features, ref = fid_features
            out["fid"] = frechet_distance(features(images), ref)
        else:
            out.update(compute_metrics(images, reference, **metric_options))
    return out


def as_scalars(result: Mapping[str, Any], prefix: str = "eval/") -> dict[str, float]:
    """The numbers of a result, flat, for W&B and metrics.jsonl: ``eval/fid``, ``eval/heldout/coarse_ce`` ..."""
    out = {f"{prefix}{k}": float(result[k]) for k in SAMPLE_METRICS if result.get(k) is not None}
    out.update({f"{prefix}heldout/{k}": float(v) for k, v in result.get("heldout", {}).items()})
    return out
