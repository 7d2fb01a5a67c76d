"""Sample images from a training checkpoint: PNGs plus one ADM-style ``.npz`` (``arr_0``: uint8 N x H x W x 3).

    python -m masc_llamagen.sample checkpoint=PATH [num_samples=50000 cfg_scale=2.5 decoder=frequency ...]

Runs on every process of an ``accelerate launch`` (each draws a disjoint, seeded share; rank 0 packs the npz). A
``<npz>.json`` sidecar records the checkpoint, head, decoder, sampling settings and the training dataset, so
``scripts/eval.sh`` can pick the right reference set.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from masc_llamagen.checkpoint import CheckpointError, load_gpt, load_vq
from masc_llamagen.masc.heads import Vocabulary, build_vocabulary
from masc_llamagen.models.sampling import SamplingConfig, generate
from masc_llamagen.train.checkpointing import load_training_checkpoint
from masc_llamagen.train.images import to_uint8


def sample_labels(n: int, num_classes: int, mode: str, seed: int) -> torch.Tensor:
    if mode == "balanced":
        return torch.arange(n) % num_classes if n < num_classes else torch.arange(n) * num_classes // n
    if mode == "random":
        return torch.randint(0, num_classes, (n,), generator=torch.Generator().manual_seed(seed))
    raise ValueError(f"labels={mode!r}; use 'balanced' or 'random'")


@torch.no_grad()
def sample_images(model, vocab: Vocabulary, vq, labels: torch.Tensor, sampling: SamplingConfig,
                  generator: torch.Generator, dtype: torch.dtype = torch.float32) -> np.ndarray:
    """Labels -> model ids -> fine tokens (the head's member decoder) -> decoded uint8 images (B, H, W, 3)."""
    side = math.isqrt(model.config.block_size)
    ids = generate(model, labels, sampling=sampling, generator=generator, dtype=dtype)
    tokens = vocab.decode(ids.cpu(), generator=generator).to(ids.device)
    return to_uint8(vq.decode_code(tokens.reshape(-1, side, side)))


def _heldout(name: str | None) -> str | None:
    """The split a sample set is scored against by default: the dataset's held-out images."""
    from masc_llamagen.data.images import heldout_split

    try:
        return heldout_split(name) if name else None
    except (KeyError, ValueError):
        return None


def head_from_checkpoint(ck: dict, decoder: str | None, smoothing: float) -> Vocabulary:
    head = ck.get("head")
    if head is None:
        raise CheckpointError("checkpoint has no head; was it written by masc_llamagen.train?")
    if decoder is None or decoder == head["decoder"] or head["name"] == "flat":
        return Vocabulary.from_state(head)
    counts = head.get("token_counts")
    return build_vocabulary(head["name"], int(head["codebook_size"]), head["mapping"], decoder=decoder,
                            counts=None if counts is None else counts.numpy(), smoothing=smoothing)


def sample(cfg: DictConfig) -> dict:
    from accelerate import Accelerator

    acc = Accelerator(cpu=not torch.cuda.is_available())
    ck_path = Path(cfg.checkpoint)
    ck = load_training_checkpoint(ck_path)
    model = load_gpt(ck_path, prefer_ema=cfg.use_ema).to(acc.device)
    vocab = head_from_checkpoint(ck, cfg.decoder, cfg.smoothing)
    tok_path = cfg.vq_checkpoint or ck.get("tokenizer", {}).get("checkpoint")
    if not tok_path:
        raise CheckpointError("no tokenizer recorded in the checkpoint; pass vq_checkpoint=PATH")
    vq = load_vq(tok_path, cfg.vq_arch).to(acc.device)
    recorded = ck.get("tokenizer", {}).get("codebook_sha256")
    if recorded:
        from masc_llamagen.data.extract import tokenizer_fingerprint

        have = tokenizer_fingerprint(vq)
        if have != recorded:
            raise CheckpointError(f"tokenizer {tok_path} ({have[:12]}) is not the one the model was trained on "
                                  f"({recorded[:12]}); pass vq_checkpoint=<the training tokenizer>")
    sc = SamplingConfig(cfg_scale=cfg.cfg_scale, cfg_interval=cfg.cfg_interval, temperature=cfg.temperature,
                        top_k=cfg.top_k, top_p=cfg.top_p)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.dtype]
    n_cls = model.config.num_classes
    labels = sample_labels(cfg.num_samples, n_cls, cfg.labels, cfg.seed)
    mine = torch.arange(acc.process_index, cfg.num_samples, acc.num_processes)
    run_dir = ck_path.parent.parent
    out = Path(cfg.out_dir) if cfg.out_dir else (
        run_dir / "samples" / f"{ck_path.stem}-cfg{cfg.cfg_scale:g}-{vocab.decoder if not vocab.is_flat else 'flat'}")
    out.mkdir(parents=True, exist_ok=True)
    images = {}
    from tqdm.auto import tqdm

    for start in tqdm(range(0, len(mine), cfg.batch_size), disable=not acc.is_main_process, desc="sample"):
        idx = mine[start : start + cfg.batch_size]
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + int(idx[0]))  # depends on the sample, not the rank
        imgs = sample_images(model, vocab, vq, labels[idx], sc, g, dtype)
        for i, img in zip(idx.tolist(), imgs, strict=True):
            images[i] = img
            if cfg.png:
                from PIL import Image

                Image.fromarray(img).save(out / f"{i:06d}_c{int(labels[i])}.png")
    parts = [images]
    if acc.num_processes > 1:
        import torch.distributed as dist

        parts = [None] * acc.num_processes
        dist.all_gather_object(parts, images)
    result = {}
    if acc.is_main_process:
        data_cfg = (ck.get("config") or {}).get("data", {})
        merged = {k: v for p in parts for k, v in p.items()}
        arr = np.stack([merged[i] for i in range(cfg.num_samples)])
        npz = out / "samples.npz"
        tmp = out / ".samples.npz.tmp.npz"
        np.savez(tmp, arr_0=arr, labels=labels.numpy())
        tmp.replace(npz)
        meta = {"checkpoint": str(ck_path), "step": int(ck["step"]), "ema": bool(cfg.use_ema),
                "head": vocab.name, "k": vocab.k, "decoder": None if vocab.is_flat else vocab.decoder,
                "sampling": OmegaConf.to_container(cfg, resolve=True), "num_samples": int(cfg.num_samples),
                "dataset": data_cfg.get("name"), "split": _heldout(data_cfg.get("name")),
                "data_root": data_cfg.get("root"), "image_size": data_cfg.get("image_size"),
                "npz": str(npz)}
        (out / "samples.npz.json").write_text(json.dumps(meta, indent=2))
        print(f"wrote {arr.shape[0]} samples to {npz}")
        result = {"npz": str(npz), "shape": arr.shape, **meta}
    acc.wait_for_everyone()
    return result


@hydra.main(version_base="1.3", config_path="../configs", config_name="sample")
def main(cfg: DictConfig) -> None:
    try:
        sample(cfg)
    except CheckpointError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
