"""MASC's tree: the exact average-linkage (UPGMA) dendrogram of a VQ codebook, built once and cut at any k.

The whole merge history is kept (scipy's linkage format, so scipy's tools read it), next to a fingerprint of
the codebook it came from, so a tree can never silently be used with another tokenizer.

Rules a caller can rely on (the tie rule and the id order are also written into every tree file):

* Distances are un-squared Euclidean distances in float64 between the codebook rows, L2-normalised by default
  (LlamaGen quantises with the normalised table); cluster distances follow the Lance-Williams update of the
  chosen linkage, evaluated as scipy does, so merge heights agree with scipy's to the last bit or so and the
  partitions are the same at every k unless two distances tie exactly.
* Tie rule (only exact float ties): tokens are put in a fixed order, by (distance to their nearest other code,
  token id); a cluster is represented by its member that comes last in that order; among pairs at exactly the
  same distance, the pair whose two representatives' positions (smaller, larger) are lexicographically
  smallest merges first. Duplicate codebook rows are at distance 0 from each other, come first in that order
  (by token id) and merge before anything else.
* A cut at k applies the first N - k merges (by count, not by height), so it has exactly k clusters even when
  merge heights tie.
* Cluster ids of any mapping from this package ascend with each cluster's smallest token id: cluster 0 holds
  token 0. Identical partitions give identical arrays.

Cost: one float64 condensed distance matrix, N (N - 1) / 2 doubles (1.07 GB for N = 16384), and O(N^2) time in
practice (a vectorised numpy loop, one merge per iteration).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import sys
import time
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from masc_llamagen.errors import MascError

METHODS = ("average", "single", "complete", "weighted", "ward")
FORMAT = "masc-tree"
FORMAT_VERSION = 1
CODEBOOK_KEY = "quantize.embedding.weight"
TIE_RULE = ("closest pair first; exact ties: tokens ordered by (distance to nearest other code, id), a cluster "
            "represented by its last member in that order, smallest (earlier, later) representative positions "
            "first; a cut at k applies the first N-k merges")
CLUSTER_ORDER = "cluster ids ascend with each cluster's smallest token id"
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)
_METHOD_CODE = {m: i for i, m in enumerate(METHODS)}


class TreeError(MascError, ValueError):
    """A tree, codebook, k or mapping that cannot be used as asked; the one-line message says what to do."""


# ----------------------------------------------------------------------------------------------- codebooks


def as_codebook(table: Any, source: str = "codebook") -> np.ndarray:
    """Validate a (N, d) table and return it as C-contiguous float32, the form the fingerprint hashes."""
    if hasattr(table, "detach"):  # torch tensor, without importing torch here
        table = table.detach().cpu().float().numpy()
    arr = np.asarray(table)
    if arr.dtype.kind not in "fiu" or arr.dtype == np.bool_:
        raise TreeError(f"{source}: expected a numeric (N, d) table, got dtype {arr.dtype}")
    if arr.ndim != 2:
        raise TreeError(f"{source} is {arr.ndim}-D with shape {tuple(arr.shape)}; expected a 2-D (N codes x d dims) "
                        "table: pass the embedding matrix itself (reshape it to (N, d))")
    n, d = arr.shape
    if n == 0:
        raise TreeError(f"{source} is empty (0 rows, shape {tuple(arr.shape)}); pass the tokenizer's full codebook")
    if d == 0:
        raise TreeError(f"{source} has 0 columns (shape {tuple(arr.shape)}); pass the (N, d) embedding table")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    bad = ~np.isfinite(arr)
    if bad.any():
        rows = np.flatnonzero(bad.any(axis=1))
        shown = ", ".join(str(r) for r in rows[:5]) + (", ..." if len(rows) > 5 else "")
        raise TreeError(f"{source} has {int(bad.sum())} non-finite values (NaN/inf) in {len(rows)} rows [{shown}] "
                        "(after casting to float32); fix or drop those codes before building a tree")
    return arr


def _pick_codebook(tensors: Mapping[str, Any], path: Path) -> Any:
    if CODEBOOK_KEY in tensors:
        return tensors[CODEBOOK_KEY]
    two_d = [k for k, v in tensors.items() if getattr(v, "ndim", 0) == 2]
    if len(two_d) == 1:
        return tensors[two_d[0]]
    listed = ", ".join(two_d[:6]) + (", ..." if len(two_d) > 6 else "")
    raise TreeError(f"{path}: no '{CODEBOOK_KEY}' and {len(two_d)} 2-D tensors ({listed or 'none'}); "
                    "save the codebook alone as a .npy or a .pt holding one (N, d) tensor")


def load_codebook(path: str | os.PathLike) -> np.ndarray:
    """Read a codebook from a VQ checkpoint, a .npy, or a .pt/.safetensors tensor (never unpickling objects)."""
    p = Path(path)
    if not p.is_file():
        raise TreeError(f"codebook file not found: {p} (pass a VQ checkpoint, a .npy, or a .pt/.safetensors tensor)")
    if p.suffix == ".npy":
        try:
            arr = np.load(p, allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise TreeError(f"{p}: not a readable .npy array ({_first_line(e)}); re-save it with numpy.save") from None
        return as_codebook(arr, source=str(p))
    from ..checkpoint import CheckpointError, extract_state_dict, read_checkpoint

    if p.suffix == ".safetensors":
        try:
            return as_codebook(_pick_codebook(extract_state_dict(read_checkpoint(p)), p), source=str(p))
        except CheckpointError as e:
            raise TreeError(str(e)) from None
    import pickle

    import torch

    try:
        obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise TreeError(f"{p}: refused to unpickle arbitrary objects ({_first_line(e)[:160]}); "
                        "save the codebook as a plain tensor, state dict or .npy") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile) as e:
        raise TreeError(f"{p}: cannot read ({_first_line(e)[:160]}); the file is truncated or corrupt") from None
    if isinstance(obj, torch.Tensor):
        return as_codebook(obj, source=str(p))
    if isinstance(obj, Mapping):
        return as_codebook(_pick_codebook(extract_state_dict(obj), p), source=str(p))
    raise TreeError(f"{p}: holds a {type(obj).__name__}, not a tensor or a state dict; save the (N, d) codebook")


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0] if s else type(e).__name__


def codebook_sha256(codebook: np.ndarray) -> str:
    return hashlib.sha256(as_codebook(codebook).tobytes()).hexdigest()


def prepare_points(codebook: np.ndarray, normalize: bool = True) -> np.ndarray:
    """float64 points to cluster; normalising as torch's F.normalize does (norm clamped at 1e-12)."""
    x = as_codebook(codebook).astype(np.float64)
    if normalize:
        x /= np.maximum(np.sqrt(np.einsum("ij,ij->i", x, x)), 1e-12)[:, None]
    return x


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
        return cls(hashlib.sha256(cb.tobytes()).hexdigest(), int(cb.shape[0]), int(cb.shape[1]),
                   bool(normalized), method)

    def describe(self) -> str:
        return (f"sha256 {self.sha256[:12]} N={self.n} d={self.d} "
                f"{'normalised' if self.normalized else 'raw'} {self.method}")


