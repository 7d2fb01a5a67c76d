"""Choosing the device a job runs on: one rule and one error for every entry point."""

from __future__ import annotations

import torch

from masc_llamagen.errors import ConfigError


def pick_device(name: str | None = "auto") -> torch.device:
    """``auto``/None -> CUDA when present, else CPU; ``cpu``; ``cuda`` or ``cuda:N`` (must exist)."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = str(name)
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device={name} asked for but CUDA is not available here; use device=cpu or auto")
        dev = torch.device(name)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"device={name}: only {torch.cuda.device_count()} CUDA device(s) here")
        return dev
    raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}")
