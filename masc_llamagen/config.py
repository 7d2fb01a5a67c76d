"""Typed schemas for the Hydra configs: an unknown key or a wrong type fails at compose time, not mid-run.

Each config group's YAML options list ``base_<group>`` first in their defaults, and ``configs/train.yaml`` lists
``base_config``; Hydra then validates every value against these dataclasses.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf


@dataclass
class ModelSchema:
    """Architecture only; vocabulary comes from the head, grid and classes from the data."""

    arch: str = MISSING  # a masc_llamagen.models.gpt.GPT_CONFIGS name
    token_dropout_p: float = 0.1
    resid_dropout_p: float = 0.1
    ffn_dropout_p: float = 0.1
    attn_dropout_p: float = 0.0
    class_dropout_prob: float = 0.1


@dataclass
class HeadSchema:
    name: str = "flat"  # flat | masc | kmeans | balanced_kmeans | random | single | complete | ward
    k: int | None = None  # clusters for coarse heads
    decoder: str = "uniform"  # uniform (the paper) | frequency
    smoothing: float = 1.0  # add-alpha on code counts for the frequency decoder
    normalize: bool = True  # cluster the L2-normalised codebook (what LlamaGen quantises with)
    seed: int = 0  # k-means / random mapping seed
    tree: str | None = None  # a built tree (.npz); default: built once from the tokenizer and cached
    # head=flat only: also log the flat model's CE marginalised onto the MASC clusters at this k, to compare a flat
    # model with a coarse head on the coarse task itself (masc-method.md section 7b)
    compare_k: int | None = None


@dataclass
class TokenizerSchema:
    name: str = MISSING
    checkpoint: str = MISSING
    arch: str | None = None  # registry config for files that carry none (upstream vq_ds16_c2i.pt -> VQ-16)


@dataclass
class DataSchema:
    name: str = MISSING  # image dataset the codes come from (fashion_mnist, imagefolder, twemoji)
    codes: str = MISSING  # packed code directory (codes.npy, labels.npy, meta.json)
    image_size: int = 32
    root: str | None = None  # image root for imagefolder datasets
    augment: bool = True  # draw one stored augmentation variant per sample
    num_workers: int = 0


@dataclass
class OptimSchema:
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.05  # applied to >= 2-D tensors only
    schedule: str = "constant"  # constant | cosine
    warmup_steps: int = 0
    final_lr: float = 1e-5  # cosine end point
    grad_clip: float = 1.0  # 0 disables


@dataclass
class TrainSchema:
    steps: int = 1000
    global_batch_size: int = 256  # images per optimizer step over all processes and accumulation
    grad_accum: int = 1
    mixed_precision: str = "bf16"  # no | fp16 | bf16
    distributed: str = "ddp"  # ddp | fsdp (transformer blocks as wrap units)
    compile: bool = False
    cpu: bool = False  # force CPU even when a GPU is visible
    seed: int = 0
    ema: bool = True
    ema_decay: float = 0.9999
    ckpt_every: int = 1000
    keep_last: int = 3
    log_every: int = 10
    sample_every: int = 0  # decoded sample grid every N steps (0: off)
    sample_cfg_scale: float = 2.0  # CFG for sample grids and in-training FID
    eval_every: int = 0  # FID/KID of EMA samples vs the held-out set every N steps (0: off)
    eval_samples: int = 1000
    eval_reference: int = 1000  # held-out real images (features cached once per dataset and size)
    eval_feature_layer: str = "2048"  # Inception layer; only 2048 gives FIDs comparable with published ones
    baseline_curve: str | None = None  # a baseline run's metrics.jsonl: logs acceleration so far
    peak_tflops: float | None = None  # dense bf16 peak per device for MFU; default: looked up by GPU name
    stop_after: int | None = None  # leave after this many steps in this invocation (cluster time slices)
    resume: bool = True  # continue from the newest checkpoint in the run directory


@dataclass
class LoggerSchema:
    kind: str = "wandb"  # wandb | tensorboard | none
    project: str = "masc-llamagen"
    mode: str = "offline"  # offline | online | disabled (wandb); never network unless asked
    entity: str | None = None
    tags: list[str] = field(default_factory=list)


@dataclass
class PathsSchema:
    root: str = "."
    data: str = "data"
    artifacts: str = "artifacts"
    runs: str = "runs"
    output_dir: str = "."


@dataclass
class TrainConfig:
    name: str = "run"
    model: ModelSchema = field(default_factory=ModelSchema)
    head: HeadSchema = field(default_factory=HeadSchema)
    tokenizer: TokenizerSchema = field(default_factory=TokenizerSchema)
    data: DataSchema = field(default_factory=DataSchema)
    optim: OptimSchema = field(default_factory=OptimSchema)
    train: TrainSchema = field(default_factory=TrainSchema)
    logger: LoggerSchema = field(default_factory=LoggerSchema)
    paths: PathsSchema = field(default_factory=PathsSchema)


GROUPS = {"model": ModelSchema, "head": HeadSchema, "tokenizer": TokenizerSchema, "data": DataSchema,
          "optim": OptimSchema, "train": TrainSchema, "logger": LoggerSchema, "paths": PathsSchema}


def _short_hash(s: str) -> str:
    return hashlib.sha1(s.encode()).hexdigest()[:8]


def register() -> None:
    """Register schemas and resolvers once (safe to call repeatedly)."""
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=TrainConfig)
    for group, schema in GROUPS.items():
        cs.store(group=group, name=f"base_{group}", node=schema)
    if not OmegaConf.has_resolver("masc.hash"):
        OmegaConf.register_new_resolver("masc.hash", _short_hash)
