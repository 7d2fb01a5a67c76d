"""Training-step time and peak memory at the paper's shapes: head=flat (N-way) vs head=masc (k-way), same GPT otherwise.

    python benchmarks/bench_train_step.py [model=GPT-B] [vocab=16384] [k=[8192,4096]] [grid=16] [batch=8]
                                          [steps=5] [layers=N] [parts=[head,step]] [amp=auto|bf16|none]
                                          [device=auto|cpu|cuda] [quick=true] [json=PATH]

The heads differ only in the size of the token table and the output layer, so two parts are measured per vocabulary:

* ``head``: the output layer and the cross-entropy alone, forward and backward: hidden states (batch, grid^2, dim)
  -> logits (batch, grid^2, vocab), cast to float32 as GPT.forward does -> mean cross-entropy -> gradients of the
  weight and of the hidden states. Always at the model's real width and the real vocabulary sizes.
* ``step``: one whole optimizer step of the GPT (forward with loss, backward, clip, AdamW), with ``layers``
  transformer blocks (default: the model's; ``quick`` uses 2 so that GPT-B width and vocab fit a small CPU).

Defaults are the paper's: GPT-B (dim 768), 16 x 16 tokens (256 targets; 256 positions = class token + 255 inputs),
vocabulary 16384 (flat) vs k = 8192 and 4096 (masc), 1000 classes. Median step time over ``steps`` timed steps
after ``warmup`` (2; quick 1) warm-ups. tokens/s counts target tokens (batch x grid^2), as train/tokens_per_s
does.

Memory, one fresh subprocess per row so that no row's allocations hide another's peak:

* CUDA: torch.cuda.max_memory_allocated() over the warm-up and timed steps minus memory_allocated() before them
  (tensors only, not the CUDA context or the allocator's cache);
* CPU: ru_maxrss after the steps minus the resident set (/proc/self/statm) before them, in a process that first ran
  a tiny warm-up so that torch's lazily loaded kernels do not count, with glibc's mmap threshold pinned at 64 KiB
  (MALLOC_MMAP_THRESHOLD_): every large tensor is then its own mapping, returned when freed, so the resident set
  follows the live tensors (checked: the head rows scale with the vocabulary) instead of heap fragmentation.

``head`` rows count what the output layer and the loss allocate beyond their inputs (the hidden states and the
weight exist before): logits, their float32 copy, softmax buffers, the gradients. ``step`` rows count the model,
its gradients, the AdamW state and the activations. The ``fp32 logits MiB`` column is batch x grid^2 x vocab x 4
bytes, computed: one float32 logits tensor, the quantity a coarse head shrinks. MFU (CUDA only, for devices with a
known bf16 peak in masc_llamagen.train.throughput) uses 6 x dim x vocab FLOPs per token for ``head`` rows and
flops_per_token for ``step`` rows. scripts/gpu_check.py runs this script on CUDA and puts its rows in its table.
"""

from __future__ import annotations

import json
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import hydra
import torch
import torch.nn.functional as F
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from masc_llamagen.errors import ConfigError, user_errors
from masc_llamagen.models.gpt import GPT, gpt_config
from masc_llamagen.train.throughput import flops_per_token, peak_flops

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))
from isolated import in_fresh_process  # noqa: E402
from measure import current_mib, machine, peak_mib, reset_peak, resolve_device, sync  # noqa: E402

PARTS = ("head", "step")
NUM_CLASSES = 1000
CPU_WORKER_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


@dataclass
class TrainStepBench:
    """configs/bench/train_step.yaml only keeps Hydra from making output folders."""

    model: str = "GPT-B"  # masc_llamagen.models.gpt.GPT_CONFIGS name (width, heads)
    vocab: int = 16384  # flat vocabulary (the codebook size)
    k: list[int] = field(default_factory=lambda: [8192, 4096])  # coarse vocabulary sizes
    grid: int = 16  # tokens per side
    batch: int | None = None  # images per step; null: 8 (quick: 2)
    steps: int | None = None  # timed steps, median reported; null: 5 (quick: 1)
    warmup: int | None = None  # untimed steps first; null: 2 (quick: 1)
    layers: int | None = None  # transformer blocks in the step part; null: the model's (quick: 2)
    parts: list[str] = field(default_factory=lambda: list(PARTS))
    amp: str = "auto"  # bf16 autocast: auto (on CUDA only; CPU runs float32) | bf16 | none
    device: str = "auto"  # auto | cpu | cuda
    quick: bool = False  # batch 2, 1 warm-up + 1 timed step, 2 layers in the step part: a smoke run
    json: str | None = None  # also write machine, arguments and rows here


