"""Shared set-up for training tests: a random tiny tokenizer, synthetic codes in the packed format, a composed cfg."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from masc_llamagen.config import register
from masc_llamagen.data.codes import save_codes
from masc_llamagen.tokenizer.vq import VQ_CONFIGS, VQConfig, VQModel
from masc_llamagen.weights import save_weights, tokenizer_fingerprint

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def make_assets(root: Path, codebook_size: int = 64, images: int = 96, grid: int = 4, classes: int = 4) -> dict:
    """A random VQ (small codebook) and structured synthetic codes that carry its fingerprint."""
    torch.manual_seed(0)
    cfg = VQConfig.from_dict({**VQ_CONFIGS["VQ-tiny"].to_dict(), "codebook_size": codebook_size})
    vq = VQModel(cfg)
    tok = root / "vq.safetensors"
    save_weights(tok, vq, cfg, kind="vq")
    rng = np.random.default_rng(0)
    labels = rng.integers(0, classes, images)
    # class-dependent token statistics, so there is something to learn
    base = rng.integers(0, codebook_size, (classes, grid * grid))
    noise = rng.integers(0, codebook_size, (images, 2, grid * grid))
    keep = rng.random((images, 2, grid * grid)) < 0.7
    codes = np.where(keep, base[labels][:, None, :], noise)
    codes_dir = root / "codes"
    save_codes(codes_dir, codes, labels, codebook_size=codebook_size, grid=(grid, grid), num_classes=classes,
               variants=["center", "hflip"], tokenizer={"fingerprint": tokenizer_fingerprint(vq),
                                                        "checkpoint": str(tok)})
    return {"tokenizer": tok, "codes": codes_dir}


def compose_cfg(root: Path, assets: dict, overrides: list[str] = (), run: str = "run"):
    register()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIGS)):
        cfg = compose("train", overrides=["model=gpt_nano", "train=cpu", "logger=none",
                                          f"paths.output_dir={root / run}", *overrides])
    with open_dict(cfg):
        cfg.tokenizer.checkpoint = str(assets["tokenizer"])
        cfg.data.codes = str(assets["codes"])
        cfg.paths.root = str(root)
        cfg.paths.artifacts = str(root / "artifacts")
        cfg.paths.runs = str(root / "runs")
    return cfg
