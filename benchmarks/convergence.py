"""The paper's Table 1 comparison at CPU scale, followed over training: flat vs MASC vs k-means (and the other arms),
seeds, FID curves and held-out diagnostics; the library behind ``benchmarks/run.py`` (``make bench``).

The plan is data: ``configs/bench/plan/full.yaml`` and ``quick.yaml``, typed by :class:`Plan`.
Every arm trains the same GPT on the same codes with the same data order and initialisation per seed (both come
from ``train.seed`` only). Each (arm, seed) is trained once, to the arm's largest budget, saving a checkpoint at
every budget; the budgets are scored from those checkpoints (never by retraining): FID on ``fid_samples``
class-balanced samples from the EMA weights against held-out real images (real Inception, offline) and held-out
diagnostics (fine NLL, coarse CE, the flat model marginalised onto every coarse head's clusters, normalised
entropy). The learning rate is constant and the batch at step s depends on (seed, s) only, so a checkpoint at step
b is the model a b-step run would have produced, and a longer horizon (``plan.horizon``) resumes the existing runs.

Work is split into jobs (tokenizer, reference features, one training run, one scored checkpoint per decoder) that
``workers`` single-threaded processes take in priority order (on two cores that does ~1.3x the work of one
two-threaded one): training runs first, then the scores (see :func:`plan_jobs`). Every job writes one JSON and skips
itself when it is there, so an interrupted benchmark continues where it stopped; each run's results are gathered
into ``runs/<tokenizer>/<arm>/seed<s>/bench.json``.
Arms marked ``core: false`` (and every frequency-decoder score) are extras: one starts only while the projected end
of everything already admitted, itself included, stays inside the plan's deadline, measured from the start of
``make bench``; the projection is the cost model below list-scheduled exactly as the workers take jobs.
"""

from __future__ import annotations

import fcntl
import functools
import heapq
import json
import math
import os
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field, replace
from multiprocessing import get_context
from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from masc_llamagen.utils.io import atomic_savez, atomic_write_json

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Tokenizer:
    """Its fields are part of every run's key (:func:`train_key`): a new field would orphan the results on disk."""

    name: str = MISSING  # configs/tokenizer/<name>.yaml
    codebook_size: int = MISSING
    vq: list[str] = field(default_factory=list)  # tokenizer-training overrides (configs/vq_train.yaml keys)
    images: int | None = None  # train images to encode (None: all 60k, as the default job does)


@dataclass
class Arm:
    """One head of the study; its (arm, seed) pairs are the study's grid."""

    tokenizer: str = MISSING
    head: str = MISSING  # flat | masc | kmeans | random
    k: int | None = None
    steps: int | None = None  # each seed is trained once, to here; null: the plan's horizon
    budgets: list[int] | None = None  # checkpoints scored (FID, uniform decoder; held-out diagnostics); null: doubling
    seeds: list[int] | None = None  # null: the plan's seeds
    frequency: list[int] = field(default_factory=list)  # budgets also scored with the frequency decoder (extras)
    core: bool = True  # False: an extra, run only while the deadline allows

    @property
    def label(self) -> str:
        return "flat" if self.head == "flat" else f"{self.head}-k{self.k}"


@dataclass
class Plan:
    """A study: ``configs/bench/plan/<name>.yaml`` holds what differs from these defaults."""

    name: str = MISSING
    tokenizers: list[Tokenizer] = MISSING
    arms: list[Arm] = MISSING
    horizon: int = 300  # arms without ``steps`` train to here
    first_budget: int = 150  # arms without ``budgets`` are scored at first, 2 first, 4 first ... and their steps
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  # of arms without their own
    model: str = "gpt_micro"
    batch: int = 32
    lr: float = 1e-3
    cfg_scale: float = 2.0
    fid_samples: int = 500
    fid_reference: int = 1000
    heldout_codes: int = 1000
    replacement_images: int = 1000  # held-out images of the report's semantic replacement test
    threads: int = 1
    extra: list[str] = field(default_factory=list)  # further training overrides (part of every run's key)
    deadline_s: float | None = None  # extras start only while the projected end stays inside this
    plateau_threshold: float = 1.0  # flat's curve has flattened: < this FID gained over each of its last 2 doublings
    not_run: list[str] = field(default_factory=list)  # what the issue asks for that this plan leaves out, and why
    # the speed benchmarks run first: script -> its Hydra overrides (configs/bench/<script>.yaml)
    speed: dict[str, list[str]] = field(default_factory=lambda: {"tree": [], "train_step": [], "sampling": []})
    wall_time_note: str = ""  # hand-written note on the committed results, shown under the report's Wall time

    def __post_init__(self) -> None:
        """Arms get their steps, budgets and seeds from the plan where they leave them out."""
        arms = []
        for a in self.arms:
            steps = self.horizon if a.steps is None else a.steps
            arms.append(replace(a, steps=steps, budgets=list(a.budgets or doubling_budgets(self.first_budget, steps)),
                                seeds=list(self.seeds if a.seeds is None else a.seeds), frequency=list(a.frequency)))
        self.arms = arms

    @property
    def steps(self) -> int:
        return max(a.steps for a in self.arms)

    def arm(self, tokenizer: str, label: str) -> Arm:
        return next(a for a in self.arms if a.tokenizer == tokenizer and a.label == label)

    def evals(self, arm: Arm) -> list[tuple[int, str]]:
        """(step, decoder) pairs scored for ``arm``; member decoders do not apply to flat."""
        out = [(b, "uniform") for b in arm.budgets]
        if arm.head != "flat":
            out += [(b, "frequency") for b in arm.frequency]
        return sorted(set(out))

    def eval_steps(self, arm: Arm) -> list[int]:
        return sorted({s for s, _ in self.evals(arm)})