ConfigStore.instance().store(name="base_bench_train_step", node=TrainStepBench)


def autocast(device: str, amp: str):
    return torch.autocast(device, dtype=torch.bfloat16) if amp == "bf16" else nullcontext()


def _timed(step, steps: int, device: str, warmup: int) -> tuple[list[float], float]:
    """Run ``step`` warmup + steps times; per-step seconds of the timed ones and the peak MiB above the start."""
    sync(device)
    reset_peak(device)
    base = current_mib(device)
    times = []
    for i in range(warmup + steps):
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times, max(0.0, peak_mib(device) - base)


def head_steps(dim: int, vocab: int, batch: int, seq: int, steps: int, device: str, amp: str = "none",
               warmup: int = 2) -> dict:
    """Output layer + cross-entropy in isolation (see the module docstring); returns times and peak MiB."""
    torch.manual_seed(0)
    weight = (torch.randn(vocab, dim, device=device) * 0.02).requires_grad_()
    hidden = torch.randn(batch, seq, dim, device=device, requires_grad=True)
    targets = torch.randint(0, vocab, (batch, seq), device=device)

    def step():
        with autocast(device, amp):
            logits = F.linear(hidden, weight).float()
        F.cross_entropy(logits.reshape(-1, vocab), targets.reshape(-1)).backward()
        weight.grad = hidden.grad = None

    times, peak = _timed(step, steps, device, warmup)
    return {"times": times, "peak_mib": peak, "params": vocab * dim, "flops_per_token": 6.0 * dim * vocab}


def train_steps(arch: str, vocab: int, batch: int, grid: int, steps: int, device: str, amp: str = "none",
                layers: int | None = None, num_classes: int = NUM_CLASSES, warmup: int = 2) -> dict:
    """Whole optimizer steps of a GPT (forward with loss, backward, clip, AdamW); the model's build counts."""
    torch.manual_seed(0)
    sync(device)
    reset_peak(device)
    base = current_mib(device)
    extra = {"n_layer": layers} if layers else {}
    cfg = gpt_config(arch, vocab_size=vocab, block_size=grid * grid, num_classes=num_classes, **extra)
    model = GPT(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05,
                            fused=device == "cuda")
    tokens = torch.randint(0, vocab, (batch, grid * grid), device=device)
    labels = torch.randint(0, num_classes, (batch,), device=device)

    def step():
        with autocast(device, amp):
            _, loss = model(tokens[:, :-1], labels, targets=tokens)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    times, _ = _timed(step, steps, device, warmup)
    n_params = model.num_params()
    return {"times": times, "peak_mib": max(0.0, peak_mib(device) - base), "params": n_params,
            "flops_per_token": float(flops_per_token(cfg, n_params)), "layers": cfg.n_layer}


def warm_up(device: str) -> None:
    """Page in the kernels both parts use (~170 MiB of RSS on CPU) before any baseline is taken."""
    train_steps("GPT-nano", 16, 1, 2, 0, device, layers=1, num_classes=2, warmup=2)
    head_steps(8, 16, 1, 4, 0, device, warmup=2)


