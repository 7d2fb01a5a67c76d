"""Packed caption features: one extraction job per caption list and encoder, one reader.

A store is a directory of three data-only files (no pickles):

* ``features.npy``: float16 ``(tokens, dim)``, every caption's feature rows concatenated in caption order;
* ``index.npy``: int64 ``(count, 2)``, the ``(offset, length)`` of caption ``i``'s rows in ``features.npy``;
* ``meta.json``: format, encoder name, fingerprint and settings, ``dim``, ``max_length``, ``captions_sha256``
  (:func:`captions_sha256`), ``count``, ``tokens``.

:func:`extract_text_features` is a job. The captions are cut into chunks of ``chunk_size`` on a fixed grid; rank
``r`` of ``world`` encodes the contiguous run of chunks ``[r*K//world, (r+1)*K//world)`` (``K`` chunks) and writes
each as ``<out_dir>.partial/chunk-XXXXXXXX.npz`` (atomically: temporary name, then rename), so a killed job
continues where it stopped and the ranks never write the same file. Rank 0 joins the chunks into ``out_dir`` once
all of them exist (or :func:`finalize_text_features` does, e.g. after a barrier); the store appears under its name
only when complete. A finished store for the same captions and encoder fingerprint is returned at once; one made
from other captions or by another encoder is refused unless ``overwrite=True``.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from masc_llamagen.errors import MascError
from masc_llamagen.text.encoders import TextEncoder, align_features
from masc_llamagen.utils.io import atomic_directory, atomic_savez, atomic_write_json

__all__ = [
    "FEATURES_FILE",
    "INDEX_FILE",
    "META_FILE",
    "TextFeatureStore",
    "TextStoreError",
    "captions_sha256",
    "extract_text_features",
    "finalize_text_features",
]

FORMAT = "masc-llamagen-text-features"
FORMAT_VERSION = 1
FEATURES_FILE, INDEX_FILE, META_FILE, JOB_FILE = "features.npy", "index.npy", "meta.json", "job.json"
DEFAULT_CHUNK_SIZE = 1024  # captions per part file: <= 0.5 GB of flan-t5-xl float16 rows even at 120 tokens
_FLOAT16_MAX = float(np.finfo(np.float16).max)


class TextStoreError(MascError, ValueError):
    """A feature store that is missing, corrupt, or made from other captions / by another encoder."""


def captions_sha256(captions: Sequence[str]) -> str:
    """sha256 over the captions in order, each as its UTF-8 length (8 bytes) and bytes: order and boundaries count."""
    h = hashlib.sha256(b"masc-captions-v1\0")
    for c in captions:
        b = c.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def checked_row(i, n: int, what: str) -> int:
    """Python indexing (negatives from the end) with a clear IndexError; shared by both feature readers."""
    i = int(i)
    if not -n <= i < n:
        raise IndexError(f"item {i} out of range: there are {n} {what}")
    return i % n


def _fingerprint_of(encoder_or_fingerprint) -> str:
    return encoder_or_fingerprint.fingerprint if isinstance(encoder_or_fingerprint, TextEncoder) else str(
        encoder_or_fingerprint)


def _write_json_atomic(path: Path, obj: dict) -> None:
    atomic_write_json(path, obj, sort_keys=True)


def _read_json(path: Path, what: str) -> dict:
    try:
        obj = json.loads(path.read_text())
    except ValueError as e:
        raise TextStoreError(f"{path} is not valid JSON ({e}); delete {path.parent} and extract again") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise TextStoreError(f"{path} is not a {what} of this package; point at a directory made by "
                             f"extract_text_features")
    if obj.get("version") != FORMAT_VERSION:
        raise TextStoreError(f"{path} has format version {obj.get('version')}, this package reads "
                             f"{FORMAT_VERSION}; extract again with overwrite=True")
    return obj


def _short(fp: str | None) -> str:
    return f"{fp[:12]}..." if fp else "unknown"


# ---------------------------------------------------------------------------------------------------------------
# reader
# ---------------------------------------------------------------------------------------------------------------


class TextFeatureStore:
    """Read a packed store: ``store[i]`` -> ``(L_i, dim)`` float32 tensor, ``store.batch(idx)`` -> right-aligned
    ``(features (B, slots, dim), mask (B, slots))``. Memory-mapped: opening is cheap whatever the size."""

    def __init__(self, path):
        self.path = Path(path)
        meta_file = self.path / META_FILE
        if not meta_file.is_file():
            raise TextStoreError(f"no text feature store at {self.path} (no {META_FILE}); make one with "
                                 f"extract_text_features(encoder, captions, '{self.path}')")
        self.meta = _read_json(meta_file, "text feature store")
        try:
            self.features = np.load(self.path / FEATURES_FILE, mmap_mode="r", allow_pickle=False)
            self.index = np.load(self.path / INDEX_FILE, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise TextStoreError(f"{self.path} is corrupt ({e}); extract again with overwrite=True") from None
        self._check_layout()

    def __getstate__(self):  # DataLoader workers (spawn) reopen the memory map instead of copying the features
        return {"path": str(self.path)}

    def __setstate__(self, state):
        self.__init__(state["path"])

    def _check_layout(self):
        m, f, idx = self.meta, self.features, self.index
        problem = None
        if f.ndim != 2 or f.dtype != np.float16 or f.shape != (m["tokens"], m["dim"]):
            problem = f"{FEATURES_FILE} is {f.dtype} {f.shape}, meta.json says float16 ({m['tokens']}, {m['dim']})"
        elif idx.dtype != np.int64 or idx.shape != (m["count"], 2):
            problem = f"{INDEX_FILE} is {idx.dtype} {idx.shape}, meta.json says int64 ({m['count']}, 2)"
        elif m["count"] and not (
            (idx[:, 1] >= 1).all() and (idx[:, 1] <= m["max_length"]).all() and idx[0, 0] == 0
            and (idx[1:, 0] == idx[:-1, 0] + idx[:-1, 1]).all() and idx[-1, 0] + idx[-1, 1] == m["tokens"]
        ):
            problem = f"{INDEX_FILE} offsets/lengths do not tile {FEATURES_FILE}"
        if problem:
            raise TextStoreError(f"{self.path} is corrupt: {problem}; extract again with overwrite=True")

    # -- the shared reader interface -----------------------------------------------------------------------------
    @property
    def fingerprint(self) -> str:
        return self.meta["fingerprint"]

    @property
    def encoder_name(self) -> str:
        return self.meta["encoder"]

    @property
    def dim(self) -> int:
        return int(self.meta["dim"])

    @property
    def max_length(self) -> int:
        return int(self.meta["max_length"])

    @property
    def captions_sha256(self) -> str:
        return self.meta["captions_sha256"]

    def __len__(self) -> int:
        return int(self.meta["count"])

    def _row(self, i: int) -> int:
        return checked_row(i, len(self), "captions in the store")

    def numpy(self, i: int) -> np.ndarray:
        off, length = self.index[self._row(i)]
        return np.asarray(self.features[off : off + length], dtype=np.float32)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(self.numpy(i))

    def valid(self, i: int) -> bool:
        """Every item of a packed store is valid (the layout is checked on opening)."""
        self._row(i)
        return True

    def lengths(self) -> np.ndarray:
        return self.index[:, 1].copy()

    def batch(self, indices, slots: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(features (B, slots, dim) float32, mask (B, slots) bool)``, right-aligned; ``slots`` defaults to
        ``max_length`` (120)."""
        return align_features([self[i] for i in indices], slots or self.max_length)

    def check(self, encoder_fingerprint) -> None:
        """Raise :class:`TextStoreError` unless the store was made by the encoder with this fingerprint (a
        fingerprint string or an encoder)."""
        fp = _fingerprint_of(encoder_fingerprint)
        if fp != self.fingerprint:
            raise TextStoreError(
                f"{self.path} holds features of encoder {self.encoder_name} {_short(self.fingerprint)}, not of this "
                f"encoder ({_short(fp)}); use the encoder that made them or re-extract with overwrite=True")

    def __repr__(self):
        return (f"TextFeatureStore({str(self.path)!r}, count={len(self)}, encoder={self.encoder_name!r}, "
                f"dim={self.dim})")


