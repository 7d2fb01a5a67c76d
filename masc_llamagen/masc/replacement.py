"""The semantic replacement test (the paper's tree-quality diagnostic), for any mapping side by side.

Encode real images, replace every token by a random member of its cluster, decode, and compare with the plain
reconstruction (PSNR/SSIM). A mapping whose clusters hold interchangeable tokens degrades the image little.

    python -m masc_llamagen.masc.replacement tokenizer=TOKENIZER k=512 [methods=[masc,kmeans,random]] [images=500]
"""

from __future__ import annotations

from dataclasses import dataclass, field

import hydra
import numpy as np
import torch
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from masc_llamagen.errors import ConfigError, user_errors
from masc_llamagen.masc.mappings import MAPPING_METHODS, build_mapping
from masc_llamagen.masc.vocabulary import build_vocabulary
from masc_llamagen.tokenizer.metrics import DATA_RANGE, ssim
from masc_llamagen.utils.images import to_uint8
from masc_llamagen.utils.io import atomic_write_json


@dataclass
class ReplacementJob:
    tokenizer: str | None = None  # the VQ checkpoint (required)
    k: int | None = None  # clusters of every mapping (required)
    methods: list[str] = field(default_factory=lambda: ["masc", "kmeans", "random"])  # any of MAPPING_METHODS
    dataset: str = "fashion_mnist"  # images from its held-out split
    images: int = 500
    seed: int = 0
    arch: str | None = None  # VQ config name for tokenizer files without one (e.g. VQ-16)
    out: str | None = None  # also write the results as JSON here


ConfigStore.instance().store(name="base_masc_replacement", node=ReplacementJob)
ConfigStore.instance().store(name="masc_replacement", node={
    "defaults": ["base_masc_replacement", "_self_", {"override hydra/job_logging": "none"},
                 {"override hydra/hydra_logging": "none"}],
    "hydra": {"run": {"dir": "."}, "output_subdir": None}})  # a job that writes only the file it is given


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
        a, b = to_uint8(vq.decode_code(swapped)), to_uint8(plain)
        sq += (a.double() - b.double()).pow(2).sum().item()
        px += a.numel()
        ss.append(ssim(a, b))
    n_tokens = images.shape[0] * idx[0].numel()
    mse = sq / px
    return {"psnr": float("inf") if mse == 0 else 10 * np.log10(DATA_RANGE**2 / mse),
            "ssim": torch.cat([q.reshape(-1) for q in ss]).mean().item(),
            "tokens_changed": changed / n_tokens}


def compare(tokenizer: str, k: int, methods: list[str], dataset: str = "fashion_mnist", n_images: int = 500,
            seed: int = 0, tokenizer_arch: str | None = None) -> dict:
    """Every method's mapping of the tokenizer's codebook at k, scored on the dataset's held-out images."""
    from masc_llamagen.data.images import build_image_dataset, heldout_split
    from masc_llamagen.weights import load_vq, vq_codebook

    vq = load_vq(tokenizer, tokenizer_arch)
    codebook = vq_codebook(vq)
    ds = build_image_dataset(dataset, heldout_split(dataset))
    images = torch.stack([ds[i][0] for i in range(min(n_images, len(ds)))])
    out = {}
    for m in methods:
        mapping = build_mapping(m, codebook, k, seed=seed)
        out[m] = {**replacement_scores(vq, images, mapping, seed), "max_cluster": int(np.bincount(mapping).max()),
                  "singletons": int((np.bincount(mapping) == 1).sum())}
    return {"tokenizer": tokenizer, "k": k, "n": int(codebook.shape[0]), "images": int(images.shape[0]),
            "dataset": dataset, "results": out}


def run(job: ReplacementJob) -> dict:
    """Check the job, score every mapping, print the table (and write the JSON)."""
    if job.tokenizer is None or job.k is None:
        raise ConfigError("the replacement test needs tokenizer=PATH and k=K (clusters of every mapping)")
    unknown = [m for m in job.methods if m not in MAPPING_METHODS]
    if unknown or not job.methods:
        raise ConfigError(f"methods={list(job.methods)}: choose one or more of {', '.join(MAPPING_METHODS)}")
    if job.images < 1:
        raise ConfigError(f"images={job.images} must be >= 1")
    res = compare(job.tokenizer, job.k, list(job.methods), job.dataset, job.images, job.seed, job.arch)
    print(f"semantic replacement on {res['images']} {res['dataset']} images, N={res['n']}, k={res['k']}")
    print("| mapping | PSNR vs recon (dB) | SSIM | tokens changed | largest cluster | singletons |")
    print("|---|---|---|---|---|---|")
    for m, r in res["results"].items():
        print(f"| {m} | {r['psnr']:.2f} | {r['ssim']:.4f} | {r['tokens_changed']:.1%} | {r['max_cluster']} | "
              f"{r['singletons']} |")
    if job.out:
        atomic_write_json(job.out, res)
    return res


@hydra.main(version_base="1.3", config_path=None, config_name="masc_replacement")
def main(cfg: DictConfig) -> None:
    with user_errors():
        run(OmegaConf.to_object(cfg))


if __name__ == "__main__":
    main()
