"""CPU training-step time, head=masc (k-way) vs head=flat (N-way), same GPT otherwise.

    python benchmarks/bench_train_step.py [--model GPT-micro] [--vocab 1024] [--k 512 256] [--batch 32] [--grid 8]

The only difference between heads is the size of the token table and output layer, so this isolates what a
coarse vocabulary saves per step (it does not measure convergence; see docs/benchmarks.md for that).
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
import torch.nn.functional as F

from masc_llamagen.models.gpt import GPT, gpt_config


def step_time(arch: str, vocab: int, batch: int, grid: int, steps: int) -> float:
    torch.manual_seed(0)
    model = GPT(gpt_config(arch, vocab_size=vocab, block_size=grid * grid, num_classes=10))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokens = torch.randint(0, vocab, (batch, grid * grid))
    labels = torch.randint(0, 10, (batch,))
    times = []
    for i in range(steps + 2):
        t0 = time.perf_counter()
        logits, _ = model(tokens[:, :-1], labels)
        F.cross_entropy(logits.reshape(-1, vocab), tokens.reshape(-1)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="GPT-micro")
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--k", type=int, nargs="+", default=[512, 256])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--grid", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args(argv)
    print(f"{args.model}, batch {args.batch}, {args.grid}x{args.grid} tokens, fp32, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {platform.machine()}; median of {args.steps} steps")
    base = step_time(args.model, args.vocab, args.batch, args.grid, args.steps)
    print("| head | vocab rows | step ms | tokens/s | time vs flat |")
    print("|---|---|---|---|---|")
    tok = args.batch * args.grid * args.grid
    print(f"| flat | {args.vocab} | {base * 1e3:.1f} | {tok / base:,.0f} | 1.00 |")
    for k in args.k:
        t = step_time(args.model, k, args.batch, args.grid, args.steps)
        print(f"| masc | {k} | {t * 1e3:.1f} | {tok / t:,.0f} | {t / base:.2f} |")


if __name__ == "__main__":
    main()
