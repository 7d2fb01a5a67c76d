"""Sampling throughput and peak memory: static KV cache vs recomputing the whole prefix every step, CFG off and on.

    python benchmarks/bench_sampling.py [--model GPT-micro] [--grid 16] [--batch 8] [--cfg 2.0] [--repeats 3]
                                        [--bf16] [--device auto|cpu|cuda] [--quick] [--json PATH]

Prints a markdown table (tokens/s = generated image tokens per second, CFG's doubled batch not counted twice).

Each (cfg, KV/full) configuration runs in a fresh subprocess, so one's allocations cannot hide another's peak. On
CPU the peak is ru_maxrss above the process's peak after imports and one tiny warm-up generation (weights, caches
and activations count; torch and the kernels it pages in on first use do not); on CUDA it is
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

from masc_llamagen.models.gpt import GPT, gpt_config
from masc_llamagen.models.sampling import SamplingConfig, generate

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))
from measure import machine, peak_mib, resolve_device, sync  # noqa: E402


def make_model(arch: str, vocab: int, grid: int, device: str) -> GPT:
    torch.manual_seed(0)
    cfg = gpt_config(arch, vocab_size=vocab, block_size=grid**2, num_classes=10, zero_init_head=False)
    return GPT(cfg).eval().to(device)


def time_generate(model, labels, n, sc, use_cache, repeats, dtype):
    device = labels.device
    times = []
    for r in range(repeats + 1):  # first run warms up allocators and kernels
        gen = torch.Generator(device=device).manual_seed(r)
        sync(device.type)
        t0 = time.perf_counter()
        generate(model, labels, n, sc, generator=gen, use_cache=use_cache, dtype=dtype)
        sync(device.type)
        times.append(time.perf_counter() - t0)
    return min(times[1:])


def worker(args, cfg_scale: float, use_cache: bool) -> dict:
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    sc = SamplingConfig(cfg_scale=cfg_scale, temperature=1.0)
    tiny = make_model("GPT-nano", 16, 2, args.device)  # pages in lazily loaded kernels before the baseline
    generate(tiny, torch.arange(2, device=args.device), 4, sc, use_cache=use_cache, dtype=dtype)
    del tiny
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    base = peak_mib(args.device)
    model = make_model(args.model, args.vocab, args.grid, args.device)
    labels = torch.arange(args.batch, device=args.device) % 10
    t = time_generate(model, labels, args.grid**2, sc, use_cache, args.repeats, dtype)
    return {"seconds": t, "params": model.num_params(), "peak_mib": peak_mib(args.device) - base, "baseline_mib": base}


def run(args, cfg_scale: float, use_cache: bool) -> dict:
    cmd = [sys.executable, str(HERE), "--worker", "--model", args.model, "--grid", str(args.grid), "--vocab",
           str(args.vocab), "--batch", str(args.batch), "--cfg", str(cfg_scale), "--repeats", str(args.repeats),
           "--device", args.device] + (["--bf16"] if args.bf16 else []) + ([] if use_cache else ["--no-cache"])
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise SystemExit(f"worker cfg={cfg_scale} use_cache={use_cache} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="GPT-micro")
    ap.add_argument("--grid", type=int, default=None, help="grid x grid tokens per image (default 16, --quick 8)")
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--cfg", type=float, default=2.0, help="guidance scale of the CFG-on rows (CFG off is 1)")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs, best reported (default 3, --quick 1)")
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--quick", action="store_true", help="grid 8 and 1 repeat: a smoke run")
    ap.add_argument("--json", help="also write machine, arguments and rows here")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--no-cache", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.device = resolve_device(ap, args.device)
    if args.grid is None:
        args.grid = 8 if args.quick else 16
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    if args.worker:
        print(json.dumps(worker(args, args.cfg, not args.no_cache)))
        return
    mach = machine(args.device)
    mem = "cuda max_memory_allocated" if args.device == "cuda" else "ru_maxrss above post-import, post-warm-up peak"
    n = args.grid**2
    rows = []
    for cfg_scale in sorted({1.0, args.cfg}):
        for use_cache in (True, False):
            r = run(args, cfg_scale, use_cache)
            rows.append({"cfg_scale": cfg_scale, "mode": "kv" if use_cache else "full", "seconds": r["seconds"],
                         "tokens_per_s": args.batch * n / r["seconds"], "peak_mib": r["peak_mib"],
                         "baseline_mib": r["baseline_mib"]})
        kv, full = rows[-2:]
        kv["speedup"] = full["seconds"] / kv["seconds"]
        full["speedup"] = 1.0
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    print(f"model {args.model} ({r['params'] / 1e6:.2f}M params, vocab {args.vocab}), {args.grid}x{args.grid} "
          f"tokens, batch {args.batch}, {dtype}, torch {torch.__version__}, {mach['device_name']} ({args.device}, "
          f"{mach['threads']} threads, {mach['cpu_count']} CPUs); best of {args.repeats}; peak = {mem}, one "
          "subprocess per cell")
    print("| cfg | KV cache tok/s | full recompute tok/s | speed-up | KV cache peak MiB | full recompute peak MiB |")
    print("|---|---|---|---|---|---|")
    for kv, full in zip(rows[::2], rows[1::2], strict=True):
        print(f"| {kv['cfg_scale']:g} | {kv['tokens_per_s']:,.0f} | {full['tokens_per_s']:,.0f} | "
              f"{kv['speedup']:.1f}x | {kv['peak_mib']:.0f} | {full['peak_mib']:.0f} |")
    if args.json:
        kept = {k: v for k, v in vars(args).items() if k not in ("worker", "no_cache")}
        out = {"benchmark": "sampling", "machine": mach, "args": kept, "params": r["params"], "tokens_per_image": n,
               "memory": mem, "rows": rows}
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
