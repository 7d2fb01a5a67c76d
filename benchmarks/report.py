"""docs/benchmarks.md: ``report.md`` (beside this file) holds the prose; the functions here compute what fills its
``${fields}`` (tables, verdicts, figures) from the study's JSONs and the speed benchmarks' output."""

from __future__ import annotations

import json
import shutil
import string
import time
from pathlib import Path

import numpy as np
from convergence import Plan, coarse_mappings, estimate, tokenizer_cfg
from plots import plots
from results import (
    acceleration_rows,
    arms_of,
    budgets_of,
    curve,
    fid_at,
    group,
    heldout_at,
    load_results,
    mean_curve,
    step_time,
)

from masc_llamagen.utils.provenance import machine, short_revision

TEMPLATE = Path(__file__).resolve().with_name("report.md")
SPEED_TITLES = {"tree": "Tree build (N = 16384, d = 8)", "train_step": "Training step, head=masc vs head=flat",
                "sampling": "Sampling: KV cache vs full recompute, with and without CFG"}


def _tables(stdout: str) -> str:
    """The header line and markdown tables a benchmark printed (its own description of what it measured)."""
    lines = stdout.strip().splitlines()
    keep = [ln for ln in lines if ln.startswith("|") or not ln.strip()]
    head = [ln for ln in lines if ln and not ln.startswith("|")]
    return "\n".join(([f"_{head[0]}_", ""] if head else []) + keep).strip()


def _ms(vals, nd: int = 2) -> str:
    v = np.asarray([x for x in vals if x is not None], float)
    if not len(v):
        return "-"
    if len(v) == 1:
        return f"{v[0]:.{nd}f}"
    return f"{v.mean():.{nd}f} ± {v.std(ddof=1):.{nd}f}"


def _r(x, nd: int = 2):
    return "-" if x is None else round(float(x), nd) if nd else int(round(float(x)))



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
    return np.asarray([fid_at(a[s], step, dec_a) - fid_at(b[s], step, dec_b) for s in sorted(a) if s in b
                       and fid_at(a[s], step, dec_a) is not None and fid_at(b[s], step, dec_b) is not None], float)


def fid_tables(plan, groups) -> tuple[str, str]:
    """(mean ± std per arm and budget, the per-seed values), uniform decoder; frequency-decoder rows where scored."""
    mean_t, seed_t = [], []
    for tok in plan.tokenizers:
        arms = arms_of(plan, groups, tok)
        if not arms:
            continue
        cols = sorted({b for a in arms for b in budgets_of(groups[(tok.name, a.label)])})
        head = "| tokenizer (N) | head | decoder | seeds | " + " | ".join(f"FID @ {b}" for b in cols) + " |"
        sep = "|---" * (4 + len(cols)) + "|"
        mean_t += [head, sep] if not mean_t else [""] + [head, sep]
        seed_t += ([head.replace("| seeds |", "| seed |"), sep] if not seed_t else
                   ["", head.replace("| seeds |", "| seed |"), sep])
        for arm in arms:
            runs = groups[(tok.name, arm.label)]
            for dec in ("uniform", "frequency"):
                if not budgets_of(runs, dec):
                    continue
                cells = [_ms([fid_at(r, b, dec) for r in runs.values()]) for b in cols]
                n = len([r for r in runs.values() if curve(r, dec)])
                mean_t.append(f"| {tok.name} ({tok.codebook_size}) | {arm.label} | {dec} | {n} | "
                              + " | ".join(cells) + " |")
                for s in sorted(runs):
                    vals = [fid_at(runs[s], b, dec) for b in cols]
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
        arms = arms_of(plan, groups, tok, flat=False)
        if not flat or not arms:
            continue
        cols = budgets_of(flat)
        head = ("| tokenizer | head | decoder | " + " | ".join(f"Δ @ {b}" for b in cols) + " |")
        lines += ([""] if lines else []) + [head, "|---" * (3 + len(cols)) + "|"]
        for arm in arms:
            runs = groups[(tok.name, arm.label)]
            for dec in ("uniform", "frequency"):
                if not budgets_of(runs, dec):
                    continue
                cells = []
                for b in cols:
                    d = paired(runs, flat, b, dec)
                    cells.append("-" if not len(d) else f"{d.mean():+.2f} (lower in {int((d < 0).sum())}/{len(d)})")
                lines.append(f"| {tok.name} | {arm.label} | {dec} | " + " | ".join(cells) + " |")
                v = _over_budgets(f"{arm.label} vs flat (N={tok.codebook_size}, {dec} decoder)", runs, flat,
                                  budgets_of(runs, dec), dec)
                if v:
                    verdicts.append(v)
        half = tok.codebook_size // 2
        m, km = groups.get((tok.name, f"masc-k{half}")), groups.get((tok.name, f"kmeans-k{half}"))
        if m and km:
            for dec in ("uniform", "frequency"):
                v = _over_budgets(f"masc-k{half} vs kmeans-k{half} ({dec} decoder)", m, km, budgets_of(m, dec), dec,
                                  dec)
                if v:
                    verdicts.append(v)
        if m and budgets_of(m, "frequency"):
            v = _over_budgets(f"masc-k{half}, frequency vs uniform decoder (same samples)", m, m,
                              budgets_of(m, "frequency"), "frequency", "uniform")
            if v:
                verdicts.append(v)
    return "\n".join(lines), verdicts



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
        for arm in arms_of(plan, groups, tok, flat=False):
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
        for arm in arms_of(plan, groups, tok):
            runs = groups[(tok.name, arm.label)]
            for step in sorted({e["step"] for r in runs.values() for e in r["evals"] if e.get("heldout")}):
                ds = [d for r in runs.values() if (d := heldout_at(r, step))]
                marg = "-"
                if arm.head != "flat":
                    marg = _ms([(heldout_at(r, step) or {}).get(f"marginal_ce/{arm.label}") for r in flat.values()])
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
        for arm in [a for a in arms_of(plan, groups, tok, flat=False) if a.core]:
            runs = groups[(tok.name, arm.label)]
            common = [b for b in budgets_of(runs) if len(paired(runs, flat, b))]
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
        maps = coarse_mappings(plan, tok.name, root)
        cfg = tokenizer_cfg(tok, root)
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



