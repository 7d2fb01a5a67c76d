"""Packed VQ code sets: one memory-mapped array per split, so training is not bound by small-file I/O.

A split is a directory holding three files:

* ``codes.npy``: int16 (codebook <= 32768) or int32, shape ``(num_images, num_variants, h * w)``, raster order;
  variant 0 is always the un-flipped centre crop, the one used without augmentation;
* ``labels.npy``: int64 ``(num_images,)``;
* ``meta.json``: codebook size, grid, variants, tokenizer fingerprint and checkpoint, dataset, count (see
  :func:`make_meta`).

A text-to-image split (``meta["task"] == "t2i"``) adds, per stored item, in the same order:

* ``captions.jsonl``: one JSON object a line, ``{"index": i, "source_index": j, "caption": "..."}`` (``i`` equals
  ``labels[i]``, the key for the caption's text features; ``j`` the item's index in the source dataset);
* ``valid.npy``: bool ``(num_images,)``, False where the source image could not be read (its codes encode a blank).

:func:`write_split` is the one writer of this layout: it writes the directory under a temporary name and renames it
into place, so a reader never sees half a split.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from masc_llamagen.errors import MascError
from masc_llamagen.utils.io import atomic_directory

FORMAT = "masc-llamagen-codes"
FORMAT_VERSION = 1
CODES_FILE, LABELS_FILE, META_FILE = "codes.npy", "labels.npy", "meta.json"
CAPTIONS_FILE, VALID_FILE = "captions.jsonl", "valid.npy"  # text-to-image splits only
_SCAN_ROWS = 1 << 16  # images per block when scanning the memory map (bounded RAM on ImageNet-sized sets)
_MASK64 = (1 << 64) - 1


class CodeFormatError(MascError, ValueError):
    """A packed code set that is inconsistent or out of range; the message names the file and the problem."""


def code_dtype(codebook_size: int) -> np.dtype:
    """Smallest signed dtype holding every index: half the disk and page cache of int32 for LlamaGen's 16384."""
    return np.dtype(np.int16) if codebook_size <= np.iinfo(np.int16).max + 1 else np.dtype(np.int32)


def normalize_variants(variants: Sequence[str | Mapping[str, Any]] | None, num_variants: int) -> list[dict]:
    if variants is None:
        variants = ["center"] + [f"variant{v}" for v in range(1, num_variants)]
    out = [dict(v) if isinstance(v, Mapping) else {"name": str(v)} for v in variants]
    if len(out) != num_variants:
        raise CodeFormatError(f"{len(out)} variant descriptions for {num_variants} variants")
    return out


