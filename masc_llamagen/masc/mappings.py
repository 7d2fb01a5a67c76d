"""Token -> cluster mappings behind one interface: MASC's tree and the baselines of the paper's ablations.

Every mapping is an (N,) int64 array in [0, k) with every cluster non-empty and cluster ids ordered by each
cluster's smallest token id (linkage.canonical_labels), whatever produced it, so two methods that find the same
partition give the same array, and a mapping file says nothing about how it was made.

Methods (``build_mapping``):
  * ``masc`` / ``average``: a cut of the exact average-linkage tree (the paper's method);
  * ``single``, ``complete``, ``weighted``, ``ward``: other linkages through the same machinery;
  * ``kmeans``: scikit-learn KMeans, init="random", n_init=10, lowest inertia (the paper's baseline);
  * ``balanced_kmeans``: IAR-style k-means with equal cluster sizes (sizes differ by at most 1 when k does not
    divide N);
  * ``random``: a seeded random balanced partition (the floor any structured mapping should beat).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from masc_llamagen.masc.linkage import METHODS as LINKAGES
from masc_llamagen.masc.linkage import TreeError, as_codebook, canonical_labels, check_k, prepare_points
from masc_llamagen.masc.tree import build_tree

MAPPING_METHODS = ("masc", *LINKAGES, "kmeans", "balanced_kmeans", "random")


# ------------------------------------------------------------------------------------------------ baselines


def kmeans_mapping(points: np.ndarray, k: int, seed: int = 0, n_init: int = 10) -> np.ndarray:
    """scikit-learn KMeans as the paper ran it (init random, 10 restarts, lowest inertia kept), seeded."""
    from sklearn.cluster import KMeans

    x = np.asarray(points, dtype=np.float64)
    k = check_k(k, x.shape[0])
    km = KMeans(n_clusters=k, init="random", n_init=n_init, random_state=seed).fit(x)
    labels = np.asarray(km.labels_, dtype=np.int64)
    return canonical_labels(_fill_empty(x, labels, k))


def _fill_empty(x: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """Give each empty cluster the token farthest from its centroid in the largest cluster (deterministic)."""
    labels = labels.copy()
    while True:
        counts = np.bincount(labels, minlength=k)
        empty = np.flatnonzero(counts == 0)
        if not empty.size:
            return labels
        big = int(np.argmax(counts))
        idx = np.flatnonzero(labels == big)
        far = idx[int(np.argmax(((x[idx] - x[idx].mean(0)) ** 2).sum(1)))]
        labels[far] = int(empty[0])


def _nearest_candidates(x: np.ndarray, cent: np.ndarray, c: int, chunk: int = 2048) -> np.ndarray:
    """Indices of each point's c nearest centroids, nearest first (ties by centroid id)."""
    n = x.shape[0]
    out = np.empty((n, c), dtype=np.int64)
    cn = (cent * cent).sum(1)
    for lo in range(0, n, chunk):
        xs = x[lo : lo + chunk]
        d2 = cn[None, :] - 2.0 * xs @ cent.T
        part = np.argpartition(d2, c - 1, axis=1)[:, :c] if c < cent.shape[0] else np.tile(
            np.arange(cent.shape[0]), (xs.shape[0], 1))
        dd = np.take_along_axis(d2, part, 1)
        o = np.lexsort((part, dd), axis=1)
        out[lo : lo + chunk] = np.take_along_axis(part, o, 1)
    return out


