"""The training checkpoint: one typed schema (:class:`TrainingCheckpoint`) that the loop saves, resume and the readers
load, and :func:`load_for_sampling`, which turns it into what sampling and evaluation need. The weights inside are
read by :mod:`masc_llamagen.weights`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from masc_llamagen.utils.io import atomic_open
from masc_llamagen.weights import CheckpointError, _load_gpt, load_vq, read_checkpoint, tokenizer_fingerprint


class NotATrainingCheckpointError(CheckpointError):
    """Released weights or some other file where a checkpoint written by masc_llamagen.train is needed."""


class CheckpointVersionError(CheckpointError):
    """A training checkpoint written by a newer masc-llamagen than this one."""


class TokenizerMismatchError(CheckpointError):
    """The tokenizer offered for decoding is not the one the model was trained on."""


# -- the training checkpoint ----------------------------------------------------------------------------------------
# Version 1 is the layout written since the first release; files from before ``format_version`` existed hold exactly
# these keys and read as version 1. Bump it when a key changes meaning, and keep reading the old one.
FORMAT_VERSION = 1
REQUIRED = ("model", "optimizer", "step", "rng")  # what resume cannot do without, in the order they are checked


@dataclass
class TokenizerRecord:
    """Which tokenizer made the training codes: where it was, and its codebook's fingerprint."""

    checkpoint: str | None = None
    codebook_sha256: str | None = None


@dataclass
class TrainingCheckpoint:
    """One ``torch.save`` file of plain data (``weights_only`` loadable), written by the training loop.

    Field names are the on-disk keys. ``rng`` holds one state per process; ``head`` is ``Vocabulary.to_state()``
    plus the training codes' ``token_counts`` (what other member decoders need); ``config`` is the resolved config.
    """

    step: int
    model: dict[str, torch.Tensor]
    optimizer: dict
    rng: list[dict]
    scheduler: dict = field(default_factory=dict)
    ema: dict[str, torch.Tensor] | None = None
    ema_updates: int = 0
    elapsed_s: float = 0.0  # training wall time of every invocation so far (FID against wall-clock)
    model_config: dict = field(default_factory=dict)
    model_kind: str = "gpt"
    head: dict = field(default_factory=dict)
    head_info: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    tokenizer: TokenizerRecord = field(default_factory=TokenizerRecord)
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if not (k == "ema" and v is None)}
        out["tokenizer"] = asdict(self.tokenizer)
        return out

    @classmethod
    def from_dict(cls, ckpt: Mapping[str, Any], source: str | os.PathLike = "checkpoint") -> TrainingCheckpoint:
        """Validate a loaded dict against the schema (clear errors, never a KeyError later)."""
        for key in REQUIRED:
            if key not in ckpt:
                raise NotATrainingCheckpointError(
                    f"{source} is not a masc-llamagen training checkpoint (no '{key}'); to start from released "
                    "weights use load_gpt instead")
        version = int(ckpt.get("format_version", 1))
        if version > FORMAT_VERSION:
            raise CheckpointVersionError(
                f"{source} is a format-{version} training checkpoint but this masc-llamagen reads up to format "
                f"{FORMAT_VERSION}; update masc-llamagen to load it")
        unknown = sorted(set(ckpt) - set(cls.__dataclass_fields__))
        if unknown:
            raise CheckpointVersionError(
                f"{source} holds keys this masc-llamagen does not know ({', '.join(unknown)}); update masc-llamagen, "
                "or re-save the file with the keys of TrainingCheckpoint only")
        if not isinstance(ckpt["model"], Mapping) or not isinstance(ckpt["rng"], list):
            raise NotATrainingCheckpointError(
                f"{source}: 'model' is not a state dict or 'rng' not a list of per-process states; the file is not "
                "a masc-llamagen training checkpoint (or is damaged): resume from another one")
        data = dict(ckpt)
        data["tokenizer"] = TokenizerRecord(**{k: v for k, v in (ckpt.get("tokenizer") or {}).items()
                                               if k in TokenizerRecord.__dataclass_fields__})
        data["step"], data["format_version"] = int(ckpt["step"]), version
        data.setdefault("ema_updates", data["step"])  # files from before the count was saved: one update a step
        return cls(**data)

    def save(self, path: str | os.PathLike) -> Path:
        """Temp file, fsync, rename: a kill or a full disk at any moment leaves the previous checkpoint intact."""
        with atomic_open(path, "wb") as f:
            torch.save(self.to_dict(), f)
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> TrainingCheckpoint:
        return cls.from_dict(read_checkpoint(path), path)

    def vocabulary(self, decoder: str | None = None, smoothing: float = 1.0):
        """The head the model was trained with; ``decoder`` swaps its member decoder (training-code counts)."""
        from masc_llamagen.masc.vocabulary import Vocabulary, build_vocabulary

        head = self.head
        if not head:
            raise NotATrainingCheckpointError("checkpoint has no head; was it written by masc_llamagen.train?")
        if decoder is None or decoder == head["decoder"] or head["name"] == "flat":
            return Vocabulary.from_state(head)
        counts = head.get("token_counts")
        return build_vocabulary(head["name"], int(head["codebook_size"]), head["mapping"], decoder=decoder,
                                counts=None if counts is None else counts.numpy(), smoothing=smoothing)


@dataclass
class ForSampling:
    """What sampling and evaluation take from a training checkpoint, checked against each other."""

    model: torch.nn.Module  # GPT in eval mode on the CPU, EMA weights if asked and saved
    vocabulary: Any  # masc_llamagen.masc.vocabulary.Vocabulary
    vq: torch.nn.Module  # the tokenizer that decodes the samples (its fingerprint matches the training one)
    vq_checkpoint: str
    model_config: Any  # GPTConfig
    config: dict  # the run's resolved training config
    step: int


def load_for_sampling(path: str | os.PathLike, *, use_ema: bool = True, decoder: str | None = None,
                      smoothing: float = 1.0, vq_checkpoint: str | os.PathLike | None = None,
                      vq_arch: Any = None) -> ForSampling:
    """Model, head and tokenizer of a training checkpoint; ``vq_checkpoint`` overrides the recorded tokenizer."""
    content = read_checkpoint(path)
    ckpt = TrainingCheckpoint.from_dict(content, path)
    model = _load_gpt(path, None, use_ema, {}, content)
    vocab = ckpt.vocabulary(decoder, smoothing)
    tok_path = vq_checkpoint or ckpt.tokenizer.checkpoint
    if not tok_path:
        raise CheckpointError(f"no tokenizer recorded in {path}; pass vq_checkpoint=PATH")
    vq = load_vq(tok_path, vq_arch)
    recorded = ckpt.tokenizer.codebook_sha256
    if recorded:
        have = tokenizer_fingerprint(vq)
        if have != recorded:
            raise TokenizerMismatchError(f"tokenizer {tok_path} ({have[:12]}) is not the one the model was trained "
                                         f"on ({recorded[:12]}); pass vq_checkpoint=<the training tokenizer>")
    return ForSampling(model=model, vocabulary=vocab, vq=vq, vq_checkpoint=str(tok_path), model_config=model.config,
                       config=ckpt.config, step=ckpt.step)