def make_meta(
    *, codebook_size: int, grid: Sequence[int], count: int, variants: Sequence[str | Mapping[str, Any]],
    num_classes: int, classes: Sequence[str] | None = None, tokenizer: Mapping[str, Any] | None = None,
    dataset: Mapping[str, Any] | None = None, extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``meta.json`` content; ``tokenizer`` holds ``fingerprint`` (codebook sha256) and ``checkpoint``."""
    h, w = (int(g) for g in grid)
    variants = normalize_variants(variants, len(variants))
    meta = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "codebook_size": int(codebook_size),
        "grid": [h, w],
        "seq_len": h * w,
        "dtype": code_dtype(codebook_size).name,
        "count": int(count),
        "num_variants": len(variants),
        "variants": variants,
        "num_classes": int(num_classes),
        "classes": list(classes) if classes is not None else None,
        "tokenizer": dict(tokenizer or {}),
        "dataset": dict(dataset or {}),
    }
    meta.update(extra or {})
    return meta


def _write_meta(directory: Path, meta: Mapping[str, Any]) -> None:
    with open(directory / META_FILE, "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2, sort_keys=False)
        f.write("\n")


def _write_captions(directory: Path, captions: Sequence[str], source_index: Sequence[int] | np.ndarray | None) -> None:
    src = range(len(captions)) if source_index is None else [int(j) for j in source_index]
    if len(src) != len(captions):
        raise CodeFormatError(f"{len(src)} source indices for {len(captions)} captions")
    with open(directory / CAPTIONS_FILE, "w", encoding="utf-8") as f:
        for i, (j, c) in enumerate(zip(src, captions, strict=True)):
            if not isinstance(c, str):
                raise CodeFormatError(f"caption {i} is {type(c).__name__}, not a string")
            f.write(json.dumps({"index": i, "source_index": j, "caption": c}, ensure_ascii=False) + "\n")


def read_captions(path: str | os.PathLike) -> list[str]:
    """The captions of a packed t2i split, in stored-item order (checked: line i has index i)."""
    f = Path(path) / CAPTIONS_FILE
    out: list[str] = []
    with open(f, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as e:
                raise CodeFormatError(f"{f}:{lineno}: not JSON ({e}); re-extract the codes") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("caption"), str) or obj.get("index") != len(out):
                raise CodeFormatError(
                    f"{f}:{lineno}: expected {{\"index\": {len(out)}, \"caption\": \"...\"}}; re-extract the codes")
            out.append(obj["caption"])
    return out


def check_code_range(codes: np.ndarray, codebook_size: int, where: str = "codes", start: int = 0) -> None:
    """Scan in blocks (a memory map is never loaded whole) and refuse any index outside [0, codebook_size).

    ``start``: the split index of ``codes[0]``, so a block of a larger split is reported by its images' indices.
    """
    for s in range(0, codes.shape[0], _SCAN_ROWS):
        block = np.asarray(codes[s : s + _SCAN_ROWS])
        if block.size == 0:
            continue
        lo, hi = int(block.min()), int(block.max())
        if lo < 0 or hi >= codebook_size:
            bad = int(np.argmax(((block < 0) | (block >= codebook_size)).reshape(block.shape[0], -1).any(1)))
            raise CodeFormatError(
                f"{where}: code indices must be in [0, {codebook_size}) but image {start + s + bad} has values in "
                f"[{lo}, {hi}] in its block; the codes were made with another tokenizer or are corrupt"
            )


def write_split(
    path: str | os.PathLike, codes: np.ndarray | Iterable[np.ndarray], labels: np.ndarray, meta: Mapping[str, Any],
    *, captions: Sequence[str] | None = None, source_index: Sequence[int] | np.ndarray | None = None,
    valid: np.ndarray | Sequence[bool] | None = None, overwrite: bool = False,
) -> Path:
    """Check and write one split directory atomically: the only code that knows its file names and dtypes.

    ``codes`` is the ``(count, variants, h * w)`` array or consecutive blocks of it, streamed into the file one at a
    time, so extraction never holds a whole ImageNet split in memory. ``meta`` comes from :func:`make_meta`.
    ``captions`` (one per image, ``source_index`` their dataset indices) makes it a t2i split: labels must be
    ``arange(count)``, ``valid`` defaults to all True, and ``task``/``num_invalid`` are added to the meta.
    """
    path, meta, labels = Path(path), dict(meta), np.asarray(labels)
    n, cbs = int(meta["count"]), int(meta["codebook_size"])
    if captions is not None:
        captions = list(captions)
        valid = np.ones(n, dtype=bool) if valid is None else np.asarray(valid, dtype=bool)
        if len(captions) != n or valid.shape != (n,):
            raise CodeFormatError(f"{len(captions)} captions and {valid.shape} valid flags for {n} images")
        if not np.array_equal(labels, np.arange(n)) or meta["num_classes"] != n:
            raise CodeFormatError("a t2i split's labels are the item positions arange(N) (num_classes=N); pass "
                                  "labels=np.arange(N)")
        meta.update(task="t2i", num_invalid=int((~valid).sum()))
    elif valid is not None:
        raise CodeFormatError("valid flags belong to a t2i split; pass captions=... with them")
    if isinstance(codes, np.ndarray):
        validate_arrays(codes, labels, meta, where=str(path))
        codes = [codes[s : s + _SCAN_ROWS] for s in range(0, n, _SCAN_ROWS)]  # views, not copies
    h, w = meta["grid"]
    shape = (n, int(meta["num_variants"]), h * w)
    with atomic_directory(path, overwrite=overwrite) as tmp:
        out = np.lib.format.open_memmap(tmp / CODES_FILE, mode="w+", dtype=code_dtype(cbs), shape=shape)
        filled = 0
        for block in codes:
            if block.shape[1:] != shape[1:] or filled + block.shape[0] > n:
                raise CodeFormatError(f"{path}: a block of codes shaped {tuple(block.shape)} at image {filled} does "
                                      f"not fit (count, variants, h*w) = {shape}")
            if not np.issubdtype(block.dtype, np.integer):
                raise CodeFormatError(f"{path}: codes must be integers, got {block.dtype}")
            check_code_range(block, cbs, where=str(path), start=filled)  # before the cast could wrap a value
            out[filled : filled + block.shape[0]] = block
            filled += block.shape[0]
        if filled != n:
            raise CodeFormatError(f"{path}: {filled} images of codes for a split of count {n}")
        out.flush()
        validate_arrays(out, labels, meta, where=str(path))
        del out
        np.save(tmp / LABELS_FILE, labels.astype(np.int64, copy=False))
        if captions is not None:
            _write_captions(tmp, captions, source_index)
            np.save(tmp / VALID_FILE, valid)
        _write_meta(tmp, meta)
    return path


def save_codes(
    path: str | os.PathLike, codes: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor, *,
    codebook_size: int, grid: Sequence[int] | None = None, variants: Sequence[str | Mapping[str, Any]] | None = None,
    num_classes: int | None = None, tokenizer: Mapping[str, Any] | None = None,
    dataset: Mapping[str, Any] | None = None, captions: Sequence[str] | None = None,
    valid: np.ndarray | Sequence[bool] | None = None,
) -> Path:
    """Pack in-memory codes ``(N, V, L)``, ``(N, L)`` or ``(N, V, h, w)`` into a split directory, atomically.

    ``captions`` (one per image) makes it a t2i split: labels must then be ``arange(N)`` and ``valid`` defaults to
    all True (see :func:`write_split`).
    """
    codes = codes.numpy() if isinstance(codes, torch.Tensor) else np.asarray(codes)
    labels = labels.numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if codes.ndim == 2:
        codes = codes[:, None]
    if codes.ndim == 4:
        grid = grid or codes.shape[2:]
        codes = codes.reshape(codes.shape[0], codes.shape[1], -1)
    if codes.ndim != 3:
        raise CodeFormatError(f"codes must be (N, V, L), (N, L) or (N, V, h, w), got shape {codes.shape}")
    if grid is None:
        side = int(round(codes.shape[2] ** 0.5))
        if side * side != codes.shape[2]:
            raise CodeFormatError(f"cannot infer a square grid from {codes.shape[2]} tokens; pass grid=(h, w)")
        grid = (side, side)
    if captions is not None:
        num_classes = codes.shape[0]
    ncls = int(num_classes) if num_classes is not None else int(labels.max()) + 1
    meta = make_meta(
        codebook_size=codebook_size, grid=grid, count=codes.shape[0],
        variants=normalize_variants(variants, codes.shape[1]), num_classes=ncls,
        tokenizer=tokenizer, dataset=dataset,
    )
    return write_split(path, codes, labels, meta, captions=captions, valid=valid)


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    f = path / META_FILE
    if not f.is_file():
        raise FileNotFoundError(
            f"no packed codes at {path} ({META_FILE} missing): extract them first "
            "(`python -m masc_llamagen.pipeline 'pipeline.stages=[tokenizer,codes]'` for the default data, or "
            "masc_llamagen.data.extract.extract_codes)"
        )
    with open(f, encoding="utf-8") as fh:
        meta = json.load(fh)
    if meta.get("format") != FORMAT:
        raise CodeFormatError(f"{f}: not a {FORMAT} file (format={meta.get('format')!r})")
    if int(meta.get("version", -1)) > FORMAT_VERSION:
        raise CodeFormatError(f"{f}: format version {meta['version']} is newer than this code ({FORMAT_VERSION})")
    return meta


def validate_arrays(codes: np.ndarray, labels: np.ndarray, meta: Mapping[str, Any], where: str) -> None:
    """Shapes, dtypes and labels against ``meta`` (cheap: the code values are checked by check_code_range)."""
    h, w = meta["grid"]
    want = (meta["count"], meta["num_variants"], h * w)
    problems = []
    if tuple(codes.shape) != tuple(want):
        problems.append(f"{CODES_FILE} has shape {tuple(codes.shape)} but meta says (count, variants, h*w) = {want}")
    if not np.issubdtype(codes.dtype, np.integer):
        problems.append(f"{CODES_FILE} has dtype {codes.dtype}, expected an integer type")
    if tuple(labels.shape) != (meta["count"],):
        problems.append(f"{LABELS_FILE} has shape {tuple(labels.shape)} but meta count is {meta['count']}")
    elif labels.size and (labels.min() < 0 or labels.max() >= meta["num_classes"]):
        problems.append(f"labels in [{labels.min()}, {labels.max()}] outside [0, num_classes={meta['num_classes']})")
    if len(meta.get("variants", [])) != meta["num_variants"]:
        problems.append(f"meta lists {len(meta.get('variants', []))} variants but num_variants={meta['num_variants']}")
    if problems:
        raise CodeFormatError(f"{where}: " + "; ".join(problems))


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def draw_variant(seed: int, epoch: int, index: int, num_variants: int) -> int:
    """A pure function of (seed, epoch, index): no RNG state, so resume and any worker layout give the same data."""
    h = _splitmix64(int(seed) & _MASK64)
    h = _splitmix64(h ^ (int(epoch) & _MASK64))
    h = _splitmix64(h ^ (int(index) & _MASK64))
    return h % num_variants


class CodeDataset(Dataset):
    """Items ``(codes LongTensor (h*w,), label int)``, one augmentation variant per sample.

    A t2i split (``task == "t2i"``) also has ``captions`` (list[str], ``captions[label]`` is the item's text) and
    ``valid`` (bool array, False where the source image was unreadable); both are None for class-conditional codes.

    The variant is :func:`draw_variant` of (seed, epoch, index). Call :meth:`set_epoch` before each epoch's
    DataLoader iterator is created: workers copy the dataset when the iterator starts, so with
    ``persistent_workers=True`` a later ``set_epoch`` would not reach them.
    """

    def __init__(self, path: str | os.PathLike, augment: bool = True, seed: int = 0, validate: bool = True) -> None:
        self.path = Path(path)
        self.meta = read_meta(self.path)
        self.augment = augment
        self.seed = int(seed)
        self.epoch = 0
        for f in (CODES_FILE, LABELS_FILE):
            if not (self.path / f).is_file():
                raise CodeFormatError(f"{self.path}: {f} missing next to {META_FILE}; re-extract the codes")
        codes = self._open()
        self.labels = np.load(self.path / LABELS_FILE)
        validate_arrays(codes, self.labels, self.meta, where=str(self.path))
        if validate:
            check_code_range(codes, self.codebook_size, where=str(self.path / CODES_FILE))
        self._counts: np.ndarray | None = None
        self.captions: list[str] | None = None
        self.valid: np.ndarray | None = None
        if (self.path / CAPTIONS_FILE).is_file():
            self.captions = read_captions(self.path)
            if len(self.captions) != len(self):
                raise CodeFormatError(f"{self.path / CAPTIONS_FILE}: {len(self.captions)} captions for {len(self)} "
                                      "images; re-extract the codes")
        elif self.task == "t2i":
            raise CodeFormatError(f"{self.path}: a t2i split without {CAPTIONS_FILE}; re-extract the codes")
        if (self.path / VALID_FILE).is_file():
            self.valid = np.load(self.path / VALID_FILE)
            if self.valid.dtype != np.bool_ or self.valid.shape != (len(self),):
                raise CodeFormatError(f"{self.path / VALID_FILE}: {self.valid.dtype} {self.valid.shape}, expected "
                                      f"bool ({len(self)},); re-extract the codes")

    def _open(self) -> np.ndarray:
        self._codes = np.load(self.path / CODES_FILE, mmap_mode="r")
        return self._codes

    def __getstate__(self) -> dict:
        # Pickling a memmap copies the whole array; spawned workers reopen the file instead.
        state = self.__dict__.copy()
        state["_codes"] = None
        return state

    @property
    def codes(self) -> np.ndarray:
        """All codes as a read-only memory map (N, V, h*w)."""
        return self._codes if self._codes is not None else self._open()

    @property
    def codebook_size(self) -> int:
        return int(self.meta["codebook_size"])

    @property
    def grid(self) -> tuple[int, int]:
        h, w = self.meta["grid"]
        return int(h), int(w)

    @property
    def seq_len(self) -> int:
        h, w = self.grid
        return h * w

    @property
    def num_classes(self) -> int:
        return int(self.meta["num_classes"])

    @property
    def task(self) -> str:
        """``"t2i"`` for captioned codes, ``"c2i"`` (class labels) otherwise."""
        return str(self.meta.get("task", "c2i"))

    @property
    def num_variants(self) -> int:
        return int(self.meta["num_variants"])

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def variant_index(self, index: int) -> int:
        if not self.augment or self.num_variants == 1:
            return 0
        return draw_variant(self.seed, self.epoch, index, self.num_variants)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {n} images")
        i = i % n
        row = np.asarray(self.codes[i, self.variant_index(i)], dtype=np.int64)
        return torch.from_numpy(row), int(self.labels[i])

    def code_counts(self) -> np.ndarray:
        """How often each code occurs over all images and variants, int64 (codebook_size,); cached."""
        if self._counts is None:
            counts = np.zeros(self.codebook_size, dtype=np.int64)
            for s in range(0, len(self), _SCAN_ROWS):
                block = np.asarray(self.codes[s : s + _SCAN_ROWS]).ravel()
                counts += np.bincount(block, minlength=self.codebook_size)[: self.codebook_size]
            self._counts = counts
        return self._counts.copy()
