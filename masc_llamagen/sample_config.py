"""Typed schema and up-front checks for ``configs/sample.yaml`` (``python -m masc_llamagen.sample``).

``register()`` stores the schema as ``base_sample`` (listed first in sample.yaml's defaults), so an unknown key or a
wrongly typed value fails when the config is composed; ``validate`` then checks every value in one place and
raises ``SampleConfigError`` with one line naming the option and the fix, before any model is loaded.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from masc_llamagen.errors import ConfigError
from masc_llamagen.masc.vocabulary import DECODERS
from masc_llamagen.models.sampling import SamplingConfig, SamplingError

LABEL_MODES = ("balanced", "random")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class SampleConfigError(ConfigError, SamplingError):
    """A sampler option that cannot work; the message names the option and what to set instead."""


@dataclass
class SampleConfig(SamplingConfig):
    """The generator's settings (``SamplingConfig``: cfg_interval, temperature, top_k, top_p, greedy and their
    defaults, checked on construction) plus what to load and where to write."""

    cfg_scale: float = 2.0  # the CLI samples guided; the generator's own default (1.0) is no guidance
    checkpoint: str = MISSING  # a training checkpoint (EMA weights used by default)
    use_ema: bool = True
    vq_checkpoint: str | None = None  # default: the tokenizer recorded in the training checkpoint
    vq_arch: str | None = None  # registry config for tokenizer files that carry none (e.g. VQ-16)
    num_samples: int | None = None  # c2i: images to write (null: 100); t2i: the first N prompts (null: all)
    labels: str = "balanced"  # balanced (equal per class, in class order) | random
    batch_size: int = 50
    seed: int = 0
    decoder: str | None = None  # member decoder for coarse heads: null = as trained, or uniform | frequency
    smoothing: float = 1.0  # add-alpha on code counts for the frequency decoder
    dtype: str = "float32"  # float32 | bfloat16
    png: bool = True  # also write one PNG per sample
    out_dir: str | None = None  # default: <run dir>/samples/<checkpoint stem>-cfg<scale>-<decoder>
    # Resize the decoded images to this side before writing (bicubic, as LlamaGen scores its 384-px models at 256);
    # null: the tokenizer's resolution
    image_size_eval: int | None = None
    # t2i: one image per prompt of a file (one prompt a line) or a shipped list: coco (COCO-30k captions), parti
    prompts: str | None = None
    text_encoder: str | None = None  # null: the encoder the checkpoint's captions were extracted with
    text_path: str | None = None  # its local model directory (flan_t5_xl); null: as recorded

    @property
    def sampling(self) -> SamplingConfig:
        """The generator's settings alone (its checks raise ``SamplingError`` naming the option)."""
        return SamplingConfig(**{f.name: getattr(self, f.name) for f in fields(SamplingConfig)})

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


def register() -> None:
    """Register the schema (safe to call repeatedly); ``masc_llamagen.sample`` does it on import."""
    ConfigStore.instance().store(name="base_sample", node=SampleConfig)


def _check_file(key: str, value: str) -> None:
    path = Path(value)
    if not path.exists():
        raise SampleConfigError(f"{key}={value} does not exist: pass {key}=PATH to an existing file")
    if not path.is_file():
        raise SampleConfigError(f"{key}={value} is a directory: pass {key}=PATH to a checkpoint file inside it")


def validate(cfg: DictConfig | SampleConfig) -> SampleConfig:
    """Every sampler option checked up front; returns the typed config or raises ``SampleConfigError``."""
    if not isinstance(cfg, SampleConfig):
        try:
            merged = OmegaConf.merge(OmegaConf.structured(SampleConfig), cfg)
            if OmegaConf.is_missing(merged, "checkpoint"):
                raise SampleConfigError("checkpoint is required: pass checkpoint=PATH to a training checkpoint "
                                        "(runs/NAME/checkpoints/ckpt-XXXXXXXX.pt)")
            cfg = OmegaConf.to_object(merged)
        except OmegaConfBaseException as e:
            raise SampleConfigError(str(e).strip().splitlines()[0]) from None
        except SamplingError as e:  # SamplingConfig's own checks, run on construction
            raise SampleConfigError(str(e)) from None
    if cfg.num_samples is not None and cfg.num_samples < 1:
        raise SampleConfigError(f"num_samples={cfg.num_samples} must be >= 1: it is the number of images to write")
    if cfg.batch_size < 1:
        raise SampleConfigError(f"batch_size={cfg.batch_size} must be >= 1: images sampled per forward pass")
    if cfg.labels not in LABEL_MODES:
        raise SampleConfigError(f"labels={cfg.labels} is unknown: use labels=balanced or labels=random")
    if cfg.decoder is not None and cfg.decoder not in DECODERS:
        raise SampleConfigError(f"decoder={cfg.decoder} is unknown: use decoder=null (as trained), "
                                + " or ".join(f"decoder={d}" for d in DECODERS))
    if cfg.dtype not in DTYPES:
        raise SampleConfigError(f"dtype={cfg.dtype} is unknown: use " + " or ".join(f"dtype={d}" for d in DTYPES))
    if cfg.image_size_eval is not None and cfg.image_size_eval < 8:
        raise SampleConfigError(f"image_size_eval={cfg.image_size_eval} must be >= 8 (e.g. 256), or null to keep "
                                "the decoded resolution")
    if not cfg.smoothing >= 0:
        raise SampleConfigError(f"smoothing={cfg.smoothing} must be >= 0: add-alpha for the frequency decoder")
    try:
        cfg.sampling  # noqa: B018 - re-checks an instance changed since construction
    except SamplingError as e:
        raise SampleConfigError(str(e)) from None
    _check_file("checkpoint", cfg.checkpoint)
    if Path(cfg.checkpoint).suffix == ".safetensors" or not zipfile.is_zipfile(cfg.checkpoint):
        raise SampleConfigError(f"checkpoint={cfg.checkpoint} is not a training checkpoint (a torch .pt archive "
                                "written by masc_llamagen.train): pass runs/NAME/checkpoints/ckpt-XXXXXXXX.pt")
    if cfg.vq_checkpoint is not None:
        _check_file("vq_checkpoint", cfg.vq_checkpoint)
    return cfg
