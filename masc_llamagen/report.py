"""Run report: a markdown page with the numbers, per-class sample grids and training curves (PNG)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    # a resumed run re-logs nothing before its checkpoint; keep the last record per step
    return sorted({r["step"]: r for r in rows}.values(), key=lambda r: r["step"])


def plot_curves(rows: list[dict], path: Path, keys=("train/loss", "train/fine_nll_bits", "train/coarse_ce_bits",
                                                     "train/pred_entropy_norm")) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in keys if any(k in r for r in rows)]
    if not keys:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2))
    for ax, k in zip(np.atleast_1d(axes), keys, strict=True):
        pts = [(r["step"], r[k]) for r in rows if k in r]
        ax.plot(*zip(*pts, strict=True))
        ax.set_title(k.split("/")[-1])
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def class_grid(npz: Path, path: Path, per_class: int = 10) -> Path:
    """One row per class (first ``per_class`` samples of each), from an npz with ``arr_0`` and ``labels``."""
    from PIL import Image

    with np.load(npz, allow_pickle=False) as z:
        arr, labels = z["arr_0"], z["labels"]
    classes = sorted(set(labels.tolist()))
    h, w = arr.shape[1:3]
    grid = np.full((len(classes) * h, per_class * w, 3), 255, dtype=np.uint8)
    for r, c in enumerate(classes):
        for j, i in enumerate(np.flatnonzero(labels == c)[:per_class]):
            grid[r * h : (r + 1) * h, j * w : (j + 1) * w] = arr[i]
    scale = max(1, 256 // max(h, 1) // 2)
    img = Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def captioned_grid(sample_dir: Path, path: Path, n: int = 24, cols: int = 6, credit: str | None = None) -> Path:
    """``n`` images spread over ``sample_dir/images`` (as the t2i sampler writes them), each under its caption."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    every = (Path(sample_dir) / "captions.txt").read_text().splitlines()
    picks = np.unique(np.linspace(0, len(every) - 1, min(n, len(every))).round().astype(int))  # spread over the list
    captions = [every[i] for i in picks]
    rows = -(-len(captions) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.0 * cols, 2.4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, ax, cap in zip(picks, axes.flat, captions, strict=False):
        ax.imshow(np.asarray(Image.open(Path(sample_dir) / "images" / f"{i:06d}.png").convert("RGB")),
                  interpolation="nearest")
        ax.set_title("\n".join(textwrap.wrap(cap, 26)[:3]), fontsize=7)
    if credit:
        fig.text(0.5, 0.005, credit, ha="center", fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def write_report(out: Path, sections: dict[str, dict], images: dict[str, Path], notes: list[str]) -> Path:
    """``sections``: title -> {metric: value}; ``images``: caption -> PNG path (linked relative to ``out``)."""
    out = Path(out)
    lines = ["# masc-llamagen run report", ""]
    for title, table in sections.items():
        lines += [f"## {title}", "", "| | |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in table.items()]
        lines.append("")
    for caption, img in images.items():
        rel = Path(img).resolve().relative_to(out.parent.resolve()) if Path(img).resolve().is_relative_to(
            out.parent.resolve()) else Path(img).resolve()
        lines += [f"### {caption}", "", f"![{caption}]({rel})", ""]
    if notes:
        lines += ["## Notes", "", *[f"- {n}" for n in notes], ""]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    return out
