"""MASC's algorithm: the exact average-linkage (UPGMA) dendrogram of a VQ codebook, and its cut at any k.

numpy and scipy only: the tree file (tree.py), the baselines (mappings.py) and the heads build on it. The merge
table is scipy's linkage format, so scipy's tools read it.

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

import os
from typing import Any

import numpy as np

from masc_llamagen.errors import MascError

METHODS = ("average", "single", "complete", "weighted", "ward")

TIE_RULE = ("closest pair first; exact ties: tokens ordered by (distance to nearest other code, id), a cluster "
            "represented by its last member in that order, smallest (earlier, later) representative positions "
            "first; a cut at k applies the first N-k merges")
CLUSTER_ORDER = "cluster ids ascend with each cluster's smallest token id"
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


def prepare_points(codebook: np.ndarray, normalize: bool = True) -> np.ndarray:
    """float64 points to cluster; normalising as torch's F.normalize does (norm clamped at 1e-12)."""
    x = as_codebook(codebook).astype(np.float64)
    if normalize:
        x /= np.maximum(np.sqrt(np.einsum("ij,ij->i", x, x)), 1e-12)[:, None]
    return x


def check_k(k: Any, n: int) -> int:
    """k as an int in [1, N]; an integral float (a YAML ``8192.0``) is accepted, anything else is refused."""
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


def validate_linkage(Z: np.ndarray, n: int, where: str) -> None:
    """Refuse a merge table that is not a dendrogram of N leaves (a scrambled or hand-edited file)."""
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
