"""`make bench` / `make bench-quick`: speed and memory benchmarks, the convergence study, and the report.

    python benchmarks/run.py [--quick] [--out docs] [--skip-speed] [--report-only]

Writes ``<out>/benchmarks.md`` and its PNGs under ``<out>/benchmarks/``. Every table carries the command, the git
revision and the machine it came from. The speed benchmarks run first, while nothing else is running.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import convergence  # noqa: E402

from masc_llamagen.utils.provenance import machine, short_revision  # noqa: E402

REPO = convergence.REPO
HERE = Path(__file__).resolve().parent


# -- speed ----------------------------------------------------------------------------------------------------------
SPEED = {
    "tree": ("bench_tree.py", [], ["--quick", "--repeat", "1"]),
    "train_step": ("bench_train_step.py", [], ["--quick"]),
    "sampling": ("bench_sampling.py", [], ["--quick"]),
}


def run_speed(out: Path, quick: bool) -> dict:
    res = {}
    for name, (script, full_args, quick_args) in SPEED.items():
        js = out / f"speed-{name}.json"
        args = [sys.executable, str(HERE / script), *(quick_args if quick else full_args), "--json", str(js)]
        t0 = time.perf_counter()
        p = subprocess.run(args, cwd=REPO, capture_output=True, text=True)
        if p.returncode != 0:
            raise SystemExit(f"{script} failed ({p.returncode}):\n{p.stderr[-2000:]}")
        cmd = "python benchmarks/" + " ".join([script, *(quick_args if quick else full_args)])
        res[name] = {"command": cmd, "stdout": p.stdout, "wall_s": round(time.perf_counter() - t0, 1)}
        print(f"{script}: {res[name]['wall_s']} s", flush=True)
    (out / "speed.json").write_text(json.dumps(res, indent=2))
    return res


def _tables(stdout: str) -> str:
    """The header line and markdown tables a benchmark printed (its own description of what it measured)."""
    lines = stdout.strip().splitlines()
    keep = [ln for ln in lines if ln.startswith("|") or not ln.strip()]
    head = [ln for ln in lines if ln and not ln.startswith("|")]
    return "\n".join(([f"_{head[0]}_", ""] if head else []) + keep).strip()


# -- convergence: aggregation ------------------------------------------------------------------------------------------
def load_results(root: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(root.glob("runs/*/*/seed*/bench.json"))]


def _ms(vals, nd: int = 2) -> str:
    v = np.asarray([x for x in vals if x is not None], float)
    if not len(v):
        return "-"
    if len(v) == 1:
        return f"{v[0]:.{nd}f}"
    return f"{v.mean():.{nd}f} ± {v.std(ddof=1):.{nd}f}"


def _r(x, nd: int = 2):
    return "-" if x is None else round(float(x), nd) if nd else int(round(float(x)))


def group(results: list[dict]) -> dict:
    out: dict = {}
    for r in results:
        out.setdefault((r["arm"]["tokenizer"], r["arm"]["label"]), {})[r["seed"]] = r
    return out


def curve(r: dict, decoder: str = "uniform") -> list[tuple[int, float]]:
    """(step, FID) of one run, scored checkpoints in step order."""
    return [(e["step"], e["fid"][decoder]) for e in sorted(r["evals"], key=lambda e: e["step"]) if decoder in e["fid"]]


def _fid(r: dict, step: int, decoder: str = "uniform"):
    return dict(curve(r, decoder)).get(step)


def _diag(r: dict, step: int):
    return next((e.get("heldout") for e in r["evals"] if e["step"] == step), None)


def step_time(runs: dict) -> float | None:
    """An arm's training seconds per step: the mean over its seeds of each run's median logged step time."""
    v = [r.get("step_time_s") for r in runs.values() if r.get("step_time_s")]
    return float(np.mean(v)) if v else None


def _arms(plan, groups, tok, flat: bool = True):
    return [a for a in plan.arms if a.tokenizer == tok.name and groups.get((tok.name, a.label))
            and (flat or a.head != "flat")]


def _budgets(runs: dict, decoder: str = "uniform") -> list[int]:
    return sorted({s for r in runs.values() for s, _ in curve(r, decoder)})


def _interval(d: np.ndarray) -> tuple[float, float] | None:
    from scipy import stats

    if len(d) < 2:
        return None
    half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
    return d.mean() - half, d.mean() + half


def _call(d: np.ndarray) -> str:
    iv = _interval(d)
    if iv is None:
        return "one seed"
    return "better" if iv[1] < 0 else "worse" if iv[0] > 0 else "unresolved"


def _verdict(what: str, d: np.ndarray) -> str:
    """Paired differences (negative: the first is better); a t-interval, stated as what n seeds can support."""
    n = len(d)
    iv = _interval(d)
    if iv is None:
        return f"- {what}: ΔFID {d.mean():+.2f} from one seed; no spread, no verdict."
    lo, hi = iv
    call = {"better": "better (the 95% interval excludes 0)", "worse": "worse (the 95% interval excludes 0)",
            "unresolved": "no difference these seeds can resolve (the 95% interval contains 0)"}[_call(d)]
    return f"- {what}: ΔFID {d.mean():+.2f}, 95% t-interval [{lo:+.2f}, {hi:+.2f}] over {n} paired seeds: {call}."


def paired(a: dict, b: dict, step: int, dec_a: str = "uniform", dec_b: str = "uniform") -> np.ndarray:
    """FID(a) - FID(b) at one step, over the seeds both have scored there."""
    return np.asarray([_fid(a[s], step, dec_a) - _fid(b[s], step, dec_b) for s in sorted(a) if s in b
                       and _fid(a[s], step, dec_a) is not None and _fid(b[s], step, dec_b) is not None], float)


def fid_tables(plan, groups) -> tuple[str, str]:
    """(mean ± std per arm and budget, the per-seed values), uniform decoder; frequency-decoder rows where scored."""
    mean_t, seed_t = [], []
    for tok in plan.tokenizers:
        arms = _arms(plan, groups, tok)
        if not arms:
            continue
        cols = sorted({b for a in arms for b in _budgets(groups[(tok.name, a.label)])})
        head = "| tokenizer (N) | head | decoder | seeds | " + " | ".join(f"FID @ {b}" for b in cols) + " |"
        sep = "|---" * (4 + len(cols)) + "|"
        mean_t += [head, sep] if not mean_t else [""] + [head, sep]
        seed_t += ([head.replace("| seeds |", "| seed |"), sep] if not seed_t else
                   ["", head.replace("| seeds |", "| seed |"), sep])
        for arm in arms:
            runs = groups[(tok.name, arm.label)]
            for dec in ("uniform", "frequency"):
                if not _budgets(runs, dec):
                    continue
                cells = [_ms([_fid(r, b, dec) for r in runs.values()]) for b in cols]
                n = len([r for r in runs.values() if curve(r, dec)])
                mean_t.append(f"| {tok.name} ({tok.codebook_size}) | {arm.label} | {dec} | {n} | "
                              + " | ".join(cells) + " |")
                for s in sorted(runs):
                    vals = [_fid(runs[s], b, dec) for b in cols]
                    if any(v is not None for v in vals):
                        seed_t.append(f"| {tok.name} ({tok.codebook_size}) | {arm.label} | {dec} | {s} | "
                                      + " | ".join("-" if v is None else f"{v:.2f}" for v in vals) + " |")
    return "\n".join(mean_t), "\n".join(seed_t)


def _over_budgets(what: str, a: dict, b: dict, budgets: list[int], dec_a: str = "uniform",
                  dec_b: str = "uniform") -> str | None:
    """One verdict line over every budget: where the paired difference is better / worse / unresolved, and the
    interval at the largest budget."""
    calls: dict[str, list[int]] = {}
    last = None
    for step in budgets:
        d = paired(a, b, step, dec_a, dec_b)
        if len(d):
            calls.setdefault(_call(d), []).append(step)
            last = (step, d)
    if last is None:
        return None
    step, d = last
    parts = [f"{c} at {', '.join(map(str, s))}" for c, s in calls.items()]
    iv = _interval(d)
    tail = (f"ΔFID {d.mean():+.2f}, 95% t-interval [{iv[0]:+.2f}, {iv[1]:+.2f}] over {len(d)} paired seeds"
            if iv else f"ΔFID {d.mean():+.2f} from one seed")
    return f"- {what}: {'; '.join(parts)} steps. At {step} steps: {tail}."


def delta_table(plan, groups) -> tuple[str, list[str]]:
    """Paired FID difference against flat at every budget, and the verdict lines (flat, and MASC vs k-means)."""
    lines, verdicts = [], []
    for tok in plan.tokenizers:
        flat = groups.get((tok.name, "flat"))
        arms = _arms(plan, groups, tok, flat=False)
        if not flat or not arms:
            continue
        cols = _budgets(flat)
        head = ("| tokenizer | head | decoder | " + " | ".join(f"Δ @ {b}" for b in cols) + " |")
        lines += ([""] if lines else []) + [head, "|---" * (3 + len(cols)) + "|"]
        for arm in arms:
            runs = groups[(tok.name, arm.label)]
            for dec in ("uniform", "frequency"):
                if not _budgets(runs, dec):
                    continue
                cells = []
                for b in cols:
                    d = paired(runs, flat, b, dec)
                    cells.append("-" if not len(d) else f"{d.mean():+.2f} (lower in {int((d < 0).sum())}/{len(d)})")
                lines.append(f"| {tok.name} | {arm.label} | {dec} | " + " | ".join(cells) + " |")
                v = _over_budgets(f"{arm.label} vs flat (N={tok.codebook_size}, {dec} decoder)", runs, flat,
                                  _budgets(runs, dec), dec)
                if v:
                    verdicts.append(v)
        half = tok.codebook_size // 2
        m, km = groups.get((tok.name, f"masc-k{half}")), groups.get((tok.name, f"kmeans-k{half}"))
        if m and km:
            for dec in ("uniform", "frequency"):
                v = _over_budgets(f"masc-k{half} vs kmeans-k{half} ({dec} decoder)", m, km, _budgets(m, dec), dec, dec)
                if v:
                    verdicts.append(v)
        if m and _budgets(m, "frequency"):
            v = _over_budgets(f"masc-k{half}, frequency vs uniform decoder (same samples)", m, m,
                              _budgets(m, "frequency"), "frequency", "uniform")
            if v:
                verdicts.append(v)
    return "\n".join(lines), verdicts


def mean_curve(runs: dict, decoder: str = "uniform") -> list[tuple[int, float]]:
    """The mean over seeds at every budget all of them scored."""
    per = [dict(curve(r, decoder)) for r in runs.values()]
    steps = sorted(set.intersection(*(set(p) for p in per))) if per else []
    return [(s, float(np.mean([p[s] for p in per]))) for s in steps]


def plateau_lines(plan, groups) -> list[str]:
    """Has flat's FID curve flattened (the plan's criterion), on the mean curve and per seed."""
    from masc_llamagen.eval.acceleration import plateau

    out = []
    thr = plan.plateau_threshold
    for tok in plan.tokenizers:
        flat = groups.get((tok.name, "flat"))
        if not flat:
            continue
        mc = mean_curve(flat)
        if not mc:
            continue
        p = plateau(mc, thr)
        per = {s: plateau(curve(r), thr) for s, r in sorted(flat.items()) if curve(r)}
        last = int(mc[-1][0])
        if p["flattened"] is None:
            out.append(f"- `{tok.name}` flat: the curve (to {last} steps) does not reach back two doublings; no call.")
            continue
        imp = ", ".join(f"{d:+.2f}" for d in p["improvements"])
        pts = " -> ".join(f"{s:g}" for s in p["steps"])
        seeds = "; ".join(f"seed {s}: " + ("-" if q["improvements"] is None else
                                           ", ".join(f"{d:+.2f}" for d in q["improvements"]))
                          for s, q in per.items())
        n_flat = sum(bool(q["flattened"]) for q in per.values())
        verdict = (f"**flattened** by {last} steps" if p["flattened"] else
                   f"**not flattened** by {last} steps: the study stops before flat has converged")
        out.append(f"- `{tok.name}` flat, mean of {len(flat)} seeds: FID gained over the doublings {pts}: {imp} "
                   f"(criterion: less than {thr:g} FID per doubling over each of the last two): {verdict}. "
                   f"Per seed ({seeds}): flattened in {n_flat} of {len(per)}.")
    return out


def _steps_txt(row: dict) -> str:
    if row["steps"] is None:
        return "not reached"
    return f"≤ {row['steps']:.0f}" if row["bound"] else f"{row['steps']:.0f}"


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
        for arm in _arms(plan, groups, tok, flat=False):
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


def acceleration_table(plan, groups) -> str:
    lines = ["| tokenizer | head | flat's budget b | flat's FID @ b (mean) | steps to reach it, per seed | "
             "steps, mean ± std (reached) | acceleration 1 - steps/b | wall-clock: head s vs flat s | "
             "wall-clock acceleration |",
             "|---|---|---|---|---|---|---|---|---|"]
    for a in acceleration_rows(plan, groups):
        rows = list(a["seeds"].values())
        got = [r for r in rows if r["steps"] is not None]
        note = "" if len(got) == len(rows) else f" ({len(rows) - len(got)} of {len(rows)} not reached)"
        bound = any(r["bound"] for r in got)
        acc = [r["acceleration"] for r in got]
        acc_txt = ("not reached" if not got else (f"{np.mean(acc):+.0%}" + (f" ± {np.std(acc, ddof=1):.0%}"
                                                                             if len(acc) > 1 else ""))
                   + (" (≥: a bound)" if bound else "") + note)
        if got and "seconds" in got[0]:
            secs = [r["seconds"] for r in got]
            tacc = [r["time_acceleration"] for r in got]
            wall = f"{'≤ ' if bound else ''}{np.mean(secs):.0f} vs {got[0]['baseline_seconds']:.0f}"
            wacc = f"{np.mean(tacc):+.0%}" + (f" ± {np.std(tacc, ddof=1):.0%}" if len(tacc) > 1 else "") + note
        else:
            wall = wacc = "-" if got else "not reached"
        lines.append(f"| {a['tokenizer']} | {a['label']} | {a['budget']:g} | "
                     f"{np.mean([r['target'] for r in rows]):.2f} | {', '.join(_steps_txt(r) for r in rows)} | "
                     f"{_ms([r['steps'] for r in got], 0)}{note} | {acc_txt} | {wall} | {wacc} |")
    return "\n".join(lines)


def area_table(plan, groups) -> str:
    """FID-vs-step area of each head over flat's, per seed (paired), on linear and log step axes."""
    from masc_llamagen.eval.acceleration import area_ratio

    lines = ["| tokenizer | head | common steps | area ratio per seed (linear steps) | mean ± std | log-step axis, "
             "mean ± std |", "|---|---|---|---|---|---|"]
    for tok in plan.tokenizers:
        flat = groups.get((tok.name, "flat"))
        if not flat:
            continue
        for arm in _arms(plan, groups, tok, flat=False):
            runs = groups[(tok.name, arm.label)]
            lin, log, rng = [], [], None
            for s in sorted(runs):
                if s not in flat:
                    continue
                a, f = curve(runs[s]), curve(flat[s])
                r = area_ratio(a, f) if len(a) > 1 and len(f) > 1 else None
                if r is not None:
                    lin.append(r)
                    log.append(area_ratio(a, f, log_steps=True))
                    rng = (max(a[0][0], f[0][0]), min(a[-1][0], f[-1][0]))
            if lin:
                lines.append(f"| {tok.name} | {arm.label} | {rng[0]:g}-{rng[1]:g} | "
                             f"{', '.join(f'{v:.3f}' for v in lin)} | {_ms(lin, 3)} | {_ms(log, 3)} |")
    return "\n".join(lines)


