"""Turn an image dataset into a packed code set (codes.py) through a VQ tokenizer: resumable and distributable.

Variants per image:
  * ``("center", "hflip")`` (default for small, already-square sets such as Fashion-MNIST): the image and its
    mirror;
  * ``("tencrop",)`` (default for ImageFolder; LlamaGen's scheme): for each ``crop_range`` r, ADM-centre-crop to
    ``int(size * r)``, then the centre and four corner ``size`` crops of it and of its mirror: 10 per range.
Variant 0 is always the un-flipped centre crop (of the first range), which CodeDataset uses without augmentation.

Captioned (text-to-image) datasets (captions.py) are packed the same way, with ``labels.npy`` holding each stored
item's position, ``captions.jsonl`` its caption, ``valid.npy`` whether its image could be read and ``meta.json``
``task: "t2i"``; their default variant is ``("center",)`` alone, since a mirror contradicts captions such as
"leftwards arrow".

Work is split into chunks of ``chunk_size`` images, each written as a part file in ``<out_dir>.partial/``;
a restarted run skips the chunks already there. Under Accelerate every process encodes chunks
``k % num_processes == process_index`` into that shared folder and the main process packs them, so ``out_dir``
must be on a filesystem all processes see.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from masc_llamagen.data.captions import (
    CAPTION_DATASETS,
    TASK,
    build_caption_dataset,
    canonical_caption_name,
    is_caption_dataset,
)
from masc_llamagen.data.codes import META_FILE, VALID_FILE, code_dtype, make_meta, read_meta, write_split
from masc_llamagen.data.images import ImageFolderDataset, build_image_dataset, center_crop_pil, pil_to_tensor
from masc_llamagen.text.store import captions_sha256
from masc_llamagen.utils.devices import pick_device
from masc_llamagen.utils.io import atomic_savez, atomic_write_json
from masc_llamagen.weights import tokenizer_fingerprint

DEFAULT_CROP_RANGES = (1.1, 1.05)  # LlamaGen's two extraction passes
DEFAULT_CHUNK_SIZE = 4096
TEN_CROP_POSITIONS = ("center", "tl", "tr", "bl", "br")  # centre first: variant 0 is the plain centre crop
JOB_FILE = "job.json"


def variant_plan(
    variants: Sequence[str], crop_ranges: Sequence[float] = DEFAULT_CROP_RANGES
) -> list[dict[str, Any]]:
    """The ordered variant descriptions stored in meta.json (name, crop_range, crop position, hflip)."""
    names = tuple(variants)
    if "tencrop" in names:
        if names != ("tencrop",):
            raise ValueError(f"'tencrop' already includes the centre and flips; use it alone, got {names}")
        if not crop_ranges or any(float(r) < 1.0 for r in crop_ranges):
            raise ValueError(f"crop_ranges must be non-empty values >= 1, got {tuple(crop_ranges)}")
        return [
            {"name": f"{'hflip-' if flip else ''}{pos}@{float(r):g}", "crop_range": float(r), "crop": pos,
             "hflip": flip}
            for r in crop_ranges
            for flip in (False, True)
            for pos in TEN_CROP_POSITIONS
        ]
    unknown = set(names) - {"center", "hflip"}
    if unknown or "center" not in names or len(set(names)) != len(names):
        raise ValueError(f"variants must be ('center',), ('center', 'hflip') or ('tencrop',), got {names}")
    plan = [{"name": "center", "crop_range": None, "crop": "center", "hflip": False}]
    if "hflip" in names:
        plan.append({"name": "hflip", "crop_range": None, "crop": "center", "hflip": True})
    return plan


def _base(ds: Dataset) -> Dataset:
    while isinstance(ds, Subset):
        ds = ds.dataset
    return ds


def describe_dataset(ds: Dataset) -> dict[str, Any]:
    """What the codes were made from; root is informative only (a moved dataset still resumes)."""
    base = _base(ds)
    d = {
        "name": getattr(base, "name", type(base).__name__),
        "split": getattr(base, "split", None),
        "image_size": getattr(base, "image_size", None),
        "count": len(ds),
    }
    if getattr(base, "crop_range", None) is not None:
        d["crop_range"] = float(base.crop_range)
    if ds is not base:
        idx = np.asarray(_subset_indices(ds), dtype=np.int64)
        d["subset_sha256"] = hashlib.sha256(idx.tobytes()).hexdigest()
    if is_caption_dataset(base):
        describe = getattr(base, "describe", None)
        d.update(describe() if callable(describe) else {})
        d["task"] = TASK
        d["captions_sha256"] = captions_sha256(base.captions[j] for j in _subset_indices(ds))
    return d


def _subset_indices(ds: Dataset) -> list[int]:
    if not isinstance(ds, Subset):
        return list(range(len(ds)))
    inner = _subset_indices(ds.dataset)
    return [inner[int(i)] for i in ds.indices]


class _Views(Dataset):
    """Index -> (all variants of one image (V, 3, S, S), label), computed in DataLoader workers.

    For a caption dataset the label is the base item index and a third element says whether the image was readable.
    """

    def __init__(self, ds: Dataset, plan: list[dict[str, Any]], image_size: int) -> None:
        self.ds, self.plan, self.size = ds, plan, image_size
        self.tencrop = plan[0]["crop_range"] is not None
        self.t2i = is_caption_dataset(_base(ds))
        if self.tencrop:
            base = _base(ds)
            if not callable(getattr(base, "load_image", None)) or getattr(base, "labels", None) is None:
                raise ValueError(
                    f"'tencrop' needs a dataset with load_image(i) and labels (ImageFolderDataset, Twemoji, "
                    f"ArrayImageDataset); {type(base).__name__} only yields fixed-size tensors: use ('center', 'hflip')"
                )
            self.base, self.index = base, _subset_indices(ds)

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int] | tuple[torch.Tensor, int, bool]:
        if not self.tencrop:
            x, y = self.ds[i]
            views = torch.stack([x.flip(-1) if v["hflip"] else x for v in self.plan])
            if self.t2i:  # the item just read its image, so valid() answers from its cache
                return views, int(y), bool(_base(self.ds).valid(int(y)))
            return views, int(y)
        j = self.index[i]
        img = self.base.load_image(j)
        s = self.size
        bases: dict[tuple[float, bool], torch.Tensor] = {}
        views = []
        for v in self.plan:
            r = v["crop_range"]
            if (r, False) not in bases:
                bases[(r, False)] = pil_to_tensor(center_crop_pil(img, int(s * r)))
            if v["hflip"] and (r, True) not in bases:
                bases[(r, True)] = bases[(r, False)].flip(-1)
            views.append(_crop(bases[(r, v["hflip"])], v["crop"], s))
        if self.t2i:
            return torch.stack(views), int(self.base.labels[j]), bool(self.base.valid(j))
        return torch.stack(views), int(self.base.labels[j])


def _crop(x: torch.Tensor, pos: str, size: int) -> torch.Tensor:
    """torchvision FiveCrop geometry (same centre rounding), on a square (3, F, F) tensor."""
    f = x.shape[-1]
    if pos == "center":
        o = int(round((f - size) / 2.0))
        top = left = o
    else:
        top = 0 if pos[0] == "t" else f - size
        left = 0 if pos[1] == "l" else f - size
    return x[:, top : top + size, left : left + size]


def _resolve(data: Dataset | str | os.PathLike | Mapping[str, Any], image_size: int | None) -> Dataset:
    if isinstance(data, Dataset):
        if image_size is not None and getattr(_base(data), "image_size", image_size) != image_size:
            raise ValueError(f"image_size={image_size} but the dataset yields {_base(data).image_size}")
        return data
    if isinstance(data, Mapping):
        spec = dict(data)
        if image_size is not None:
            spec.setdefault("image_size", image_size)
        task = spec.pop("task", None)
        if task == TASK or canonical_caption_name(str(spec.get("name", ""))) in CAPTION_DATASETS[1:]:
            return build_caption_dataset(**spec)
        if task not in (None, "c2i"):
            raise ValueError(f"task={task!r}: a dataset spec's task is 'c2i' (class labels) or 't2i' (captions)")
        return build_image_dataset(**spec)
    return ImageFolderDataset(data, image_size=image_size or 256)


def _chunk_name(k: int) -> str:
    return f"chunk_{k:06d}.npz"


def _write_chunk(path: Path, codes: np.ndarray, labels: np.ndarray, valid: np.ndarray | None = None) -> None:
    arrays = {"codes": codes, "labels": labels} | ({} if valid is None else {"valid": valid})
    atomic_savez(path, **arrays)


def _canonical(obj: Any) -> Any:
    return json.loads(json.dumps(obj))


def extract_codes(
    vq: torch.nn.Module,
    data: Dataset | str | os.PathLike | Mapping[str, Any],
    out_dir: str | os.PathLike,
    *,
    variants: Sequence[str] | None = None,
    crop_ranges: Sequence[float] = DEFAULT_CROP_RANGES,
    image_size: int | None = None,
    batch_size: int = 256,
    num_workers: int = 0,
    device: str | torch.device | None = None,
    accelerator: Any = None,
    resume: bool = True,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    keep_chunks: bool = False,
    tokenizer_path: str | os.PathLike | None = None,
    progress: bool = True,
) -> Path:
    """Encode every image of ``data`` into ``out_dir`` (codes.npy, labels.npy, meta.json); returns ``out_dir``.

    ``data``: a dataset yielding ``(3 x S x S in [-1, 1], label)``, a ``build_image_dataset`` keyword dict, or an
    ImageFolder path (with ``image_size``). A caption dataset (captions.py; as a dict: ``task="t2i"`` with
    ``build_caption_dataset`` keywords) also writes ``captions.jsonl`` and ``valid.npy`` (see the module doc).
    ``batch_size`` counts encoded views (images x variants), the quantity that bounds memory. ``resume=True``
    reuses finished chunks and returns at once when ``out_dir`` already holds the same job; a different job there
    is an error. ``resume=False`` discards chunks and replaces ``out_dir``.
    ``keep_chunks`` keeps the part files after packing, so a deleted ``out_dir`` is rebuilt without encoding.
    The tokenizer is put in eval mode on ``device`` for the run (its training flag is restored).
    """
    out_dir = Path(out_dir)
    ds = _resolve(data, image_size)
    base = _base(ds)
    if getattr(base, "random_flip", False):
        raise ValueError(
            "extraction must be deterministic: build the dataset with random_flip=False (flips are a variant)"
        )
    t2i = is_caption_dataset(base)
    if variants is None:
        variants = ("tencrop",) if isinstance(base, ImageFolderDataset) else ("center",) if t2i else ("center", "hflip")
    plan = variant_plan(variants, crop_ranges)
    n = len(ds)
    if n == 0:
        raise ValueError("extract_codes: the dataset is empty")
    size = getattr(base, "image_size", None) or int(ds[0][0].shape[-1])
    grid = vq.num_tokens_hw(size)
    seq_len = grid[0] * grid[1]
    codebook_size = int(vq.config.codebook_size)
    dtype = code_dtype(codebook_size)
    chunk_size = int(chunk_size)
    if chunk_size < 1 or batch_size < 1:
        raise ValueError("chunk_size and batch_size must be >= 1")

    rank = accelerator.process_index if accelerator is not None else 0
    world = accelerator.num_processes if accelerator is not None else 1
    is_main = rank == 0

    def barrier() -> None:
        if accelerator is not None:
            accelerator.wait_for_everyone()

    fingerprint = tokenizer_fingerprint(vq)
    dataset_desc = describe_dataset(ds)
    job = _canonical({
        "tokenizer_fingerprint": fingerprint, "dataset": dataset_desc, "variants": plan, "grid": list(grid),
        "codebook_size": codebook_size, "chunk_size": chunk_size,
    })

    if out_dir.exists() and not (out_dir / META_FILE).is_file() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} exists and is not a packed code set; refusing to replace it")
    if (out_dir / META_FILE).is_file() and resume:
        done = read_meta(out_dir).get("extraction", {}).get("job")
        if done == job:
            return out_dir
        raise FileExistsError(
            f"{out_dir} already holds codes from a different job (tokenizer, dataset, variants or chunking differ); "
            "choose another out_dir or pass resume=False to replace it"
        )
    work = out_dir.parent / f"{out_dir.name}.partial"
    if resume and (work / JOB_FILE).is_file():
        with open(work / JOB_FILE, encoding="utf-8") as f:
            if json.load(f) != job:
                raise FileExistsError(
                    f"{work} holds chunks of a different extraction job; delete it or pass resume=False"
                )
    if is_main:
        if not resume and work.exists():
            shutil.rmtree(work)
        work.mkdir(parents=True, exist_ok=True)
        if not (work / JOB_FILE).is_file():
            atomic_write_json(work / JOB_FILE, job)
    barrier()

    n_chunks = math.ceil(n / chunk_size)
    todo = [k for k in range(rank, n_chunks, world) if not (work / _chunk_name(k)).is_file()]
    if todo:
        _encode_chunks(vq, ds, plan, size, todo, n, chunk_size, work, dtype, seq_len, batch_size, num_workers,
                       device if accelerator is None else accelerator.device,
                       progress=progress and is_main, desc=f"extract {dataset_desc['name']}"
                       + (f" [rank {rank}/{world}]" if world > 1 else ""))
    barrier()

    if is_main:
        tokenizer = {
            "fingerprint": fingerprint,
            "checkpoint": str(tokenizer_path) if tokenizer_path is not None else getattr(vq, "checkpoint_path", None),
            "config": vq.config.to_dict() if hasattr(vq.config, "to_dict") else None,
        }
        dataset_meta = dict(dataset_desc, root=str(getattr(base, "root", None)))
        _pack(work, out_dir, n, n_chunks, chunk_size, plan, seq_len, grid, codebook_size, base, tokenizer,
              dataset_meta, {"job": job, "crop_ranges": [float(r) for r in crop_ranges] if plan[0]["crop_range"]
                             else None})
        if not keep_chunks:
            shutil.rmtree(work, ignore_errors=True)
    barrier()
    return out_dir


def _encode_chunks(
    vq: torch.nn.Module, ds: Dataset, plan: list[dict], size: int, todo: list[int], n: int, chunk_size: int,
    work: Path, dtype: np.dtype, seq_len: int, batch_size: int, num_workers: int,
    device: str | torch.device | None, progress: bool, desc: str,
) -> None:
    dev = pick_device(None if device is None else str(device))
    v = len(plan)
    per_batch = max(1, batch_size // v)
    batches = []  # never straddle a chunk, so a chunk is written as soon as its last batch is encoded
    for k in todo:
        lo, hi = k * chunk_size, min(n, (k + 1) * chunk_size)
        batches += [list(range(s, min(s + per_batch, hi))) for s in range(lo, hi, per_batch)]
    loader = DataLoader(_Views(ds, plan, size), batch_sampler=batches, num_workers=num_workers,
                        pin_memory=dev.type == "cuda")
    was_training = vq.training
    vq.eval().to(dev)
    pending: dict[int, list[tuple[int, np.ndarray, np.ndarray]]] = {}
    try:
        with torch.inference_mode(), tqdm(total=sum(len(b) for b in batches), desc=desc, unit="img",
                                          disable=not progress) as bar:
            for idx, batch in zip(batches, loader, strict=True):
                x, y = batch[0], batch[1]
                ok = batch[2].numpy().astype(bool) if len(batch) > 2 else None
                b = x.shape[0]
                codes = vq.encode(x.to(dev, non_blocking=True).flatten(0, 1)).reshape(b, v, seq_len)
                k = idx[0] // chunk_size
                pending.setdefault(k, []).append((idx[0], codes.cpu().numpy().astype(dtype), y.numpy(), ok))
                lo, hi = k * chunk_size, min(n, (k + 1) * chunk_size)
                if sum(len(p[2]) for p in pending[k]) == hi - lo:
                    parts = sorted(pending.pop(k), key=lambda p: p[0])
                    _write_chunk(work / _chunk_name(k), np.concatenate([p[1] for p in parts]),
                                 np.concatenate([p[2] for p in parts]).astype(np.int64),
                                 None if ok is None else np.concatenate([p[3] for p in parts]))
                bar.update(b)
    finally:
        vq.train(was_training)


def _pack(
    work: Path, out_dir: Path, n: int, n_chunks: int, chunk_size: int, plan: list[dict], seq_len: int,
    grid: tuple[int, int], codebook_size: int, base: Dataset, tokenizer: dict, dataset_meta: dict, extraction: dict,
) -> None:
    """Join the chunk files into the split (codes.write_split), streaming the codes chunk by chunk."""
    missing = [k for k in range(n_chunks) if not (work / _chunk_name(k)).is_file()]
    if missing:
        raise RuntimeError(f"{work}: chunks {missing[:8]} missing after encoding; did a process fail? rerun to resume")
    t2i = is_caption_dataset(base)
    labels = np.empty(n, dtype=np.int64)
    valid = np.ones(n, dtype=bool) if t2i else None
    for k in range(n_chunks):  # the small arrays first; an npz member is read only when asked for
        lo, hi = k * chunk_size, min(n, (k + 1) * chunk_size)
        with np.load(work / _chunk_name(k)) as part:
            y = part["labels"]
            ok = part["valid"] if "valid" in part.files else None
        if y.shape != (hi - lo,):
            raise RuntimeError(f"{work / _chunk_name(k)} has {y.shape} labels; delete it and rerun to resume")
        if t2i and (ok is None or ok.shape != (hi - lo,)):
            raise RuntimeError(f"{work / _chunk_name(k)} has no per-item valid flags; delete it and rerun")
        labels[lo:hi] = y
        if t2i:
            valid[lo:hi] = ok

    def chunk_codes():
        for k in range(n_chunks):
            with np.load(work / _chunk_name(k)) as part:
                c = part["codes"]
            if c.shape != (min(n, (k + 1) * chunk_size) - k * chunk_size, len(plan), seq_len):
                raise RuntimeError(f"{work / _chunk_name(k)} has shape {c.shape}; delete it and rerun to resume")
            yield c

    captions = source = None
    if t2i:
        # chunks hold base item indices; store positions so caption features are looked up by label
        source, labels = labels, np.arange(n, dtype=np.int64)
        captions = [base.captions[int(j)] for j in source]
        bad = int((~valid).sum())
        if bad:
            first = getattr(base, "paths", None)
            where = f" (first: {first[int(source[~valid][0])]})" if first is not None else ""
            print(f"warning: {bad} of {n} images could not be read{where}; they are blank and marked invalid "
                  f"in {out_dir / VALID_FILE}", file=sys.stderr, flush=True)
    classes = None if t2i else getattr(base, "classes", None)
    num_classes = n if t2i else (
        getattr(base, "num_classes", None) or (len(classes) if classes else int(labels.max()) + 1))
    meta = make_meta(
        codebook_size=codebook_size, grid=grid, count=n, variants=plan, num_classes=num_classes,
        classes=classes, tokenizer=tokenizer, dataset=dataset_meta, extra={"extraction": extraction},
    )
    write_split(out_dir, chunk_codes(), labels, meta, captions=captions, source_index=source, valid=valid,
                overwrite=True)
