"""What made a run: resolved config, git revision, package versions, command line (written once, by rank 0)."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

PACKAGES = ("masc-llamagen", "torch", "torchvision", "accelerate", "hydra-core", "omegaconf", "numpy", "scipy",
            "safetensors", "wandb", "timm", "torch-fidelity")


def git_revision(cwd: Path | None = None) -> dict:
    def git(*args):
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=cwd, timeout=10)

    try:
        rev = git("rev-parse", "HEAD")
        if rev.returncode:
            return {"revision": None, "dirty": None}
        dirty = bool(git("status", "--porcelain", "--untracked-files=no").stdout.strip())
        return {"revision": rev.stdout.strip(), "dirty": dirty}
    except (OSError, subprocess.TimeoutExpired):
        return {"revision": None, "dirty": None}


def package_versions() -> dict:
    out = {}
    for p in PACKAGES:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = None
    return out


def write_run_info(run_dir: Path, cfg: DictConfig, extra: dict | None = None) -> dict:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config_resolved.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    info = {
        "command": [sys.executable, *sys.argv],
        "git": git_revision(Path(__file__).resolve().parent),
        "packages": package_versions(),
        "python": sys.version.split()[0],
        "host": platform.node(),
        **(extra or {}),
    }
    (run_dir / "run.json").write_text(json.dumps(info, indent=2))
    return info