# ---------------------------------------------------------------------------------------------------------------
# extraction job
# ---------------------------------------------------------------------------------------------------------------


def _partial_dir(out: Path) -> Path:
    return out.parent / f"{out.name}.partial"


def _chunk_file(partial: Path, k: int) -> Path:
    return partial / f"chunk-{k:08d}.npz"


def _job_matches(job: dict, fingerprint: str, caps: str, count: int) -> bool:
    return job.get("fingerprint") == fingerprint and job.get("captions_sha256") == caps and job.get("count") == count


def _dir_is_empty(p: Path) -> bool:
    return p.is_dir() and not any(p.iterdir())


def extract_text_features(encoder: TextEncoder, captions: Sequence[str], out_dir, batch_size: int = 64,
                          rank: int = 0, world: int = 1, *, chunk_size: int = DEFAULT_CHUNK_SIZE,
                          overwrite: bool = False, progress: bool = False) -> TextFeatureStore | None:
    """Encode ``captions`` with ``encoder`` into a packed store at ``out_dir``; returns it once complete.

    Resumable and skip-if-done (see the module docstring). ``rank``/``world``: this process's contiguous share of
    the chunks; every rank must pass the same captions, encoder, ``out_dir`` (on a filesystem all ranks see) and
    ``chunk_size``. Returns the :class:`TextFeatureStore` when the store is complete (rank 0 joins as soon as all
    chunks exist), else ``None`` (other ranks, or rank 0 ahead of them: call :func:`finalize_text_features` after
    they finish). ``chunk_size`` (captions per part file) is fixed by the first run of a job; a resumed job keeps
    it. ``batch_size`` is captions per encoder call. ``overwrite=True`` replaces a store or an unfinished job made
    from other captions or by another encoder (the old store stays readable until the new one is complete)."""
    captions = list(captions)
    for i, c in enumerate(captions):
        if not isinstance(c, str):
            raise TextStoreError(f"caption {i} is a {type(c).__name__}, not a str; pass a list of strings")
    if not captions:
        raise TextStoreError("no captions to extract; pass a non-empty list")
    if not (isinstance(world, int) and world >= 1 and isinstance(rank, int) and 0 <= rank < world):
        raise TextStoreError(f"rank={rank}, world={world}: need an int world >= 1 and 0 <= rank < world")
    if batch_size < 1 or chunk_size < 1:
        raise TextStoreError(f"batch_size={batch_size} and chunk_size={chunk_size} must be >= 1")

    out = Path(out_dir)
    caps, fp, count = captions_sha256(captions), encoder.fingerprint, len(captions)
    replace = False
    if (out / META_FILE).is_file():
        meta = _read_json(out / META_FILE, "text feature store")
        if _job_matches(meta, fp, caps, count):
            store = TextFeatureStore(out)
            if rank == 0:
                shutil.rmtree(_partial_dir(out), ignore_errors=True)
            return store
        if not overwrite:
            what = "other captions" if meta.get("captions_sha256") != caps or meta.get("count") != count else \
                f"encoder {meta.get('encoder')} {_short(meta.get('fingerprint'))}"
            raise TextStoreError(f"{out} already holds features of {what}, not these captions with encoder "
                                 f"{encoder.name} {_short(fp)}; pass overwrite=True to replace it, or another out_dir")
        replace = True
    elif out.exists():
        if not (overwrite or _dir_is_empty(out)):
            raise TextStoreError(f"{out} exists and is not a text feature store; pass another out_dir or "
                                 f"overwrite=True to replace it")
        replace = True

    partial = _partial_dir(out)
    job_file = partial / JOB_FILE
    job = None
    if job_file.is_file():
        job = _read_json(job_file, "text extraction job")
        if not _job_matches(job, fp, caps, count):
            if not overwrite:
                raise TextStoreError(f"{partial} holds an unfinished extraction of other captions or another "
                                     f"encoder; pass overwrite=True to discard it, or another out_dir")
            shutil.rmtree(partial)
            job = None
    if job is None:
        partial.mkdir(parents=True, exist_ok=True)
        job = {"format": FORMAT, "version": FORMAT_VERSION, "encoder": encoder.name, "fingerprint": fp,
               "settings": encoder.describe(), "dim": int(encoder.dim), "max_length": int(encoder.max_length),
               "captions_sha256": caps, "count": count, "chunk_size": int(chunk_size), "replace": replace}
        _write_json_atomic(job_file, job)
    elif replace and not job.get("replace"):
        _write_json_atomic(job_file, {**job, "replace": True})

    chunk = int(job["chunk_size"])
    num_chunks = math.ceil(count / chunk)
    mine = range(rank * num_chunks // world, (rank + 1) * num_chunks // world)
    todo = [k for k in mine if not _chunk_file(partial, k).is_file()]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(min(chunk, count - k * chunk) for k in todo), desc=f"text features r{rank}",
                   unit="caption")
    try:
        for k in todo:
            _encode_chunk(encoder, captions[k * chunk : (k + 1) * chunk], batch_size, _chunk_file(partial, k), bar)
    finally:
        if bar is not None:
            bar.close()

    if rank == 0 and all(_chunk_file(partial, k).is_file() for k in range(num_chunks)):
        return finalize_text_features(out)
    return None


