"""Training-step time and peak memory, head=masc (k-way) vs head=flat (N-way), same GPT otherwise.

    python benchmarks/bench_train_step.py [--model GPT-micro] [--vocab 1024] [--k 512 256] [--batch 64] [--grid 8]
                                          [--steps 20] [--device auto|cpu|cuda] [--quick] [--json PATH]

The only difference between heads is the size of the token table and output layer, so this isolates what a
coarse vocabulary saves per step (it does not measure convergence; see docs/benchmarks.md for that).

Each configuration runs in a fresh subprocess, so one's allocations cannot hide another's peak. On CPU the peak
is ru_maxrss above the process's peak after imports and one tiny warm-up step (model, optimizer state and
activations count; torch and the kernels it pages in on first use do not); on CUDA it is
torch.cuda.max_memory_allocated() (tensors only, not the CUDA context).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from masc_llamagen.models.gpt import GPT, gpt_config

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))
from measure import machine, peak_mib, resolve_device, sync  # noqa: E402


def train_steps(arch: str, vocab: int, batch: int, grid: int, steps: int, device: str) -> tuple[list[float], int]:
    torch.manual_seed(0)
    model = GPT(gpt_config(arch, vocab_size=vocab, block_size=grid * grid, num_classes=10)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokens = torch.randint(0, vocab, (batch, grid * grid), device=device)
    labels = torch.randint(0, 10, (batch,), device=device)
    times = []
    for i in range(steps + 2):  # two warm-up steps: allocator, kernels and AdamW state
        sync(device)
        t0 = time.perf_counter()
        logits, _ = model(tokens[:, :-1], labels)
        F.cross_entropy(logits.reshape(-1, vocab), tokens.reshape(-1)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return times, model.num_params()


def worker(arch: str, vocab: int, batch: int, grid: int, steps: int, device: str) -> dict:
    train_steps("GPT-nano", 16, 1, 2, 0, device)  # pages in lazily loaded kernels (~170 MiB RSS) before the baseline
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    base = peak_mib(device)
    times, params = train_steps(arch, vocab, batch, grid, steps, device)
    times.sort()
    return {"step_s": times[len(times) // 2], "params": params, "peak_mib": peak_mib(device) - base,
            "baseline_mib": base}


def run(args, vocab: int) -> dict:
    cmd = [sys.executable, str(HERE), "--worker", "--model", args.model, "--vocab", str(vocab), "--batch",
           str(args.batch), "--grid", str(args.grid), "--steps", str(args.steps), "--device", args.device]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise SystemExit(f"worker vocab={vocab} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="GPT-micro")
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--k", type=int, nargs="+", default=[512, 256])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--grid", type=int, default=8)
    ap.add_argument("--steps", type=int, default=None, help="timed steps, median reported (default 20, --quick 5)")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--quick", action="store_true", help="5 steps: a smoke run")
    ap.add_argument("--json", help="also write machine, arguments and rows here")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.device = resolve_device(ap, args.device)
    if args.steps is None:
        args.steps = 5 if args.quick else 20
    if args.worker:
        print(json.dumps(worker(args.model, args.vocab, args.batch, args.grid, args.steps, args.device)))
        return
    mach = machine(args.device)
    mem = "cuda max_memory_allocated" if args.device == "cuda" else "ru_maxrss above post-import, post-warm-up peak"
    print(f"{args.model}, batch {args.batch}, {args.grid}x{args.grid} tokens, fp32, torch {torch.__version__}, "
          f"{mach['device_name']} ({args.device}, {mach['threads']} threads, {mach['cpu_count']} CPUs); "
          f"median of {args.steps} steps; peak = {mem}, one subprocess per row", flush=True)
    tok = args.batch * args.grid * args.grid
    rows = []
    for head, vocab in [("flat", args.vocab)] + [("masc", k) for k in args.k]:
        r = run(args, vocab)
        rows.append({"head": head, "vocab_rows": vocab, "params": r["params"], "step_ms": r["step_s"] * 1e3,
                     "tokens_per_s": tok / r["step_s"], "peak_mib": r["peak_mib"], "baseline_mib": r["baseline_mib"]})
    for r in rows:
        r["time_vs_flat"] = r["step_ms"] / rows[0]["step_ms"]
    print("| head | vocab rows | step ms | tokens/s | time vs flat | peak MiB |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['head']} | {r['vocab_rows']} | {r['step_ms']:.1f} | {r['tokens_per_s']:,.0f} | "
              f"{r['time_vs_flat']:.2f} | {r['peak_mib']:.0f} |")
    if args.json:
        kept = {k: v for k, v in vars(args).items() if k != "worker"}
        out = {"benchmark": "train_step", "machine": mach, "args": kept, "tokens_per_step": tok, "memory": mem,
               "rows": rows}
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