ConfigStore.instance().store(group="plan", name="base_plan", node=Plan)


def doubling_budgets(first: int, horizon: int) -> tuple[int, ...]:
    """first, 2 first, 4 first, ... up to horizon, and the horizon itself."""
    out, b = [], first
    while b < horizon:
        out.append(b)
        b *= 2
    return (*out, horizon)


# -- cost model ------------------------------------------------------------------------------------------------------
# From the committed full study at revision d22444e (docs/benchmarks.md, "Wall time"; AMD EPYC, 2 cores, 2
# single-threaded workers): 21 runs of 300 steps trained in 130.9 s each on average; 15 of them on N = 1024, 6 on
# N = 4096, whose larger output layer costs ~1.4x per step (FLOPs of gpt_micro), so 15 x + 6 x 1.4 x = 21 x 130.9
# gives x = 117 s: 0.39 s per step at N = 1024, rounded up to 0.40 (it includes each run's start-up). One FID's
# Inception took 229.3 s per 1000 images and sampling 15.2 s per 1000. The 2 x 5850.7 worker-seconds of training
# + scoring, less training (2,749), Inception (33 x 229.3) and sampling (27 x 15.2), leave 975 s over 27 scored
# checkpoints: 36 s each (held-out diagnostics, decoding, FID algebra, loading, and the pool's idle tail). Speed
# benchmarks: the 106-minute total less the logged stages, about 250 s; tokenizer training 484.2 s including its
# rFID, plus ~150 s encoding the codes ("another ~20 minutes" for both tokenizers, the slower one trained 1052.7 s).
STEP_S = {"gpt_micro": 0.40, "gpt_nano": 0.05}  # per training step at batch 32, N = 1024 (nano: a guess, quick only)
SAMPLE_S = 15.21 / 1000  # per generated sample (CFG 2.0, KV cache)
INCEPTION_S = 229.30 / 1000  # per image per FID
EVAL_S = 36.0  # per uniform-decoder score, beyond sampling and Inception
DECODER_EVAL_S = 12.0  # per further decoder of already generated samples, beyond Inception (load, decode, FID)
TOKENIZER_S = {"fmnist_vq_tiny": 640.0, "fmnist_vq_4096": 1210.0, "fmnist_vq_quick": 60.0}
MAPPINGS_S = 12.0  # trees and k-means mappings of one tokenizer, in the driver
SPEED_S = 250.0  # the speed benchmarks, run before the study with nothing else running
SPEED_QUICK_S = 60.0


@dataclass(frozen=True)
class Job:
    kind: str  # tokenizer | reference | train | score
    tokenizer: str = ""
    label: str = ""
    seed: int = -1
    step: int = 0
    decoder: str = ""

    def __str__(self) -> str:
        if self.kind in ("tokenizer", "reference"):
            return f"{self.kind} {self.tokenizer}".strip()
        what = f"{self.kind} {self.tokenizer} {self.label} seed {self.seed}"
        return what + (f" step {self.step} ({self.decoder})" if self.kind == "score" else "")


def _vocab_factor(n: int) -> float:
    return 1.0 + 0.4 * max(0, n - 1024) / 3072  # 1.4x per step at N = 4096 (see the cost model above)


def job_cost(plan: Plan, job: Job) -> float:
    """Estimated seconds of one worker for a job (the cost model above)."""
    if job.kind == "tokenizer":
        return TOKENIZER_S.get(job.tokenizer, 600.0) + MAPPINGS_S
    if job.kind == "reference":
        return plan.fid_reference * INCEPTION_S + 12.0
    arm = plan.arm(job.tokenizer, job.label)
    n = next(t.codebook_size for t in plan.tokenizers if t.name == arm.tokenizer)
    if job.kind == "train":
        return arm.steps * STEP_S.get(plan.model, 0.4) * plan.batch / 32 * _vocab_factor(n)
    if job.decoder == "uniform":
        return EVAL_S + plan.fid_samples * (SAMPLE_S * _vocab_factor(n) + INCEPTION_S)
    return DECODER_EVAL_S + plan.fid_samples * INCEPTION_S


