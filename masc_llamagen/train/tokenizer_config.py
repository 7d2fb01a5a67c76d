"""The typed schema of tokenizer training: one dataclass tree that Hydra (``configs/vq_train.yaml``) and Python
callers (``train_tokenizer({...})``) both validate against, so a misspelt key or a wrong type fails before any work.

The defaults are the project's CPU tokenizer (``artifacts/tokenizers/fmnist_vq_tiny``); upstream LlamaGen trains
VQ-16 with Adam (0.9, 0.95), constant lr 1e-4, batch 128 for 40 epochs at 256 px.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from masc_llamagen.config import LoggerSchema
from masc_llamagen.errors import ConfigError
from masc_llamagen.tokenizer.vq import VQConfig, get_vq_config

SCHEMA_NAME = "vq_train_schema"


@dataclass
class VQSchema:
    arch: str = "VQ-tiny"  # a masc_llamagen.tokenizer.vq.VQ_CONFIGS name
    codebook_size: int | None = None  # null: the arch's (VQ-tiny: 1024)
    codebook_embed_dim: int | None = None  # null: the arch's (8)
    commit_loss_beta: float = 0.25  # upstream
    entropy_loss_ratio: float = 0.0
    overrides: dict[str, Any] = field(default_factory=dict)  # any other VQConfig field, e.g. +vq.overrides.ch=64


@dataclass
class VQDataSchema:
    name: str = "fashion_mnist"  # fashion_mnist | imagefolder | twemoji
    split: str = "train"
    heldout_split: str | None = None  # null: the dataset's held-out split (fashion_mnist: test, imagefolder: val)
    image_size: int = 32
    root: str | None = None  # null: masc_llamagen.data.images.default_root
    random_flip: bool = False
    num_workers: int = 0


@dataclass
class VQTrainConfig:
    vq: VQSchema = field(default_factory=VQSchema)
    data: VQDataSchema = field(default_factory=VQDataSchema)
    # Optimisation: a few CPU minutes need a larger lr than upstream's, with warmup and cosine decay. Measured on
    # 2 CPU cores: 600 x 32 images in about 300 s, held-out PSNR 24.8 dB, SSIM 0.83, all 1024 codes used.
    steps: int = 600
    batch_size: int = 32  # images per optimizer step over all processes
    lr: float = 2.0e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    weight_decay: float = 0.0  # AdamW, on >= 2-D tensors only (masc_llamagen.train.optim.build_optimizer)
    warmup_steps: int = 20
    min_lr_ratio: float = 0.05  # cosine decay ends at lr * min_lr_ratio
    grad_clip: float = 1.0  # 0 disables
    # Losses: L2 reconstruction + codebook + commitment (vq.commit_loss_beta); the rest is off by default.
    recon_loss: str = "l2"  # l2 (upstream) | l1
    codebook_weight: float = 1.0
    perceptual_weight: float = 0.0  # > 0 needs pretrained weights (none can be downloaded here)
    perceptual: str = "vgg16"  # a name in masc_llamagen.tokenizer.losses.PERCEPTUAL_LOSSES
    perceptual_weights: str | None = None  # torchvision vgg16 state dict; null: $TORCH_HOME's hub cache
    adversarial_weight: float = 0.0  # PatchGAN hinge loss; upstream 0.5 from step 20k
    disc_start: int = 0  # generator step the discriminator (and its loss) starts at
    disc_lr: float | None = None  # null: lr
    disc_layers: int = 2  # stride-2 conv layers of the PatchGAN (2 for 32 px images, 3 for 256 px)
    disc_ch: int = 64
    disc_adaptive_weight: bool = True  # scale the GAN term by |grad rec| / |grad gan| at the decoder's last layer
    # Dead codes: every reseed_every steps, codes no training batch used since the last check are moved onto random
    # encoder outputs of the current batch (0 disables). MASC clusters the whole codebook, so none may stay dead.
    reseed_every: int = 25
    # Held-out evaluation: PSNR, SSIM, codebook usage/perplexity on the first eval_images of the held-out split, and
    # rFID of reconstructions vs originals on the first rfid_images (0 skips it; needs an rFID scorer and Inception).
    eval_images: int = 2000
    rfid_images: int = 1000
    eval_batch_size: int = 250
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda[:N]; under `accelerate launch` each process takes its own GPU
    num_threads: int | None = None  # torch CPU threads; null: torch's default
    out: str = "${oc.env:MASC_ARTIFACTS,artifacts}/tokenizers/fmnist_vq_tiny.safetensors"
    # Added with Accelerate; they change the weights, so a value other than the default enters the report's record.
    mixed_precision: str = "no"  # no | fp16 | bf16
    # Runtime only: they do not change the result, so the up-to-date check ignores them.
    force: bool = False  # retrain even when <out>.json records this exact config
    progress: bool = True
    resume: bool = True  # continue from the checkpoint in run_dir (false: start over)
    ckpt_every: int = 100  # steps between resumable checkpoints (the last one is removed once <out> is written)
    stop_after: int | None = None  # leave after this many steps in this invocation (time slices); resume later
    log_every: int = 10
    run_dir: str | None = None  # checkpoints, metrics.jsonl, W&B files; null: <out without suffix>.run/
    logger: LoggerSchema = field(default_factory=LoggerSchema)


RUNTIME_KEYS = ("force", "progress", "resume", "ckpt_every", "stop_after", "log_every", "run_dir", "logger")
ADDED_DEFAULTS = {"mixed_precision": "no"}  # reports written before these keys existed ran at these values

_CHOICES = {"recon_loss": ("l2", "l1"), "mixed_precision": ("no", "fp16", "bf16"),
            "logger.kind": ("wandb", "tensorboard", "none"), "logger.mode": ("offline", "online", "disabled")}
_AT_LEAST = {"steps": 1, "batch_size": 1, "eval_batch_size": 1, "ckpt_every": 1, "log_every": 1, "stop_after": 1,
             "warmup_steps": 0, "reseed_every": 0, "eval_images": 0, "rfid_images": 0, "disc_start": 0,
             "disc_layers": 1, "disc_ch": 1, "num_threads": 1, "data.image_size": 1, "data.num_workers": 0,
             "vq.codebook_size": 2, "vq.codebook_embed_dim": 1}
_POSITIVE = ("lr", "disc_lr")
_NON_NEGATIVE = ("weight_decay", "grad_clip", "codebook_weight", "perceptual_weight", "adversarial_weight",
                 "vq.commit_loss_beta", "vq.entropy_loss_ratio")


def register() -> None:
    """Put the schema in Hydra's ConfigStore (``configs/vq_train.yaml`` lists it first); safe to call repeatedly."""
    ConfigStore.instance().store(name=SCHEMA_NAME, node=VQTrainConfig)


