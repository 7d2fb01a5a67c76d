"""What one tokenizer-training invocation holds: the built objects (``VQRun``), what changes with every step
(``VQState``), and ``<run_dir>/train_state.pt``, which keeps both between invocations for exact resume."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import DataLoader, Dataset

from masc_llamagen.errors import TrainingError
from masc_llamagen.tokenizer.losses import PatchDiscriminator
from masc_llamagen.tokenizer.vq import VQConfig, VQModel
from masc_llamagen.train.checkpointing import capture_rng
from masc_llamagen.train.logging import MetricLogger
from masc_llamagen.utils.io import atomic_open
from masc_llamagen.weights import CheckpointError, read_checkpoint

if TYPE_CHECKING:
    from accelerate import Accelerator

STATE_KIND = "vq_train_state"
FINAL_LOSS_WINDOW = 50  # "final" losses are means over the last steps, not one noisy batch


@dataclass
class VQRun:
    """The objects :func:`masc_llamagen.train.tokenizer_loop.build` makes; none is replaced while training."""

    cfg: DictConfig
    acc: Accelerator
    record: dict  # config_record(cfg): what a saved state and the up-to-date check are compared by
    run_dir: Path
    vq_config: VQConfig
    model: nn.Module  # the whole training forward, prepared by Accelerate (DDP-wrapped on several processes)
    raw: VQModel  # the same model unwrapped: what re-seeding, scoring and the saved files see
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    disc: PatchDiscriminator | None  # the GAN's, when adversarial_weight > 0
    disc_opt: torch.optim.Optimizer | None
    perceptual: nn.Module | None
    reseed_gen: torch.Generator  # the dead-code draws: the same on every process
    train_set: Dataset
    held_set: Dataset
    held_split: str
    loader: DataLoader
    logger: MetricLogger
    t_start: float  # when the invocation began, and the load average then: the report's timing context
    load_start: tuple[float, float, float]

    @property
    def out(self) -> Path:
        return Path(self.cfg.out)

    @property
    def steps(self) -> int:
        return int(self.cfg.steps)

    @property
    def state_path(self) -> Path:
        return self.run_dir / "train_state.pt"


@dataclass
class VQState:
    """The step and what the steps accumulate; all of it is saved, so a resumed run continues bit-identically."""

    counts: torch.Tensor  # code assignments since the last dead-code check
    step: int = 0
    start: int = 0  # the step this invocation started at
    resumed: bool = False
    history: dict[str, deque] = field(default_factory=dict)  # each loss term's last FINAL_LOSS_WINDOW values
    reseeded_total: int = 0
    reseed_events: int = 0
    train_time: float = 0.0  # training seconds of earlier invocations (of this one too, once fit returns)
    t_train: float = 0.0  # when this invocation's training began

    @classmethod
    def from_saved(cls, saved: dict) -> VQState:
        start = int(saved["step"])
        return cls(counts=saved["counts"].clone(), step=start, start=start, resumed=True,
                   history={name: deque(v, maxlen=FINAL_LOSS_WINDOW) for name, v in saved["history"].items()},
                   reseeded_total=int(saved["reseeded_total"]), reseed_events=int(saved["reseed_events"]),
                   train_time=float(saved["train_time_s"]))

    def record(self, terms: dict[str, torch.Tensor]) -> None:
        for name, v in terms.items():
            self.history.setdefault(name, deque(maxlen=FINAL_LOSS_WINDOW)).append(float(v.detach()))

    def final_losses(self) -> dict[str, float]:
        return {name: sum(v) / len(v) for name, v in self.history.items()}


def read_state(path: Path, record: dict) -> dict | None:
    """The saved state of this run, None when there is none; refuses a state of another config."""
    if not path.is_file():
        return None
    try:
        state = read_checkpoint(path)
    except CheckpointError as e:
        raise TrainingError(f"{e}; delete it to start over, or pass resume=false") from None
    if state.get("kind") != STATE_KIND:
        raise TrainingError(f"{path} is not a tokenizer-training state; delete it or pass resume=false")
    if state["config"] != record:
        a, b = _flatten(state["config"]), _flatten(record)
        diff = [f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}" for k in sorted(set(a) | set(b))
                if a.get(k) != b.get(k)]
        raise TrainingError(f"{path} belongs to a run with another config ({'; '.join(diff)}); rerun with that "
                            "config to finish it, or pass resume=false (or another run_dir) to start over")
    return state


def save_state(run: VQRun, state: VQState) -> None:
    """Every process hands in its RNG states; rank 0 writes the file atomically."""
    from accelerate.utils import gather_object

    rngs = gather_object([capture_rng()])
    if not run.acc.is_main_process:
        return
    scaler, disc, disc_opt = run.acc.scaler, run.disc, run.disc_opt
    blob: dict[str, Any] = {
        "kind": STATE_KIND, "step": state.step, "config": run.record, "model": run.raw.state_dict(),
        "optimizer": run.opt.state_dict(), "scheduler": run.sched.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "disc": disc.state_dict() if disc is not None else None,
        "disc_optimizer": disc_opt.state_dict() if disc_opt is not None else None,
        "rng": rngs, "reseed_rng": run.reseed_gen.get_state(), "counts": state.counts.cpu(),
        "history": {name: list(v) for name, v in state.history.items()}, "reseeded_total": state.reseeded_total,
        "reseed_events": state.reseed_events, "train_time_s": state.train_time + time.time() - state.t_train}
    with atomic_open(run.state_path, "wb") as f:
        torch.save(blob, f)


def _flatten(d: Mapping, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, Mapping) else {f"{prefix}{k}": v})
    return out