def plan_jobs(plan: Plan) -> tuple[list[Job], dict[Job, tuple[Job, ...]], dict[Job, tuple | None]]:
    """(jobs in priority order, their dependencies, their extra unit or None for core jobs).

    Order: tokenizers and the reference features; core training runs (seed by seed); scores of core checkpoints
    (seed by seed); then the extras in plan order, each admitted as a unit (a frequency score of a core run, or an
    extra arm's seed: its training and all its scores). Long jobs before short ones (training runs take ~6x a
    score): the short scores then fill both workers to the end, where scores first would leave one worker idle
    while the last training run finishes (~400 s more on the full plan's cost model).
    """
    ref = Job("reference")
    toks = [Job("tokenizer", t.name) for t in plan.tokenizers]
    deps: dict[Job, tuple[Job, ...]] = {j: () for j in [*toks, ref]}
    unit: dict[Job, tuple | None] = {j: None for j in deps}
    core_scores, core_trains, extras = [], [], []
    seed_rank = {s: i for i, s in enumerate(sorted({s for a in plan.arms for s in a.seeds}))}
    for ai, arm in enumerate(plan.arms):
        for seed in arm.seeds:
            tr = Job("train", arm.tokenizer, arm.label, seed)
            deps[tr] = (Job("tokenizer", arm.tokenizer),)
            scores = []
            for step, dec in plan.evals(arm):
                sj = Job("score", arm.tokenizer, arm.label, seed, step, dec)
                deps[sj] = (tr, ref) if dec == "uniform" else (Job("score", arm.tokenizer, arm.label, seed, step,
                                                                   "uniform"),)
                scores.append(sj)
            if arm.core:
                unit[tr] = None
                core_trains.append(((seed_rank[seed], ai), tr))
                for sj in scores:
                    if sj.decoder == "uniform":
                        unit[sj] = None
                        core_scores.append(((seed_rank[seed], ai, sj.step), sj))
                    else:  # one unit per (arm, step, decoder) over the seeds: a single seed has no spread
                        unit[sj] = ("frequency", arm.tokenizer, arm.label, sj.step, sj.decoder)
                        extras.append(((ai, 0, sj.step, seed_rank[seed]), [sj]))
            else:  # one unit per arm: its training runs and all their scores, seed by seed
                for j in (tr, *scores):
                    unit[j] = ("arm", arm.tokenizer, arm.label)
                extras.append(((ai, 1, 0, seed_rank[seed]), [tr, *scores]))
    order = [*toks, ref, *[j for _, j in sorted(core_trains, key=lambda x: x[0])],
             *[j for _, j in sorted(core_scores, key=lambda x: x[0])],
             *[j for _, js in sorted(extras, key=lambda x: x[0]) for j in js]]
    return order, deps, unit


def simulate(jobs: list[Job], deps: dict, prio: dict, cost, workers: int, done=(), running=None) -> float:
    """Makespan of list scheduling: whenever a worker is free it takes the first ready job in priority order.
    ``running``: job -> remaining seconds of jobs already on a worker. Jobs whose dependencies can never finish
    are left out."""
    fin = set(done)
    events = [(rem, prio.get(j, -1), i, j) for i, (j, rem) in enumerate((running or {}).items())]
    heapq.heapify(events)
    pend = sorted(jobs, key=lambda j: prio[j])
    free, t, end, tick = workers - len(events), 0.0, 0.0, len(events)
    while True:
        while free > 0:
            j = next((j for j in pend if all(d in fin for d in deps[j])), None)
            if j is None:
                break
            pend.remove(j)
            tick += 1
            heapq.heappush(events, (t + cost(j), prio[j], tick, j))
            free -= 1
        if not events:
            return end
        t, _, _, j = heapq.heappop(events)
        end = max(end, t)
        fin.add(j)
        free += 1


def unit_name(u: tuple) -> str:
    """('arm', tok, label) -> 'tok label (all seeds)'; ('frequency', tok, label, step, dec) -> '... dec @ step'."""
    if u[0] == "arm":
        return f"{u[1]} {u[2]}"
    return f"{u[1]} {u[2]} {u[4]} decoder @ {u[3]}"


class Scheduler:
    """Hands out jobs in priority order once their dependencies are done; extras only within the deadline."""

    def __init__(self, plan: Plan, workers: int, done=(), deadline_s: float | None = None, cost=None):
        self.plan, self.workers, self.deadline_s = plan, workers, deadline_s
        self.jobs, self.deps, self.unit = plan_jobs(plan)
        self.prio = {j: i for i, j in enumerate(self.jobs)}
        self.cost = cost or functools.partial(job_cost, plan)
        self.done = set(done) & set(self.jobs)
        self.pending = [j for j in self.jobs if j not in self.done]
        self.running: dict[Job, float] = {}
        self.admitted: dict[tuple, None] = {}  # an ordered set: admission order, so the printout is stable
        self.failed: list[Job] = []
        self.blocked: list[Job] = []  # jobs that depended on a failed one

    @property
    def skipped(self) -> list[tuple]:
        """Extra units not admitted (so far: once nothing is left to run, those the deadline left out)."""
        return list(dict.fromkeys(self.unit[j] for j in self.pending if self.unit[j] not in (None, *self.admitted)))

    def _ready(self, j: Job) -> bool:
        return all(d in self.done for d in self.deps[j])

    def projected(self, now: float, unit: tuple | None = None) -> float:
        """Seconds from ``now`` until everything running, every pending core job, every admitted extra and ``unit``
        would be done, on the cost model."""
        jobs = [j for j in self.pending if self.unit[j] is None or self.unit[j] in self.admitted
                or self.unit[j] == unit]
        running = {j: max(1.0, self.cost(j) - (now - t0)) for j, t0 in self.running.items()}
        return simulate(jobs, self.deps, self.prio, self.cost, self.workers, self.done, running)

    def pick(self, now: float) -> Job | None:
        """The first ready job in priority order, or None. An extra unit is admitted (for good) when its first job
        is picked and the projected end with it stays inside the deadline; one that does not fit is asked again at
        the next pick, so a unit that fits later, or a smaller one behind it, still runs."""
        rejected = set()
        for j in self.pending:
            if not self._ready(j):
                continue
            u = self.unit[j]
            if u is not None and u not in self.admitted:
                if u in rejected:
                    continue
                if self.deadline_s is not None and now + self.projected(now, u) > self.deadline_s:
                    rejected.add(u)
                    continue
                self.admitted[u] = None
            self.pending.remove(j)
            self.running[j] = now
            return j
        return None

    def finish(self, job: Job, ok: bool = True) -> None:
        self.running.pop(job, None)
        if ok:
            self.done.add(job)
            return
        self.failed.append(job)
        lost = {job}
        for j in list(self.pending):  # priority order puts dependents after what they depend on
            if any(d in lost for d in self.deps[j]):
                lost.add(j)
                self.pending.remove(j)
                self.blocked.append(j)


