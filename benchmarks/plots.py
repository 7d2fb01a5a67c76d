"""The report's figures: FID curves, acceleration, held-out diagnostics, training logs, cluster sizes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from results import acceleration_rows, arms_of, budgets_of, curve, fid_at, heldout_at, step_time


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
    steps = budgets_of(runs, decoder)
    vals = [[fid_at(r, s, decoder) for r in runs.values() if fid_at(r, s, decoder) is not None] for s in steps]
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
        arms = arms_of(plan, groups, tok)
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
        _plain_log(axes[0], xticks=sorted({b for a in arms for b in budgets_of(groups[(tok.name, a.label)])}))
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
                v = [[d[key] for r in runs.values() if (d := heldout_at(r, s))] for s in steps]
                ax.plot(steps, [np.mean(x) for x in v], marker="o", ms=4, color=c, label=arm.label)
                ax.fill_between(steps, [min(x) for x in v], [max(x) for x in v], color=c, alpha=0.18)
            if arm.head != "flat" and groups.get((tok.name, "flat")):
                fr = groups[(tok.name, "flat")]
                fsteps = sorted({e["step"] for r in fr.values() for e in r["evals"] if e.get("heldout")})
                v = [[d.get(f"marginal_ce/{arm.label}") for r in fr.values() if (d := heldout_at(r, s))]
                     for s in fsteps]
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

