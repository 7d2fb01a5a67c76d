"""Benchmark (not a test): building the exact average-linkage tree of an N x 8 codebook (LlamaGen's size by
default), ours vs scipy's linkage vs the paper's O(N^3) reference loop.

Every measurement runs in a fresh subprocess: wall time and CPU time of the build call only (imports and the
codebook excluded), and peak RSS above the process's peak before the build (ru_maxrss), so library imports do
not count. The O(N^3) loop is timed on small N and extrapolated as N^3 (time) and N^2 (memory). The partitions
of ours and scipy's are compared at a few k.

    python benchmarks/bench_tree.py               # N = 16384
    python benchmarks/bench_tree.py quick=true    # N = 4096, a minute or so

On a shared VM, first-touching fresh memory can cost seconds per GB and other jobs share the cores; the script
prints the load average next to each run, and by default first touches 2.5 GB once in a throwaway process so
all contenders start from the same memory state (warm=false to skip).
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import hydra
import numpy as np
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))
from isolated import in_fresh_process  # noqa: E402


@dataclass
class TreeBench:
    """configs/bench/tree.yaml only keeps Hydra from making output folders."""

    n: int = 16384
    quick: bool = False  # N = 4096 and smaller reference sizes
    repeat: int = 2  # runs of each contender (median reported)
    ref_sizes: list[int] | None = None  # N of the O(N^3) loop; null: 500, 1000, 2000 (quick: 250, 500, 1000)
    ks: list[int] | None = None  # k at which partitions are compared; null: N/2, N/4, N/8
    seed: int = 0
    warm: bool = True  # first touch 2.5 GB in a throwaway process
    json: str | None = None  # also write the raw results here


ConfigStore.instance().store(name="base_bench_tree", node=TreeBench)


def make_codebook(n: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def reference_loop(points: np.ndarray) -> np.ndarray:
    """The paper's reference: full square matrix, merge the globally closest pair, Lance-Williams, repeat."""
    n = len(points)
    D = np.zeros((n, n))
    for k in range(points.shape[1]):  # no (N, N, d) temporary: memory is the N x N matrix (and one more)
        t = points[:, None, k] - points[None, :, k]
        t *= t
        D += t
        del t
    np.sqrt(D, out=D)
    np.fill_diagonal(D, np.inf)
    size = np.ones(n)
    heights = np.empty(n - 1)
    for t in range(n - 1):
        i, j = np.unravel_index(np.argmin(D), D.shape)
        i, j = min(i, j), max(i, j)
        heights[t] = D[i, j]
        row = (size[i] * D[i] + size[j] * D[j]) / (size[i] + size[j])
        D[i, :] = row
        D[:, i] = row
        D[i, i] = np.inf
        D[j, :] = np.inf
        D[:, j] = np.inf
        size[i] += size[j]
    return heights


def _usage() -> tuple[float, float, float]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime, r.ru_maxrss / 1024.0