def diagnostics_table(plan, groups) -> str:
    lines = ["| tokenizer | head | step | fine NLL bits/token (uniform dec.) | fine NLL (frequency dec.) | "
             "coarse CE bits | flat marginalised onto the same clusters | normalised entropy H/log V |",
             "|---|---|---|---|---|---|---|---|"]
    for tok in plan.tokenizers:
        flat = groups.get((tok.name, "flat"), {})
        for arm in _arms(plan, groups, tok):
            runs = groups[(tok.name, arm.label)]
            for step in sorted({e["step"] for r in runs.values() for e in r["evals"] if e.get("heldout")}):
                ds = [d for r in runs.values() if (d := _diag(r, step))]
                marg = "-"
                if arm.head != "flat":
                    marg = _ms([(_diag(r, step) or {}).get(f"marginal_ce/{arm.label}") for r in flat.values()])
                lines.append(f"| {tok.name} | {arm.label} | {step} | {_ms([d['fine_nll_uniform'] for d in ds])} | "
                             f"{_ms([d['fine_nll_frequency'] for d in ds])} | "
                             f"{_ms([d['coarse_ce'] for d in ds]) if arm.head != 'flat' else '-'} | {marg} | "
                             f"{_ms([d['entropy_norm'] for d in ds])} |")
    return "\n".join(lines)