def _encode_chunk(encoder: TextEncoder, captions: list[str], batch_size: int, dest: Path, bar) -> None:
    rows, lengths = [], []
    for s in range(0, len(captions), batch_size):
        for x in encoder.encode_tokens(captions[s : s + batch_size]):
            x = x.detach().to("cpu", torch.float32)
            if x.ndim != 2 or x.shape[1] != encoder.dim or not 1 <= x.shape[0] <= encoder.max_length:
                raise TextStoreError(f"encoder {encoder.name} returned a caption of shape {tuple(x.shape)}; expected "
                                     f"(1..{encoder.max_length}, {encoder.dim})")
            a = x.numpy()
            if not np.isfinite(a).all() or np.abs(a).max() > _FLOAT16_MAX:
                raise TextStoreError(f"encoder {encoder.name} gave non-finite features or values beyond float16 "
                                     f"range; check the encoder weights and dtype")
            rows.append(a.astype(np.float16))
            lengths.append(a.shape[0])
        if bar is not None:
            bar.update(min(batch_size, len(captions) - s))
    atomic_savez(dest, features=np.concatenate(rows), lengths=np.asarray(lengths, dtype=np.int64))


def _load_chunk(partial: Path, k: int, key: str) -> np.ndarray:
    p = _chunk_file(partial, k)
    try:
        with np.load(p, allow_pickle=False) as z:
            return z[key]
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        raise TextStoreError(f"{p} cannot be read ({type(e).__name__}); delete it and rerun its rank") from None


