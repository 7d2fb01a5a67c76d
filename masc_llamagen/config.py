"""Typed schemas for the Hydra configs: an unknown key or a wrong type fails at compose time, not mid-run.

Each config group's YAML options list ``base_<group>`` first in their defaults, and ``configs/train.yaml`` lists
``base_config``; Hydra then validates every value against these dataclasses.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from masc_llamagen.models.gpt import GPTConfig


@dataclass
class ModelSchema:
    """Architecture only; vocabulary comes from the head, grid and classes from the data. Dropouts default to the
    model's own (upstream's ``ModelArgs``), so the two cannot drift apart."""

    arch: str = MISSING  # a masc_llamagen.models.gpt.GPT_CONFIGS name
    model_type: str = "c2i"  # c2i (class ids) | t2i (caption features; task=t2i sets it)
    cls_token_num: int | None = None  # condition slots; null: 1 for c2i, 120 for t2i (LlamaGen's)
    token_dropout_p: float = GPTConfig.token_dropout_p
    resid_dropout_p: float = GPTConfig.resid_dropout_p
    ffn_dropout_p: float = GPTConfig.ffn_dropout_p
    attn_dropout_p: float = GPTConfig.attn_dropout_p
    drop_path_rate: float = GPTConfig.drop_path_rate  # stochastic depth (timm's DropPath), 0 as upstream
    class_dropout_prob: float = GPTConfig.class_dropout_prob


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
    # model with a coarse head on the coarse task itself (docs/method.md section 4)
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
    image_size: int = MISSING  # a property of the dataset: each data option sets it
    root: str | None = None  # image root for imagefolder datasets
    augment: bool = True  # draw one stored augmentation variant per sample
    num_workers: int = 0


@dataclass
class TextSchema:
    """Caption features for task=t2i: extracted once (``python -m masc_llamagen.data.extract_text``), read by
    training."""

    encoder: str = "wordllama"  # wordllama (offline default: contextless per-token embeddings) | flan_t5_xl
    path: str | None = None  # local model directory (flan_t5_xl); wordllama ships in its package
    # packed features of the training / held-out (in-training FID, grids) captions; default: where the extraction job
    # writes them for this dataset and encoder
    features: str | None = "${paths.artifacts}/text/${data.name}_${text.encoder}/train"
    heldout_features: str | None = "${paths.artifacts}/text/${data.name}_${text.encoder}/heldout"
    # Reuse features LlamaGen already extracted: text.features={t5_root} holding {jsonl stem}/{line}.npy, read in the
    # order of this jsonl (the codes must come from the same jsonl: data.name=llamagen_jsonl)
    llamagen_jsonl: str | None = None
    llamagen_dim: int = 2048  # their width (flan-t5-xl)


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
    eval_heldout: int = 1000  # c2i: held-out images whose codes score the likelihood at each eval (0: off)
    eval_feature_layer: str = "2048"  # Inception layer; only 2048 gives FIDs comparable with published ones
    # t2i: prompts for in-training FID (coco, parti or a file; the first eval_samples of them), scored by the COCO
    # protocol against the images of eval_reference_dir (val2014/); null: the held-out captions vs their images
    eval_prompts: str | None = None
    eval_reference_dir: str | None = None
    eval_clip_weights: str | None = None  # CLIP ViT-B/32 weights: adds eval/clip_score
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
    # This run's directory. Configs composed in code run under runs/NAME unless they pass paths.output_dir=DIR;
    # `python train.py` sets it to Hydra's run directory (runs/NAME/<hash of the overrides>, configs/hydra/).
    output_dir: str = "${paths.runs}/${name}"


@dataclass
class TrainConfig:
    name: str = "run"
    model: ModelSchema = field(default_factory=ModelSchema)
    head: HeadSchema = field(default_factory=HeadSchema)
    tokenizer: TokenizerSchema = field(default_factory=TokenizerSchema)
    data: DataSchema = field(default_factory=DataSchema)
    text: TextSchema = field(default_factory=TextSchema)
    optim: OptimSchema = field(default_factory=OptimSchema)
    train: TrainSchema = field(default_factory=TrainSchema)
    logger: LoggerSchema = field(default_factory=LoggerSchema)
    paths: PathsSchema = field(default_factory=PathsSchema)


GROUPS = {"model": ModelSchema, "head": HeadSchema, "tokenizer": TokenizerSchema, "data": DataSchema,
          "text": TextSchema, "optim": OptimSchema, "train": TrainSchema, "logger": LoggerSchema, "paths": PathsSchema}


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


# -- validation: what the types cannot say ---------------------------------------------------------------------
_CHOICES = {
    "train.mixed_precision": ("no", "fp16", "bf16"),
    "train.distributed": ("ddp", "fsdp"),
    "optim.schedule": ("constant", "cosine"),
    "head.decoder": ("uniform", "frequency"),
    "logger.kind": ("wandb", "tensorboard", "none"),
    "logger.mode": ("offline", "online", "disabled"),
    "model.model_type": ("c2i", "t2i"),
}
_AT_LEAST = {  # key: minimum (None values are allowed where the schema says Optional)
    "train.steps": 1, "train.global_batch_size": 1, "train.grad_accum": 1, "train.ckpt_every": 1, "train.log_every": 1,
    "train.keep_last": 0, "train.sample_every": 0, "train.eval_every": 0, "train.eval_samples": 2,
    "train.eval_reference": 2, "train.eval_heldout": 0, "train.stop_after": 1, "optim.warmup_steps": 0,
    "data.num_workers": 0, "data.image_size": 1, "head.k": 2, "head.compare_k": 2, "model.cls_token_num": 1,
}
_POSITIVE = ("optim.lr", "optim.eps", "train.peak_tflops")
_NON_NEGATIVE = ("optim.final_lr", "optim.weight_decay", "optim.grad_clip", "head.smoothing", "train.sample_cfg_scale")
_PROBABILITIES = ("model.token_dropout_p", "model.resid_dropout_p", "model.ffn_dropout_p", "model.attn_dropout_p",
                  "model.drop_path_rate", "model.class_dropout_prob")


def _unknown_keys(node, schema, prefix: str = "") -> list[str]:
    from dataclasses import fields, is_dataclass

    known = {f.name: f.type for f in fields(schema)}
    out = []
    for key in node:
        name = f"{prefix}{key}"
        if key not in known:
            out.append(name)
            continue
        sub = next((f.default_factory for f in fields(schema) if f.name == key and callable(f.default_factory)), None)
        child = node[key]
        if sub is not None and is_dataclass(sub) and isinstance(child, dict):
            out += _unknown_keys(child, sub, f"{name}.")
    return out


def validate(cfg) -> None:
    """Refuse a training config that cannot work, with one line naming every bad key and what it accepts.

    Called by ``train.py`` right after Hydra composed the config, and by the loop itself (configs composed in code).
    Also refuses keys the schema does not know: Hydra's ``+train.foo=1`` would store a typo and ignore it.
    """
    from masc_llamagen.errors import ConfigError

    problems = [f"{k} is not a config key (a typo? `python train.py --cfg job` lists them)"
                for k in _unknown_keys(OmegaConf.to_container(cfg, resolve=False), TrainConfig) if k != "hydra"]

    def get(key):
        return OmegaConf.select(cfg, key, default=None)

    for key, choices in _CHOICES.items():
        if get(key) not in choices:
            problems.append(f"{key}={get(key)!r} must be one of {', '.join(choices)}")
    for key, low in _AT_LEAST.items():
        v = get(key)
        if v is not None and v < low:
            problems.append(f"{key}={v} must be >= {low}")
    for key in _POSITIVE:
        v = get(key)
        if v is not None and not v > 0:
            problems.append(f"{key}={v} must be > 0")
    for key in _NON_NEGATIVE:
        v = get(key)
        if v is not None and v < 0:
            problems.append(f"{key}={v} must be >= 0")
    for key in _PROBABILITIES:
        v = get(key)
        if v is not None and not 0 <= v < 1:
            problems.append(f"{key}={v} must be in [0, 1)")
    if get("train.ema_decay") is not None and not 0 <= get("train.ema_decay") < 1:
        problems.append(f"train.ema_decay={get('train.ema_decay')} must be in [0, 1)")
    betas = get("optim.betas")
    if betas is not None and (len(betas) != 2 or not all(0 <= b < 1 for b in betas)):
        problems.append(f"optim.betas={list(betas)} must be two numbers in [0, 1)")
    if get("head.name") != "flat" and get("head.k") is None:
        problems.append(f"head={get('head.name')} needs head.k (the number of clusters)")
    if get("model.model_type") == "t2i" and not get("text.features"):
        problems.append("task=t2i needs text.features: the packed caption features of the training set")
    if get("train.eval_prompts") and (get("model.model_type") != "t2i" or not get("train.eval_reference_dir")):
        problems.append("train.eval_prompts is for task=t2i and needs train.eval_reference_dir (e.g. COCO val2014/)")
    if get("model.model_type") == "c2i" and get("model.cls_token_num") not in (None, 1):
        problems.append(f"model.cls_token_num={get('model.cls_token_num')}: a class-conditional model has 1 slot")
    if problems:
        raise ConfigError("; ".join(problems))
