"""One reader for every weights format a user may hand us, and strict loading into our models.

Formats accepted, detected from the file itself (never from flags):
  * upstream LlamaGen DDP checkpoints ``{"model": state_dict, ...}`` (``c2i_B_256.pt``, ``vq_ds16_c2i.pt``);
  * bare state dicts (LlamaGen's FSDP-consolidated ``c2i_XXL_384.pt``, ``c2i_3B_384.pt``);
  * safetensors files (optionally carrying this project's metadata);
  * this project's own checkpoints, which carry ``model_config`` (and ``ema``) so no flag is needed to rebuild.

Everything goes through ``torch.load(weights_only=True)``: a file that needs arbitrary unpickling is refused. The
training checkpoint's schema, built on these readers, is :mod:`masc_llamagen.checkpoint`.
"""

from __future__ import annotations

import json
import os
import re
import zipfile
from collections.abc import Mapping
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from masc_llamagen.errors import MascError
from masc_llamagen.utils.io import atomic_open
from masc_llamagen.utils.provenance import codebook_sha256

CODEBOOK_KEY = "quantize.embedding.weight"  # where a VQ tokenizer's state dict keeps its codebook


class CheckpointError(MascError, ValueError):
    """A weights file that cannot be used as asked; the message says why and what to do."""


def _is_safetensors(path: Path) -> bool:
    return path.suffix == ".safetensors"


def _describe_load_failure(path: Path, e: Exception) -> str:
    """What a failed ``torch.load(weights_only=True)`` means, without quoting torch's advice to turn it off."""
    text = str(e)
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found:
        return (f"refused to unpickle the Python object {found.group(1)} it holds (loading it could run code); only "
                "plain tensors and dicts are loaded. Re-save the state dict alone")
    with open(path, "rb") as f:
        head = f.read(2)
    if len(head) == 2 and head[0] == 0x80 and head[1] <= 5:  # a pickle stream that is not a torch.save archive
        return ("refused to unpickle: a raw pickle whose content is not plain tensors (objects, or a protocol "
                "weights-only loading does not read); re-save it with torch.save(state_dict)")
    if isinstance(e, (EOFError, zipfile.BadZipFile)) or "zip" in text.lower() or "central directory" in text:
        return "cannot read checkpoint: the file is truncated or corrupt"
    return "not a PyTorch checkpoint (neither a torch.save file nor safetensors); check the path"


def read_checkpoint(path: str | os.PathLike, bare_tensor: bool = False) -> dict[str, Any] | torch.Tensor:
    """Return the raw content of a weights file as a dict, refusing anything that is not plain data.

    ``bare_tensor``: also accept a .pt file holding one tensor (a codebook saved alone), returned as is.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path} (check the path, or download the weights first)")
    if _is_safetensors(path):
        from safetensors import SafetensorError
        from safetensors.torch import load_file, safe_open

        try:
            tensors = load_file(str(path))
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({e}); is it truncated?") from None
        out: dict[str, Any] = {"model": tensors}
        if "model_config" in meta:
            out["model_config"] = json.loads(meta["model_config"])
        if "model_kind" in meta:
            out["model_kind"] = meta["model_kind"]
        return out
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=False)
    except Exception as e:  # noqa: BLE001 - torch raises many types for a bad file (a text file: KeyError)
        raise CheckpointError(f"{path}: {_describe_load_failure(path, e)}") from None
    if bare_tensor and isinstance(obj, torch.Tensor):
        return obj
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    return dict(obj)


def extract_state_dict(ckpt: Mapping[str, Any], prefer_ema: bool = False) -> dict[str, torch.Tensor]:
    """Pick the model weights out of any supported layout (``ema`` first when asked and present)."""
    if prefer_ema and isinstance(ckpt.get("ema"), Mapping):
        sd = ckpt["ema"]
    elif isinstance(ckpt.get("model"), Mapping):
        sd = ckpt["model"]
    else:
        sd = ckpt  # bare state dict (FSDP-consolidated upstream files)
    sd = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    # Tolerate the two wrappers a training framework adds; nothing else is renamed.
    for prefix in ("module.", "_orig_mod."):
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix) :]: v for k, v in sd.items()}
    return sd


def read_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict | None]:
    """(state_dict, model_config or None) from any supported file (the trained weights, not an EMA copy)."""
    ckpt = read_checkpoint(path)
    sd = extract_state_dict(ckpt)
    if not sd:
        raise CheckpointError(f"{path}: no tensors found; is this a model checkpoint?")
    cfg = ckpt.get("model_config")
    return sd, (dict(cfg) if isinstance(cfg, Mapping) else None)


def describe_mismatch(model: torch.nn.Module, sd: Mapping[str, torch.Tensor]) -> list[str]:
    """Human-readable differences between a model's state dict and a loaded one (empty if they match)."""
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = sorted(
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(own) & set(sd)
        if tuple(own[k].shape) != tuple(sd[k].shape)
    )

    def clip(xs: list[str]) -> str:
        return ", ".join(xs[:8]) + (f", ... (+{len(xs) - 8} more)" if len(xs) > 8 else "")

    out = []
    if missing:
        out.append(f"missing keys [{clip(missing)}]")
    if unexpected:
        out.append(f"unexpected keys [{clip(unexpected)}]")
    if shapes:
        out.append(f"shape differences [{clip(shapes)}]")
    return out


def load_strict(model: torch.nn.Module, sd: Mapping[str, torch.Tensor], source: str, expected: str) -> None:
    """Load ``sd`` into ``model`` strictly, or raise one CheckpointError naming every difference."""
    problems = describe_mismatch(model, sd)
    if problems:
        raise CheckpointError(
            f"{source} does not match the expected config {expected}: " + "; ".join(problems)
            + ". Pass the config the weights were trained with (e.g. the right model name or vocab size)."
        )
    own = model.state_dict()
    cast = {k: v.to(own[k].dtype) if v.is_floating_point() and own[k].is_floating_point() else v for k, v in sd.items()}
    model.load_state_dict(cast, strict=True)