def _arm_schedule(plan) -> str:
    """Which arms were trained how far and scored where, grouped by identical schedules."""
    groups_: dict[tuple, list[str]] = {}
    for a in plan.arms:
        k = (a.tokenizer, a.steps, tuple(a.budgets), tuple(a.seeds), a.core)
        groups_.setdefault(k, []).append(a.label)
    parts = []
    for (tok, steps, budgets, seeds, core), labels in groups_.items():
        parts.append(f"{', '.join(labels)} on `{tok}`{'' if core else ' (extras)'}: seeds {', '.join(map(str, seeds))}"
                     f", trained to {steps} steps, scored at {', '.join(map(str, budgets))}")
    freq = [f"{a.label} at {', '.join(map(str, a.frequency))}" for a in plan.arms if a.frequency and a.head != "flat"]
    if freq:
        parts.append("frequency member decoder (extras, on the same samples): " + "; ".join(freq))
    return "; ".join(parts)


def _lines(xs) -> str:
    return "\n".join(xs)


def _tokenizer_quality(toks: dict) -> str:
    return "; ".join(f"`{k}` PSNR {_r(v['report'].get('psnr'))} dB, SSIM {_r(v['report'].get('ssim'), 3)}, rFID "
                     f"{_r(v['report'].get('rfid'))}, codebook usage {_r(v['report'].get('codebook_usage'), 3)}, "
                     f"perplexity {_r(v['report'].get('perplexity'), 0)}" for k, v in toks.items()) or "-"


def _epochs(plan: Plan) -> str:
    """How the training sequences compare with the data: every image and its flip."""
    n_seq = 2 * min(t.images or 60_000 for t in plan.tokenizers)
    if plan.steps * plan.batch <= n_seq:
        return (f", under one epoch of the {n_seq:,} ({n_seq // 2:,} images and their flips), so each logged "
                "training-batch loss is measured on data the model has not seen")
    return f", {plan.steps * plan.batch / n_seq:.1f} epochs of the {n_seq:,} ({n_seq // 2:,} images and their flips)"


def _core_status(plan: Plan, groups: dict) -> dict:
    runs = sum(len(a.seeds) for a in plan.arms if a.core)
    done = sum(1 for a in plan.arms if a.core for s in a.seeds
               if (r := groups.get((a.tokenizer, a.label), {}).get(s)) and r["final_step"] >= a.steps)
    scores = sum(len(a.budgets) * len(a.seeds) for a in plan.arms if a.core)
    scored = sum(1 for a in plan.arms if a.core for s in a.seeds for b in a.budgets
                 if (r := groups.get((a.tokenizer, a.label), {}).get(s)) and fid_at(r, b) is not None)
    complete = done == runs and scored == scores
    return {"core_done": done, "core_runs": runs, "scored": scored, "core_scores": scores,
            "incomplete": "" if complete else " (**incomplete**: the tables cover what finished)"}


def _sample_grids(root: Path, groups: dict, img_dir: Path) -> str:
    """Seed 0's grid at each arm's last budget, copied next to the report. Found in its run's report/ folder under
    ``root``: the JSONs name it by the absolute path it was written at, and results may have moved since."""
    out = []
    for (tok, label), runs in sorted(groups.items()):
        seed = min(runs)

        def grid(e: dict, tok=tok, label=label, seed=seed) -> Path:
            return root / "runs" / tok / label / f"seed{seed}" / "report" / Path(e["grid"]).name

        final = [e for e in runs[seed]["evals"] if e.get("grid") and grid(e).is_file()]
        if final:
            dst = img_dir / f"samples-{tok}-{label}.png"
            shutil.copyfile(grid(final[-1]), dst)
            out.append(f"- `{tok}` {label} at {final[-1]['step']} steps:\n\n  ![{label}](benchmarks/{dst.name})")
    return _lines(out)


