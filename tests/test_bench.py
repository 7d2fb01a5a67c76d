"""The benchmark plans (configs/bench/) compose into valid training configs, the study fits its budget on the cost
model, the job scheduler keeps its promises, and the report's statistics are right on hand-made data."""

import json
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import convergence  # noqa: E402
import report  # noqa: E402
import results  # noqa: E402
import run as bench_run  # noqa: E402
from convergence import Arm, Job, Plan, Scheduler, Tokenizer  # noqa: E402

PLANS = sorted(p.stem for p in (REPO / "configs" / "bench" / "plan").glob("*.yaml"))


def bench_job(*overrides: str) -> bench_run.BenchJob:
    """``python benchmarks/run.py OVERRIDES``'s typed job, composed as the app composes it."""
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "configs" / "bench")):
        return OmegaConf.to_object(compose("convergence", overrides=list(overrides)))


def bench_plan(name: str = "full", *overrides: str) -> Plan:
    return bench_job(f"plan={name}", *overrides).plan


def test_the_app_defaults_to_the_full_plan_and_maps_the_old_flags():
    job = bench_job()
    assert job.plan.name == "full" and job.deadline and not job.estimate and not job.report_only
    job = bench_job("plan=quick", "plan.horizon=80", "deadline=false", "estimate=true", "workers=1")
    assert job.plan.name == "quick" and not job.deadline and job.estimate and job.workers == 1
    assert all(a.steps == 80 and a.budgets[-1] == 80 for a in job.plan.arms if a.core)
    assert bench_run.command_line(job.plan, ["plan=quick", "plan.horizon=80", "out=/tmp/x"]) == \
        "make bench-quick ARGS='plan.horizon=80'"
    assert bench_run.command_line(bench_job().plan, ["report_only=true", "out=/tmp/x"]) == "make bench"