def worker(kind: str, n: int, seed: int, zout: str | None) -> dict:
    """One build, in its own process (see :func:`run`)."""
    cb = make_codebook(n, 8, seed)
    if kind == "ours":
        from masc_llamagen.masc import tree as T

        def build():
            return T.build_tree(cb).linkage
    elif kind == "scipy":
        from scipy.cluster.hierarchy import linkage

        pts = cb.astype(np.float64)
        pts /= np.maximum(np.sqrt((pts * pts).sum(1)), 1e-12)[:, None]

        def build():
            return linkage(pts, "average")
    elif kind == "ref":
        pts = cb.astype(np.float64)

        def build():
            return reference_loop(pts)
    elif kind == "warm":
        a = np.ones(int(2.5 * 2**30) // 8)
        return {"kind": "warm", "sum": float(a[::4096].sum())}
    else:
        raise SystemExit(f"unknown worker {kind}")
    u0, s0, rss0 = _usage()
    t0 = time.perf_counter()
    out = build()
    wall = time.perf_counter() - t0
    u1, s1, rss1 = _usage()
    if zout:
        np.save(zout, out)
    return {"kind": kind, "n": n, "wall_s": wall, "cpu_s": (u1 - u0) + (s1 - s0), "sys_s": s1 - s0,
            "peak_mib": rss1 - rss0, "baseline_mib": rss0}


def run(kind: str, n: int, seed: int, zout: str | None = None) -> dict:
    load = os.getloadavg()[0]
    info = in_fresh_process("bench_tree", "worker", kind=kind, n=n, seed=seed, zout=zout)
    info["load1"] = load
    if kind == "warm":
        return info
    print(f"  {kind:<11} N={n:<6} wall {info['wall_s']:8.2f} s  cpu {info['cpu_s']:8.2f} s (sys {info['sys_s']:5.2f})  "
          f"peak +{info['peak_mib']:7.0f} MiB  (load avg {load:.1f})", flush=True)
    return info


def cut(Z: np.ndarray, k: int) -> np.ndarray:
    from masc_llamagen.masc.linkage import cut_linkage

    return cut_linkage(Z, k)


def measure(args: TreeBench) -> bool:
    """Print the tables (and write the JSON); whether ours and scipy's partitions agree at every k."""
    n = 4096 if args.quick and args.n == 16384 else args.n
    ref_sizes = args.ref_sizes or ([250, 500, 1000] if args.quick else [500, 1000, 2000])
    ks = args.ks or [n // 2, n // 4, n // 8]
    print(f"codebook: {n} x 8, standard normal rows L2-normalised, seed {args.seed}; {os.cpu_count()} CPUs")
    if args.warm:
        run("warm", 0, 0)
    results: dict[str, list[dict]] = {"ours": [], "scipy": []}
    tmp = Path(tempfile.mkdtemp(prefix="bench_tree_"))
    contenders = ["ours", "scipy"]
    for r in range(args.repeat):
        for kind in contenders:
            results[kind].append(run(kind, n, args.seed, str(tmp / f"{kind}.npy") if r == 0 else None))
    ref = [run("ref", m, args.seed) for m in ref_sizes]

    # Exactness: the same partition as scipy's at each k.
    z_ours, z_scipy = np.load(tmp / "ours.npy"), np.load(tmp / "scipy.npy")
    checks = {k: bool(np.array_equal(cut(z_ours, k), cut(z_scipy, k))) for k in ks}
    max_dh = float(np.abs(z_ours[:, 2] - z_scipy[:, 2]).max())

    def med(rows, key):
        return statistics.median(r[key] for r in rows)

    big = ref[-1]
    scale_t = (n / big["n"]) ** 3
    scale_m = (n / big["n"]) ** 2
    if len(ref) > 1:
        slope = np.polyfit(np.log([r["n"] for r in ref]), np.log([r["wall_s"] for r in ref]), 1)[0]
    else:
        slope = float("nan")
    print()
    print(f"| build of {n} x 8 (average linkage) | wall s (median of {args.repeat}) | CPU s (of which "
          "kernel/page faults) | peak RSS over imports (MiB) |")
    print("|---|---|---|---|")
    for kind, label in (("ours", "ours (masc_llamagen.masc.tree.build_tree)"),
                        ("scipy", "scipy linkage(method='average')")):
        rows = results[kind]
        print(f"| {label} | {med(rows, 'wall_s'):.2f} | {med(rows, 'cpu_s'):.2f} ({med(rows, 'sys_s'):.2f}) | "
              f"{med(rows, 'peak_mib'):.0f} |")
    for r in ref:
        print(f"| O(N^3) reference loop, measured at N={r['n']} | {r['wall_s']:.2f} | {r['cpu_s']:.2f} "
              f"({r['sys_s']:.2f}) | {r['peak_mib']:.0f} |")
    print(f"| O(N^3) reference loop, extrapolated to N={n} (x (N/{big['n']})^3 time, ^2 memory) | "
          f"~{big['wall_s'] * scale_t:,.0f} | ~{big['cpu_s'] * scale_t:,.0f} | ~{big['peak_mib'] * scale_m:,.0f} |")
    print()
    print(f"reference loop: fitted exponent of time vs N over {ref_sizes}: {slope:.2f}")
    print("same partition as scipy at k=" + ", ".join(f"{k}: {v}" for k, v in checks.items() if isinstance(k, int)))
    for k, v in checks.items():
        if not isinstance(k, int):
            print(f"{k}: {v}")
    print(f"largest merge-height difference vs scipy: {max_dh:.3g}")
    print(f"load average while running: {min(r['load1'] for rs in results.values() for r in rs):.1f} .. "
          f"{max(r['load1'] for rs in results.values() for r in rs):.1f} (on {os.cpu_count()} CPUs)")
    if args.json:
        Path(args.json).write_text(json.dumps({"n": n, "results": results, "ref": ref, "checks":
                                               {str(k): v for k, v in checks.items()}}, indent=1))
    return all(checks.values())


@hydra.main(version_base="1.3", config_path=str(HERE.parents[1] / "configs" / "bench"), config_name="tree")
def main(cfg: DictConfig) -> None:
    if not measure(OmegaConf.to_object(cfg)):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