def _balanced_assign(x: np.ndarray, cent: np.ndarray, cap: np.ndarray, n_cand: int) -> np.ndarray:
    """Capacity-constrained assignment by deferred acceptance: points propose to their nearest centroids in
    order, each centroid keeps its closest proposers up to capacity; leftovers go greedily to free capacity."""
    n, k = x.shape[0], cent.shape[0]
    c = min(k, n_cand)
    cand = _nearest_candidates(x, cent, c)
    dist = ((x[:, None, :] - cent[cand]) ** 2).sum(-1)
    ptr = np.zeros(n, dtype=np.int64)
    assign = np.full(n, -1, dtype=np.int64)
    while True:
        free = np.flatnonzero((assign < 0) & (ptr < c))
        if not free.size:
            break
        held = np.flatnonzero(assign >= 0)
        pts = np.concatenate((held, free))
        cl = np.concatenate((assign[held], cand[free, ptr[free]]))
        dd = np.concatenate((dist[held, ptr[held]], dist[free, ptr[free]]))
        order = np.lexsort((pts, dd, cl))
        pts, cl = pts[order], cl[order]
        start = np.searchsorted(cl, cl, side="left")
        rank = np.arange(pts.size) - start
        keep = rank < cap[cl]
        assign[pts[keep]] = cl[keep]
        lost = pts[~keep]
        assign[lost] = -1
        ptr[lost] += 1
    rest = np.flatnonzero(assign < 0)
    if rest.size:  # rare: every candidate full; only clusters with room left (at most rest.size of them)
        left = cap - np.bincount(assign[assign >= 0], minlength=k)
        free = np.flatnonzero(left > 0)
        xr, cf = x[rest], cent[free]
        d2 = (xr * xr).sum(1)[:, None] + (cf * cf).sum(1)[None, :] - 2.0 * xr @ cf.T
        room = left[free]
        for i in np.argsort(d2.min(1), kind="stable"):
            j = int(np.argmin(np.where(room > 0, d2[i], np.inf)))
            assign[rest[i]] = free[j]
            room[j] -= 1
    return assign


def balanced_kmeans_mapping(points: np.ndarray, k: int, seed: int = 0, max_iter: int = 50,
                            n_cand: int = 32) -> np.ndarray:
    """IAR-style balanced k-means: Lloyd iterations whose assignment step fills every cluster to an equal size
    (N // k, plus one for N % k clusters: those whose centroid is wanted by most points)."""
    x = np.asarray(points, dtype=np.float64)
    n = x.shape[0]
    k = check_k(k, n)
    rng = np.random.default_rng(seed)
    cent = x[np.sort(rng.choice(n, size=k, replace=False))].copy()
    q, r = divmod(n, k)
    assign = None
    for _ in range(max_iter):
        cap = np.full(k, q, dtype=np.int64)
        if r:
            want = np.bincount(_nearest_candidates(x, cent, 1)[:, 0], minlength=k)
            cap[np.argsort(-want, kind="stable")[:r]] += 1
        new = _balanced_assign(x, cent, cap, n_cand)
        if assign is not None and np.array_equal(new, assign):
            break
        assign = new
        cnt = np.bincount(assign, minlength=k).astype(np.float64)
        cent = np.zeros_like(cent)
        np.add.at(cent, assign, x)
        cent /= cnt[:, None]
    return canonical_labels(assign)


def random_mapping(n: int, k: int, seed: int = 0) -> np.ndarray:
    """A seeded random partition into k clusters of (nearly) equal size, every cluster non-empty."""
    k = check_k(k, n)
    perm = np.random.default_rng(seed).permutation(n)
    labels = np.empty(n, dtype=np.int64)
    labels[perm] = np.arange(n) % k
    return canonical_labels(labels)


def build_mapping(method: str, codebook: Any, k: int, seed: int = 0, normalize: bool = True) -> np.ndarray:
    """(N,) int64 mapping into k clusters by ``method`` (see MAPPING_METHODS), canonically ordered."""
    if method not in MAPPING_METHODS:
        raise TreeError(f"unknown mapping method {method!r}; choose one of {', '.join(MAPPING_METHODS)}")
    cb = as_codebook(codebook)
    n = cb.shape[0]
    k = check_k(k, n)
    if method == "random":
        return random_mapping(n, k, seed)
    if method in ("masc", *LINKAGES):
        return build_tree(cb, normalize=normalize, method="average" if method == "masc" else method).mapping(k)
    points = prepare_points(cb, normalize)
    if method == "kmeans":
        return kmeans_mapping(points, k, seed)
    return balanced_kmeans_mapping(points, k, seed)