def estimate(plan: Plan, workers: int = 2, deadline_s: float | None = ..., tokenizers_built: bool = False,
             speed: bool = True) -> dict:
    """The whole benchmark on the cost model, scheduled as ``run_plan`` does (speed benchmarks first, then the
    pool), extras admitted against the deadline (default: the plan's; 0: none). Seconds and worker-seconds."""
    deadline = plan.deadline_s if deadline_s is ... else deadline_s

    def cost(j: Job) -> float:
        return 20.0 + MAPPINGS_S if (j.kind == "tokenizer" and tokenizers_built) else job_cost(plan, j)

    sched = Scheduler(plan, workers, deadline_s=deadline, cost=cost)
    t0 = (SPEED_S if plan.name == "full" else SPEED_QUICK_S) if speed else 0.0
    now, events, tick = t0, [], 0
    while True:
        while len(sched.running) < workers and (j := sched.pick(now)) is not None:
            tick += 1
            heapq.heappush(events, (now + cost(j), tick, j))
        if not events:
            break
        now, _, j = heapq.heappop(events)
        sched.finish(j)
    work = {}
    for j in sched.done:
        work[j.kind] = work.get(j.kind, 0.0) + cost(j)
    return {"total_s": now, "speed_s": t0, "worker_s": work, "workers": workers, "deadline_s": deadline,
            "admitted": [unit_name(u) for u in sched.admitted], "skipped": [unit_name(u) for u in sched.skipped],
            "jobs": len(sched.done)}


# -- configs -------------------------------------------------------------------------------------------------------
def tokenizer_overrides(tok: Tokenizer, root: Path) -> list[str]:
    if tok.name == "fmnist_vq_quick":  # not a config group option: the tiny tokenizer's settings under another name
        return ["tokenizer=fmnist_vq_tiny", f"tokenizer.name={tok.name}",
                f"tokenizer.checkpoint={root / 'tokenizers' / (tok.name + '.safetensors')}",
                f"data.codes={root / 'codes' / tok.name}"]
    return [f"tokenizer={tok.name}"]


def train_overrides(plan: Plan, arm: Arm, seed: int, root: Path) -> list[str]:
    tok = next(t for t in plan.tokenizers if t.name == arm.tokenizer)
    o = ["experiment=cpu_default", f"model={plan.model}", f"head={arm.head}", *tokenizer_overrides(tok, root),
         f"train.seed={seed}", f"train.steps={arm.steps}", f"train.global_batch_size={plan.batch}",
         f"optim.lr={plan.lr}", "logger=none", "train.log_every=10", "train.sample_every=0", "train.eval_every=0",
         f"train.ckpt_every={math.gcd(*plan.eval_steps(arm), arm.steps)}", "train.keep_last=0",
         f"train.sample_cfg_scale={plan.cfg_scale}", *plan.extra]
    if arm.head == "flat":
        ks = [a.k for a in plan.arms if a.tokenizer == arm.tokenizer and a.head == "masc"]
        if ks:  # the training log then carries flat's CE marginalised onto MASC k = N/2 clusters, step by step
            o.append(f"head.compare_k={max(ks)}")
    else:
        o.append(f"head.k={arm.k}")
    return o


def compose(overrides: list[str], run_dir: Path):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from masc_llamagen.config import register

    register()
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "configs")):
        return hydra_compose("train", overrides=[*overrides, f"paths.output_dir={run_dir}"])


def tokenizer_cfg(tok: Tokenizer, root: Path):
    """The default training config on this tokenizer: where its checkpoint, codes and data settings are."""
    return compose(["experiment=cpu_default", *tokenizer_overrides(tok, root)], root / "scratch")


def run_dir(root: Path, arm: Arm, seed: int) -> Path:
    return root / "runs" / arm.tokenizer / arm.label / f"seed{seed}"