def verify_fingerprint(fingerprint: Fingerprint, codebook: Any, source: str = "the codebook in use") -> None:
    """Raise TreeError naming both sides unless ``codebook`` is the table the tree was built from."""
    cb = as_codebook(codebook, source=source)
    sha = hashlib.sha256(cb.tobytes()).hexdigest()
    n, d = cb.shape
    if sha != fingerprint.sha256 or (n, d) != (fingerprint.n, fingerprint.d):
        raise TreeError(f"tree/codebook mismatch: the tree was built from sha256 {fingerprint.sha256[:12]} "
                        f"N={fingerprint.n} d={fingerprint.d}, but {source} has sha256 {sha[:12]} N={n} d={d}; "
                        "rebuild the tree from this tokenizer's codebook (python -m masc_llamagen.tree build)")


def check_k(k: Any, n: int) -> int:
    if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)):
        if isinstance(k, (float, np.floating)) and float(k).is_integer():
            k = int(k)
        else:
            raise TreeError(f"k must be an integer in [1, {n}], got {k!r}")
    k = int(k)
    if not 1 <= k <= n:
        raise TreeError(f"k={k} is out of range: a codebook of N={n} tokens can be cut into 1 <= k <= {n} clusters")
    return k


# ------------------------------------------------------------------------------------------ the algorithm
#
# The "generic" closest-pair algorithm over a float64 condensed distance matrix (the upper triangle of the
# matrix over slots, D[i, j] for i < j at rs[i] + j). bound[i] is a lower bound of row i's minimum over active
# columns j > i and nn[i] a column where it was attained: the smallest bound is exact when D[i, nn[i]] still
# equals it, and then no pair is closer; otherwise row i is rescanned. Decreases from a merge are applied at
# once, increases lazily, so any Lance-Williams update works. Merging slots a < b keeps the cluster in b.
#
# Slots are the tokens sorted by their distance to their nearest other code. Each merge must read a full row of
# each merged slot, and a row of the triangle is contiguous only to the right of the diagonal; with early-merging
# tokens in the low slots most of those reads are contiguous: ~40% fewer cache-missing reads than in token
# order at N = 16384. The order is invisible in the result except in how exact ties are broken (TIE_RULE).