def worker(args: dict, part: str, vocab: int) -> dict:
    """One row, in its own process (see :func:`run_row`)."""
    args = TrainStepBench(**args)
    warm_up(args.device)
    seq = args.grid * args.grid
    if part == "head":
        dim = gpt_config(args.model).dim
        r = head_steps(dim, vocab, args.batch, seq, args.steps, args.device, args.amp, args.warmup)
        r["layers"] = 0
    else:
        r = train_steps(args.model, vocab, args.batch, args.grid, args.steps, args.device, args.amp, args.layers,
                        warmup=args.warmup)
    times = sorted(r.pop("times"))
    r["step_s"] = times[len(times) // 2]
    return r


def run_row(args: TrainStepBench, part: str, vocab: int) -> dict:
    env = {**os.environ, **(CPU_WORKER_ENV if args.device == "cpu" else {})}
    return in_fresh_process("bench_train_step", "worker", env=env, args=asdict(args), part=part, vocab=vocab)


def measure_rows(args: TrainStepBench) -> list[dict]:
    """Every (part, head) row; one subprocess each. The function scripts/gpu_check.py's bench rows come from."""
    tok = args.batch * args.grid * args.grid
    peak = peak_flops(torch.device(args.device)) if args.device == "cuda" else None
    rows = []
    for part in args.parts:
        first = None
        for head, vocab in [("flat", args.vocab)] + [("masc", k) for k in args.k]:
            r = run_row(args, part, vocab)
            tps = tok / r["step_s"]
            row = {"part": part, "head": head, "vocab_rows": vocab, "layers": r["layers"], "params": r["params"],
                   "step_ms": r["step_s"] * 1e3, "tokens_per_s": tps, "peak_mib": r["peak_mib"],
                   "logits_fp32_mib": tok * vocab * 4 / 2**20,
                   "mfu": tps * r["flops_per_token"] / peak if peak else None}
            first = first or row
            row["time_vs_flat"] = row["step_ms"] / first["step_ms"]
            rows.append(row)
            print(f"  {part} {head} {vocab}: {row['step_ms']:.1f} ms", file=sys.stderr, flush=True)
    return rows


def format_table(rows: list[dict]) -> str:
    lines = ["| part | head | vocab rows | layers | step ms | tokens/s | time vs flat | MFU | peak MiB | "
             "fp32 logits MiB |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "n/a"
        lines.append(f"| {r['part']} | {r['head']} | {r['vocab_rows']} | {r['layers'] or '-'} | {r['step_ms']:.1f} | "
                     f"{r['tokens_per_s']:,.0f} | {r['time_vs_flat']:.2f} | {mfu} | {r['peak_mib']:.0f} | "
                     f"{r['logits_fp32_mib']:.0f} |")
    return "\n".join(lines)


def resolve(args: TrainStepBench) -> TrainStepBench:
    """The quick, device and precision defaults filled in."""
    bad = [p for p in args.parts if p not in PARTS] + ([args.amp] if args.amp not in ("auto", "bf16", "none") else [])
    if bad:
        raise ConfigError(f"{', '.join(bad)}: unknown; parts are {'/'.join(PARTS)} and amp is auto, bf16 or none")
    device = resolve_device(args.device)

    def pick(value, quick, default):
        return value if value is not None else quick if args.quick else default

    amp = ("bf16" if device == "cuda" else "none") if args.amp == "auto" else args.amp
    return replace(args, device=device, amp=amp,
                   batch=pick(args.batch, 2, 8), steps=pick(args.steps, 1, 5), warmup=pick(args.warmup, 1, 2),
                   layers=pick(args.layers, 2, None))


def measure(args: TrainStepBench) -> None:
    mach = machine(args.device)
    mem = ("cuda max_memory_allocated minus memory_allocated before the steps" if args.device == "cuda" else
           "ru_maxrss after the steps minus RSS before them (fresh process, after a tiny warm-up, "
           "MALLOC_MMAP_THRESHOLD_=65536)")
    cfg = gpt_config(args.model)
    print(f"{args.model} (dim {cfg.dim}; step part: {args.layers or cfg.n_layer} of {cfg.n_layer} layers), batch "
          f"{args.batch}, {args.grid}x{args.grid} tokens, {'bf16 autocast' if args.amp == 'bf16' else 'fp32'}, "
          f"torch {torch.__version__}, {mach['device_name']} ({args.device}, {mach['threads']} threads, "
          f"{mach['cpu_count']} CPUs); median of {args.steps} steps after {args.warmup} warm-up(s); peak = {mem}; one "
          "subprocess per row", flush=True)
    rows = measure_rows(args)
    print(format_table(rows))
    if args.json:
        out = {"benchmark": "train_step", "machine": mach, "args": asdict(args),
               "tokens_per_step": args.batch * args.grid * args.grid, "memory": mem, "rows": rows}
        Path(args.json).write_text(json.dumps(out, indent=1))


@hydra.main(version_base="1.3", config_path=str(HERE.parents[1] / "configs" / "bench"), config_name="train_step")
def main(cfg: DictConfig) -> None:
    with user_errors():
        measure(resolve(OmegaConf.to_object(cfg)))


if __name__ == "__main__":
    main()
