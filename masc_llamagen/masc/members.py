"""A token -> cluster mapping: its one validator, its one member table, its size summary (numpy only).

Every mapping (a tree's cut, a baseline, a head loaded from a checkpoint) passes through ``validate_mapping``, and
the heads build their torch tables from ``cluster_members``, so the rules live in one place.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from masc_llamagen.masc.linkage import TreeError


def validate_mapping(mapping: Any, n: int, k: int | None = None, source: str = "mapping") -> np.ndarray:
    """(N,) int64 copy of ``mapping``, or a TreeError naming the mismatch (length vs N, ids vs k, empties).

    ``k=None`` takes k from the largest id, so a gap in the ids is still an empty cluster."""
    m = np.asarray(mapping)
    if m.ndim != 1 or m.shape[0] != n:
        raise TreeError(f"{source} has shape {tuple(m.shape)} but the codebook has N={n} tokens; it was made for "
                        "another tokenizer: cut the tree of this tokenizer's codebook")
    if m.dtype.kind not in "iu":
        raise TreeError(f"{source} has dtype {m.dtype}; expected integer cluster ids (int64)")
    m = m.astype(np.int64)
    if n == 0:
        return m
    top = int(m.max()) + 1
    k = top if k is None else int(k)
    if int(m.min()) < 0 or top > k:
        raise TreeError(f"{source} has ids in [{int(m.min())}, {top - 1}] but k={k} needs ids in [0, {k - 1}]; "
                        "use the mapping cut at this k")
    empty = np.flatnonzero(np.bincount(m, minlength=k) == 0)
    if empty.size:
        raise TreeError(f"{source} leaves {empty.size} of k={k} clusters empty (e.g. {int(empty[0])}); "
                        "every cluster needs a member: rebuild the mapping")
    return m


@dataclass(frozen=True)
class MemberTable:
    """CSR member table: the members of cluster c are ``members[offsets[c]:offsets[c + 1]]``, ascending."""

    mapping: np.ndarray
    members: np.ndarray
    offsets: np.ndarray

    @property
    def k(self) -> int:
        return int(self.offsets.size - 1)

    @property
    def sizes(self) -> np.ndarray:
        return np.diff(self.offsets)

    def __getitem__(self, c: int) -> np.ndarray:
        return self.members[self.offsets[c] : self.offsets[c + 1]]


def cluster_members(mapping: Any, n: int, k: int | None = None, source: str = "mapping") -> MemberTable:
    """The validated mapping of N tokens and its member table (``k=None``: k from the largest id)."""
    m = validate_mapping(mapping, n, k, source)
    if k is None:
        k = int(m.max()) + 1 if m.size else 0
    order = np.argsort(m, kind="stable")  # stable: token ids ascend within each cluster
    offsets = np.zeros(int(k) + 1, dtype=np.int64)
    np.cumsum(np.bincount(m, minlength=int(k)), out=offsets[1:])
    return MemberTable(m, order.astype(np.int64), offsets)


def size_summary(sizes: np.ndarray) -> dict:
    """The numbers that say whether a cut is usable: spread, singletons, and how much the largest clusters hold."""
    s = np.sort(np.asarray(sizes))[::-1]
    n = int(s.sum())
    top = lambda c: float(s[:c].sum()) / n  # noqa: E731
    return {"k": int(s.size), "n": n, "min": int(s[-1]), "median": float(np.median(s)), "mean": n / s.size,
            "max": int(s[0]), "singletons": int((s == 1).sum()), "top1_share": top(1), "top10_share": top(10),
            "top1pct_clusters": max(1, math.ceil(0.01 * s.size)),
            "top1pct_share": top(max(1, math.ceil(0.01 * s.size)))}