def _row_starts(n: int) -> np.ndarray:
    i = np.arange(n, dtype=np.int64)
    return i * n - i * (i + 1) // 2 - i - 1


def _memory_check(n: int) -> None:
    need = n * (n - 1) // 2 * 8
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return
    if need > 0.8 * total:
        raise TreeError(f"N={n} needs {need / 2**30:.1f} GiB for the exact distance matrix but this machine has "
                        f"{total / 2**30:.1f} GiB; use a smaller codebook or a bigger machine")


def _pair_distances(x: np.ndarray, D: np.ndarray, rs: np.ndarray) -> None:
    """Fill the condensed matrix: sum of squared differences over dimensions in order, then sqrt (the same
    operations, so the same bits, as scipy's pdist)."""
    n, d = x.shape
    xt = np.ascontiguousarray(x.T)
    block = 8  # 8 x N doubles per temporary: stays in L2, twice as fast as larger blocks
    starts = list(range(0, n - 1, block))

    def work(first: int, stride: int) -> None:
        acc = np.empty((block, n))
        tmp = np.empty((block, n))
        for lo in starts[first::stride]:
            hi = min(lo + block, n - 1)
            a = acc[: hi - lo, : n - lo]
            t = tmp[: hi - lo, : n - lo]
            np.subtract(xt[0, lo:hi, None], xt[0, None, lo:], out=a)
            np.multiply(a, a, out=a)
            for k in range(1, d):
                np.subtract(xt[k, lo:hi, None], xt[k, None, lo:], out=t)
                np.multiply(t, t, out=t)
                a += t
            np.sqrt(a, out=a)
            for r in range(lo, hi):
                D[rs[r] + r + 1 : rs[r] + n] = a[r - lo, r - lo + 1 :]

    workers = max(1, min(4, os.cpu_count() or 1, len(starts)))
    if workers == 1 or n < 2048:
        work(0, 1)
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(workers) as pool:  # numpy releases the GIL inside each array operation
        for f in [pool.submit(work, w, workers) for w in range(workers)]:
            f.result()


def slot_order(x: np.ndarray) -> np.ndarray:
    """Tokens sorted by (distance to the nearest other code, token id): the build's slot order."""
    n = x.shape[0]
    if n < 2:
        return np.arange(n, dtype=np.int64)
    from scipy.spatial import cKDTree

    _, idx = cKDTree(x).query(x, k=2)
    other = np.where(idx[:, 0] == np.arange(n), idx[:, 1], idx[:, 0])  # duplicates may list another token first
    diff = x - x[other]
    nnd = np.sqrt(np.einsum("ij,ij->i", diff, diff))  # exact float64 again: the order must not depend on the tree
    return np.lexsort((np.arange(n), nnd)).astype(np.int64)


