"""What the study's JSONs say, gathered per arm and seed: the curves and step times the report and its plots read."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def load_results(root: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(root.glob("runs/*/*/seed*/bench.json"))]


def group(results: list[dict]) -> dict:
    out: dict = {}
    for r in results:
        out.setdefault((r["arm"]["tokenizer"], r["arm"]["label"]), {})[r["seed"]] = r
    return out


def curve(r: dict, decoder: str = "uniform") -> list[tuple[int, float]]:
    """(step, FID) of one run, scored checkpoints in step order."""
    return [(e["step"], e["fid"][decoder]) for e in sorted(r["evals"], key=lambda e: e["step"]) if decoder in e["fid"]]


def fid_at(r: dict, step: int, decoder: str = "uniform"):
    return dict(curve(r, decoder)).get(step)


def heldout_at(r: dict, step: int):
    return next((e.get("heldout") for e in r["evals"] if e["step"] == step), None)


def step_time(runs: dict) -> float | None:
    """An arm's training seconds per step: the mean over its seeds of each run's median logged step time."""
    v = [r.get("step_time_s") for r in runs.values() if r.get("step_time_s")]
    return float(np.mean(v)) if v else None


def arms_of(plan, groups, tok, flat: bool = True):
    return [a for a in plan.arms if a.tokenizer == tok.name and groups.get((tok.name, a.label))
            and (flat or a.head != "flat")]


def budgets_of(runs: dict, decoder: str = "uniform") -> list[int]:
    return sorted({s for r in runs.values() for s, _ in curve(r, decoder)})


def mean_curve(runs: dict, decoder: str = "uniform") -> list[tuple[int, float]]:
    """The mean over seeds at every budget all of them scored."""
    per = [dict(curve(r, decoder)) for r in runs.values()]
    steps = sorted(set.intersection(*(set(p) for p in per))) if per else []
    return [(s, float(np.mean([p[s] for p in per]))) for s in steps]


def acceleration_rows(plan, groups) -> list[dict]:
    """Per (tokenizer, head, flat budget b): the per-seed rows of acceleration_curve (paired by seed: the head's own
    curve against the same seed's flat FID at b), with the arms' measured step times for the wall-clock columns."""
    from masc_llamagen.eval.acceleration import acceleration_curve

    out = []
    for tok in plan.tokenizers:
        flat = groups.get((tok.name, "flat"))
        if not flat:
            continue
        fs = step_time(flat)
        for arm in arms_of(plan, groups, tok, flat=False):
            runs = groups[(tok.name, arm.label)]
            hs = step_time(runs)
            per_seed = {}
            for s in sorted(runs):
                if s in flat and len(curve(runs[s])) >= 2 and curve(flat[s]):
                    per_seed[s] = {r["budget"]: r for r in acceleration_curve(curve(runs[s]), curve(flat[s]), hs, fs)}
            for b in sorted({b for rows in per_seed.values() for b in rows}):
                rows = {s: rows[b] for s, rows in per_seed.items() if b in rows}
                out.append({"tokenizer": tok.name, "label": arm.label, "budget": b, "seeds": rows,
                            "head_step_s": hs, "flat_step_s": fs})
    return out