def resolve_config(cfg: Mapping[str, Any] | DictConfig | None = None) -> DictConfig:
    """The schema's defaults overlaid with ``cfg`` (a partial dict is enough), interpolations resolved, validated.

    Unknown keys and wrong types raise ConfigError (one line) instead of OmegaConf's multi-line report.
    """
    base = OmegaConf.structured(VQTrainConfig)
    try:
        if cfg is not None:
            # as plain data: a DictConfig typed by this schema (Hydra's) would carry keys that ``+key=`` appended
            plain = OmegaConf.to_container(cfg) if isinstance(cfg, DictConfig) else dict(cfg)
            base = OmegaConf.merge(base, plain)
        OmegaConf.resolve(base)
    except OmegaConfBaseException as e:
        where = f"{e.full_key}: " if getattr(e, "full_key", None) else ""
        raise ConfigError(f"bad tokenizer-training config: {where}{str(e).splitlines()[0]} "
                          "(`python -m masc_llamagen.train.tokenizer --cfg job` lists the keys)") from None
    validate(base)
    return base


def validate(cfg: DictConfig) -> None:
    """Refuse values the types cannot rule out, naming every bad key and what it accepts, in one line."""

    def get(key):
        return OmegaConf.select(cfg, key, default=None)

    problems = [f"{k}={get(k)!r} must be one of {', '.join(c)}" for k, c in _CHOICES.items() if get(k) not in c]
    problems += [f"{k}={get(k)} must be >= {low}" for k, low in _AT_LEAST.items()
                 if get(k) is not None and get(k) < low]
    problems += [f"{k}={get(k)} must be > 0" for k in _POSITIVE if get(k) is not None and not get(k) > 0]
    problems += [f"{k}={get(k)} must be >= 0" for k in _NON_NEGATIVE if get(k) < 0]
    if not 0 <= cfg.min_lr_ratio <= 1:
        problems.append(f"min_lr_ratio={cfg.min_lr_ratio} must be in [0, 1]")
    if len(cfg.betas) != 2 or not all(0 <= b < 1 for b in cfg.betas):
        problems.append(f"betas={list(cfg.betas)} must be two numbers in [0, 1), e.g. [0.9, 0.95]")
    if problems:
        raise ConfigError("; ".join(problems))


def build_vq_config(vq: Mapping[str, Any]) -> VQConfig:
    """A VQConfig from the ``vq`` block: registry arch, then the explicit fields, then free-form overrides."""
    try:
        d = get_vq_config(vq["arch"]).to_dict()
        for key in ("codebook_size", "codebook_embed_dim"):
            if vq.get(key) is not None:
                d[key] = int(vq[key])
        d["commit_loss_beta"] = float(vq["commit_loss_beta"])
        d["entropy_loss_ratio"] = float(vq["entropy_loss_ratio"])
        d.update(dict(vq.get("overrides") or {}))
        return VQConfig.from_dict(d)
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"vq: {str(e).strip(chr(39))}") from None


def run_dir_of(cfg: DictConfig) -> Path:
    """Where the run's state, metrics and logger files go: ``run_dir``, else ``out`` without suffix plus ``.run``."""
    return Path(cfg.run_dir) if cfg.run_dir else Path(cfg.out).with_suffix(".run")


def config_record(cfg: DictConfig) -> dict:
    """The config as plain JSON data without runtime-only keys: what the up-to-date check and resume compare."""
    d = OmegaConf.to_container(cfg, resolve=True)
    for key in RUNTIME_KEYS:
        d.pop(key, None)
    for key, default in ADDED_DEFAULTS.items():
        if d.get(key) == default:
            del d[key]
    return json.loads(json.dumps(d))