def _lance_williams(code: int, da: np.ndarray, db: np.ndarray, na: float, nb: float, h: float,
                    nu: np.ndarray | None) -> np.ndarray:
    if code == 0:  # average (UPGMA): (na da + nb db) / (na + nb), in scipy's order of operations
        out = da * na
        out += db * nb
        out /= na + nb
        return out
    if code == 1:  # single
        return np.minimum(da, db)
    if code == 2:  # complete
        return np.maximum(da, db)
    if code == 3:  # weighted (WPGMA)
        out = da + db
        out /= 2.0
        return out
    assert nu is not None  # ward, on Euclidean distances
    out = ((nu + na) * da * da + (nu + nb) * db * db - nu * h * h) / (nu + na + nb)
    return np.sqrt(np.maximum(out, 0.0))


def _generic_linkage(x: np.ndarray, code: int, order: np.ndarray) -> np.ndarray:
    n = x.shape[0]
    rs = _row_starts(n)
    D = np.empty(n * (n - 1) // 2)
    _pair_distances(np.ascontiguousarray(x[order]), D, rs)
    inf = np.inf
    bound = np.full(n, inf)
    nn = np.zeros(n, dtype=np.int64)
    for r in range(n - 1):
        row = D[rs[r] + r + 1 : rs[r] + n]
        j = int(row.argmin())  # first minimum: the smallest column among ties
        bound[r] = row[j]
        nn[r] = r + 1 + j
    size = np.ones(n, dtype=np.int64)
    node = order.astype(np.int64)  # slot -> node id in the merge table (leaves: token ids)
    alive = np.ones(n, dtype=bool)
    act = np.arange(n, dtype=np.int64)  # active slots, ascending
    act_rs = rs.copy()
    Z = np.empty((n - 1, 4))
    for step in range(n - 1):
        while True:
            a = int(bound.argmin())  # first minimum: the smallest row among ties
            b = int(nn[a])
            h = float(bound[a])
            if alive[b] and D[rs[a] + b] == h:
                break
            pa = int(np.searchsorted(act, a))
            row = D[rs[a] + act[pa + 1 :]]
            if row.size == 0:
                bound[a] = inf
                continue
            j = int(row.argmin())
            bound[a] = row[j]
            nn[a] = act[pa + 1 + j]
        na, nb = float(size[a]), float(size[b])
        pa = int(np.searchsorted(act, a))
        pb = int(np.searchsorted(act, b))
        mid = act[pa + 1 : pb]
        hi = act[pb + 1 :]
        below = np.concatenate((act[:pa], mid))  # active slots below b, other than a
        ia = np.concatenate((act_rs[:pa] + a, mid + rs[a], hi + rs[a]))
        ib = np.concatenate((act_rs[:pa] + b, act_rs[pa + 1 : pb] + b, hi + rs[b]))
        nu = size[np.concatenate((below, hi))].astype(np.float64) if code == 4 else None
        new = _lance_williams(code, D[ia], D[ib], na, nb, h, nu)
        D[ib] = new
        v = new[: below.size]
        cur = bound[below]
        upd = np.flatnonzero((v < cur) | ((v == cur) & (nn[below] > b)))
        if upd.size:
            bound[below[upd]] = v[upd]
            nn[below[upd]] = b
        if hi.size:
            j = int(new[below.size :].argmin())
            bound[b] = new[below.size + j]
            nn[b] = hi[j]
        else:
            bound[b] = inf
        bound[a] = inf
        alive[a] = False
        x0, y0 = node[a], node[b]
        Z[step] = (min(x0, y0), max(x0, y0), h, na + nb)
        node[b] = n + step
        size[b] += size[a]
        act = np.delete(act, pa)
        act_rs = np.delete(act_rs, pa)
    return Z


def linkage_matrix(points: np.ndarray, method: str = "average") -> np.ndarray:
    """(N-1, 4) merge table in scipy's linkage format, in merge order, from float64 points (N, d)."""
    if method not in _METHOD_CODE:
        raise TreeError(f"unknown linkage method {method!r}; choose one of {', '.join(METHODS)}")
    x = np.ascontiguousarray(points, dtype=np.float64)
    n = x.shape[0]
    if n < 2:
        return np.empty((0, 4))
    _memory_check(n)
    return _generic_linkage(x, _METHOD_CODE[method], slot_order(x))


# ------------------------------------------------------------------------------------------- cuts


def canonical_labels(labels: Any) -> np.ndarray:
    """Relabel any partition so ids ascend with each cluster's smallest token id (the package-wide order)."""
    lab = np.asarray(labels).reshape(-1)
    if lab.size == 0:
        return np.zeros(0, dtype=np.int64)
    _, first, inv = np.unique(lab, return_index=True, return_inverse=True)
    rank = np.empty(first.size, dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(first.size)
    return rank[inv.reshape(-1)]


def cut_linkage(Z: np.ndarray, k: int) -> np.ndarray:
    """Mapping (N,) int64 in [0, k) after the first N - k merges of a linkage table (cut by count)."""
    n = int(Z.shape[0]) + 1
    k = check_k(k, n)
    parent = np.arange(2 * n - 1, dtype=np.int64)
    t = n - k
    if t:
        ch = Z[:t, :2].astype(np.int64)
        parent[ch[:, 0]] = np.arange(n, n + t)
        parent[ch[:, 1]] = np.arange(n, n + t)
    while True:  # pointer jumping: every leaf ends at its cluster's root
        nxt = parent[parent]
        if np.array_equal(nxt, parent):
            break
        parent = nxt
    return canonical_labels(parent[:n])


@dataclass(frozen=True)
class Cut:
    """One flat cut: the mapping, its cluster sizes, and the height of the last merge applied."""

    k: int
    mapping: np.ndarray
    sizes: np.ndarray
    height: float

    @property
    def members(self):
        """CSR member table (see mappings.MemberTable): members of cluster c ascending by token id."""
        from .mappings import cluster_members

        return cluster_members(self.mapping, self.k)


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
    def d(self) -> int:
        return self.fingerprint.d

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

    def check_codebook(self, codebook: Any, source: str = "the codebook in use") -> None:
        verify_fingerprint(self.fingerprint, codebook, source)

    def save(self, path: str | os.PathLike) -> Path:
        return save_tree(self, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tree:
        return load_tree(path)


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
    if method not in _METHOD_CODE:
        raise TreeError(f"unknown linkage method {method!r}; choose one of {', '.join(METHODS)}")
    Z = linkage_matrix(prepare_points(cb, normalize), method=method)
    return Tree(Z, Fingerprint.of(cb, normalize, method), library_versions())


# ----------------------------------------------------------------------------------------- tree files


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    arr = np.asarray(arr)
    np.lib.format.write_array(buf, arr if arr.flags.c_contiguous else arr.copy(order="C"), allow_pickle=False)
    return buf.getvalue()


def write_npz(path: str | os.PathLike, arrays: Mapping[str, np.ndarray]) -> Path:
    """A .npz that np.load reads, byte-identical for identical content (fixed zip dates), written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:
            for name in sorted(arrays):
                info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_DATE)
                info.external_attr = 0o644 << 16
                info.create_system = 3
                zf.writestr(info, _npy_bytes(arrays[name]), compress_type=zipfile.ZIP_STORED)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def save_tree(tree: Tree, path: str | os.PathLike) -> Path:
    fp = tree.fingerprint
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "sha256": fp.sha256, "n": fp.n, "d": fp.d,
            "normalized": fp.normalized, "method": fp.method, "versions": dict(tree.versions),
            "tie_rule": TIE_RULE, "cluster_order": CLUSTER_ORDER}
    return write_npz(path, {"linkage": np.asarray(tree.linkage, dtype=np.float64),
                            "meta": np.array(json.dumps(meta, sort_keys=True))})


def _validate_linkage(Z: np.ndarray, n: int, where: str) -> None:
    if Z.shape != (max(n - 1, 0), 4) or not np.isfinite(Z).all():
        raise TreeError(f"{where}: merge table has shape {Z.shape} (or non-finite values) but N={n}; "
                        "the file is corrupt: rebuild the tree")
    if n < 2:
        return
    ch = Z[:, :2]
    ids = ch.astype(np.int64)
    steps = np.arange(n - 1)
    ok = (ids == ch).all() and (ids >= 0).all() and (ids < (n + steps)[:, None]).all()
    ok = ok and np.unique(ids).size == 2 * (n - 1)
    if ok:
        sizes = np.ones(2 * n - 1)
        for t in range(n - 1):  # cheap next to any use of a tree; catches a scrambled table
            sizes[n + t] = sizes[ids[t, 0]] + sizes[ids[t, 1]]
        ok = np.array_equal(sizes[n:], Z[:, 3])
    if not ok:
        raise TreeError(f"{where}: the merge table is not a valid dendrogram of N={n} tokens; the file is "
                        "corrupt: rebuild the tree")


def load_tree(path: str | os.PathLike) -> Tree:
    """Read a tree file (no pickle); a missing, truncated or foreign file is a TreeError saying so."""
    path = Path(path)
    rebuild = f"rebuild it with: python -m masc_llamagen.tree build CODEBOOK --out {path}"
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
        raise TreeError(f"{path}: not a readable MASC tree file ({_first_line(e)[:160]}); "
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
    _validate_linkage(Z, fp.n, str(path))
    return Tree(Z, fp, dict(meta.get("versions", {})))


def save_mapping(path: str | os.PathLike, mapping: np.ndarray) -> Path:
    """Write an int64 .npy atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            np.lib.format.write_array(fh, np.ascontiguousarray(mapping, dtype=np.int64), allow_pickle=False)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


# ------------------------------------------------------------------------------------------------- CLI


def size_summary(sizes: np.ndarray) -> dict:
    s = np.sort(np.asarray(sizes))[::-1]
    n = int(s.sum())
    top = lambda c: float(s[:c].sum()) / n  # noqa: E731
    return {"k": int(s.size), "n": n, "min": int(s[-1]), "median": float(np.median(s)), "mean": n / s.size,
            "max": int(s[0]), "singletons": int((s == 1).sum()), "top1_share": top(1), "top10_share": top(10),
            "top1pct_clusters": max(1, math.ceil(0.01 * s.size)),
            "top1pct_share": top(max(1, math.ceil(0.01 * s.size)))}


def _stats_lines(tree: Tree, cut: Cut) -> list[str]:
    st = size_summary(cut.sizes)
    fp = tree.fingerprint
    return [
        f"tree: {fp.describe()}",
        f"cut k={cut.k}: {tree.n - cut.k} of {max(tree.n - 1, 0)} merges applied, last merge height "
        f"{cut.height:.6g}",
        f"cluster sizes: min {st['min']}  median {st['median']:g}  mean {st['mean']:.3g}  max {st['max']}",
        f"singletons: {st['singletons']} clusters ({st['singletons'] / st['k']:.1%} of clusters, "
        f"{st['singletons'] / st['n']:.1%} of tokens)",
        f"largest clusters: top-1 holds {st['top1_share']:.1%} of tokens, top-10 {st['top10_share']:.1%}, "
        f"top 1% ({st['top1pct_clusters']} clusters) {st['top1pct_share']:.1%}",
    ]


def plot_stats(tree: Tree, cut: Cut, path: str | os.PathLike) -> Path:
    """Cluster-size histogram and the top of the dendrogram, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from scipy.cluster.hierarchy import dendrogram

    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(13, 4.8))
    sizes = cut.sizes
    bins = np.unique(np.round(np.logspace(0, np.log10(max(int(sizes.max()), 1) + 1), 40)).astype(int))
    ax0.hist(sizes, bins=bins if bins.size > 1 else 1, color="#4472c4", edgecolor="white")
    ax0.set_xscale("log")
    ax0.set_yscale("log")
    ax0.set_xlabel("cluster size (tokens)")
    ax0.set_ylabel("clusters")
    ax0.set_title(f"cluster sizes at k={cut.k} (N={tree.n})")
    if tree.n >= 2:
        p = min(40, tree.n)
        dendrogram(tree.linkage, truncate_mode="lastp", p=p, ax=ax1, leaf_font_size=7,
                   color_threshold=cut.height if cut.k > 1 else None, above_threshold_color="#555555")
        if 1 < cut.k < tree.n:
            ax1.axhline(cut.height, color="red", lw=0.8, ls="--", label=f"cut k={cut.k}")
            ax1.legend(loc="upper right")
        # Leaves of a truncated dendrogram sit at 0: start the axis near the lowest merge drawn (or the cut).
        low = min(float(tree.linkage[-(p - 1), 2]) if p > 1 else 0.0, cut.height if cut.k > 1 else np.inf)
        top = float(tree.linkage[-1, 2])
        ax1.set_ylim(max(0.0, low - 0.08 * (top - low + 1e-12)), top + 0.04 * (top - low + 1e-12))
    ax1.set_title(f"top of the {tree.method}-linkage dendrogram (last {min(40, tree.n)} clusters)")
    ax1.set_ylabel("merge height")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m masc_llamagen.tree", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build the whole dendrogram of a codebook")
    b.add_argument("codebook", help="VQ checkpoint, .npy, or .pt/.safetensors tensor")
    b.add_argument("--out", required=True, help="tree file (.npz)")
    b.add_argument("--raw", action="store_true", help="cluster the raw table (default: L2-normalised rows)")
    b.add_argument("--method", default="average", choices=METHODS)
    c = sub.add_parser("cut", help="cut a tree at k clusters and save the (N,) int64 mapping")
    c.add_argument("tree")
    c.add_argument("--k", type=int, required=True)
    c.add_argument("--out", required=True, help="mapping file (.npy, int64)")
    c.add_argument("--codebook", help="refuse unless the tree was built from this codebook")
    s = sub.add_parser("stats", help="cluster-size distribution at k (and a PNG)")
    s.add_argument("tree")
    s.add_argument("--k", type=int, required=True)
    s.add_argument("--png", help="write a cluster-size histogram and the top of the dendrogram here")
    args = ap.parse_args(argv)

    try:
        if args.cmd == "build":
            cb = load_codebook(args.codebook)
            t0 = time.perf_counter()
            tree = build_tree(cb, normalize=not args.raw, method=args.method)
            dt = time.perf_counter() - t0
            out = tree.save(args.out)
            print(f"built {tree.fingerprint.describe()} tree in {dt:.2f} s -> {out}")
        elif args.cmd == "cut":
            tree = load_tree(args.tree)
            if args.codebook:
                tree.check_codebook(load_codebook(args.codebook), source=args.codebook)
            cut = tree.cut(args.k)
            out = save_mapping(args.out, cut.mapping)
            st = size_summary(cut.sizes)
            print(f"k={cut.k}: sizes min {st['min']} median {st['median']:g} max {st['max']}, "
                  f"{st['singletons']} singletons -> {out}")
        else:
            tree = load_tree(args.tree)
            cut = tree.cut(args.k)
            print("\n".join(_stats_lines(tree, cut)))
            if args.png:
                print(f"wrote {plot_stats(tree, cut, args.png)}")
    except (MascError, OSError) as e:  # a bad file or value: one line (an unwritable --out included)
        from masc_llamagen.errors import describe_os_error

        print(f"error: {describe_os_error(e) if isinstance(e, OSError) else e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
