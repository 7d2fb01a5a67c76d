"""Training "acceleration" against a baseline FID curve (docs/method.md section 4), as a single number and as a curve.

The paper does not define it; we use the reading it supports best:
``acceleration = 1 - T_run(reach the baseline's final FID) / T_baseline(total)`` (share of training saved), and, while
the run has not reached that FID yet, the ``step ratio`` = baseline steps needed to reach the run's current FID /
the run's steps so far (>1: ahead of the baseline). Curves are linearly interpolated between evaluations.

The curve version (:func:`acceleration_curve`) asks the same question at every budget ``b`` the baseline was scored
at: how many steps does the run need to get to the baseline's FID at ``b``? A single number at the final budget can
hide a lead that shrinks and reverses; the curve shows it. Conventions, shared by every function here:

* a curve is a sequence of ``(step, value)`` pairs with strictly increasing steps, lower values better (FID);
  between scored steps it is linear in the step, outside them it is unknown (nothing is extrapolated);
* "reaching" a target means the first crossing: the earliest interpolated step at which the curve is at or below
  the target. A curve that goes below, back above and below again reached the target the first time; the later
  crossings do not count (training that got there once is what the steps measure, not where it ends up);
* a curve that is already at or below the target at its first scored step reached it at that step *or earlier*:
  :class:`Reach` flags this as ``bound`` (an upper bound on the steps, a lower bound on the acceleration);
* a curve that never gets to the target is "not reached" (``None``), never a number.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

Curve = Sequence[tuple[float, float]]


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


def _checked(curve: Curve) -> list[tuple[float, float]]:
    pts = [(float(s), float(v)) for s, v in curve]
    if not pts:
        raise ValueError("empty curve")
    for (s0, _), (s1, _) in zip(pts, pts[1:], strict=False):
        if not s1 > s0:
            raise ValueError(f"curve steps must increase strictly; got {s0} then {s1}")
    if not all(math.isfinite(s) and math.isfinite(v) for s, v in pts):
        raise ValueError("curve holds a non-finite step or value")
    return pts


@dataclass(frozen=True)
class Reach:
    """When a curve first gets to a target. ``step`` None: not reached within the curve. ``bound``: the curve was
    already at or below the target at its first point, so it got there at ``step`` or earlier."""

    step: float | None
    bound: bool = False


def reach(curve: Curve, target: float) -> Reach:
    """First crossing of ``target`` (linear interpolation between points); see the module's conventions."""
    pts = _checked(curve)
    if pts[0][1] <= target:
        return Reach(pts[0][0], bound=True)
    for (s0, v0), (s1, v1) in zip(pts, pts[1:], strict=False):
        if v1 <= target:  # v0 > target here (else the previous segment would have returned)
            return Reach(s0 + (v0 - target) / (v0 - v1) * (s1 - s0))
    return Reach(None)


def first_reach(curve: list[tuple[float, float]], target: float) -> float | None:
    """Earliest (interpolated) step at which a decreasing-is-better curve gets to ``target`` or below."""
    return reach(curve, target).step


def value_at(curve: Curve, step: float) -> float | None:
    """The curve's linearly interpolated value at ``step``; None outside its scored range."""
    pts = _checked(curve)
    if step < pts[0][0] or step > pts[-1][0]:
        return None
    for (s0, v0), (s1, v1) in zip(pts, pts[1:], strict=False):
        if s0 <= step <= s1:
            return v0 + (v1 - v0) * (step - s0) / (s1 - s0)
    return pts[0][1]  # a single-point curve, at its step


def acceleration(run_curve: list[tuple[float, float]], baseline: list[tuple[float, float]]) -> dict:
    """{'acceleration': share of the baseline's steps saved, or None if not reached; 'step_ratio': ...}."""
    base_total, base_final = baseline[-1]
    step, value = run_curve[-1]
    reach_ = first_reach(run_curve, base_final)
    base_steps = first_reach(baseline, value)
    return {
        "acceleration": None if reach_ is None else 1.0 - reach_ / base_total,
        "step_ratio": None if base_steps is None or step <= 0 else base_steps / step,
        "baseline_final": base_final,
    }