def eval_path(rd: Path, step: int, decoder: str) -> Path:
    return rd / "evals" / f"step{step:06d}-{decoder}.json"


def train_key(plan: Plan, arm: Arm, seed: int) -> str:
    """What a training run's weights mean (not how far it went: a longer horizon continues the same run)."""
    tok = next(t for t in plan.tokenizers if t.name == arm.tokenizer)
    return json.dumps({"model": plan.model, "batch": plan.batch, "lr": plan.lr, "extra": list(plan.extra),
                       "tokenizer": asdict(tok), "head": arm.head, "k": arm.k, "seed": seed}, sort_keys=True)


def eval_key(plan: Plan, arm: Arm, seed: int, step: int, decoder: str) -> str:
    return json.dumps({"train": train_key(plan, arm, seed), "step": step, "decoder": decoder,
                       "fid_samples": plan.fid_samples, "fid_reference": plan.fid_reference,
                       "heldout_codes": plan.heldout_codes, "cfg_scale": plan.cfg_scale}, sort_keys=True)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def job_done(plan: Plan, job: Job, root: Path) -> bool:
    """A training run at or past its arm's steps, or a score, already on disk with the same meaning."""
    if job.kind not in ("train", "score"):
        return False  # tokenizer and reference jobs are cheap when their outputs exist: they check for themselves
    arm = plan.arm(job.tokenizer, job.label)
    rd = run_dir(root, arm, job.seed)
    if job.kind == "train":
        r = _read_json(rd / "train.json")
        return bool(r) and r.get("key") == train_key(plan, arm, job.seed) and r.get("final_step", 0) >= arm.steps
    r = _read_json(eval_path(rd, job.step, job.decoder))
    return bool(r) and r.get("key") == eval_key(plan, arm, job.seed, job.step, job.decoder)


# -- tokenizers and codes --------------------------------------------------------------------------------------------
def build_tokenizer(plan: Plan, tok: Tokenizer, root: Path) -> dict:
    """Train the tokenizer and encode the training set (skipped when up to date), then the held-out code set."""
    import torch

    torch.set_num_threads(plan.threads)
    t0 = time.perf_counter()
    if tok.images is None:
        from masc_llamagen import pipeline

        skipped = pipeline.run([f"tokenizer={tok.name}"], stages=("tokenizer", "codes"), vq_overrides=list(tok.vq),
                               rfid_images=500)["tokenizer"].get("skipped")
    else:
        skipped = _build_small_tokenizer(tok, root)
    cfg = tokenizer_cfg(tok, root)
    heldout = heldout_codes(cfg, plan.heldout_codes, root)
    report = json.loads(Path(str(cfg.tokenizer.checkpoint) + ".json").read_text())
    return {"tokenizer": tok.name, "wall_s": round(time.perf_counter() - t0, 1), "heldout": str(heldout),
            "report": {k: report.get(k) for k in ("psnr", "ssim", "rfid", "codebook_usage", "perplexity", "steps",
                                                  "wall_time_s")} | {"skipped": bool(skipped)}}


def _build_small_tokenizer(tok: Tokenizer, root: Path) -> bool:
    from omegaconf import OmegaConf
    from torch.utils.data import Subset

    from masc_llamagen.data.extract import extract_codes
    from masc_llamagen.data.images import build_image_dataset
    from masc_llamagen.train.tokenizer import train_tokenizer
    from masc_llamagen.weights import load_vq

    ckpt = root / "tokenizers" / f"{tok.name}.safetensors"
    rep = train_tokenizer(OmegaConf.merge(OmegaConf.create({"out": str(ckpt), "rfid_images": 0, "progress": False}),
                                          OmegaConf.from_dotlist(list(tok.vq))))
    out = root / "codes" / tok.name
    if not (out / "meta.json").is_file():
        ds = build_image_dataset("fashion_mnist", "train", image_size=32)
        extract_codes(load_vq(ckpt), Subset(ds, range(tok.images)), out, variants=("center", "hflip"),
                      tokenizer_path=str(ckpt))
    return bool(rep.get("skipped"))


def heldout_codes(cfg, n: int, root: Path) -> Path:
    """Codes of the first n held-out images, the diagnostics' test set, encoded once (the cache file's path)."""
    from masc_llamagen.eval.model_eval import HeldoutCodes
    from masc_llamagen.weights import load_vq

    vq = load_vq(cfg.tokenizer.checkpoint).eval()
    return HeldoutCodes.encode(vq, cfg.data.name, n, image_size=cfg.data.image_size, cache_dir=root / "heldout").path


def coarse_mappings(plan: Plan, tokenizer: str, root: Path) -> dict:
    """label -> (N,) mapping of every coarse arm on this tokenizer (built once, cached under artifacts/trees)."""
    from masc_llamagen.data.codes import CodeDataset
    from masc_llamagen.masc.vocabulary import vocabulary_from_config
    from masc_llamagen.weights import read_codebook

    out = {}
    for arm in plan.arms:
        if arm.tokenizer != tokenizer or arm.head == "flat" or arm.label in out:
            continue
        cfg = compose(train_overrides(plan, arm, 0, root), root / "scratch")
        voc, _ = vocabulary_from_config(cfg.head, read_codebook(cfg.tokenizer.checkpoint),
                                        CodeDataset(cfg.data.codes).code_counts(), Path(cfg.paths.artifacts) / "trees")
        out[arm.label] = voc.mapping
    return out