def _wall_time(plan: Plan, summary: dict, results: list[dict], groups: dict, info: dict) -> dict:
    timings, toks = summary.get("timings", {}), summary.get("tokenizers", {})
    est = summary.get("estimate") or estimate(plan)
    st = [f"{label} {s * 1000:.0f} ms" for (_, label), runs in sorted(groups.items()) if (s := step_time(runs))]
    inception = [v for r in results for e in r["evals"] for k, v in e.items() if k.startswith("inception_s") and v]
    return {
        "tokenizer_jobs": ", ".join(f"`{k}` {v['wall_s']} s ({'reused' if v['report'].get('skipped') else 'trained'}"
                                    f", tokenizer training {v['report'].get('wall_time_s')} s)"
                                    for k, v in toks.items()) or "-",
        "mappings_s": timings.get("mappings_s", "-"), "reference_s": timings.get("reference_s", "-"),
        "pool_s": timings.get("pool_s", "-"), "workers": summary.get("workers", "-"),
        "estimated_h": f"{est['total_s'] / 3600:.2f}",
        "measured": f"{info['total_s'] / 3600:.2f} h." if "total_s" in info else "-.",
        "per_run": _ms([r["train_wall_s"] for r in results], 1), "inception": _ms(inception, 1),
        "sampling": _ms([e.get("sample_s") for r in results for e in r["evals"]], 1),
        "step_times": ("\n- Training step time (median of the logged intervals, mean over seeds; the wall-clock axis "
                       "and columns use these; measured next to another busy worker): " + ", ".join(st) + ".")
        if st else "",
    }


def _speed(speed: dict) -> str:
    return "".join(f"### {title}\n\n`{speed[name]['command']}`\n\n{_tables(speed[name]['stdout'])}\n\n"
                   for name, title in SPEED_TITLES.items() if name in speed)


def write_benchmarks_md(plan: Plan, root: Path, out: Path, speed: dict, command: str) -> Path:
    """Fill report.md from the results under ``root``; writes ``out/benchmarks.md`` and its PNGs under
    ``out/benchmarks/``."""
    info = json.loads((root / "run-info.json").read_text()) if (root / "run-info.json").is_file() else {}
    summary_p = root / "convergence.json"
    summary = json.loads(summary_p.read_text()) if summary_p.is_file() else {}
    results = load_results(root)
    groups = group(results)
    img_dir = out / "benchmarks"
    img_dir.mkdir(parents=True, exist_ok=True)
    fid_means, fid_seeds = fid_tables(plan, groups)
    deltas, verdicts = delta_table(plan, groups)
    clusters, sizes = cluster_table(plan, root, plan.replacement_images)
    figs = plots(plan, groups, sizes, img_dir)
    fields = {
        "plan_name": plan.name, "generated_by": info.get("command", command),
        "git_rev": info.get("git_rev", short_revision()), "started": info.get("started", "-"),
        "written": time.strftime("%Y-%m-%d %H:%M"),
        "total": f", total {info['total_s'] / 60:.0f} min" if "total_s" in info else "",
        "machine": machine(), "command": command, "estimate_h": f"{estimate(plan)['total_s'] / 3600:.1f}",
        "also_quick": "" if plan.name == "quick" else (" or `make bench-quick` (a smoke version in minutes, written "
                                                       "under `artifacts/bench/quick/`)"),
        **_core_status(plan, groups),
        "extras_run": ", ".join(summary.get("admitted", [])) or "none",
        "left_out": ", ".join(summary.get("skipped", [])) or "none",
        "not_run": f"\nNot in this plan: {'; '.join(plan.not_run)}." if plan.not_run else "",
        "headline": _lines(headline(plan, groups)),
        "tokenizers": ", ".join(f"`{t.name}`, N = {t.codebook_size}" for t in plan.tokenizers),
        "tokenizer_quality": _tokenizer_quality(summary.get("tokenizers", {})),
        "model": plan.model, "batch": plan.batch, "lr": plan.lr, "steps": plan.steps,
        "sequences": f"{plan.steps * plan.batch:,}", "epochs": _epochs(plan), "schedule": _arm_schedule(plan),
        "n_fids": sum(len(e["fid"]) for r in results for e in r["evals"]),
        "fid_samples": plan.fid_samples, "fid_samples_txt": f"{plan.fid_samples:,}", "cfg_scale": plan.cfg_scale,
        "fid_reference": plan.fid_reference, "fid_means": fid_means, "fid_seeds": fid_seeds, "deltas": deltas,
        "verdicts": _lines(verdicts), "plateau": _lines(plateau_lines(plan, groups)),
        "acceleration": acceleration_table(plan, groups), "areas": area_table(plan, groups),
        "heldout_codes": plan.heldout_codes, "diagnostics": diagnostics_table(plan, groups),
        "replacement_images": plan.replacement_images, "clusters": clusters,
        "figures": _lines(f"![{k}](benchmarks/{v})" for k, v in figs.items()),
        "samples": _sample_grids(root, groups, img_dir),
        "wall_time_note": plan.wall_time_note + "\n\n" if plan.wall_time_note else "",
        **_wall_time(plan, summary, results, groups, info),
        "speed": _speed(speed),
    }
    path = out / "benchmarks.md"
    path.write_text(string.Template(TEMPLATE.read_text()).substitute(fields))
    return path