def acceleration_curve(run: Curve, baseline: Curve, run_step_s: float | None = None,
                       baseline_step_s: float | None = None) -> list[dict]:
    """One row per point ``(b, target)`` of the baseline: the steps the run needs to reach the baseline's value at b.

    Keys: ``budget`` b, ``target`` (the baseline's value at b), ``steps`` (first crossing on the run's own
    interpolated curve; None: not reached), ``bound`` (already below at the run's first point: ``steps`` is an upper
    bound), ``step_ratio`` = steps / b (< 1: faster), ``acceleration`` = 1 - steps / b (share of the baseline's steps
    saved). With both per-step times the same in wall-clock: ``seconds`` = steps x run_step_s,
    ``baseline_seconds`` = b x baseline_step_s, ``time_ratio`` and ``time_acceleration``. A run that is faster per
    step than the baseline can lose on steps and still win on time, and the other way round.
    """
    rows = []
    for b, target in _checked(baseline):
        r = reach(run, target)
        row = {"budget": b, "target": target, "steps": r.step, "bound": r.bound,
               "step_ratio": None if r.step is None else r.step / b,
               "acceleration": None if r.step is None else 1.0 - r.step / b}
        if run_step_s is not None and baseline_step_s is not None:
            secs, base_secs = (None if r.step is None else r.step * run_step_s), b * baseline_step_s
            row.update(seconds=secs, baseline_seconds=base_secs,
                       time_ratio=None if secs is None else secs / base_secs,
                       time_acceleration=None if secs is None else 1.0 - secs / base_secs)
        rows.append(row)
    return rows


def area(curve: Curve, lo: float, hi: float, log_steps: bool = False) -> float:
    """Integral of the interpolated curve over [lo, hi] (inside its range): trapezoids over its points in [lo, hi]
    and the interpolated end points, which is exact for the piecewise-linear curve. ``log_steps``: the same
    trapezoids on a log-step axis (equal weight per doubling of steps; ``lo`` > 0)."""
    pts = _checked(curve)
    if lo < pts[0][0] or hi > pts[-1][0] or not hi >= lo:
        raise ValueError(f"[{lo}, {hi}] is not inside the curve's range [{pts[0][0]}, {pts[-1][0]}]")
    xs = [lo, *[s for s, _ in pts if lo < s < hi], hi]
    ys = [value_at(pts, x) for x in xs]
    if log_steps:
        if lo <= 0:
            raise ValueError("log_steps needs positive steps")
        xs = [math.log(x) for x in xs]
    return sum((x1 - x0) * (y0 + y1) / 2 for x0, x1, y0, y1 in zip(xs, xs[1:], ys, ys[1:], strict=False))


def area_ratio(run: Curve, baseline: Curve, log_steps: bool = False) -> float | None:
    """Area under the run's curve / area under the baseline's, both over their common step range (< 1: the run's
    curve lies lower on average). None when the ranges overlap in a single step or not at all."""
    a, b = _checked(run), _checked(baseline)
    lo, hi = max(a[0][0], b[0][0]), min(a[-1][0], b[-1][0])
    if not hi > lo:
        return None
    den = area(b, lo, hi, log_steps)
    return None if den == 0 else area(a, lo, hi, log_steps) / den


def plateau(curve: Curve, threshold: float = 1.0, doublings: int = 2) -> dict:
    """Has the curve flattened? Yes when each of its last ``doublings`` doublings of steps improved the value by less
    than ``threshold``: with S the last scored step, the improvements v(S/2) - v(S), v(S/4) - v(S/2), ... on the
    interpolated curve (an improvement is a decrease; a rise counts as no improvement). Two doublings rather than
    one, so that one flat segment between noisy points does not end the study.

    Returns ``flattened`` (None when the curve does not reach back ``doublings`` doublings from S: too short to tell),
    ``improvements`` (earliest doubling first, each from S/2^(j+1) to S/2^j), ``steps`` (the points used) and
    ``threshold``.
    """
    pts = _checked(curve)
    last = pts[-1][0]
    steps = [last / 2**j for j in range(doublings, -1, -1)]
    out = {"threshold": threshold, "steps": steps, "improvements": None, "flattened": None}
    if steps[0] < pts[0][0]:
        return out
    vals = [value_at(pts, s) for s in steps]
    out["improvements"] = [v0 - v1 for v0, v1 in zip(vals, vals[1:], strict=False)]
    out["flattened"] = all(d < threshold for d in out["improvements"])
    return out