def headline(plan, groups) -> list[str]:
    """What the longest horizon shows, in a few generated sentences: the paired difference to flat at the first and
    the last budget, the acceleration at the last budget, and whether flat has flattened."""
    out = []
    acc = {(a["tokenizer"], a["label"], a["budget"]): a for a in acceleration_rows(plan, groups)}
    for tok in plan.tokenizers:
        flat = groups.get((tok.name, "flat"))
        if not flat:
            continue
        for arm in [a for a in _arms(plan, groups, tok, flat=False) if a.core]:
            runs = groups[(tok.name, arm.label)]
            common = [b for b in _budgets(runs) if len(paired(runs, flat, b))]
            if not common:
                continue
            first, last = common[0], common[-1]
            d0, d1 = paired(runs, flat, first), paired(runs, flat, last)
            a = acc.get((tok.name, arm.label, last))
            reach = ""
            if a:
                rows = list(a["seeds"].values())
                got = [r for r in rows if r["steps"] is not None]
                reach = (f"; flat's FID at {last} is reached by {len(got)} of {len(rows)} seeds" +
                         (f" (acceleration {np.mean([r['acceleration'] for r in got]):+.0%})" if got else ""))
            trend = ("the lead holds" if d1.mean() < 0 and _call(d1) == "better" else
                     "the lead is gone" if _call(d1) in ("unresolved", "one seed") and d0.mean() < 0 else
                     "flat is ahead" if _call(d1) == "worse" else "no lead either way")
            out.append(f"- **{arm.label} vs flat** (N = {tok.codebook_size}): ΔFID {d0.mean():+.2f} at {first} steps "
                       f"({_call(d0)}), {d1.mean():+.2f} at {last} ({_call(d1)}): {trend}{reach}.")
    out += plateau_lines(plan, groups)
    return out