@functools.lru_cache(maxsize=1)
def inception():
    """One Inception per process: loading it takes seconds, and a worker scores many checkpoints."""
    from masc_llamagen.eval.fid import InceptionFeatures

    return InceptionFeatures(batch_size=100)


def reference_features(plan: Plan, cfg):
    """(npz, Inception features) of the held-out reference images, cached under artifacts/fid; a file lock keeps
    two processes from computing them at once."""
    from masc_llamagen.data.images import heldout_split
    from masc_llamagen.eval.metrics import dataset_reference_npz

    cache = Path(cfg.paths.artifacts) / "fid"
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".reference.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        npz = dataset_reference_npz(cfg.data.name, heldout_split(cfg.data.name), image_size=cfg.data.image_size,
                                    limit=plan.fid_reference, cache=cache)
        return npz, inception().cached(npz, cache=cache)


# -- jobs (run in the workers) --------------------------------------------------------------------------------------
def run_job(plan: Plan, job: Job, root: str) -> dict:
    import torch

    torch.set_num_threads(plan.threads)
    root_p = Path(root)
    t0 = time.perf_counter()
    if job.kind == "tokenizer":
        out = build_tokenizer(plan, next(t for t in plan.tokenizers if t.name == job.tokenizer), root_p)
    elif job.kind == "reference":
        reference_features(plan, tokenizer_cfg(plan.tokenizers[0], root_p))
        out = {}
    elif job.kind == "train":
        out = train_job(plan, plan.arm(job.tokenizer, job.label), job.seed, root_p)
    else:
        out = score_job(plan, plan.arm(job.tokenizer, job.label), job.seed, job.step, job.decoder, root_p)
    return out | {"job_wall_s": round(time.perf_counter() - t0, 1)}


def train_job(plan: Plan, arm: Arm, seed: int, root: Path) -> dict:
    """Train (or continue) one (arm, seed) to ``arm.steps``; writes train.json."""
    import numpy as np

    from masc_llamagen.train.loop import train

    rd = run_dir(root, arm, seed)
    path, key = rd / "train.json", train_key(plan, arm, seed)
    prev = _read_json(path)
    if prev and prev.get("key") == key and prev.get("final_step", 0) >= arm.steps:
        return prev
    cfg = compose(train_overrides(plan, arm, seed, root), rd)
    t0 = time.perf_counter()
    out = train(cfg)
    dt = time.perf_counter() - t0
    if out.get("stopped_early"):
        raise RuntimeError(f"training stopped early at step {out['step']} (signal); rerun to continue")
    metrics = [json.loads(line) for line in (rd / "metrics.jsonl").read_text().splitlines() if line.strip()]
    step_s = [m["train/step_time_s"] for m in metrics if "train/step_time_s" in m]
    earlier = prev.get("train_wall_s", 0.0) if prev and prev.get("key") == key else 0.0
    res = {"key": key, "arm": asdict(arm) | {"label": arm.label}, "seed": seed, "final_step": out["step"],
           "train_wall_s": round(earlier + dt, 1), "step_time_s": float(np.median(step_s)) if step_s else None,
           "metrics": metrics, "run_dir": str(rd)}
    atomic_write_json(path, res, indent=None, default=float)
    return res


def score_job(plan: Plan, arm: Arm, seed: int, step: int, decoder: str, root: Path) -> dict:
    """Score one checkpoint with one member decoder; writes evals/step<step>-<decoder>.json."""
    rd = run_dir(root, arm, seed)
    path, key = eval_path(rd, step, decoder), eval_key(plan, arm, seed, step, decoder)
    prev = _read_json(path)
    if prev and prev.get("key") == key:
        return prev
    from masc_llamagen.train.checkpointing import checkpoint_path

    cfg = compose(train_overrides(plan, arm, seed, root), rd)
    ck = checkpoint_path(rd / "checkpoints", step)
    t0 = time.perf_counter()
    grid = rd / "report" / f"samples-step{step}.png" if step == max(arm.budgets) else None
    if decoder == "uniform":
        mappings = coarse_mappings(plan, arm.tokenizer, root) if arm.head == "flat" else {}
        ev = evaluate_checkpoint(plan, cfg, ck, mappings, seed, root, ids_path=path.with_suffix(".ids.npz"),
                                 grid=grid)
    else:
        ev = score_decoder(plan, cfg, ck, decoder, seed, eval_path(rd, step, "uniform").with_suffix(".ids.npz"))
    res = {"key": key, "step": step, "decoder": decoder, **ev, "wall_s": round(time.perf_counter() - t0, 1)}
    atomic_write_json(path, res, indent=None, default=float)
    return res


