"""GPU throughput and memory check (one call, torch only: runs where Hydra/W&B are not installed).

    python scripts/gpu_check.py [--models GPT-B GPT-XL] [--batch 32] [--steps 10]

For each model, head (flat: vocab 16384; masc: k = 8192) and torch.compile on/off: bf16 training-step tokens/s,
MFU and peak memory, then KV-cached sampling tokens/s (CFG 2.0, 256 tokens). Prints one markdown table.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from masc_llamagen.models.gpt import GPT, gpt_config
from masc_llamagen.models.sampling import SamplingConfig, generate
from masc_llamagen.train.throughput import flops_per_token, peak_flops


def train_step_rate(arch: str, vocab: int, batch: int, steps: int, compile_: bool) -> dict:
    torch.manual_seed(0)
    dev = torch.device("cuda")
    cfg = gpt_config(arch, vocab_size=vocab, block_size=256, num_classes=1000)
    model = GPT(cfg).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05, fused=True)
    fwd = torch.compile(model) if compile_ else model
    tokens = torch.randint(0, vocab, (batch, 256), device=dev)
    labels = torch.randint(0, 1000, (batch,), device=dev)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits, _ = fwd(tokens[:, :-1], labels)
        loss = F.cross_entropy(logits.reshape(-1, vocab), tokens.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):  # warm-up (and compilation)
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    n_params = sum(p.numel() for p in model.parameters())
    tps = batch * 256 / dt
    peak = peak_flops(dev)
    return {"tok_s": tps, "mfu": tps * flops_per_token(cfg, n_params) / peak if peak else float("nan"),
            "mem_gb": torch.cuda.max_memory_allocated() / 2**30, "step_ms": dt * 1e3}


def sample_rate(arch: str, vocab: int, batch: int) -> float:
    torch.manual_seed(0)
    model = GPT(gpt_config(arch, vocab_size=vocab, block_size=256, num_classes=1000, zero_init_head=False)).cuda()
    labels = torch.randint(0, 1000, (batch,))
    sc = SamplingConfig(cfg_scale=2.0)
    generate(model, labels, 16, sc, dtype=torch.bfloat16)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    generate(model, labels, 256, sc, dtype=torch.bfloat16)
    torch.cuda.synchronize()
    return batch * 256 / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["GPT-B", "GPT-XL"])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--no-compile", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_check needs a CUDA device")
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, batch {args.batch}, bf16, 256 tokens")
    print("| model | head | compile | step ms | train tok/s | MFU | peak GB | sample tok/s (CFG 2, bs 32) |")
    print("|---|---|---|---|---|---|---|---|")
    for arch in args.models:
        for head, vocab in (("flat", 16384), ("masc k=8192", 8192)):
            srate = sample_rate(arch, vocab, 32)
            for comp in ([False] if args.no_compile else [False, True]):
                r = train_step_rate(arch, vocab, args.batch, args.steps, comp)
                print(f"| {arch} | {head} | {comp} | {r['step_ms']:.0f} | {r['tok_s']:,.0f} | {r['mfu']:.1%} | "
                      f"{r['mem_gb']:.1f} | {srate:,.0f} |", flush=True)
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