def cluster_table(plan, root: Path, n_images: int) -> tuple[str, dict]:
    """Cluster sizes and the semantic replacement test (PSNR/SSIM of member-swapped decodes) per coarse head."""
    import torch

    from masc_llamagen.data.images import build_image_dataset, heldout_split
    from masc_llamagen.masc.replacement import replacement_scores
    from masc_llamagen.weights import load_vq

    lines = ["| tokenizer | head | k | largest cluster | singletons | median size | tokens in the largest 1% of "
             "clusters | replacement PSNR (dB) | SSIM | tokens changed |", "|---|---|---|---|---|---|---|---|---|---|"]
    sizes = {}
    for tok in plan.tokenizers:
        maps = convergence.coarse_mappings(plan, tok.name, root)
        cfg = convergence.tokenizer_cfg(tok, root)
        vq = load_vq(cfg.tokenizer.checkpoint).eval()
        ds = build_image_dataset(cfg.data.name, heldout_split(cfg.data.name), image_size=cfg.data.image_size)
        images = torch.stack([ds[i][0] for i in range(min(n_images, len(ds)))])
        for label, mapping in maps.items():
            m = mapping.numpy() if hasattr(mapping, "numpy") else np.asarray(mapping)
            sz = np.sort(np.bincount(m))[::-1]
            sizes[(tok.name, label)] = sz
            top = sz[: max(1, len(sz) // 100)].sum() / sz.sum()
            rep = replacement_scores(vq, images, m, seed=0)
            lines.append(f"| {tok.name} | {label} | {len(sz)} | {sz[0]} | {int((sz == 1).sum())} | "
                         f"{np.median(sz):.0f} | {top:.1%} | {rep['psnr']:.2f} | {rep['ssim']:.3f} | "
                         f"{rep['tokens_changed']:.1%} |")
    return "\n".join(lines), sizes


# -- plots ------------------------------------------------------------------------------------------------------------
def _series(runs: dict, key: str):
    """(steps, values (seeds x steps)) of a training-log key over the runs of one arm."""
    per = []
    for r in runs.values():
        pts = {m["step"]: m[key] for m in r["metrics"] if key in m}
        per.append(pts)
    steps = sorted(set.intersection(*(set(p) for p in per))) if per else []
    return np.asarray(steps), np.asarray([[p[s] for s in steps] for p in per])


def _smooth(v: np.ndarray, width: int = 3) -> np.ndarray:
    """Centred moving average over logged steps (one batch per point is noisy), renormalised at the ends."""
    if v.shape[1] <= width:
        return v
    kern = np.ones(width)
    norm = np.convolve(np.ones(v.shape[1]), kern, mode="same")
    return np.stack([np.convolve(row, kern, mode="same") / norm for row in v])


def _band(runs: dict, decoder: str = "uniform"):
    """(steps, mean, min, max) over the seeds that scored each step."""
    steps = _budgets(runs, decoder)
    vals = [[_fid(r, s, decoder) for r in runs.values() if _fid(r, s, decoder) is not None] for s in steps]
    return (np.asarray(steps, float), np.asarray([np.mean(v) for v in vals]), np.asarray([min(v) for v in vals]),
            np.asarray([max(v) for v in vals]))


def _legend(ax, size: int) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=size)


def _plain_log(ax, xticks=None, yticks=None) -> None:
    """Log axes labelled with plain numbers (at the budgets where given) instead of powers of ten."""
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    for axis, ticks in ((ax.xaxis, xticks), (ax.yaxis, yticks)):
        if axis.get_scale() != "log":
            continue
        if ticks is not None:
            axis.set_ticks(list(ticks))
        axis.set_major_formatter(ScalarFormatter())
        axis.set_minor_formatter(NullFormatter())


def plots(plan, groups, sizes, out: Path) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    figs = {}
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]

    def save(fig, name: str, key: str) -> None:
        fig.tight_layout()
        p = out / name
        fig.savefig(p, dpi=110)
        plt.close(fig)
        figs[key] = p.name

    for tok in plan.tokenizers:
        arms = _arms(plan, groups, tok)
        if not arms:
            continue
        color = {a.label: colors[i % len(colors)] for i, a in enumerate(arms)}

        # FID vs step and vs training wall-clock, every head on one axis, min-max bands over seeds
        fig, axes = plt.subplots(1, 2, figsize=(13, 4.6))
        for arm in arms:
            runs, c = groups[(tok.name, arm.label)], color[arm.label]
            st = step_time(runs)
            for dec, ls in (("uniform", "-"), ("frequency", "--")):
                steps, mean, lo, hi = _band(runs, dec)
                if not len(steps):
                    continue
                name = arm.label if dec == "uniform" else f"{arm.label} (frequency decoder)"
                n = len([r for r in runs.values() if curve(r, dec)])
                for ax, x in ((axes[0], steps), (axes[1], steps * st if st else None)):
                    if x is None:
                        continue
                    ax.plot(x, mean, ls, marker="o", ms=4, color=c, label=f"{name}, {n} seeds")
                    ax.fill_between(x, lo, hi, color=c, alpha=0.18)
        axes[0].set(title=f"FID vs training step ({plan.fid_samples} samples vs held-out)", xlabel="step", ylabel="FID",
                    xscale="log")
        axes[1].set(title="FID vs training wall-clock (step x the arm's measured step time)",
                    xlabel="training seconds (one single-threaded worker)", xscale="log")
        _plain_log(axes[0], xticks=sorted({b for a in arms for b in _budgets(groups[(tok.name, a.label)])}))
        _plain_log(axes[1])
        for ax in axes:
            ax.grid(alpha=0.3, which="both")
        _legend(axes[0], 7)
        fig.suptitle(f"{tok.name} (N = {tok.codebook_size}); bands: min-max over seeds")
        save(fig, f"fid-{tok.name}.png", f"fid-{tok.name}")

        # the acceleration curve: steps (and seconds) to reach flat's FID at each of flat's budgets
        rows = [a for a in acceleration_rows(plan, groups) if a["tokenizer"] == tok.name]
        if rows:
            fig, axes = plt.subplots(1, 2, figsize=(13, 4.6))
            budgets = sorted({a["budget"] for a in rows})
            for ax, key, base in ((axes[0], "steps", "budget"), (axes[1], "seconds", "baseline_seconds")):
                # one height for every 'not reached' mark: above everything reached and the diagonal's end
                top = max([r[key] for a in rows for r in a["seeds"].values() if r.get(key) is not None]
                          + [r[base] for a in rows for r in a["seeds"].values() if r.get(base) is not None] + [1.0])
                for label in dict.fromkeys(a["label"] for a in rows):
                    c = color.get(label, "k")
                    xs, ys, lo, hi, miss = [], [], [], [], []
                    for a in [a for a in rows if a["label"] == label]:
                        got = [r for r in a["seeds"].values() if r.get(key) is not None]
                        any_row = next(iter(a["seeds"].values()))
                        x = any_row["budget"] if base == "budget" else any_row.get(base)
                        if x is None:
                            continue
                        if got:
                            v = [r[key] for r in got]
                            xs.append(x), ys.append(np.mean(v)), lo.append(min(v)), hi.append(max(v))
                        if len(got) < len(a["seeds"]):
                            miss.append(x)
                    if xs:
                        ys_a = np.asarray(ys)
                        ax.errorbar(xs, ys_a, yerr=[ys_a - np.asarray(lo), np.asarray(hi) - ys_a], marker="o", ms=4,
                                    color=c, capsize=3, label=label)
                    if miss:
                        ax.scatter(miss, [top * 1.3] * len(miss), marker="x", color=c, s=40,
                                   label=f"{label}: not reached by some or all seeds")
                lim = [min(budgets) * 0.8, max(budgets) * 1.6] if base == "budget" else None
                if lim:
                    ax.plot(lim, lim, "k:", lw=1, label="flat (y = x)")
                else:
                    ax.plot(ax.get_xlim(), ax.get_xlim(), "k:", lw=1, label="flat (y = x)")
                ax.set(xscale="log", yscale="log")
                ax.grid(alpha=0.3, which="both")
            axes[0].set(title="steps a head needs to reach flat's FID at b (below the line: faster)",
                        xlabel="flat's budget b (steps)", ylabel="head's steps (mean, min-max over seeds)")
            axes[1].set(title="the same in training wall-clock", xlabel="flat's training seconds at b",
                        ylabel="head's training seconds")
            _plain_log(axes[0], xticks=budgets, yticks=budgets)
            _plain_log(axes[1])
            _legend(axes[0], 7)
            save(fig, f"acceleration-{tok.name}.png", f"acceleration-{tok.name}")

        # held-out fine NLL and coarse CE at the scored budgets
        fig, axes = plt.subplots(1, 2, figsize=(13, 4.2))
        for arm in arms:
            runs, c = groups[(tok.name, arm.label)], color[arm.label]
            steps = sorted({e["step"] for r in runs.values() for e in r["evals"] if e.get("heldout")})
            for ax, key in ((axes[0], "fine_nll_uniform"), (axes[1], "coarse_ce")):
                if key == "coarse_ce" and arm.head == "flat":
                    continue
                v = [[d[key] for r in runs.values() if (d := _diag(r, s))] for s in steps]
                ax.plot(steps, [np.mean(x) for x in v], marker="o", ms=4, color=c, label=arm.label)
                ax.fill_between(steps, [min(x) for x in v], [max(x) for x in v], color=c, alpha=0.18)
            if arm.head != "flat" and groups.get((tok.name, "flat")):
                fr = groups[(tok.name, "flat")]
                fsteps = sorted({e["step"] for r in fr.values() for e in r["evals"] if e.get("heldout")})
                v = [[d.get(f"marginal_ce/{arm.label}") for r in fr.values() if (d := _diag(r, s))] for s in fsteps]
                if v and all(x is not None for row in v for x in row):
                    axes[1].plot(fsteps, [np.mean(x) for x in v], ":", marker="s", ms=3, color=c,
                                 label=f"flat marginalised onto {arm.label}'s clusters")
        axes[0].set(title="held-out fine NLL (uniform member decoder), bits/token", xlabel="step", xscale="log")
        axes[1].set(title="held-out coarse CE, bits/token", xlabel="step", xscale="log")
        for ax in axes:
            ax.grid(alpha=0.3, which="both")
            _legend(ax, 7)
            _plain_log(ax, xticks=sorted({e["step"] for a in arms for r in groups[(tok.name, a.label)].values()
                                          for e in r["evals"] if e.get("heldout")}))
        save(fig, f"heldout-{tok.name}.png", f"heldout-{tok.name}")

        # the training logs: fine NLL on fresh batches and normalised prediction entropy
        fig, axes = plt.subplots(1, 2, figsize=(13, 4.2))
        for arm in arms:
            runs, c = groups[(tok.name, arm.label)], color[arm.label]
            for ax, key in ((axes[0], "train/fine_nll_bits"), (axes[1], "train/pred_entropy_norm")):
                steps, v = _series(runs, key)
                if len(steps):
                    sm = _smooth(v)
                    ax.plot(steps, sm.mean(0), color=c, label=arm.label)
                    ax.fill_between(steps, sm.min(0), sm.max(0), color=c, alpha=0.2)
        axes[0].set(title="fine-token NLL on fresh training batches (bits/token)", xlabel="step")
        axes[1].set(title="normalised prediction entropy H / log V", xlabel="step")
        for ax in axes:
            ax.grid(alpha=0.3)
        _legend(axes[0], 7)
        save(fig, f"curves-{tok.name}.png", f"curves-{tok.name}")

        # the coarse task itself: coarse CE vs flat marginalised onto MASC k=N/2's clusters (logged every step)
        label = f"masc-k{tok.codebook_size // 2}"
        if groups.get((tok.name, label)) and groups.get((tok.name, "flat")):
            fig, ax = plt.subplots(figsize=(6.5, 4.2))
            for runs, key, c, name in ((groups[(tok.name, label)], "train/coarse_ce_bits", color[label], label),
                                       (groups[(tok.name, "flat")], "train/marginal_coarse_ce_bits", color["flat"],
                                        f"flat, marginalised onto {label}'s clusters")):
                steps, v = _series(runs, key)
                if len(steps):
                    ax.plot(steps, v.mean(0), color=c, label=name)
                    ax.fill_between(steps, v.min(0), v.max(0), color=c, alpha=0.2)
            ax.set(title=f"coarse task CE on fresh batches, N = {tok.codebook_size}", xlabel="step",
                   ylabel="bits/token")
            ax.grid(alpha=0.3)
            _legend(ax, 8)
            save(fig, f"coarse-task-{tok.name}.png", f"coarse-{tok.name}")
    if sizes:
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        for (tok, label), sz in sizes.items():
            ax.loglog(np.arange(1, len(sz) + 1), sz, label=f"{tok} {label}")
        ax.set(title="cluster sizes, largest first", xlabel="rank", ylabel="tokens in cluster")
        ax.grid(alpha=0.3)
        _legend(ax, 7)
        save(fig, "cluster-sizes.png", "sizes")
    return figs