def _images(vq, tokens, side: int):
    import numpy as np
    import torch

    from masc_llamagen.utils.images import to_uint8_numpy

    with torch.no_grad():
        return np.concatenate([to_uint8_numpy(vq.decode_code(tokens[s : s + 250].reshape(-1, side, side)))
                               for s in range(0, len(tokens), 250)])


def evaluate_checkpoint(plan: Plan, cfg, ck: Path, mappings: dict, seed: int, root: Path, ids_path: Path,
                        grid: Path | None) -> dict:
    """Held-out diagnostics, then ``fid_samples`` samples -> uniform member decoder -> FID, both by
    :func:`evaluate_model`. The sampled coarse ids are kept (``ids_path``) for the other decoders."""
    import numpy as np
    import torch

    from masc_llamagen.checkpoint import TrainingCheckpoint
    from masc_llamagen.eval.model_eval import HeldoutCodes, evaluate_model
    from masc_llamagen.models.sampling import SamplingConfig, generate
    from masc_llamagen.report import class_grid
    from masc_llamagen.weights import load_gpt, load_vq
    state = TrainingCheckpoint.load(ck)
    model = load_gpt(ck, prefer_ema=True).eval()
    vq = load_vq(cfg.tokenizer.checkpoint).eval()
    out: dict = {"checkpoint": str(ck)}

    # held-out diagnostics -----------------------------------------------------------------------------------------
    heldout = HeldoutCodes.encode(vq, cfg.data.name, plan.heldout_codes, image_size=cfg.data.image_size,
                                  cache_dir=root / "heldout")
    vocabs = {d: state.vocabulary(d, cfg.head.smoothing) for d in ("uniform", "frequency")}
    voc = vocabs["uniform"]
    out["heldout"] = evaluate_model(model, vocabs, heldout=heldout, mappings=mappings)["heldout"]

    # samples -> FID ------------------------------------------------------------------------------------------------
    n = plan.fid_samples
    cls = torch.arange(n) * model.config.num_classes // n
    sc = SamplingConfig(cfg_scale=plan.cfg_scale)
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(20_000 + seed)  # the same draws at every budget: smoother curves
    ids = torch.cat([generate(model, cls[s : s + 250], sampling=sc, generator=g) for s in range(0, n, 250)])
    out["sample_s"] = round(time.perf_counter() - t0, 1)
    atomic_savez(ids_path, ids=ids.numpy(), labels=cls.numpy())
    side = math.isqrt(model.config.block_size)
    imgs = _images(vq, voc.decode(ids, generator=torch.Generator().manual_seed(30_000 + seed)), side)
    _, ref = reference_features(plan, cfg)
    t1 = time.perf_counter()
    out["fid"] = evaluate_model(images=imgs, fid_features=(inception(), ref))["fid"]
    out["inception_s"] = round(time.perf_counter() - t1, 1)
    if grid is not None:
        npz = grid.with_suffix(".npz")
        npz.parent.mkdir(parents=True, exist_ok=True)
        keep = np.concatenate([np.flatnonzero(cls.numpy() == c)[:10] for c in range(model.config.num_classes)])
        np.savez(npz, arr_0=imgs[keep], labels=cls.numpy()[keep])
        class_grid(npz, grid)
        out["grid"] = str(grid)
    return out


def score_decoder(plan: Plan, cfg, ck: Path, decoder: str, seed: int, ids_path: Path) -> dict:
    """FID of the samples the uniform score drew, decoded to fine tokens by another member decoder."""
    import numpy as np
    import torch

    from masc_llamagen.checkpoint import TrainingCheckpoint
    from masc_llamagen.eval.model_eval import evaluate_model
    from masc_llamagen.weights import load_vq

    voc = TrainingCheckpoint.load(ck).vocabulary(decoder, cfg.head.smoothing)
    vq = load_vq(cfg.tokenizer.checkpoint).eval()
    with np.load(ids_path) as z:
        ids = torch.from_numpy(z["ids"].astype(np.int64))
    side = math.isqrt(ids.shape[1])
    imgs = _images(vq, voc.decode(ids, generator=torch.Generator().manual_seed(30_000 + seed)), side)
    _, ref = reference_features(plan, cfg)
    t1 = time.perf_counter()
    fid = evaluate_model(images=imgs, fid_features=(inception(), ref))["fid"]
    return {"checkpoint": str(ck), "fid": fid, "inception_s": round(time.perf_counter() - t1, 1)}


# -- results ---------------------------------------------------------------------------------------------------------
def assemble(plan: Plan, arm: Arm, seed: int, root: Path) -> dict | None:
    """Gather one run's train.json and its scores (those of this plan's meaning) into bench.json."""
    rd = run_dir(root, arm, seed)
    tr = _read_json(rd / "train.json")
    if not tr or tr.get("key") != train_key(plan, arm, seed):
        return None
    by_step: dict[int, dict] = {}
    for step, dec in plan.evals(arm):
        e = _read_json(eval_path(rd, step, dec))
        if not e or e.get("key") != eval_key(plan, arm, seed, step, dec):
            continue
        row = by_step.setdefault(step, {"step": step, "fid": {}})
        row["fid"][dec] = e["fid"]
        row[f"inception_s_{dec}"] = e.get("inception_s")
        row[f"wall_s_{dec}"] = e.get("wall_s")
        for k in ("heldout", "sample_s", "grid", "checkpoint"):
            if k in e:
                row[k] = e[k]
    res = {"key": tr["key"], "arm": asdict(arm) | {"label": arm.label}, "seed": seed,
           "train_wall_s": tr["train_wall_s"], "final_step": tr["final_step"], "step_time_s": tr.get("step_time_s"),
           "metrics": tr["metrics"], "evals": [by_step[s] for s in sorted(by_step)], "run_dir": str(rd)}
    atomic_write_json(rd / "bench.json", res, indent=None, default=float)
    return res


