"""The tree job: build a tokenizer's tree, cut it at k, or print (and plot) its cluster sizes at k.

    python -m masc_llamagen.tree action=build codebook=tokenizers/vq_ds16_c2i.pt tree=tokenizers/vq16_tree.npz
    python -m masc_llamagen.tree action=cut tree=tokenizers/vq16_tree.npz k=8192 mapping=mapping.npy
    python -m masc_llamagen.tree action=stats tree=tokenizers/vq16_tree.npz k=8192 png=stats.png

The only part of the tree that reads tokenizer checkpoints (torch) or draws; it writes nothing but the files named.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import hydra
import numpy as np
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from masc_llamagen.errors import ConfigError, first_line, user_errors
from masc_llamagen.masc.linkage import TreeError, as_codebook
from masc_llamagen.masc.members import size_summary
from masc_llamagen.masc.tree import Cut, Tree, build_tree, load_tree, save_mapping, verify_fingerprint

ACTIONS = {"build": ("codebook", "tree"), "cut": ("tree", "k", "mapping"), "stats": ("tree", "k")}
OPTIONAL = {"build": (), "cut": ("codebook",), "stats": ("png",)}


@dataclass
class TreeJob:
    """One tree job; each action reads the fields listed in ACTIONS (required) and OPTIONAL."""

    action: str = "build"  # build | cut | stats
    codebook: str | None = None  # build: the table to cluster; cut: refuse unless the tree was built from it
    tree: str | None = None  # build: the tree file to write (.npz); cut, stats: the tree to read
    normalize: bool = True  # build: cluster L2-normalised rows (LlamaGen quantises with them); false: the raw table
    method: str = "average"  # build: average | single | complete | weighted | ward
    k: int | None = None  # cut, stats: the number of clusters
    mapping: str | None = None  # cut: the (N,) int64 .npy to write
    png: str | None = None  # stats: also draw the cluster sizes and the top of the dendrogram here


ConfigStore.instance().store(name="base_masc_tree", node=TreeJob)
ConfigStore.instance().store(name="masc_tree", node={
    "defaults": ["base_masc_tree", "_self_", {"override hydra/job_logging": "none"},
                 {"override hydra/hydra_logging": "none"}],
    "hydra": {"run": {"dir": "."}, "output_subdir": None}})  # a job that writes only the files it is given


# ----------------------------------------------------------------------------------------------- codebooks


def _pick_codebook(tensors: Mapping[str, Any], path: Path, key: str) -> Any:
    """The VQ codebook entry, else the file's only 2-D tensor (a codebook saved under another name)."""
    if key in tensors:
        return tensors[key]
    two_d = [k for k, v in tensors.items() if getattr(v, "ndim", 0) == 2]
    if len(two_d) == 1:
        return tensors[two_d[0]]
    listed = ", ".join(two_d[:6]) + (", ..." if len(two_d) > 6 else "")
    raise TreeError(f"{path}: no '{key}' and {len(two_d)} 2-D tensors ({listed or 'none'}); "
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
            raise TreeError(f"{p}: not a readable .npy array ({first_line(e)}); re-save it with numpy.save") from None
        return as_codebook(arr, source=str(p))
    # torch only here, so cutting a tree or reading its stats does not load it
    from masc_llamagen.weights import CODEBOOK_KEY, CheckpointError, extract_state_dict, read_checkpoint

    try:
        obj = read_checkpoint(p, bare_tensor=True)
    except CheckpointError as e:
        raise TreeError(str(e)) from None
    if isinstance(obj, Mapping):
        obj = _pick_codebook(extract_state_dict(obj), p, CODEBOOK_KEY)
    return as_codebook(obj, source=str(p))


# ---------------------------------------------------------------------------------------------- stats


def _stats_lines(tree: Tree, cut: Cut) -> list[str]:
    st = size_summary(cut.sizes)
    return [
        f"tree: {tree.fingerprint.describe()}",
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


# ------------------------------------------------------------------------------------------------- job


def check_job(job: TreeJob) -> None:
    """Refuse an unknown action, a missing field, or a field the action would silently ignore."""
    if job.action not in ACTIONS:
        raise ConfigError(f"action={job.action} is unknown; choose one of {', '.join(ACTIONS)}")
    need, may = ACTIONS[job.action], OPTIONAL[job.action]
    missing = [f"{name}=..." for name in need if getattr(job, name) is None]
    if missing:
        raise ConfigError(f"action={job.action} needs {' '.join(missing)} (it reads {', '.join(need + may)})")
    ignored = [f.name for f in fields(job) if f.default is None and getattr(job, f.name) is not None
               and f.name not in need + may]
    if ignored:
        raise ConfigError(f"action={job.action} does not read {', '.join(ignored)}; drop it or pick the action "
                          "that does")


def run(job: TreeJob) -> Path | None:
    """Do one job and print what it did; returns the file written (None for stats without a PNG)."""
    check_job(job)
    if job.action == "build":
        cb = load_codebook(job.codebook)
        t0 = time.perf_counter()
        tree = build_tree(cb, normalize=job.normalize, method=job.method)
        dt = time.perf_counter() - t0
        out = tree.save(job.tree)
        print(f"built {tree.fingerprint.describe()} tree in {dt:.2f} s -> {out}")
        return out
    tree = load_tree(job.tree)
    if job.action == "cut":
        if job.codebook:
            verify_fingerprint(tree.fingerprint, load_codebook(job.codebook), source=job.codebook)
        cut = tree.cut(job.k)
        out = save_mapping(job.mapping, cut.mapping)
        st = size_summary(cut.sizes)
        print(f"k={cut.k}: sizes min {st['min']} median {st['median']:g} max {st['max']}, "
              f"{st['singletons']} singletons -> {out}")
        return out
    cut = tree.cut(job.k)
    print("\n".join(_stats_lines(tree, cut)))
    if job.png:
        out = plot_stats(tree, cut, job.png)
        print(f"wrote {out}")
        return out
    return None


@hydra.main(version_base="1.3", config_path=None, config_name="masc_tree")
def main(cfg: DictConfig) -> None:
    with user_errors():
        run(OmegaConf.to_object(cfg))


if __name__ == "__main__":
    main()