def config_to_dict(cfg: Any) -> dict:
    return asdict(cfg) if is_dataclass(cfg) else dict(cfg)


def save_weights(path: str | os.PathLike, model: torch.nn.Module, model_config: Any, kind: str) -> None:
    """Write a self-describing safetensors file atomically (temp file, fsync, rename)."""
    from safetensors.torch import save

    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    blob = save(sd, metadata={"model_config": json.dumps(config_to_dict(model_config)), "model_kind": kind})
    with atomic_open(path, "wb") as f:
        f.write(blob)


def _resolve_config(kind: str, config: Any, saved: dict | None, registry: Mapping[str, Any], factory, path,
                    overrides: dict):
    if config is None:
        if saved is None:
            names = ", ".join(sorted(registry))
            raise CheckpointError(
                f"{path} carries no model config (an upstream LlamaGen file?); pass the {kind} config it was "
                f"trained with, one of {names} (plus e.g. block_size=576 for 384 px GPTs)"
            )
        return factory({**saved, **overrides})
    if isinstance(config, str):
        if config not in registry:
            raise CheckpointError(f"unknown {kind} config {config!r}; choose one of {sorted(registry)}")
        return factory({**_as_dict(registry[config]), **overrides})
    return factory({**_as_dict(config), **overrides})


def _as_dict(cfg: Any) -> dict:
    return config_to_dict(cfg) if is_dataclass(cfg) else dict(cfg)


def _check_kind(ckpt: Mapping[str, Any], kind: str, path) -> None:
    found = ckpt.get("model_kind")
    if found is not None and found != kind:
        raise CheckpointError(f"{path} holds a {found} model, not a {kind}; pass the matching file")


def _load_model(path, kind: str, config: Any, registry: Mapping[str, Any], from_dict, build, describe: tuple[str, ...],
                prefer_ema: bool, overrides: dict, ckpt: Mapping[str, Any] | None = None):
    """``ckpt``: the file's content when the caller has read it already (a training checkpoint is large)."""
    ckpt = read_checkpoint(path) if ckpt is None else ckpt
    _check_kind(ckpt, kind, path)
    sd = extract_state_dict(ckpt, prefer_ema=prefer_ema)
    saved = ckpt.get("model_config") if isinstance(ckpt.get("model_config"), Mapping) else None
    name = kind.upper()
    try:
        cfg = _resolve_config(name, config, saved, registry, from_dict, path, overrides)
    except CheckpointError:
        raise
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: invalid {name} config ({e})") from None
    model = build(cfg)
    load_strict(model, sd, str(path), _describe(cfg, describe))
    return model.eval()


def load_gpt(path: str | os.PathLike, config: Any = None, *, prefer_ema: bool = True, **overrides):
    """A GPT with the weights of ``path`` (upstream .pt, FSDP bare dict, safetensors, or ours; EMA if present).

    ``config`` is a registry name ("GPT-XL"), a GPTConfig, or None for files that carry their own config.
    """
    return _load_gpt(path, config, prefer_ema, overrides)


def _load_gpt(path, config: Any, prefer_ema: bool, overrides: dict, ckpt: Mapping[str, Any] | None = None):
    from masc_llamagen.models.gpt import GPT, GPT_CONFIGS, GPTConfig

    def build(cfg):
        with torch.device("meta"):  # no random init of weights that are overwritten right away
            model = GPT(cfg)
        return model.to_empty(device="cpu")

    return _load_model(path, "gpt", config, GPT_CONFIGS, GPTConfig.from_dict, build,
                       ("dim", "n_layer", "n_head", "vocab_size", "num_classes"), prefer_ema, overrides, ckpt)


def load_vq(path: str | os.PathLike, config: Any = None, **overrides):
    """A VQModel with the weights of ``path``; ``config`` is a registry name ("VQ-16"), a VQConfig or None."""
    from masc_llamagen.tokenizer.vq import VQ_CONFIGS, VQConfig, VQModel

    return _load_model(path, "vq", config, VQ_CONFIGS, VQConfig.from_dict, VQModel,
                       ("codebook_size", "codebook_embed_dim", "z_channels", "ch", "encoder_ch_mult",
                        "decoder_ch_mult"), False, overrides)


def _describe(cfg: Any, keys: tuple[str, ...]) -> str:
    d = _as_dict(cfg)
    return "(" + ", ".join(f"{k}={d[k]}" for k in keys if k in d) + ")"


def vq_codebook(vq: torch.nn.Module) -> np.ndarray:
    """A VQ model's codebook as float32 on the CPU (a copy: training the model later does not change it)."""
    return vq.quantize.embedding.weight.detach().to("cpu", torch.float32).numpy().copy()


def read_codebook(path: str | os.PathLike) -> np.ndarray:
    """The float32 codebook of a VQ checkpoint file, without building the model (any format read_checkpoint reads)."""
    sd, _ = read_state_dict(path)
    if CODEBOOK_KEY not in sd:
        raise CheckpointError(f"{path} has no {CODEBOOK_KEY}; is it a VQ tokenizer?")
    return sd[CODEBOOK_KEY].to(torch.float32).numpy()


def tokenizer_fingerprint(vq: torch.nn.Module) -> str:
    """sha256 of a VQ model's raw codebook (float32 bytes): codes, trees and checkpoints record it, so what one
    tokenizer made is never read with another."""
    return codebook_sha256(vq_codebook(vq))
