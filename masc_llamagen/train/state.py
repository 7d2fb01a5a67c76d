"""What one training invocation holds: the built objects (``Run``) and what changes with every step (``TrainState``)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from masc_llamagen.checkpoint import TokenizerRecord
from masc_llamagen.errors import TrainingError
from masc_llamagen.masc.vocabulary import Vocabulary
from masc_llamagen.models.gpt import GPT
from masc_llamagen.train.checkpointing import last_good_checkpoint
from masc_llamagen.train.ema import EMA
from masc_llamagen.train.evaluate import TrainingSampler
from masc_llamagen.train.logging import MetricLogger


@dataclass
class Run:
    """The objects :func:`masc_llamagen.train.build.build_run` makes; none is replaced while training."""

    cfg: DictConfig
    acc: Accelerator
    run_dir: Path
    model: torch.nn.Module  # prepared by Accelerate (wrapped, compiled, sharded)
    raw: GPT  # the same module unwrapped: what EMA, sampling and checkpoints see
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    ema: EMA | None
    vocab: Vocabulary
    head_info: dict
    token_counts: np.ndarray
    tokenizer: TokenizerRecord
    compare_mapping: torch.Tensor | None  # a flat run's MASC mapping, for the marginal coarse CE it logs
    loader: DataLoader
    logger: MetricLogger
    sampler: TrainingSampler
    tokens_per_image: int
    flops_per_token: float
    peak_flops: float | None  # of all processes together; None: no MFU
    resumed_from: Path | None

    @property
    def ckpt_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    @property
    def fsdp(self) -> bool:
        return self.cfg.train.distributed == "fsdp"

    @property
    def micro_batch(self) -> int:
        t = self.cfg.train
        return t.global_batch_size // self.acc.num_processes // t.grad_accum


@dataclass
class TrainState:
    """The step, and the losses: each step's global loss stays on the device (``pending``) until a log step or a
    save reads them all back at once, so steps that do not log cost no host sync."""

    step: int
    start: int  # the step this invocation started at
    elapsed_before: float  # training wall time of earlier invocations (for FID against wall-clock)
    invalid: torch.Tensor  # t2i samples without a readable image or caption, summed on the device
    history: list[float] = field(default_factory=list)
    pending: list[torch.Tensor] = field(default_factory=list)
    t_start: float = field(default_factory=time.perf_counter)

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.t_start

    def drain(self, ckpt_dir: Path) -> None:
        """Read back the pending losses; stop before anything is saved if one is not finite."""
        if not self.pending:
            return
        values: list[Any] = torch.stack(self.pending).tolist()
        first = self.step - len(self.pending) + 1
        self.pending.clear()
        for i, v in enumerate(values):
            if not math.isfinite(v):
                good = last_good_checkpoint(ckpt_dir)
                raise TrainingError(f"loss became {v} at step {first + i}; stopping. Last good checkpoint: "
                                    f"{good or 'none'}. Lower optim.lr or check the data")
        self.history.extend(values)