# -- report -----------------------------------------------------------------------------------------------------------
def _arm_schedule(plan) -> str:
    """Which arms were trained how far and scored where, grouped by identical schedules."""
    groups_: dict[tuple, list[str]] = {}
    for a in plan.arms:
        k = (a.tokenizer, a.steps, a.budgets, a.seeds, a.core)
        groups_.setdefault(k, []).append(a.label)
    parts = []
    for (tok, steps, budgets, seeds, core), labels in groups_.items():
        parts.append(f"{', '.join(labels)} on `{tok}`{'' if core else ' (extras)'}: seeds {', '.join(map(str, seeds))}"
                     f", trained to {steps} steps, scored at {', '.join(map(str, budgets))}")
    freq = [f"{a.label} at {', '.join(map(str, a.frequency))}" for a in plan.arms if a.frequency and a.head != "flat"]
    if freq:
        parts.append("frequency member decoder (extras, on the same samples): " + "; ".join(freq))
    return "; ".join(parts)


def wall_time_lines(plan, summary: dict, results: list[dict], groups: dict, info: dict) -> list[str]:
    timings = summary.get("timings", {})
    toks = summary.get("tokenizers", {})
    est = summary.get("estimate") or convergence.estimate(plan)
    lines = [
        "- Tokenizer jobs: "
        + (", ".join(f"`{k}` {v['wall_s']} s ({'reused' if v['report'].get('skipped') else 'trained'}, tokenizer "
                     f"training {v['report'].get('wall_time_s')} s)" for k, v in toks.items()) or "-")
        + f"; trees and mappings {timings.get('mappings_s', '-')} s; reference features "
        f"{timings.get('reference_s', '-')} s; the job pool {timings.get('pool_s', '-')} s on "
        f"{summary.get('workers', '-')} single-threaded workers.",
        f"- Estimated beforehand (`python benchmarks/convergence.py --estimate`, cost model in "
        f"`benchmarks/convergence.py`): {est['total_s'] / 3600:.2f} h; measured: "
        + (f"{info['total_s'] / 3600:.2f} h." if "total_s" in info else "-."),
        f"- Per training run: {_ms([r['train_wall_s'] for r in results], 1)} s; per scored checkpoint: Inception "
        f"{_ms([v for r in results for e in r['evals'] for k, v in e.items() if k.startswith('inception_s') and v], 1)}"
        f" s, sampling {_ms([e.get('sample_s') for r in results for e in r['evals']], 1)} s.",
    ]
    st = []
    for (_, label), runs in sorted(groups.items()):
        s = step_time(runs)
        if s:
            st.append(f"{label} {s * 1000:.0f} ms")
    if st:
        lines.append("- Training step time (median of the logged intervals, mean over seeds; the wall-clock axis and "
                     "columns use these; measured next to another busy worker): " + ", ".join(st) + ".")
    return lines


