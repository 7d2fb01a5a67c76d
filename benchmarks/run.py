"""`make bench` / `make bench-quick`: speed and memory benchmarks, the convergence study, and the report.

    python benchmarks/run.py [--quick] [--out docs] [--skip-speed] [--report-only]

Writes ``<out>/benchmarks.md`` and its PNGs under ``<out>/benchmarks/``. Every table carries the command, the git
revision and the machine it came from. The speed benchmarks run first, while nothing else is running.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import convergence  # noqa: E402

REPO = convergence.REPO
HERE = Path(__file__).resolve().parent


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f", {kb / 2**20:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"
    return f"{cpu}, {os.cpu_count()} cores{mem}{gpu}; {platform.system()} {platform.release()}; " \
           f"Python {platform.python_version()}, torch {torch.__version__}"


def git_rev() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True).stdout.strip()
        return rev + ("+uncommitted changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


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


def _ms(vals) -> str:
    v = np.asarray([x for x in vals if x is not None], float)
    if not len(v):
        return "-"
    if len(v) == 1:
        return f"{v[0]:.2f}"
    return f"{v.mean():.2f} ± {v.std(ddof=1):.2f}"


def _r(x, nd: int = 2):
    return "-" if x is None else round(float(x), nd) if nd else int(round(float(x)))


def _fid(r: dict, step: int, decoder: str):
    for e in r["evals"]:
        if e["step"] == step:
            return e["fid"].get(decoder)
    return None


def _diag(r: dict, step: int):
    for e in r["evals"]:
        if e["step"] == step:
            return e["heldout"]
    return None


def group(results: list[dict]) -> dict:
    out: dict = {}
    for r in results:
        out.setdefault((r["arm"]["tokenizer"], r["arm"]["label"]), {})[r["seed"]] = r
    return out


def fid_table(plan, groups) -> tuple[str, list[str]]:
    T = plan.steps
    half = T // 2
    verdicts = []
    lines = [f"| tokenizer (N) | head | FID @ {half} steps (uniform) | FID @ {T} (uniform) | FID @ {T} (frequency) | "
             f"Δ vs flat @ {T}, paired by seed (uniform) | per-seed FID @ {T} (uniform) |",
             "|---|---|---|---|---|---|---|"]
    for tok in plan.tokenizers:
        flat = groups.get((tok.name, "flat"), {})
        for arm in [a for a in plan.arms if a.tokenizer == tok.name]:
            runs = groups.get((tok.name, arm.label), {})
            if not runs:
                continue
            seeds = sorted(runs)
            fu = [_fid(runs[s], T, "uniform") for s in seeds]
            diffs = [fu[i] - _fid(flat[s], T, "uniform") for i, s in enumerate(seeds)
                     if s in flat and fu[i] is not None and arm.head != "flat"]
            dtxt = "-"
            if diffs:
                d = np.asarray(diffs)
                wins = int((d < 0).sum())
                dtxt = f"{d.mean():+.2f} (range {d.min():+.2f} .. {d.max():+.2f}; lower in {wins}/{len(d)})"
                verdicts.append(_verdict(f"{arm.label} vs flat (N={tok.codebook_size}, uniform decoder)", d))
            lines.append(f"| {tok.name} ({tok.codebook_size}) | {arm.label} | "
                         f"{_ms([_fid(runs[s], half, 'uniform') for s in seeds])} | {_ms(fu)} | "
                         f"{_ms([_fid(runs[s], T, 'frequency') for s in seeds])} | {dtxt} | "
                         f"{', '.join('-' if v is None else f'{v:.1f}' for v in fu)} |")
    # MASC against k-means, both decoders, same seeds
    for tok in plan.tokenizers:
        for dec in ("uniform", "frequency"):
            m, km = groups.get((tok.name, f"masc-k{tok.codebook_size // 2}")), groups.get(
                (tok.name, f"kmeans-k{tok.codebook_size // 2}"))
            if m and km:
                d = [_fid(m[s], T, dec) - _fid(km[s], T, dec) for s in sorted(m) if s in km
                     and _fid(m[s], T, dec) is not None and _fid(km[s], T, dec) is not None]
                if d:
                    verdicts.append(_verdict(f"masc-k{tok.codebook_size // 2} vs kmeans-k{tok.codebook_size // 2} "
                                             f"({dec} decoder)", np.asarray(d)))
    return "\n".join(lines), verdicts


def _verdict(what: str, d: np.ndarray) -> str:
    """Paired differences (negative: the first is better); a t-interval, stated as what n seeds can support."""
    from scipy import stats

    n = len(d)
    if n < 2:
        return f"- {what}: ΔFID {d.mean():+.2f} from one seed; no spread, no verdict."
    half = stats.t.ppf(0.975, n - 1) * d.std(ddof=1) / np.sqrt(n)
    lo, hi = d.mean() - half, d.mean() + half
    if hi < 0:
        call = "better (the 95% interval excludes 0)"
    elif lo > 0:
        call = "worse (the 95% interval excludes 0)"
    else:
        call = "no difference these seeds can resolve (the 95% interval contains 0)"
    return (f"- {what}: ΔFID {d.mean():+.2f}, 95% t-interval [{lo:+.2f}, {hi:+.2f}] over {n} paired seeds: {call}.")


def acceleration_table(plan, groups) -> str:
    from masc_llamagen.eval.acceleration import first_reach

    T = plan.steps
    lines = ["| tokenizer | head | decoder | flat's final FID (mean of seeds) | steps to reach it, per seed | "
             "acceleration per seed | mean ± std |", "|---|---|---|---|---|---|---|"]
    for tok in plan.tokenizers:
        flat = groups.get((tok.name, "flat"), {})
        finals = [_fid(r, T, "uniform") for r in flat.values()]
        if not finals or None in finals:
            continue
        target = float(np.mean(finals))
        for arm in [a for a in plan.arms if a.tokenizer == tok.name and a.head != "flat"]:
            runs = groups.get((tok.name, arm.label), {})
            for dec in ("uniform", "frequency"):
                steps_, accs = [], []
                for s in sorted(runs):
                    curve = [(e["step"], e["fid"][dec]) for e in runs[s]["evals"] if dec in e["fid"]]
                    if len(curve) < 2:  # one scored checkpoint says nothing about when the target was reached
                        continue
                    reach = first_reach(curve, target)
                    first = curve[0][0]
                    if reach is None:
                        steps_.append("not reached")
                        accs.append(None)
                    else:
                        bound = "≤ " if reach == first and first < T else ""
                        steps_.append(f"{bound}{reach:.0f}")
                        accs.append(1 - reach / T)
                if not steps_:
                    continue
                got = [a for a in accs if a is not None]
                acc_txt = ", ".join("-" if a is None else f"{a:+.0%}" for a in accs)
                ms = (f"{np.mean(got):+.0%} ± {np.std(got, ddof=1):.0%}" if len(got) > 1 else
                      (f"{got[0]:+.0%}" if got else "not reached"))
                if len(got) < len(accs) and got:
                    ms += f" ({len(accs) - len(got)} of {len(accs)} not reached)"
                lines.append(f"| {tok.name} | {arm.label} | {dec} | {target:.2f} | {', '.join(steps_)} | "
                             f"{acc_txt} | {ms} |")
    return "\n".join(lines)


def diagnostics_table(plan, groups) -> str:
    T = plan.steps
    lines = ["| tokenizer | head | fine NLL bits/token (uniform dec.) | fine NLL (frequency dec.) | coarse CE bits | "
             "flat marginalised onto the same clusters | normalised entropy H/log V |",
             "|---|---|---|---|---|---|---|"]
    for tok in plan.tokenizers:
        flat = groups.get((tok.name, "flat"), {})
        for arm in [a for a in plan.arms if a.tokenizer == tok.name]:
            runs = groups.get((tok.name, arm.label), {})
            ds = [_diag(r, T) for r in runs.values() if _diag(r, T)]
            if not ds:
                continue
            marg = "-"
            if arm.head != "flat":
                marg = _ms([_diag(r, T).get(f"marginal_ce/{arm.label}") for r in flat.values() if _diag(r, T)])
            lines.append(f"| {tok.name} | {arm.label} | {_ms([d['fine_nll_uniform'] for d in ds])} | "
                         f"{_ms([d['fine_nll_frequency'] for d in ds])} | "
                         f"{_ms([d['coarse_ce'] for d in ds]) if arm.head != 'flat' else '-'} | {marg} | "
                         f"{_ms([d['entropy_norm'] for d in ds])} |")
    return "\n".join(lines)


def cluster_table(plan, root: Path, n_images: int) -> tuple[str, dict]:
    """Cluster sizes and the semantic replacement test (PSNR/SSIM of member-swapped decodes) per coarse head."""
    import torch

    from masc_llamagen.checkpoint import load_vq
    from masc_llamagen.data.images import build_image_dataset, heldout_split
    from masc_llamagen.masc.replacement import replacement_scores

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


def plots(plan, groups, sizes, out: Path) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    figs = {}
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for tok in plan.tokenizers:
        arms = [a for a in plan.arms if a.tokenizer == tok.name and groups.get((tok.name, a.label))]
        if not arms:
            continue
        fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
        for i, arm in enumerate(arms):
            runs, c = groups[(tok.name, arm.label)], colors[i % len(colors)]
            for ax, key in ((axes[0], "train/fine_nll_bits"), (axes[2], "train/pred_entropy_norm")):
                steps, v = _series(runs, key)
                if len(steps):
                    sm = _smooth(v)
                    ax.plot(steps, sm.mean(0), color=c, label=arm.label)
                    ax.fill_between(steps, sm.min(0), sm.max(0), color=c, alpha=0.2)
            # FID vs step: every seed as a dot, the mean as a line
            for dec, ls in (("uniform", "-"), ("frequency", "--")):
                pts = sorted({e["step"] for r in runs.values() for e in r["evals"] if dec in e["fid"]})
                if not pts:
                    continue
                vals = [[e["fid"][dec] for r in runs.values() for e in r["evals"] if e["step"] == s
                         and dec in e["fid"]] for s in pts]
                axes[1].plot(pts, [np.mean(v) for v in vals], ls, marker="o", color=c,
                             label=f"{arm.label} ({dec})" if arm.head != "flat" else arm.label)
                for s, v in zip(pts, vals, strict=True):
                    axes[1].scatter([s] * len(v), v, color=c, s=10, alpha=0.5)
        axes[0].set(title="fine-token NLL on fresh batches (bits/token)", xlabel="step", ylim=(None, None))
        axes[1].set(title=f"FID ({plan.fid_samples} samples vs held-out)", xlabel="step")
        axes[2].set(title="normalised prediction entropy H / log V", xlabel="step")
        for ax in axes:
            ax.grid(alpha=0.3)
        axes[1].legend(fontsize=7)
        axes[0].legend(fontsize=7)
        fig.suptitle(f"{tok.name} (N = {tok.codebook_size}); bands: min-max over seeds")
        fig.tight_layout()
        p = out / f"curves-{tok.name}.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        figs[f"curves-{tok.name}"] = p.name

        # the coarse task itself: coarse CE vs flat marginalised onto MASC k=N/2's clusters (logged every step)
        label = f"masc-k{tok.codebook_size // 2}"
        if groups.get((tok.name, label)) and groups.get((tok.name, "flat")):
            fig, ax = plt.subplots(figsize=(6.5, 4.2))
            for runs, key, c, name in ((groups[(tok.name, label)], "train/coarse_ce_bits", colors[1], label),
                                       (groups[(tok.name, "flat")], "train/marginal_coarse_ce_bits", colors[0],
                                        f"flat, marginalised onto {label}'s clusters")):
                steps, v = _series(runs, key)
                if len(steps):
                    ax.plot(steps, v.mean(0), color=c, label=name)
                    ax.fill_between(steps, v.min(0), v.max(0), color=c, alpha=0.2)
            ax.set(title=f"coarse task CE on fresh batches, N = {tok.codebook_size}", xlabel="step",
                   ylabel="bits/token")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
            fig.tight_layout()
            p = out / f"coarse-task-{tok.name}.png"
            fig.savefig(p, dpi=110)
            plt.close(fig)
            figs[f"coarse-{tok.name}"] = p.name
    if sizes:
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        for (tok, label), sz in sizes.items():
            ax.loglog(np.arange(1, len(sz) + 1), sz, label=f"{tok} {label}")
        ax.set(title="cluster sizes, largest first", xlabel="rank", ylabel="tokens in cluster")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        p = out / "cluster-sizes.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        figs["sizes"] = p.name
    return figs


# -- report -----------------------------------------------------------------------------------------------------------
def write_report(plan, root: Path, out: Path, speed: dict, command: str, n_replacement: int) -> Path:
    info = json.loads((root / "run-info.json").read_text()) if (root / "run-info.json").is_file() else {}
    summary_p = root / "convergence.json"
    summary = json.loads(summary_p.read_text()) if summary_p.is_file() else {}
    results = load_results(root)
    groups = group(results)
    img_dir = out / "benchmarks"
    img_dir.mkdir(parents=True, exist_ok=True)
    fids, verdicts = fid_table(plan, groups)
    clusters, sizes = cluster_table(plan, root, n_replacement)
    figs = plots(plan, groups, sizes, img_dir)
    grids = []
    for (tok, label), runs in sorted(groups.items()):
        r = runs[min(runs)]
        final = [e for e in r["evals"] if e["step"] == plan.steps and e.get("grid")]
        if final:
            dst = img_dir / f"samples-{tok}-{label}.png"
            shutil.copyfile(final[0]["grid"], dst)
            grids.append((tok, label, min(runs), dst.name))
    expected = len(plan.arms) * len(plan.seeds)
    toks = summary.get("tokenizers", {})
    timings = summary.get("timings", {})
    n_fids = sum(len(e["fid"]) for r in results for e in r["evals"])
    md = [
        f"# Benchmarks ({plan.name} plan)",
        "",
        f"Generated by `{command}` at git revision `{info.get('git_rev', git_rev())}`, started "
        f"{info.get('started', '-')}, report written {time.strftime('%Y-%m-%d %H:%M')}"
        + (f", total {info['total_s'] / 60:.0f} min" if "total_s" in info else "") + ".",
        f"Machine: {machine()}.",
        "",
        "Regenerate with `make bench` (this file, about 2 hours on 2 CPU cores) or `make bench-quick` (a smoke "
        "version in minutes, written under `artifacts/bench/quick/`). Raw results: `artifacts/bench/<plan>/`.",
        "",
        f"Completed runs: {len(results)} of {expected}" + ("" if len(results) == expected else
                                                           " (**incomplete**: the tables cover what finished)") + ".",
        "",
        "## Convergence study: does MASC beat flat and k-means at this scale?",
        "",
        "### Set-up",
        f"- Data: Fashion-MNIST (MIT licence) train split, 32 x 32, as codes of this project's tokenizers "
        f"({', '.join(f'`{t.name}`, N = {t.codebook_size}' for t in plan.tokenizers)}). Tokenizer quality: "
        + "; ".join(f"`{k}` PSNR {_r(v['report'].get('psnr'))} dB, SSIM {_r(v['report'].get('ssim'), 3)}, rFID "
                    f"{_r(v['report'].get('rfid'))}, codebook usage {_r(v['report'].get('codebook_usage'), 3)}, "
                    f"perplexity {_r(v['report'].get('perplexity'), 0)}" for k, v in toks.items()) + ".",
        f"- Model `{plan.model}`, {plan.steps} steps of batch {plan.batch} ({plan.steps * plan.batch:,} sequences, "
        f"under one epoch, so each logged training-batch loss is measured on data the model has not seen), "
        f"lr {plan.lr}, the `cpu_default` recipe otherwise (AdamW, EMA 0.999 with warm-up, fp32). Seeds "
        f"{list(plan.seeds)}: a seed fixes initialisation and data order, identical across heads.",
        f"- FID: torch-fidelity's Inception (2015-12-05 weights, pool3), {plan.fid_samples} class-balanced samples "
        f"from the EMA weights at CFG {plan.cfg_scale} against {plan.fid_reference} held-out (test split) images; "
        f"exact FID via the nuclear-norm identity (`masc_llamagen/eval/fid.py`, checked against torch-fidelity). "
        f"FID at {plan.fid_samples:,} samples is biased upwards (against 50k-sample FIDs), the same way for every "
        f"head: compare within these tables only.",
        "- Which checkpoints were scored (each FID costs about 2-4 CPU minutes, so not every one): "
        + "; ".join(f"{lab if lab != '*' else 'every head'} on {tk if tk != '*' else 'every tokenizer'} at "
                    f"{int(plan.steps * fr)} steps, {dec} decoder" for lab, tk, fr, dec in plan.fids)
        + f" ({n_fids} FIDs in all).",
        "",
        "### FID (lower is better; mean ± std over seeds)",
        "",
        fids,
        "",
        "### Verdicts",
        "",
        *verdicts,
        "",
        "### Acceleration (masc-method.md section 5)",
        "",
        "`1 - steps to reach flat's final FID / flat's total steps`, FID curves interpolated linearly between the "
        "scored checkpoints. With checkpoints at half and full budget only, a run already below the target at the "
        "first one is reported as `≤ step` (a lower bound on the acceleration); `not reached` means its final FID "
        "is worse than flat's.",
        "",
        acceleration_table(plan, groups),
        "",
        f"### Diagnostics at {plan.steps} steps (held-out codes of {plan.heldout_codes} test images, EMA weights)",
        "",
        "Fine NLL is the true likelihood under model + member decoder (a coarse head pays log |C(y)| per token); "
        "coarse CE next to flat marginalised onto the same clusters is the direct test of 'the coarse task is learned "
        "faster' (masc-method.md section 7).",
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
        "### Samples (seed 0, final EMA weights, one row per class, uniform member decoder)",
        "",
        *[f"- `{tok}` {label}:\n\n  ![{label}](benchmarks/{name})" for tok, label, _, name in grids],
        "",
        "### Wall time",
        "",
        f"- Tokenizers and codes: {timings.get('tokenizers_codes_s', '-')} s (skipped where already built: "
        + ", ".join(f"`{k}` {'reused' if v['report'].get('skipped') else 'trained'}, tokenizer training "
                    f"{v['report'].get('wall_time_s')} s" for k, v in toks.items())
        + f"); trees, mappings and reference features {timings.get('mappings_and_reference_s', '-')} s; training "
        f"+ scoring {timings.get('runs_s', '-')} s on {summary.get('workers', '-')} single-threaded workers.",
        f"- Per run: training {_ms([r['train_wall_s'] for r in results])} s; per FID Inception "
        f"{_ms([v for r in results for e in r['evals'] for k, v in e.items() if k.startswith('inception_s')])} s, "
        f"sampling {_ms([e['sample_s'] for r in results for e in r['evals']])} s.",
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
    args = ap.parse_args(argv)
    name = "quick" if args.quick else "full"
    plan = convergence.PLANS[name]()
    root = REPO / "artifacts" / "bench" / name
    out = Path(args.out) if args.out else (root if args.quick else REPO / "docs")
    out.mkdir(parents=True, exist_ok=True)
    root.mkdir(parents=True, exist_ok=True)
    command = "make bench-quick" if args.quick else "make bench"
    t0 = time.perf_counter()
    info_p = root / "run-info.json"
    if not args.report_only:  # the revision that produced the numbers, not the one that later formats them
        info_p.write_text(json.dumps({"git_rev": git_rev(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                                      "command": command}))
    speed_p = root / "speed.json"
    if args.skip_speed or args.report_only:
        speed = json.loads(speed_p.read_text()) if speed_p.is_file() else {}
    else:
        speed = run_speed(root, args.quick)
    if not args.report_only:
        convergence.run_plan(name, root, args.workers)
        info = json.loads(info_p.read_text())
        info_p.write_text(json.dumps(info | {"total_s": round(time.perf_counter() - t0, 1)}))
    path = write_report(plan, root, out, speed, command, n_replacement=250 if args.quick else 1000)
    print(f"wrote {path} ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
