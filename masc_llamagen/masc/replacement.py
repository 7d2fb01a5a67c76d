"""The semantic replacement test (the paper's tree-quality diagnostic), for any mapping side by side.

Encode real images, replace every token by a random member of its cluster, decode, and compare with the plain
reconstruction (PSNR/SSIM). A mapping whose clusters hold interchangeable tokens degrades the image little.

    python -m masc_llamagen.masc.replacement TOKENIZER --k 512 [--methods masc,kmeans,random] [--images 500]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from masc_llamagen.masc.heads import build_vocabulary
from masc_llamagen.tokenizer.metrics import DATA_RANGE, images_to_uint8, ssim


@torch.no_grad()
def replacement_scores(vq, images: torch.Tensor, mapping: np.ndarray, seed: int = 0, batch_size: int = 250) -> dict:
    """PSNR/SSIM of member-replaced decodes against plain reconstructions of ``images`` (B, 3, H, W).

    PSNR is over the whole set (from the mean squared error of all pixels), so an image whose tokens all sit in
    singleton clusters (identical decode, infinite per-image PSNR) does not make the mean infinite.
    """
    voc = build_vocabulary("replacement", int(mapping.shape[0]), mapping)
    g = torch.Generator().manual_seed(seed)
    sq, px, ss, changed = 0.0, 0, [], 0.0
    for s in range(0, images.shape[0], batch_size):
        x = images[s : s + batch_size]
        idx = vq.encode(x)
        plain = vq.decode_code(idx)
        swapped = voc.decode(voc.encode(idx), generator=g)
        changed += (swapped != idx).float().sum().item()
        a, b = images_to_uint8(vq.decode_code(swapped)), images_to_uint8(plain)
        sq += (a.double() - b.double()).pow(2).sum().item()
        px += a.numel()
        ss.append(ssim(a, b))
    n_tokens = images.shape[0] * idx[0].numel()
    mse = sq / px
    return {"psnr": float("inf") if mse == 0 else 10 * np.log10(DATA_RANGE**2 / mse),
            "ssim": torch.cat([q.reshape(-1) for q in ss]).mean().item(),
            "tokens_changed": changed / n_tokens}


def compare(tokenizer: str, k: int, methods: list[str], dataset: str = "fashion_mnist", split: str | None = None,
            n_images: int = 500, seed: int = 0, tokenizer_arch: str | None = None) -> dict:
    from masc_llamagen.checkpoint import load_vq
    from masc_llamagen.data.images import build_image_dataset, heldout_split
    from masc_llamagen.masc.mappings import build_mapping

    vq = load_vq(tokenizer, tokenizer_arch)
    codebook = vq.quantize.embedding.weight.detach().float().numpy()
    ds = build_image_dataset(dataset, split or heldout_split(dataset))
    images = torch.stack([ds[i][0] for i in range(min(n_images, len(ds)))])
    out = {}
    for m in methods:
        mapping = build_mapping(m, codebook, k, seed=seed)
        out[m] = {**replacement_scores(vq, images, mapping, seed), "max_cluster": int(np.bincount(mapping).max()),
                  "singletons": int((np.bincount(mapping) == 1).sum())}
    return {"tokenizer": tokenizer, "k": k, "n": int(codebook.shape[0]), "images": int(images.shape[0]),
            "dataset": dataset, "results": out}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m masc_llamagen.masc.replacement", description=__doc__.splitlines()[0])
    ap.add_argument("tokenizer")
    ap.add_argument("--k", type=int, required=True)
    ap.add_argument("--methods", default="masc,kmeans,random")
    ap.add_argument("--dataset", default="fashion_mnist")
    ap.add_argument("--images", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--arch", default=None, help="VQ config name for tokenizer files without one (e.g. VQ-16)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    res = compare(args.tokenizer, args.k, args.methods.split(","), args.dataset, None, args.images, args.seed,
                  args.arch)
    print(f"semantic replacement on {res['images']} {res['dataset']} images, N={res['n']}, k={res['k']}")
    print("| mapping | PSNR vs recon (dB) | SSIM | tokens changed | largest cluster | singletons |")
    print("|---|---|---|---|---|---|")
    for m, r in res["results"].items():
        print(f"| {m} | {r['psnr']:.2f} | {r['ssim']:.4f} | {r['tokens_changed']:.1%} | {r['max_cluster']} | "
              f"{r['singletons']} |")
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
