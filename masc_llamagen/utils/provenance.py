"""Where a result came from (git revision, machine, package versions): recorded the same way by runs,
evaluations and benchmarks, so any number can be traced to the code and hardware that made it."""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("masc-llamagen", "torch", "torchvision", "accelerate", "hydra-core", "omegaconf", "numpy", "scipy",
            "safetensors", "wandb", "timm", "torch-fidelity")


def git_revision(cwd: Path | None = REPO) -> dict:
    """``{"revision": sha or None, "dirty": bool or None}`` (None outside a git checkout)."""

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


def short_revision(cwd: Path | None = REPO) -> str:
    """``abc1234`` or ``abc1234+uncommitted changes`` or ``unknown``: the form tables print."""
    g = git_revision(cwd)
    if not g["revision"]:
        return "unknown"
    return g["revision"][:7] + ("+uncommitted changes" if g["dirty"] else "")


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes: the identity of a weights or tokenizer file."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def codebook_sha256(codebook) -> str:
    """sha256 of a codebook's float32 C-order bytes: the identity of a tokenizer, recorded by the codes, trees and
    checkpoints made with it, so that artifacts of different tokenizers are never mixed."""
    import numpy as np

    return hashlib.sha256(np.ascontiguousarray(codebook, dtype=np.float32).tobytes()).hexdigest()


def package_versions() -> dict:
    out = {}
    for p in PACKAGES:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = None
    return out


def machine() -> str:
    """One line: CPU model, cores, RAM, GPU, OS, Python and torch versions."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f", {kb / 2**20:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"
    return (f"{cpu}, {os.cpu_count()} cores{mem}{gpu}; {platform.system()} {platform.release()}; "
            f"Python {platform.python_version()}, torch {torch.__version__}")


def run_record() -> dict:
    """What every run.json carries: command line, revision, packages, Python, host."""
    return {"command": [sys.executable, *sys.argv], "git": git_revision(), "packages": package_versions(),
            "python": sys.version.split()[0], "host": platform.node()}
