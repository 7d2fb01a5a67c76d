"""CPU sampling throughput: static KV cache vs recomputing the whole prefix every step.

    python benchmarks/bench_sampling.py [--model GPT-micro] [--grid 16] [--batch 8] [--cfg 2.0] [--repeats 3]

Prints a markdown table (tokens/s = generated image tokens per second, CFG's doubled batch not counted twice).
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from masc_llamagen.models.gpt import GPT, gpt_config
from masc_llamagen.models.sampling import SamplingConfig, generate


def time_generate(model, labels, n, sc, use_cache, repeats, dtype):
    times = []
    for r in range(repeats + 1):  # first run warms up allocators and kernels
        t0 = time.perf_counter()
        generate(model, labels, n, sc, generator=torch.Generator().manual_seed(r), use_cache=use_cache, dtype=dtype)
        times.append(time.perf_counter() - t0)
    return min(times[1:])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="GPT-micro")
    ap.add_argument("--grid", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--cfg", type=float, default=2.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--bf16", action="store_true")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    cfg = gpt_config(args.model, vocab_size=args.vocab, block_size=args.grid**2, num_classes=10, zero_init_head=False)
    model = GPT(cfg).eval()
    labels = torch.arange(args.batch) % 10
    n = args.grid**2
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    rows = []
    for cfg_scale in sorted({1.0, args.cfg}):
        sc = SamplingConfig(cfg_scale=cfg_scale, temperature=1.0)
        t_cache = time_generate(model, labels, n, sc, True, args.repeats, dtype)
        t_full = time_generate(model, labels, n, sc, False, args.repeats, dtype)
        rows.append((cfg_scale, args.batch * n / t_cache, args.batch * n / t_full, t_full / t_cache))
    print(f"model {args.model} ({model.num_params() / 1e6:.2f}M params, vocab {args.vocab}), {args.grid}x{args.grid} "
          f"tokens, batch {args.batch}, {dtype}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"{platform.processor() or platform.machine()}; best of {args.repeats}")
    print("| cfg | KV cache tok/s | full recompute tok/s | speed-up |")
    print("|---|---|---|---|")
    for cfg_scale, a, b, r in rows:
        print(f"| {cfg_scale:g} | {a:,.0f} | {b:,.0f} | {r:.1f}x |")


if __name__ == "__main__":
    main()
