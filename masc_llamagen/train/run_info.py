"""What made a run: the resolved config and its provenance (written once, by rank 0)."""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from masc_llamagen.utils.io import atomic_write_text
from masc_llamagen.utils.provenance import run_record


def write_run_info(run_dir: Path, cfg: DictConfig, extra: dict | None = None) -> dict:
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config_resolved.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    info = {**run_record(), **(extra or {})}
    atomic_write_text(run_dir / "run.json", json.dumps(info, indent=2))
    return info
