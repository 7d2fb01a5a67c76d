"""The run side of checkpoints: their names in a run directory, keep-last-N, RNG capture and what resume may change.

The file format itself (save, load, validate) is :class:`masc_llamagen.checkpoint.TrainingCheckpoint`.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import numpy as np
import torch

from masc_llamagen.checkpoint import TrainingCheckpoint
from masc_llamagen.weights import CheckpointError

NAME = re.compile(r"^ckpt-(\d{8})\.pt$")


def checkpoint_path(ckpt_dir: Path, step: int) -> Path:
    return Path(ckpt_dir) / f"ckpt-{step:08d}.pt"


def list_checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    d = Path(ckpt_dir)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := NAME.match(p.name))]
    return sorted(found)


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    found = list_checkpoints(ckpt_dir)
    return found[-1][1] if found else None


def last_good_checkpoint(ckpt_dir: Path) -> Path | None:
    """The newest checkpoint that loads and whose model weights are all finite (what a failure message offers)."""
    for _, p in reversed(list_checkpoints(ckpt_dir)):
        try:
            sd = TrainingCheckpoint.load(p).model
        except CheckpointError:
            continue
        if all(torch.isfinite(v).all() for v in sd.values() if torch.is_tensor(v) and v.is_floating_point()):
            return p
    return None


def prune(ckpt_dir: Path, keep_last: int) -> None:
    if keep_last <= 0:
        return
    for _, p in list_checkpoints(ckpt_dir)[:-keep_last]:
        p.unlink(missing_ok=True)


def capture_rng() -> dict:
    """All RNG states as plain tensors/ints (weights_only-safe)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    out = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- resume compatibility: what may change between invocations of one run ------------------------------------------
# Changing these does not change what the weights, optimizer state or data order mean.
RESUME_SAFE = ("name", "paths.", "logger.", "train.steps", "train.ckpt_every", "train.keep_last", "train.log_every",
               "train.sample_every", "train.sample_cfg_scale", "train.eval_", "train.baseline_curve",
               "train.stop_after", "train.resume", "train.peak_tflops", "train.cpu", "data.num_workers",
               "data.codes", "data.root", "tokenizer.checkpoint", "tokenizer.name", "tokenizer.arch",
               "head.compare_k", "head.tree", "head.decoder", "head.smoothing")
# Allowed, but the continuation is then no longer bit-identical to an uninterrupted run.
RESUME_INEXACT = ("train.compile", "train.mixed_precision", "train.distributed", "train.grad_accum")


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _matches(key: str, patterns: tuple[str, ...]) -> bool:
    return any(key == p or (p.endswith((".", "_")) and key.startswith(p)) for p in patterns)


# Options added after runs existed, with the value those runs had implicitly: a checkpoint without them resumes.
ADDED_OPTIONS = {"model.model_type": "c2i", "model.cls_token_num": None, "model.drop_path_rate": 0.0}


def _added_since(key: str, now: dict) -> bool:
    """An option the checkpoint predates (text-to-image's, drop-path), at the value its run had implicitly."""
    if key.startswith("text."):
        return now.get("model.model_type", "c2i") == "c2i"
    return key in ADDED_OPTIONS and now.get(key) == ADDED_OPTIONS[key]


def resume_differences(saved: dict, now: dict, saved_world: int, world: int) -> tuple[list[str], list[str]]:
    """(refused, inexact): one ``key: old -> new`` per difference between a checkpoint's resolved config and ours."""
    a, b = _flatten(saved), _flatten(now)
    refused, inexact = [], []
    for key in sorted(set(a) | set(b)):
        # a key the checkpoint's config lacks is an option added since: that run used what is now its default
        if a.get(key) == b.get(key) or _matches(key, RESUME_SAFE) or (key not in a and _added_since(key, b)):
            continue
        line = f"{key}: {a.get(key, '<absent>')!r} -> {b.get(key, '<absent>')!r}"
        (inexact if _matches(key, RESUME_INEXACT) else refused).append(line)
    if saved_world != world:
        inexact.append(f"processes: {saved_world} -> {world} (per-rank RNG states cannot be restored)")
    return refused, inexact
