"""MASC's tree as an artifact: the whole merge table next to the fingerprint of the codebook it came from.

A tree is built once and cut at any k without rebuilding; the fingerprint means it can never silently be used with
another tokenizer. The file is an .npz without pickles, byte-identical for identical content (numpy only).
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from masc_llamagen.errors import first_line
from masc_llamagen.masc.linkage import (
    CLUSTER_ORDER,
    METHODS,
    TIE_RULE,
    TreeError,
    as_codebook,
    cut_linkage,
    linkage_matrix,
    prepare_points,
    validate_linkage,
)
from masc_llamagen.utils import provenance
from masc_llamagen.utils.io import atomic_open

FORMAT = "masc-tree"
FORMAT_VERSION = 1
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)
BUILD_COMMAND = "python -m masc_llamagen.tree action=build codebook=CODEBOOK"


def codebook_sha256(codebook: Any) -> str:
    return provenance.codebook_sha256(as_codebook(codebook))


@dataclass(frozen=True)
class Fingerprint:
    """What a tree was built from: enough to refuse a tree from another tokenizer or another setting."""

    sha256: str
    n: int
    d: int
    normalized: bool
    method: str

    @classmethod
    def of(cls, codebook: Any, normalized: bool = True, method: str = "average") -> Fingerprint:
        cb = as_codebook(codebook)
        return cls(codebook_sha256(cb), int(cb.shape[0]), int(cb.shape[1]), bool(normalized), method)

    def describe(self) -> str:
        return (f"sha256 {self.sha256[:12]} N={self.n} d={self.d} "
                f"{'normalised' if self.normalized else 'raw'} {self.method}")


def verify_fingerprint(fingerprint: Fingerprint, codebook: Any, source: str = "the codebook in use") -> None:
    """Raise TreeError naming both sides unless ``codebook`` is the table the tree was built from."""
    cb = as_codebook(codebook, source=source)
    sha = codebook_sha256(cb)
    n, d = cb.shape
    if sha != fingerprint.sha256 or (n, d) != (fingerprint.n, fingerprint.d):
        raise TreeError(f"tree/codebook mismatch: the tree was built from sha256 {fingerprint.sha256[:12]} "
                        f"N={fingerprint.n} d={fingerprint.d}, but {source} has sha256 {sha[:12]} N={n} d={d}; "
                        f"rebuild the tree from this tokenizer's codebook ({BUILD_COMMAND} tree=...)")


@dataclass(frozen=True)
class Cut:
    """One flat cut: the mapping, its cluster sizes, and the height of the last merge applied."""

    k: int
    mapping: np.ndarray
    sizes: np.ndarray
    height: float


@dataclass(frozen=True)
class Tree:
    """A whole dendrogram plus the fingerprint of its codebook; cut it at any k without rebuilding."""

    linkage: np.ndarray
    fingerprint: Fingerprint
    versions: dict = field(default_factory=dict)

    @property
    def n(self) -> int:
        return self.fingerprint.n

    @property
    def method(self) -> str:
        return self.fingerprint.method

    @property
    def normalized(self) -> bool:
        return self.fingerprint.normalized

    def mapping(self, k: int) -> np.ndarray:
        return cut_linkage(self.linkage, k)

    def cut(self, k: int) -> Cut:
        mapping = self.mapping(k)
        t = self.n - int(k)
        height = float(self.linkage[t - 1, 2]) if t > 0 else 0.0
        return Cut(int(k), mapping, np.bincount(mapping, minlength=int(k)).astype(np.int64), height)

    def save(self, path: str | os.PathLike) -> Path:
        fp = self.fingerprint
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "sha256": fp.sha256, "n": fp.n, "d": fp.d,
                "normalized": fp.normalized, "method": fp.method, "versions": dict(self.versions),
                "tie_rule": TIE_RULE, "cluster_order": CLUSTER_ORDER}
        return write_npz(path, {"linkage": np.asarray(self.linkage, dtype=np.float64),
                                "meta": np.array(json.dumps(meta, sort_keys=True))})


def library_versions() -> dict:
    import scipy

    try:
        from importlib.metadata import version

        ours = version("masc-llamagen")
    except Exception:  # noqa: BLE001 - not installed as a distribution (e.g. run from a source tree)
        ours = "unknown"
    return {"masc_llamagen": ours, "numpy": np.__version__, "scipy": scipy.__version__}


def build_tree(codebook: Any, normalize: bool = True, method: str = "average") -> Tree:
    """Build the whole dendrogram of a (N, d) codebook; ``normalize=False`` clusters the raw table."""
    cb = as_codebook(codebook)
    if method not in METHODS:
        raise TreeError(f"unknown linkage method {method!r}; choose one of {', '.join(METHODS)}")
    Z = linkage_matrix(prepare_points(cb, normalize), method=method)
    return Tree(Z, Fingerprint.of(cb, normalize, method), library_versions())


# ----------------------------------------------------------------------------------------- files


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    arr = np.asarray(arr)
    np.lib.format.write_array(buf, arr if arr.flags.c_contiguous else arr.copy(order="C"), allow_pickle=False)
    return buf.getvalue()


def write_npz(path: str | os.PathLike, arrays: Mapping[str, np.ndarray]) -> Path:
    """A .npz that np.load reads, byte-identical for identical content (fixed zip dates; np.savez stamps the
    current time), written atomically."""
    with atomic_open(path, "wb") as fh, zipfile.ZipFile(fh, "w", compression=zipfile.ZIP_STORED) as zf:
        for name in sorted(arrays):
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_DATE)
            info.external_attr = 0o644 << 16
            info.create_system = 3
            zf.writestr(info, _npy_bytes(arrays[name]), compress_type=zipfile.ZIP_STORED)
    return Path(path)


def load_tree(path: str | os.PathLike) -> Tree:
    """Read a tree file (no pickle); a missing, truncated or foreign file is a TreeError saying so."""
    path = Path(path)
    rebuild = f"rebuild it with: {BUILD_COMMAND} tree={path}"
    if not path.is_file():
        raise TreeError(f"tree file not found: {path}; {rebuild}")
    if not zipfile.is_zipfile(path):  # numpy would read it as a pickle and suggest loading it unsafely
        raise TreeError(f"{path}: not a MASC tree file (not an .npz archive); {rebuild}")
    try:
        with np.load(path, allow_pickle=False) as f:
            if "linkage" not in f.files or "meta" not in f.files:
                raise TreeError(f"{path}: not a MASC tree file (entries {sorted(f.files)}); {rebuild}")
            Z = np.array(f["linkage"], dtype=np.float64)
            meta = json.loads(str(f["meta"][()]))
    except TreeError:
        raise
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, json.JSONDecodeError) as e:
        raise TreeError(f"{path}: not a readable MASC tree file ({first_line(e, 160)}); "
                        f"it is truncated or corrupt: {rebuild}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise TreeError(f"{path}: not a MASC tree file (no '{FORMAT}' header); {rebuild}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise TreeError(f"{path}: tree format version {meta.get('format_version')} but this code reads "
                        f"{FORMAT_VERSION}; {rebuild}")
    try:
        fp = Fingerprint(str(meta["sha256"]), int(meta["n"]), int(meta["d"]), bool(meta["normalized"]),
                         str(meta["method"]))
    except (KeyError, TypeError, ValueError) as e:
        raise TreeError(f"{path}: tree header is missing {e}; {rebuild}") from None
    validate_linkage(Z, fp.n, str(path))
    return Tree(Z, fp, dict(meta.get("versions", {})))


def save_mapping(path: str | os.PathLike, mapping: np.ndarray) -> Path:
    """A mapping as an int64 .npy (np.load reads it without pickles), written atomically."""
    with atomic_open(path, "wb") as fh:
        np.lib.format.write_array(fh, np.ascontiguousarray(mapping, dtype=np.int64), allow_pickle=False)
    return Path(path)
