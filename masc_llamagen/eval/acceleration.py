"""Training "acceleration" against a baseline FID curve (masc-method.md section 5).

The paper does not define it; we use the reading it supports best:
``acceleration = 1 - T_run(reach the baseline's final FID) / T_baseline(total)`` (share of training saved), and, while
the run has not reached that FID yet, the ``step ratio`` = baseline steps needed to reach the run's current FID /
the run's steps so far (>1: ahead of the baseline). Curves are linearly interpolated between evaluations.
"""

from __future__ import annotations

import json
from pathlib import Path


def load_curve(path: str | Path, key: str = "eval/fid") -> list[tuple[float, float]]:
    """(step, value) pairs of ``key`` from a run's metrics.jsonl (or a run directory holding one)."""
    p = Path(path)
    if p.is_dir():
        p = p / "metrics.jsonl"
    if not p.is_file():
        raise FileNotFoundError(f"baseline curve {p} not found; point train.baseline_curve to a run's metrics.jsonl")
    pts = {}
    for line in p.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            if key in r:
                pts[float(r["step"])] = float(r[key])
    if not pts:
        raise ValueError(f"{p} has no '{key}' entries; the baseline run needs train.eval_every > 0")
    return sorted(pts.items())


def first_reach(curve: list[tuple[float, float]], target: float) -> float | None:
    """Earliest (interpolated) step at which a decreasing-is-better curve gets to ``target`` or below."""
    prev = None
    for step, value in curve:
        if value <= target:
            if prev is None or prev[1] == value:
                return step
            s0, v0 = prev
            return s0 + (v0 - target) / (v0 - value) * (step - s0)
        prev = (step, value)
    return None


def acceleration(run_curve: list[tuple[float, float]], baseline: list[tuple[float, float]]) -> dict:
    """{'acceleration': share of the baseline's steps saved, or None if not reached; 'step_ratio': ...}."""
    base_total, base_final = baseline[-1]
    step, value = run_curve[-1]
    reach = first_reach(run_curve, base_final)
    base_steps = first_reach(baseline, value)
    return {
        "acceleration": None if reach is None else 1.0 - reach / base_total,
        "step_ratio": None if base_steps is None or step <= 0 else base_steps / step,
        "baseline_final": base_final,
    }