@pytest.mark.parametrize("name", PLANS)
def test_every_arm_composes_with_the_plan_applied(name, tmp_path):
    plan = bench_plan(name)
    for arm in plan.arms:
        cfg = convergence.compose(convergence.train_overrides(plan, arm, 1, tmp_path), tmp_path / "run")
        assert cfg.head.name == arm.head and cfg.train.seed == 1 and cfg.train.steps == arm.steps
        assert cfg.train.global_batch_size == plan.batch and cfg.optim.lr == plan.lr
        assert cfg.train.eval_every == 0 and cfg.paths.output_dir == str(tmp_path / "run")
        assert cfg.train.keep_last == 0  # every scored checkpoint stays
        steps = plan.eval_steps(arm)
        assert steps and max(steps) <= arm.steps and all(s % cfg.train.ckpt_every == 0 for s in steps)
        if arm.head == "flat":
            assert all(d == "uniform" for _, d in plan.evals(arm))  # member decoders do not apply to flat
            n = next(t.codebook_size for t in plan.tokenizers if t.name == arm.tokenizer)
            masc = [a.k for a in plan.arms if a.tokenizer == arm.tokenizer and a.head == "masc"]
            assert cfg.head.compare_k == (max(masc) if masc else None) and (not masc or max(masc) == n // 2)
        else:
            assert cfg.head.k == arm.k


def test_full_plan_covers_the_issue():
    plan = bench_plan()
    n = plan.tokenizers[0].codebook_size
    t1 = plan.tokenizers[0].name
    core = {a.label: a for a in plan.arms if a.core and a.tokenizer == t1}
    assert set(core) == {"flat", f"masc-k{n // 2}", f"kmeans-k{n // 2}"}
    for arm in core.values():  # whole curves: >= 3 seeds, >= 5 budgets, to >= 2400 steps, one run per seed
        assert len(arm.seeds) >= 3 and len(arm.budgets) >= 5 and max(arm.budgets) >= 2400
        assert arm.steps == max(arm.budgets) and list(arm.budgets) == sorted(set(arm.budgets))
    assert len({(tuple(a.budgets), tuple(a.seeds)) for a in core.values()}) == 1  # the same: paired curves
    extras = {a.label for a in plan.arms if not a.core}
    assert {f"masc-k{n // 4}", f"random-k{n // 2}"} <= extras
    assert {d for _, d in plan.evals(core[f"masc-k{n // 2}"])} == {"uniform", "frequency"}
    assert plan.fid_reference >= 1000 and plan.fid_samples >= 500 and plan.deadline_s == 2.5 * 3600
    assert any("4096" in why for why in plan.not_run)  # what is left out is said, not silently dropped
    # the cost: the core alone, from a fresh checkout, and everything the deadline admits fit 2.5 hours
    core_only = convergence.estimate(plan, deadline_s=0)
    everything = convergence.estimate(plan)
    assert core_only["total_s"] <= 2.5 * 3600 and everything["total_s"] <= 2.5 * 3600
    assert not core_only["admitted"] and core_only["jobs"] == 2 + 9 + 45  # tokenizer, reference, 9 runs, 45 scores


def test_the_plan_file_states_the_estimate_it_has():
    plan = bench_plan()
    text = (REPO / "configs" / "bench" / "plan" / "full.yaml").read_text()
    doc = " ".join(" ".join(ln[1:] for ln in text.splitlines() if ln.startswith("#")).split())
    total = convergence.estimate(plan)["total_s"] / 3600
    core = convergence.estimate(plan, deadline_s=0)
    built = convergence.estimate(plan, deadline_s=0, tokenizers_built=True)["total_s"] / 3600
    assert f"{total:.2f} h in all" in doc and f"core {core['total_s'] / 3600:.2f} h" in doc
    assert f"{built:.2f} h with the tokenizer already built" in doc and "the MASC frequency-decoder" in doc
    assert f"training {core['worker_s']['train']:,.0f} and scoring {core['worker_s']['score']:,.0f}" in doc
    thousand = convergence.estimate(replace(plan, fid_samples=1000), deadline_s=0)["total_s"] / 3600
    assert f"1,000 samples instead would take {thousand:.2f} h" in doc
    assert [u.split()[1] for u in convergence.estimate(plan)["admitted"]] == ["masc-k512"]


def test_cost_model_arithmetic_by_hand():
    plan = bench_plan()
    train = Job("train", "fmnist_vq_tiny", "flat", 0)
    score = Job("score", "fmnist_vq_tiny", "flat", 0, 150, "uniform")
    freq = Job("score", "fmnist_vq_tiny", "masc-k512", 0, 2400, "frequency")
    assert convergence.job_cost(plan, train) == pytest.approx(2400 * 0.40)
    assert convergence.job_cost(plan, score) == pytest.approx(36 + 500 * (15.21 + 229.30) / 1000)
    assert convergence.job_cost(plan, freq) == pytest.approx(12 + 500 * 229.30 / 1000)
    assert convergence.job_cost(plan, Job("reference")) == pytest.approx(1000 * 229.30 / 1000 + 12)


def test_budgets_double_up_to_the_horizon():
    assert convergence.doubling_budgets(150, 2400) == (150, 300, 600, 1200, 2400)
    assert convergence.doubling_budgets(150, 4000) == (150, 300, 600, 1200, 2400, 4000)
    longer = bench_plan("full", "plan.horizon=4800")
    assert all(a.steps == 4800 and a.budgets[-1] == 4800 for a in longer.arms if a.core)
    assert [a.frequency for a in longer.arms if a.head == "masc" and a.core] == [[4800]]  # follows the horizon


def test_a_longer_horizon_continues_the_same_runs():
    """train_key leaves the step count out (the run resumes); a score's key holds what its FID means."""
    a, b = bench_plan(), bench_plan("full", "plan.horizon=4800")
    arm_a, arm_b = a.arm("fmnist_vq_tiny", "flat"), b.arm("fmnist_vq_tiny", "flat")
    assert convergence.train_key(a, arm_a, 0) == convergence.train_key(b, arm_b, 0)
    assert convergence.train_key(a, arm_a, 0) != convergence.train_key(a, arm_a, 1)
    assert convergence.eval_key(a, arm_a, 0, 300, "uniform") == convergence.eval_key(b, arm_b, 0, 300, "uniform")
    fewer = replace(a, fid_samples=250)
    assert convergence.eval_key(a, arm_a, 0, 300, "uniform") != convergence.eval_key(fewer, arm_a, 0, 300, "uniform")


def test_job_done_reads_the_json_with_its_key(tmp_path):
    plan = bench_plan("quick")
    arm = plan.arms[0]
    rd = convergence.run_dir(tmp_path, arm, 0)
    job = Job("train", arm.tokenizer, arm.label, 0)
    assert not convergence.job_done(plan, job, tmp_path)
    rd.mkdir(parents=True)
    key = convergence.train_key(plan, arm, 0)
    (rd / "train.json").write_text(json.dumps({"key": key, "final_step": arm.steps - 1}))
    assert not convergence.job_done(plan, job, tmp_path)  # short of the horizon: continue it
    (rd / "train.json").write_text(json.dumps({"key": key, "final_step": arm.steps}))
    assert convergence.job_done(plan, job, tmp_path)
    (rd / "train.json").write_text(json.dumps({"key": key + "x", "final_step": arm.steps}))
    assert not convergence.job_done(plan, job, tmp_path)


# -- the scheduler, on a toy plan with hand-set costs ------------------------------------------------------------------
TOY_TOK = Tokenizer("toy", 8)


def toy_plan(deadline=None, extra_steps=100):
    arms = (Arm("toy", "flat", None, steps=100, budgets=(50, 100), seeds=(0, 1)),
            Arm("toy", "masc", 4, steps=100, budgets=(50, 100), seeds=(0, 1), frequency=(100,)),
            Arm("toy", "random", 4, steps=extra_steps, budgets=(extra_steps,), seeds=(0, 1), core=False))
    return Plan(name="toy", model="m", batch=32, lr=1e-3, cfg_scale=2.0, fid_samples=10, fid_reference=10,
                heldout_codes=10, tokenizers=(TOY_TOK,), arms=arms, deadline_s=deadline)


def toy_cost(j: Job) -> float:
    return {"tokenizer": 10.0, "reference": 4.0, "train": 20.0, "score": 3.0}[j.kind] + (j.kind == "train") * (
        j.label == "random") * 10.0


def run_sim(sched: Scheduler, workers: int, cost, t0: float = 0.0):
    """Drive a Scheduler on a simulated clock; (end time, [(start, end, job)])."""
    import heapq

    now, events, log, tick = t0, [], [], 0
    while True:
        while len(sched.running) < workers and (j := sched.pick(now)) is not None:
            tick += 1
            heapq.heappush(events, (now + cost(j), tick, j, now))
        if not events:
            return now, log
        now, _, j, start = heapq.heappop(events)
        log.append((start, now, j))
        sched.finish(j)


def test_jobs_start_only_after_what_they_depend_on():
    plan = toy_plan()
    sched = Scheduler(plan, 2, cost=toy_cost)
    _, log = run_sim(sched, 2, toy_cost)
    end = {j: e for _, e, j in log}
    start = {j: s for s, _, j in log}
    for j, deps in sched.deps.items():
        for d in deps:
            assert start[j] >= end[d], (j, d)
    assert len(log) == len(sched.jobs)  # no deadline: every job, extras included
    # training before scores: every core training run starts before any core score
    core = [j for j in sched.jobs if sched.unit[j] is None]
    trains = [start[j] for j in core if j.kind == "train"]
    scores = [start[j] for j in core if j.kind == "score"]
    assert len(trains) == 4 and len(scores) == 8
    assert max(trains) <= min(scores)


def test_simulate_by_hand():
    a, b, c = Job("train", "t", "a", 0), Job("train", "t", "b", 0), Job("score", "t", "a", 0, 1, "uniform")
    deps = {a: (), b: (), c: (a,)}
    prio = {a: 0, b: 1, c: 2}
    cost = {a: 10.0, b: 12.0, c: 5.0}.__getitem__
    assert convergence.simulate([a, b, c], deps, prio, cost, 2) == 15  # a, b in parallel; c after a: 10 + 5
    assert convergence.simulate([a, b, c], deps, prio, cost, 1) == 27
    assert convergence.simulate([c], deps, prio, cost, 2, running={a: 4.0}) == 9  # a's last 4 s, then c
    assert convergence.simulate([c], deps, prio, cost, 2) == 0  # a can never finish: c is left out


def test_deadline_admits_extras_that_fit_and_skips_the_rest():
    # the core alone: tokenizer 10 ‖ reference 4, 4 trainings of 20 on 2 workers (40), 8 scores of 3 (12): 62
    core = Scheduler(toy_plan(deadline=0), 2, deadline_s=0, cost=toy_cost)
    end, _ = run_sim(core, 2, toy_cost)
    assert end == pytest.approx(62) and len(core.skipped) == 2  # the frequency unit and the random arm
    # room for the frequency scores (2 x 3 s on two workers: +3) but not for the random arm (2 x 30 + 2 x 3)
    sched = Scheduler(toy_plan(), 2, deadline_s=66, cost=toy_cost)
    end, log = run_sim(sched, 2, toy_cost)
    assert [u[0] for u in sched.admitted] == ["frequency"] and [u[0] for u in sched.skipped] == ["arm"]
    assert end == pytest.approx(65) and end <= 66
    assert not any(j.label == "random-k4" for _, _, j in log)
    # a generous deadline admits both, and the projection used for admission was the simulated end
    sched = Scheduler(toy_plan(), 2, deadline_s=1000, cost=toy_cost)
    end, _ = run_sim(sched, 2, toy_cost)
    assert len(sched.admitted) == 2 and not sched.skipped
    assert end == pytest.approx(run_sim(Scheduler(toy_plan(), 2, cost=toy_cost), 2, toy_cost)[0])  # no deadline


def test_projection_matches_the_simulated_run():
    sched = Scheduler(toy_plan(), 2, cost=toy_cost)
    for u in {u for u in sched.unit.values() if u is not None}:
        sched.admitted[u] = None
    projected = sched.projected(0.0)
    end, _ = run_sim(Scheduler(toy_plan(), 2, cost=toy_cost), 2, toy_cost)
    assert projected == pytest.approx(end)


def test_a_failed_job_blocks_its_dependents_only():
    sched = Scheduler(toy_plan(), 2, cost=toy_cost)
    tok = sched.pick(0.0)
    ref = sched.pick(0.0)
    assert (tok.kind, ref.kind) == ("tokenizer", "reference")
    sched.finish(ref, ok=False)
    sched.finish(tok)
    assert all(j.kind == "train" for j in sched.pending)  # every score needed the reference
    assert sched.failed == [ref] and all(j.kind == "score" for j in sched.blocked)


# -- report arithmetic on hand-made results ----------------------------------------------------------------------------
def fake_run(label, seed, fids, step_s=0.4, heldout=None, freq=None):
    evals = []
    for s, f in fids.items():
        e = {"step": s, "fid": {"uniform": f}, "heldout": heldout or {"fine_nll_uniform": 5.0,
                                                                    "fine_nll_frequency": 4.9, "coarse_ce": 4.0,
                                                                    "entropy_norm": 0.5}}
        if freq and s in freq:
            e["fid"]["frequency"] = freq[s]
        evals.append(e)
    head = label.split("-")[0]
    return {"arm": {"tokenizer": "tok", "head": head, "label": label}, "seed": seed, "evals": evals,
            "step_time_s": step_s, "train_wall_s": 100.0, "final_step": max(fids), "metrics": []}


def report_plan():
    tok = Tokenizer("tok", 16)
    kw = dict(steps=800, budgets=(100, 200, 400, 800), seeds=(0, 1, 2))
    return Plan(name="t", model="m", batch=32, lr=1e-3, cfg_scale=2.0, fid_samples=10, fid_reference=10,
                heldout_codes=10, tokenizers=(tok,), arms=(Arm("tok", "flat", None, **kw), Arm("tok", "masc", 8, **kw)))


FLAT = {0: {100: 80.0, 200: 50.0, 400: 30.0, 800: 20.0}, 1: {100: 82.0, 200: 52.0, 400: 31.0, 800: 21.0},
        2: {100: 81.0, 200: 51.0, 400: 29.0, 800: 19.0}}
MASC = {0: {100: 60.0, 200: 40.0, 400: 25.0, 800: 22.0}, 1: {100: 62.0, 200: 42.0, 400: 26.0, 800: 23.0},
        2: {100: 61.0, 200: 41.0, 400: 24.0, 800: 18.0}}


def report_groups():
    return results.group([fake_run("flat", s, FLAT[s], 0.4) for s in FLAT]
                           + [fake_run("masc-k8", s, MASC[s], 0.5) for s in MASC])


def test_acceleration_rows_pair_seeds_and_use_step_times():
    rows = {(a["label"], a["budget"]): a for a in results.acceleration_rows(report_plan(), report_groups())}
    a = rows[("masc-k8", 200)]
    # seed 0: flat's 50 at 200 is reached between 100 (60) and 200 (40) at 150
    assert a["seeds"][0]["steps"] == pytest.approx(150) and a["seeds"][0]["acceleration"] == pytest.approx(0.25)
    # seed 1: flat's 52 between 100 (62) and 200 (42) at 150 too; seed 2: 51 between 61 and 41 at 150
    assert [a["seeds"][s]["steps"] for s in (1, 2)] == pytest.approx([150, 150])
    # wall-clock with the arms' step times: 150 x 0.5 = 75 s against 200 x 0.4 = 80 s
    assert a["seeds"][0]["seconds"] == pytest.approx(75) and a["seeds"][0]["baseline_seconds"] == pytest.approx(80)
    # at 800: seed 0 ends at 22 > 20 and seed 1 at 23 > 21 (not reached); seed 2 gets to 19 between 400 and 800
    last = rows[("masc-k8", 800)]["seeds"]
    assert last[0]["steps"] is None and last[1]["steps"] is None
    assert last[2]["steps"] == pytest.approx(400 + (24 - 19) / (24 - 18) * 400)
    assert rows[("masc-k8", 100)]["seeds"][0]["bound"]  # below flat's first FID at its own first checkpoint
    table = report.acceleration_table(report_plan(), report_groups())
    line = next(ln for ln in table.splitlines() if "| masc-k8 | 800 |" in ln)
    assert "not reached, not reached, 733" in line and "(2 of 3 not reached)" in line
    line = next(ln for ln in table.splitlines() if "| masc-k8 | 200 |" in ln)
    assert "150, 150, 150" in line and "+25%" in line and "75 vs 80" in line and "+6%" in line


def test_area_and_delta_tables_by_hand():
    plan, groups = report_plan(), report_groups()
    table = report.area_table(plan, groups)
    from masc_llamagen.eval.acceleration import area_ratio

    want = [area_ratio(sorted(MASC[s].items()), sorted(FLAT[s].items())) for s in (0, 1, 2)]
    # seed 0 by hand: masc 100*(60+40)/2 + 200*(40+25)/2 + 400*(25+22)/2 = 20900; flat 6500 + 8000 + 10000 = 24500
    assert want[0] == pytest.approx(20900 / 24500)
    assert ", ".join(f"{v:.3f}" for v in want) in table
    deltas, verdicts = report.delta_table(plan, groups)
    line = next(ln for ln in deltas.splitlines() if "masc-k8" in ln)
    assert "-20.00 (lower in 3/3)" in line and "+1.00 (lower in 1/3)" in line  # at 100; at 800: +2, +2, -1
    v = next(x for x in verdicts if x.startswith("- masc-k8 vs flat"))
    assert "better at 100, 200, 400" in v and "unresolved at 800" in v and "At 800 steps: ΔFID +1.00" in v


def test_plateau_and_headline_say_what_the_curves_show():
    plan, groups = report_plan(), report_groups()
    lines = report.plateau_lines(plan, groups)
    # flat's mean curve: 81, 51, 30, 20 -> gains 21 (200 -> 400) and 10 (400 -> 800), both >= 1
    assert len(lines) == 1 and "+21.00, +10.00" in lines[0] and "**not flattened** by 800" in lines[0]
    head = report.headline(plan, groups)
    assert any("masc-k8 vs flat" in h and "-20.00 at 100 steps (better)" in h and "the lead is gone" in h
               and "reached by 1 of 3 seeds" in h for h in head)
    flat_late = {s: dict(v) | {1600: v[800] - 0.5, 3200: v[800] - 0.8} for s, v in FLAT.items()}
    plan2 = replace(plan, arms=(replace(plan.arms[0], steps=3200, budgets=(100, 200, 400, 800, 1600, 3200)),
                                plan.arms[1]))
    g2 = results.group([fake_run("flat", s, flat_late[s]) for s in flat_late])
    assert "**flattened** by 3200" in report.plateau_lines(plan2, g2)[0]


def test_fid_tables_show_mean_std_and_every_seed():
    means, seeds = report.fid_tables(report_plan(), report_groups())
    line = next(ln for ln in means.splitlines() if "| flat |" in ln)
    assert "81.00 ± 1.00" in line and "| 3 |" in line  # 80, 82, 81
    assert "| masc-k8 | uniform | 1 | 62.00 | 42.00 | 26.00 | 23.00 |" in seeds


def test_verdict_calls_only_what_the_interval_supports():
    assert "better" in report._verdict("x", np.array([-5.0, -6.0, -5.5]))
    assert "worse" in report._verdict("x", np.array([5.0, 6.0, 5.5]))
    assert "contains 0" in report._verdict("x", np.array([-5.0, 4.0, 0.5]))
    assert "one seed" in report._verdict("x", np.array([-5.0]))
    # the interval itself: mean -2, sd 1, n 3 -> half width t(0.975, 2) * 1 / sqrt(3) = 2.484
    line = report._verdict("x", np.array([-1.0, -2.0, -3.0]))
    assert "[-4.48, +0.48]" in line


def test_report_renders_from_run_jsons(tmp_path, monkeypatch):
    """The whole template (benchmarks/report.md) on hand-made bench.json files (no tokenizer: the cluster table is
    stubbed); every field is filled (string.Template.substitute refuses a missing one)."""
    plan = report_plan()
    for r in [fake_run("flat", s, FLAT[s], 0.4) for s in FLAT] + [fake_run("masc-k8", s, MASC[s], 0.5,
                                                                            freq={800: MASC[s][800] - 1})
                                                                   for s in MASC]:
        p = tmp_path / "runs" / "tok" / r["arm"]["label"] / f"seed{r['seed']}" / "bench.json"
        p.parent.mkdir(parents=True)
        p.write_text(json.dumps(r))
    monkeypatch.setattr(report, "cluster_table", lambda plan, root, n: ("(clusters)", {}))
    monkeypatch.setattr(report, "estimate", lambda plan, workers=2, **k: {"total_s": 3600.0})
    path = report.write_benchmarks_md(plan, tmp_path, tmp_path / "out", {}, "make bench")
    md = path.read_text()
    for section in ("### Headline", "### FID vs training steps", "### Has flat's FID curve flattened?",
                    "### Acceleration curve", "### FID-vs-step area ratio", "### Held-out diagnostics"):
        assert section in md
    assert "masc-k8, frequency vs uniform decoder (same samples): better at 800" in md
    for png in ("fid-tok.png", "acceleration-tok.png", "heldout-tok.png"):
        assert (tmp_path / "out" / "benchmarks" / png).is_file() and f"benchmarks/{png}" in md
    assert re.search(r"Core: 6 of 6 training runs, 24 of 24 scored checkpoints\.", md)
    assert "(clusters)" in md and "$" not in md  # every field filled, none left as a placeholder


@pytest.mark.slow
def test_the_app_prints_the_estimate_and_writes_nothing(tmp_path):
    """The Hydra app end to end in a subprocess: no outputs/ folder, no change of directory."""
    p = subprocess.run([sys.executable, str(REPO / "benchmarks" / "run.py"), "plan=quick", "estimate=true"],
                       cwd=tmp_path, capture_output=True, text=True, check=True)
    assert p.stdout.strip() == convergence.describe_estimate(bench_plan("quick"))
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_a_speed_worker_runs_in_its_own_process(tmp_path):
    """The workers' protocol (benchmarks/isolated.py): the O(N^3) reference loop of bench_tree, in a fresh
    interpreter, merges at scipy's average-linkage heights."""
    import bench_tree
    from isolated import in_fresh_process
    from scipy.cluster.hierarchy import linkage

    info = in_fresh_process("bench_tree", "worker", kind="ref", n=60, seed=3, zout=str(tmp_path / "ref.npy"))
    assert info["kind"] == "ref" and info["n"] == 60 and info["wall_s"] >= 0
    heights = np.load(tmp_path / "ref.npy")
    want = linkage(bench_tree.make_codebook(60, 8, 3).astype(np.float64), "average")[:, 2]
    np.testing.assert_allclose(np.sort(heights), np.sort(want), rtol=1e-9)
