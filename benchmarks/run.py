"""`make bench` / `make bench-quick`: speed and memory benchmarks, the convergence study, and the report.

    python benchmarks/run.py [plan=quick] [plan.horizon=4800] [out=DIR] [skip_speed=true] [report_only=true]
                             [deadline=false] [workers=2] [root=DIR] [estimate=true]

The options are :class:`BenchJob`'s, the plan (``plan=full|quick``, ``plan.*``) is configs/bench/plan/. Writes
``<out>/benchmarks.md`` (filled from the template benchmarks/report.md) and its PNGs under ``<out>/benchmarks/``.
Every table carries the command, the git revision and the machine it came from. The speed benchmarks run first,
while nothing else is running.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent))
import convergence  # noqa: E402
from convergence import Plan  # noqa: E402
from report import write_benchmarks_md  # noqa: E402

from masc_llamagen.errors import user_errors  # noqa: E402
from masc_llamagen.utils.provenance import short_revision  # noqa: E402

REPO = convergence.REPO
HERE = Path(__file__).resolve().parent
SCRIPTS = {"tree": "bench_tree.py", "train_step": "bench_train_step.py", "sampling": "bench_sampling.py"}


@dataclass
class BenchJob:
    """Every option of ``make bench``; configs/bench/convergence.yaml only picks the plan."""

    plan: Plan = MISSING  # configs/bench/plan/<name>.yaml: plan=full | plan=quick
    workers: int = 2  # single-threaded job processes
    root: str | None = None  # runs and results; null: artifacts/bench/<plan name>
    out: str | None = None  # the report; null: docs (full plan) or the root
    skip_speed: bool = False  # reuse the last speed results
    report_only: bool = False  # rebuild the report from the results already there
    deadline: bool = True  # false: run every extra, whatever the time
    estimate: bool = False  # print the plan's cost estimate and exit


ConfigStore.instance().store(name="base_convergence", node=BenchJob)


def run_speed(plan: Plan, out: Path) -> dict:
    res = {}
    for name, overrides in plan.speed.items():
        script = SCRIPTS[name]
        js = out / f"speed-{name}.json"
        t0 = time.perf_counter()
        p = subprocess.run([sys.executable, str(HERE / script), *overrides, f"json={js}"], cwd=REPO,
                           capture_output=True, text=True)
        if p.returncode != 0:
            raise SystemExit(f"{script} failed ({p.returncode}):\n{p.stderr[-2000:]}")
        res[name] = {"command": " ".join([f"python benchmarks/{script}", *overrides]), "stdout": p.stdout,
                     "wall_s": round(time.perf_counter() - t0, 1)}
        print(f"{script}: {res[name]['wall_s']} s", flush=True)
    (out / "speed.json").write_text(json.dumps(res, indent=2))
    return res


def command_line(plan: Plan, overrides: list[str]) -> str:
    """The make command that regenerates the report: the plan's overrides count, where the report goes does not."""
    kept = [o for o in overrides if o.startswith("plan.")]
    return ("make bench-quick" if plan.name == "quick" else "make bench") + (f" ARGS='{' '.join(kept)}'" if kept
                                                                             else "")


def bench(job: BenchJob, command: str) -> Path | None:
    """The whole of ``make bench`` for one typed job; returns the report's path (None for ``estimate``)."""
    plan = job.plan
    if job.estimate:
        print(convergence.describe_estimate(plan, job.workers))
        return None
    started = time.time()
    root = Path(job.root) if job.root else REPO / "artifacts" / "bench" / plan.name
    out = Path(job.out) if job.out else (REPO / "docs" if plan.name == "full" else root)
    out.mkdir(parents=True, exist_ok=True)
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    info_p = root / "run-info.json"
    if not job.report_only:  # the revision that produced the numbers, not the one that later formats them
        info_p.write_text(json.dumps({"git_rev": short_revision(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                                      "command": command}))
    speed_p = root / "speed.json"
    if job.skip_speed or job.report_only:
        speed = json.loads(speed_p.read_text()) if speed_p.is_file() else {}
    else:
        speed = run_speed(plan, root)
    if not job.report_only:
        print(convergence.describe_estimate(plan, job.workers), flush=True)
        convergence.run_plan(plan, root, job.workers, started=started, deadline=job.deadline)
        info = json.loads(info_p.read_text())
        info_p.write_text(json.dumps(info | {"total_s": round(time.perf_counter() - t0, 1)}))
    path = write_benchmarks_md(plan, root, out, speed, command)
    print(f"wrote {path} ({time.perf_counter() - t0:.0f} s)")
    return path


@hydra.main(version_base="1.3", config_path=str(REPO / "configs" / "bench"), config_name="convergence")
def main(cfg: DictConfig) -> None:
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    with user_errors():
        job: BenchJob = OmegaConf.to_object(cfg)
        command = command_line(job.plan, list(HydraConfig.get().overrides.task))
        GlobalHydra.instance().clear()  # the study composes training configs from configs/ (convergence.compose)
        bench(job, command)


if __name__ == "__main__":
    main()