def finalize_text_features(out_dir) -> TextFeatureStore:
    """Join a job's chunks (``<out_dir>.partial/``) into the store at ``out_dir`` and remove the chunks.

    Returns the store; an already finished store is returned as it is. Raises :class:`TextStoreError` naming how
    many chunks are missing while ranks are still running or were killed (rerun those ranks: they resume)."""
    out = Path(out_dir)
    partial = _partial_dir(out)
    job_file = partial / JOB_FILE
    if not job_file.is_file():
        if (out / META_FILE).is_file():
            return TextFeatureStore(out)
        raise TextStoreError(f"no extraction job for {out} (no {job_file}); run extract_text_features first")
    job = _read_json(job_file, "text extraction job")
    if (out / META_FILE).is_file():
        meta = _read_json(out / META_FILE, "text feature store")
        if _job_matches(meta, job["fingerprint"], job["captions_sha256"], job["count"]):
            shutil.rmtree(partial, ignore_errors=True)
            return TextFeatureStore(out)
    count, chunk, dim = int(job["count"]), int(job["chunk_size"]), int(job["dim"])
    num_chunks = math.ceil(count / chunk)
    missing = [k for k in range(num_chunks) if not _chunk_file(partial, k).is_file()]
    if missing:
        raise TextStoreError(f"{len(missing)} of {num_chunks} chunks of {out} are not extracted yet (first missing: "
                             f"chunk {missing[0]}); run (or rerun) every rank of extract_text_features, then finalize")

    lengths = []
    for k in range(num_chunks):
        n_k = min(chunk, count - k * chunk)
        ln = _load_chunk(partial, k, "lengths")
        if ln.shape != (n_k,) or ln.dtype != np.int64:
            raise TextStoreError(f"{_chunk_file(partial, k)} holds {ln.shape} lengths, expected ({n_k},); delete "
                                 f"it and rerun its rank")
        lengths.append(ln)
    lengths = np.concatenate(lengths)
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    tokens = int(lengths.sum())

    with atomic_directory(out, overwrite=bool(job.get("replace")) or _dir_is_empty(out)) as tmp:
        feats = np.lib.format.open_memmap(tmp / FEATURES_FILE, mode="w+", dtype=np.float16, shape=(tokens, dim))
        row = 0
        for k in range(num_chunks):
            f = _load_chunk(partial, k, "features")
            if f.dtype != np.float16 or f.ndim != 2 or f.shape[1] != dim:
                raise TextStoreError(f"{_chunk_file(partial, k)} holds {f.dtype} {f.shape} features, expected "
                                     f"float16 (*, {dim}); delete it and rerun its rank")
            feats[row : row + f.shape[0]] = f
            row += f.shape[0]
        if row != tokens:
            raise TextStoreError(f"the chunks of {out} hold {row} feature rows but their lengths sum to {tokens}; "
                                 f"delete {partial} and extract again")
        feats.flush()
        del feats
        np.save(tmp / INDEX_FILE, np.stack([offsets, lengths], axis=1))
        meta = {k: job[k] for k in ("format", "version", "encoder", "fingerprint", "settings", "dim", "max_length",
                                    "captions_sha256", "count")}
        meta.update(tokens=tokens, dtype="float16")
        _write_json_atomic(tmp / META_FILE, meta)
    shutil.rmtree(partial, ignore_errors=True)
    return TextFeatureStore(out)
