"""Sampling throughput and peak memory: static KV cache vs recomputing the whole prefix every step, CFG off and on.

    python benchmarks/bench_sampling.py [model=GPT-micro] [grid=16] [batch=8] [cfg=2.0] [repeats=3] [bf16=true]
                                        [device=auto|cpu|cuda] [quick=true] [json=PATH]

Prints a markdown table (tokens/s = generated image tokens per second, CFG's doubled batch not counted twice).

Each (cfg, KV/full) configuration runs in a fresh subprocess, so one's allocations cannot hide another's peak. On
CPU the peak is ru_maxrss above the process's peak after imports and one tiny warm-up generation (weights, caches
and activations count; torch and the kernels it pages in on first use do not); on CUDA it is
torch.cuda.max_memory_allocated() (tensors only, not the CUDA context).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import hydra
import torch
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from masc_llamagen.errors import user_errors
from masc_llamagen.models.gpt import GPT, gpt_config
from masc_llamagen.models.sampling import SamplingConfig, generate

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))
from isolated import in_fresh_process  # noqa: E402
from measure import machine, peak_mib, resolve_device, sync  # noqa: E402


@dataclass
class SamplingBench:
    """configs/bench/sampling.yaml only keeps Hydra from making output folders."""

    model: str = "GPT-micro"
    grid: int | None = None  # grid x grid tokens per image; null: 16 (quick: 8)
    vocab: int = 1024
    batch: int = 8
    cfg: float = 2.0  # guidance scale of the CFG-on rows (CFG off is 1)
    repeats: int | None = None  # timed runs, best reported; null: 3 (quick: 1)
    bf16: bool = False
    device: str = "auto"  # auto | cpu | cuda
    quick: bool = False  # grid 8 and 1 repeat: a smoke run
    json: str | None = None  # also write machine, arguments and rows here


ConfigStore.instance().store(name="base_bench_sampling", node=SamplingBench)


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


def worker(args: dict, cfg_scale: float, use_cache: bool) -> dict:
    """One (cfg, KV/full) cell, in its own process (see :func:`run`)."""
    args = SamplingBench(**args)
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


def run(args: SamplingBench, cfg_scale: float, use_cache: bool) -> dict:
    return in_fresh_process("bench_sampling", "worker", args=asdict(args), cfg_scale=cfg_scale, use_cache=use_cache)


def resolve(args: SamplingBench) -> SamplingBench:
    """The quick and device defaults filled in."""
    return replace(args, device=resolve_device(args.device),
                   grid=args.grid if args.grid is not None else 8 if args.quick else 16,
                   repeats=args.repeats if args.repeats is not None else 1 if args.quick else 3)


def measure(args: SamplingBench) -> None:
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
        out = {"benchmark": "sampling", "machine": mach, "args": asdict(args), "params": r["params"],
               "tokens_per_image": n, "memory": mem, "rows": rows}
        Path(args.json).write_text(json.dumps(out, indent=1))


@hydra.main(version_base="1.3", config_path=str(HERE.parents[1] / "configs" / "bench"), config_name="sampling")
def main(cfg: DictConfig) -> None:
    with user_errors():
        measure(resolve(OmegaConf.to_object(cfg)))


if __name__ == "__main__":
    main()