def write_benchmarks_md(plan, root: Path, out: Path, speed: dict, command: str, n_replacement: int) -> Path:
    info = json.loads((root / "run-info.json").read_text()) if (root / "run-info.json").is_file() else {}
    summary_p = root / "convergence.json"
    summary = json.loads(summary_p.read_text()) if summary_p.is_file() else {}
    results = load_results(root)
    groups = group(results)
    img_dir = out / "benchmarks"
    img_dir.mkdir(parents=True, exist_ok=True)
    fid_means, fid_seeds = fid_tables(plan, groups)
    deltas, verdicts = delta_table(plan, groups)
    clusters, sizes = cluster_table(plan, root, n_replacement)
    figs = plots(plan, groups, sizes, img_dir)
    grids = []
    for (tok, label), runs in sorted(groups.items()):
        r = runs[min(runs)]
        final = [e for e in r["evals"] if e.get("grid") and Path(e["grid"]).is_file()]
        if final:
            dst = img_dir / f"samples-{tok}-{label}.png"
            shutil.copyfile(final[-1]["grid"], dst)
            grids.append((tok, label, min(runs), final[-1]["step"], dst.name))
    est = convergence.estimate(plan)
    core_runs = sum(len(a.seeds) for a in plan.arms if a.core)
    core_done = sum(1 for a in plan.arms if a.core for s in a.seeds
                    if s in groups.get((a.tokenizer, a.label), {}) and
                    groups[(a.tokenizer, a.label)][s]["final_step"] >= a.steps)
    core_scores = sum(len(a.budgets) * len(a.seeds) for a in plan.arms if a.core)
    scored = sum(1 for a in plan.arms if a.core for s in a.seeds for b in a.budgets
                 if (r := groups.get((a.tokenizer, a.label), {}).get(s)) and _fid(r, b) is not None)
    toks = summary.get("tokenizers", {})
    n_fids = sum(len(e["fid"]) for r in results for e in r["evals"])
    complete = core_done == core_runs and scored == core_scores
    n_seq = 2 * min(t.images or 60_000 for t in plan.tokenizers)  # training sequences: every image and its flip
    md = [
        f"# Benchmarks ({plan.name} plan)",
        "",
        f"Generated by `{info.get('command', command)}` at git revision "
        f"`{info.get('git_rev', short_revision())}`, started "
        f"{info.get('started', '-')}, report written {time.strftime('%Y-%m-%d %H:%M')}"
        + (f", total {info['total_s'] / 60:.0f} min" if "total_s" in info else "") + ".",
        f"Machine: {machine()}.",
        "",
        f"Regenerate with `{command}` (this file; estimated {est['total_s'] / 3600:.1f} hours on 2 CPU cores from a "
        "fresh checkout, tokenizer included; reruns skip every job already done and admit further extras within "
        "their own deadline)" + (" or `make bench-quick` (a smoke version in minutes, written under "
                                 "`artifacts/bench/quick/`)" if plan.name != "quick" else "")
        + f". Raw results: `artifacts/bench/{plan.name}/`.",
        "",
        f"Core: {core_done} of {core_runs} training runs, {scored} of {core_scores} scored checkpoints"
        + ("" if complete else " (**incomplete**: the tables cover what finished)") + ". Extras run: "
        + (", ".join(summary.get("admitted", [])) or "none") + "; left out by the deadline: "
        + (", ".join(summary.get("skipped", [])) or "none") + ".",
        *([f"Not in this plan: {'; '.join(plan.not_run)}."] if plan.not_run else []),
        "",
        "## Convergence study: does MASC beat flat and k-means, and does the lead last?",
        "",
        "### Headline",
        "",
        *headline(plan, groups),
        "",
        "### Set-up",
        f"- Data: Fashion-MNIST (MIT licence) train split, 32 x 32, as codes of this project's tokenizers "
        f"({', '.join(f'`{t.name}`, N = {t.codebook_size}' for t in plan.tokenizers)}). Tokenizer quality: "
        + ("; ".join(f"`{k}` PSNR {_r(v['report'].get('psnr'))} dB, SSIM {_r(v['report'].get('ssim'), 3)}, rFID "
                     f"{_r(v['report'].get('rfid'))}, codebook usage {_r(v['report'].get('codebook_usage'), 3)}, "
                     f"perplexity {_r(v['report'].get('perplexity'), 0)}" for k, v in toks.items()) or "-") + ".",
        f"- Model `{plan.model}`, batch {plan.batch}, lr {plan.lr} (constant), the `cpu_default` recipe otherwise "
        f"(AdamW, EMA 0.999 with warm-up, fp32). {plan.steps} steps are {plan.steps * plan.batch:,} sequences"
        + (f", under one epoch of the {n_seq:,} ({n_seq // 2:,} images and their flips), so each logged "
           "training-batch loss is measured on data the model has not seen" if plan.steps * plan.batch <= n_seq else
           f", {plan.steps * plan.batch / n_seq:.1f} epochs of the {n_seq:,} ({n_seq // 2:,} images and their flips)")
        + ". A seed fixes initialisation and data order, identical across heads.",
        f"- Schedule: {_arm_schedule(plan)}. Each (arm, seed) is trained once to its largest budget and every budget "
        "is scored from that run's checkpoint (constant LR, data order fixed by (seed, step): the checkpoint at b "
        f"is what a b-step run would give). {n_fids} FIDs in all.",
        f"- FID: torch-fidelity's Inception (2015-12-05 weights, pool3), {plan.fid_samples} class-balanced samples "
        f"from the EMA weights at CFG {plan.cfg_scale} (the same random draws at every budget of a seed) against "
        f"{plan.fid_reference} held-out (test split) images; exact FID via the nuclear-norm identity "
        "(`masc_llamagen/eval/fid.py`, checked against torch-fidelity). Every budget is scored on the same number "
        f"of samples, so the curves are comparable along their length; FID on {plan.fid_samples:,} samples is "
        "biased upwards (against 50k-sample FIDs, and more than on 1,000 samples), the same way for every head: "
        "compare within these tables only, not with earlier versions of this file scored on 1,000.",
        "",
        "### FID vs training steps (lower is better; mean ± std over seeds)",
        "",
        fid_means,
        "",
        "Per seed:",
        "",
        fid_seeds,
        "",
        "### Difference to flat at every budget (paired by seed; negative: the head is better)",
        "",
        deltas,
        "",
        "### Verdicts (95% t-intervals of the paired differences; 'unresolved': the interval contains 0)",
        "",
        *verdicts,
        "",
        "### Has flat's FID curve flattened?",
        "",
        *plateau_lines(plan, groups),
        "",
        "### Acceleration curve (docs/method.md section 4, at every budget)",
        "",
        "For each of flat's budgets b: the steps a head needs to reach flat's FID at b, on the head's own curve "
        "(linear between scored checkpoints, the first crossing counts, nothing extrapolated), paired by seed "
        "(a head's seed s against flat's seed s). `≤ s`: already at or below the target at its first scored "
        "checkpoint s (an upper bound on the steps); `not reached`: never within its curve. Acceleration = "
        "1 - steps / b (share of flat's steps saved), over the seeds that reached it. Wall-clock: the same steps "
        "times each arm's measured training step time (see Wall time), against flat's b steps.",
        "",
        acceleration_table(plan, groups),
        "",
        "### FID-vs-step area ratio",
        "",
        "Area under the head's FID curve over area under flat's, same seed, over their common step range "
        "(trapezoids of the interpolated curves; < 1: lower on average). The linear axis weighs the late budgets "
        "(half the range lies between the last two); the log-step axis weighs every doubling equally.",
        "",
        area_table(plan, groups),
        "",
        f"### Held-out diagnostics at every scored budget ({plan.heldout_codes} test images' codes, EMA weights)",
        "",
        "Fine NLL is the true likelihood under model + member decoder (a coarse head pays log |C(y)| per token); "
        "coarse CE next to flat marginalised onto the same clusters is the direct test of 'the coarse task is learned "
        "faster' (docs/method.md section 4).",
        "",
        diagnostics_table(plan, groups),
        "",
        f"### Clusters and the semantic replacement test ({n_replacement} held-out images, every token replaced by a "
        "random member of its cluster, decoded, scored against the plain reconstruction)",
        "",
        clusters,
        "",
        "### Curves",
        "",
        *[f"![{k}](benchmarks/{v})" for k, v in figs.items()],
        "",
        "### Samples (seed 0, EMA weights at the arm's last budget, one row per class, uniform member decoder)",
        "",
        *[f"- `{tok}` {label} at {step} steps:\n\n  ![{label}](benchmarks/{name})"
          for tok, label, _, step, name in grids],
        "",
        "### Wall time",
        "",
        *wall_time_lines(plan, summary, results, groups, info),
        "",
        "## Speed and memory",
        "",
        "Ratios come from one invocation each; absolute numbers depend on the machine above.",
        "",
    ]
    for name, title in (("tree", "Tree build (N = 16384, d = 8)"), ("train_step", "Training step, head=masc vs "
                        "head=flat"), ("sampling", "Sampling: KV cache vs full recompute, with and without CFG")):
        if name in speed:
            md += [f"### {title}", "", f"`{speed[name]['command']}`", "", _tables(speed[name]["stdout"]), ""]
    md += ["Fashion-MNIST: Zalando Research, MIT licence. MASC is described as patent-pending by its authors."]
    path = out / "benchmarks.md"
    path.write_text("\n".join(md) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None, help="default: docs (full) or artifacts/bench/quick (quick)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--skip-speed", action="store_true", help="reuse the last speed results")
    ap.add_argument("--report-only", action="store_true", help="rebuild the report from existing results")
    ap.add_argument("--horizon", type=int, default=None, help="train the core arms this far (existing runs continue)")
    ap.add_argument("--no-deadline", action="store_true", help="run every extra, whatever the time")
    ap.add_argument("--estimate", action="store_true", help="print the cost estimate of the plan and exit")
    args = ap.parse_args(argv)
    name = "quick" if args.quick else "full"
    plan = convergence.make_plan(name, args.horizon)
    if args.estimate:
        print(convergence.describe_estimate(plan, args.workers))
        return 0
    started = time.time()
    root = REPO / "artifacts" / "bench" / name
    out = Path(args.out) if args.out else (root if args.quick else REPO / "docs")
    out.mkdir(parents=True, exist_ok=True)
    root.mkdir(parents=True, exist_ok=True)
    command = ("make bench-quick" if args.quick else "make bench") + (f" ARGS='--horizon {args.horizon}'"
                                                                      if args.horizon else "")
    t0 = time.perf_counter()
    info_p = root / "run-info.json"
    if not args.report_only:  # the revision that produced the numbers, not the one that later formats them
        info_p.write_text(json.dumps({"git_rev": short_revision(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                                      "command": command}))
    speed_p = root / "speed.json"
    if args.skip_speed or args.report_only:
        speed = json.loads(speed_p.read_text()) if speed_p.is_file() else {}
    else:
        speed = run_speed(root, args.quick)
    if not args.report_only:
        print(convergence.describe_estimate(plan, args.workers), flush=True)
        convergence.run_plan(plan, root, args.workers, started=started, deadline=not args.no_deadline)
        info = json.loads(info_p.read_text())
        info_p.write_text(json.dumps(info | {"total_s": round(time.perf_counter() - t0, 1)}))
    path = write_benchmarks_md(plan, root, out, speed, command, n_replacement=250 if args.quick else 1000)
    print(f"wrote {path} ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
