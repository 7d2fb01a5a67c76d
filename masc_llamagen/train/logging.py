"""Console, W&B (offline unless asked) and TensorBoard logging; metrics also land in metrics.jsonl."""

from __future__ import annotations

import json
import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from masc_llamagen.errors import ConfigError
from masc_llamagen.utils.io import atomic_write_text


class MetricLogger:
    """One object for every backend; only rank 0 writes. Metrics also go to ``metrics.jsonl`` in the run dir."""

    def __init__(self, cfg: DictConfig, run_dir: Path, main: bool, resumed_at: int | None = None):
        """``resumed_at``: the step a resumed run continues from; what an interrupted invocation logged after
        its last checkpoint is about to be trained again, so those rows are dropped instead of duplicated."""
        self.main, self.kind, self.run = main, cfg.logger.kind, None
        if main and resumed_at is not None:
            _truncate_jsonl(run_dir / "metrics.jsonl", resumed_at)
        self.jsonl = open(run_dir / "metrics.jsonl", "a") if main else None  # noqa: SIM115 - closed in close()
        if not main or self.kind == "none":
            return
        if self.kind == "wandb":
            import wandb

            mode = cfg.logger.mode
            if mode not in ("offline", "online", "disabled"):
                raise ConfigError(f"logger.mode={mode!r}; use offline, online or disabled")
            os.environ.setdefault("WANDB_SILENT", "true")
            self.run = wandb.init(project=cfg.logger.project, entity=cfg.logger.entity, mode=mode, dir=str(run_dir),
                                  name=f"{cfg.name}-{run_dir.name}", id=_wandb_id(run_dir), resume="allow",
                                  tags=list(cfg.logger.tags), config=OmegaConf.to_container(cfg, resolve=True))
        elif self.kind == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # an optional extra, not a dependency
                raise ConfigError("logger=tensorboard needs the tensorboard package: pip install tensorboard") from None
            self.run = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        else:
            raise ConfigError(f"logger.kind={self.kind!r}; use wandb, tensorboard or none")

    def log(self, metrics: dict, step: int) -> None:
        if not self.main:
            return
        self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self.jsonl.flush()
        if self.kind == "wandb":
            self.run.log(metrics, step=step)
        elif self.kind == "tensorboard":
            for k, v in metrics.items():
                self.run.add_scalar(k, v, step)

    def image(self, key: str, path: Path, step: int) -> None:
        if not self.main or self.run is None:
            return
        if self.kind == "wandb":
            import wandb

            self.run.log({key: wandb.Image(str(path))}, step=step)
        elif self.kind == "tensorboard":
            import numpy as np
            from PIL import Image

            self.run.add_image(key, np.asarray(Image.open(path).convert("RGB")), step, dataformats="HWC")

    def close(self) -> None:
        if self.jsonl:
            self.jsonl.close()
        if self.run is not None:
            if self.kind == "wandb":
                self.run.finish()
            else:
                self.run.close()


def _truncate_jsonl(path: Path, last_step: int) -> None:
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= last_step:
                kept.append(line)
        except json.JSONDecodeError:  # a line cut by a kill
            continue
    atomic_write_text(path, "".join(f"{x}\n" for x in kept))


def _wandb_id(run_dir: Path) -> str:
    """Stable per run directory, so a resumed run continues the same W&B run."""
    import hashlib

    return hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:12]