# -- driver ----------------------------------------------------------------------------------------------------------
def _pool(workers: int) -> ProcessPoolExecutor:
    return ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"))


def run_plan(plan: Plan, root: Path, workers: int = 2, log=print, started: float | None = None,
             deadline: bool = True) -> dict:
    """Run every job not yet done; extras only while the projected end stays inside the plan's deadline, counted
    from ``started`` (time.time() of the start of make bench; default now)."""
    root.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("OMP_NUM_THREADS", str(plan.threads))
    started = time.time() if started is None else started
    jobs, _, _ = plan_jobs(plan)
    done = {j for j in jobs if job_done(plan, j, root)}
    sched = Scheduler(plan, workers, done, plan.deadline_s if deadline else None)
    t_pool = time.perf_counter()
    toks, timings, failed = {}, {"tokenizers_s": {}, "mappings_s": 0.0}, []

    def elapsed() -> float:
        return time.time() - started

    log(f"{len(jobs) - len(done)} of {len(jobs)} jobs to run; projected end "
        f"{elapsed() + sched.projected(elapsed()):.0f} s after the start"
        + (f" (deadline for extras {plan.deadline_s:.0f} s)" if sched.deadline_s else ""), flush=True)
    with _pool(workers) as pool:
        futs: dict = {}
        while True:
            while len(futs) < workers and (job := sched.pick(elapsed())) is not None:
                futs[pool.submit(run_job, plan, job, str(root))] = job
            if not futs:
                break
            for f in wait(futs, return_when=FIRST_COMPLETED)[0]:
                job = futs.pop(f)
                try:
                    r = f.result()
                except Exception as e:  # one broken job must not throw away the others' hours
                    failed.append(f"{job}: {type(e).__name__}: {e}")
                    log(f"FAILED {failed[-1]}", flush=True)
                    sched.finish(job, ok=False)
                    continue
                if job.kind == "tokenizer":
                    toks[job.tokenizer] = r
                    timings["tokenizers_s"][job.tokenizer] = r["wall_s"]
                    t1 = time.perf_counter()  # trees and mappings once, here, so no two workers race to build them
                    coarse_mappings(plan, job.tokenizer, root)
                    timings["mappings_s"] += round(time.perf_counter() - t1, 1)
                elif job.kind == "reference":
                    timings["reference_s"] = r["job_wall_s"]
                else:
                    assemble(plan, plan.arm(job.tokenizer, job.label), job.seed, root)
                sched.finish(job)
                what = f"FID {r['fid']:.2f}" if job.kind == "score" else f"{r.get('job_wall_s')} s"
                log(f"[{time.strftime('%H:%M:%S')}] {job}: {what} ({len(sched.done)}/{len(jobs)} done, "
                    f"{elapsed() / 60:.0f} min)", flush=True)
    timings["pool_s"] = round(time.perf_counter() - t_pool, 1)
    results = [r for arm in plan.arms for s in arm.seeds if (r := assemble(plan, arm, s, root))]
    summary = {"plan": asdict(plan), "tokenizers": toks, "timings": timings, "workers": workers,
               "estimate": estimate(plan, workers), "deadline_s": sched.deadline_s,
               "admitted": [unit_name(u) for u in sched.admitted],
               "skipped": [unit_name(u) for u in sched.skipped], "failed": failed,
               "blocked": [str(j) for j in sched.blocked], "results": [str(Path(r["run_dir"]) / "bench.json")
                                                                      for r in results]}
    (root / "convergence.json").write_text(json.dumps(summary, indent=2, default=str))
    if sched.skipped:
        log("left out by the deadline: " + "; ".join(unit_name(u) for u in sched.skipped), flush=True)
    if failed:
        raise SystemExit("jobs failed (their results are missing from the report):\n" + "\n".join(failed))
    return summary


def describe_estimate(plan: Plan, workers: int = 2) -> str:
    e, core = estimate(plan, workers), estimate(plan, workers, deadline_s=0)
    built = estimate(plan, workers, deadline_s=0, tokenizers_built=True)
    w = core["worker_s"]
    return (f"{plan.name} plan on {workers} workers: {e['total_s'] / 3600:.2f} h in all, core "
            f"{core['total_s'] / 3600:.2f} h ({built['total_s'] / 3600:.2f} h with the tokenizers built); core "
            f"training {w.get('train', 0):,.0f} and scoring {w.get('score', 0):,.0f} worker-seconds; extras admitted: "
            f"{', '.join(e['admitted']) or 'none'}; left out: {', '.join(e['skipped']) or 'none'}")
