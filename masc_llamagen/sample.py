"""Sample images from a training checkpoint: PNGs plus one ADM-style ``.npz`` (``arr_0``: uint8 N x H x W x 3).

    python -m masc_llamagen.sample checkpoint=PATH [num_samples=50000 cfg_scale=2.5 decoder=frequency ...]

Runs on every process of an ``accelerate launch``: rank r samples the contiguous index range
``[N r / W, N (r + 1) / W)`` and streams its images to ``shard-r.npz`` in the output directory (temp file, fsync,
rename); rank 0 then streams the shards, one at a time, into ``samples.npz`` in index order and deletes them. No
rank holds more than a batch of images. Sample ``i``'s randomness comes from its own generator seeded by
``(seed, i)``, so the npz is the same whatever the batch size or number of processes (up to floating-point batch
effects of the model). A ``<npz>.json`` sidecar records the checkpoint, head, decoder, sampling settings and the
training dataset, so ``scripts/eval.sh`` can pick the right reference set.
"""

from __future__ import annotations

import dataclasses
import json
import math
import zipfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig

from masc_llamagen.checkpoint import ForSampling, load_for_sampling
from masc_llamagen.data.images import heldout_split
from masc_llamagen.errors import user_errors
from masc_llamagen.masc.vocabulary import HeadError, Vocabulary
from masc_llamagen.models.sampling import SamplingConfig, SamplingError, check_null_class, generate
from masc_llamagen.sample_config import SampleConfig, SampleConfigError, register, validate
from masc_llamagen.utils.images import to_uint8_numpy
from masc_llamagen.utils.io import atomic_open
from masc_llamagen.weights import CheckpointError

register()  # sample.yaml lists the typed schema (base_sample) first in its defaults

_MASK64 = (1 << 64) - 1


def sample_labels(n: int, num_classes: int, mode: str, seed: int) -> torch.Tensor:
    if mode == "balanced":
        return torch.arange(n) % num_classes if n < num_classes else torch.arange(n) * num_classes // n
    if mode == "random":
        return torch.randint(0, num_classes, (n,), generator=torch.Generator().manual_seed(seed))
    raise ValueError(f"labels={mode!r}; use 'balanced' or 'random'")


def sample_seed(seed: int, index: int) -> int:
    """The 64-bit seed of sample ``index``'s own generator: a hash of ``(seed, index)`` and of nothing else."""
    return int(np.random.SeedSequence([seed & _MASK64, int(index)]).generate_state(1, np.uint64)[0])


def sample_uniforms(seed: int, indices: torch.Tensor, num_tokens: int,
                    device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample uniforms in [0, 1): (B, num_tokens) float64 for the token draws and (B, num_tokens) for the member
    decoder. Row ``b`` comes from a CPU generator seeded by ``(seed, indices[b])`` (drawn on the CPU, where that
    generator lives, then moved to ``device``), so it is the same on any device, batch or rank."""
    gens = (torch.Generator().manual_seed(sample_seed(seed, i)) for i in torch.as_tensor(indices).reshape(-1).tolist())
    rows = [torch.rand(2, num_tokens, dtype=torch.float64, generator=g) for g in gens]
    u = torch.stack(rows, dim=1) if rows else torch.empty(2, 0, num_tokens, dtype=torch.float64)
    u = u.to(device) if device is not None else u
    return u[0], u[1]


@torch.no_grad()
def sample_tokens(model, vocab: Vocabulary, labels: torch.Tensor, sampling: SamplingConfig,
                  seed: int | torch.Generator = 0, dtype: torch.dtype = torch.float32,
                  indices: torch.Tensor | None = None, caption_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Labels (class ids, or t2i caption features with ``caption_mask``) -> model ids -> fine tokens (B, block_size)
    on the model's device.

    ``seed`` (int): sample ``indices[b]`` (default ``0..B-1``) draws from its own generator seeded by
    ``(seed, indices[b])``, independent of the batch. A ``torch.Generator`` instead draws the whole batch's uniforms
    from it, on the generator's device (batch-dependent; kept for older callers).
    """
    n = model.config.block_size
    device = model.output.weight.device
    if isinstance(seed, torch.Generator):
        u = torch.rand(2, len(labels), n, generator=seed, dtype=torch.float64, device=seed.device).to(device)
        tok_u, member_u = u[0], u[1]
    else:
        idx = torch.arange(len(labels)) if indices is None else torch.as_tensor(indices).reshape(-1)
        if idx.numel() != len(labels):
            raise SamplingError(f"{idx.numel()} sample indices for {len(labels)} labels; pass one index per label")
        tok_u, member_u = sample_uniforms(int(seed), idx, n, device)
    ids = generate(model, labels, n, sampling=sampling, dtype=dtype, uniforms=tok_u, caption_mask=caption_mask)
    return vocab.decode(ids, uniforms=member_u)


@torch.no_grad()
def sample_images(model, vocab: Vocabulary, vq, labels: torch.Tensor, sampling: SamplingConfig,
                  seed: int | torch.Generator = 0, dtype: torch.dtype = torch.float32,
                  indices: torch.Tensor | None = None, image_size: int | None = None,
                  caption_mask: torch.Tensor | None = None) -> np.ndarray:
    """Labels -> fine tokens (``sample_tokens``, same ``seed``/``indices``) -> decoded uint8 images (B, H, W, 3).

    ``image_size``: bicubic resize of the decoded [-1, 1] images before quantising (LlamaGen's ``image_size_eval``).
    """
    side = math.isqrt(model.config.block_size)
    tokens = sample_tokens(model, vocab, labels, sampling, seed, dtype, indices, caption_mask)
    images = vq.decode_code(tokens.reshape(-1, side, side))
    if image_size is not None and image_size != images.shape[-1]:
        images = torch.nn.functional.interpolate(images.float(), size=(image_size, image_size), mode="bicubic")
    return to_uint8_numpy(images)


def share(n: int, rank: int, world: int) -> range:
    """The contiguous index range process ``rank`` of ``world`` samples (sizes differ by at most one)."""
    return range(n * rank // world, n * (rank + 1) // world)


class _Rows:
    """One ``.npy`` member of known shape, written a block of rows at a time; refuses too few or too many rows."""

    def __init__(self, f, shape: tuple[int, ...], dtype: np.dtype):
        self._f, self.shape, self.dtype, self.done = f, tuple(int(d) for d in shape), np.dtype(dtype), 0
        np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(self.dtype),
                                                 "fortran_order": False, "shape": self.shape})

    def write(self, rows: np.ndarray) -> None:
        rows = np.ascontiguousarray(rows, dtype=self.dtype)
        if rows.shape[1:] != self.shape[1:] or self.done + rows.shape[0] > self.shape[0]:
            raise RuntimeError(f"rows of shape {rows.shape} after {self.done} do not fit an array of {self.shape}")
        self._f.write(rows.reshape(-1).view(np.uint8).data)
        self.done += rows.shape[0]

    def close(self) -> None:
        if self.done != self.shape[0]:
            raise RuntimeError(f"wrote {self.done} of {self.shape[0]} rows")
        self._f.close()


class _NpzWriter:
    """An uncompressed ``.npz`` (what ``np.savez`` writes) built member by member, published atomically:
    written to a temp file beside ``path``, fsynced, then renamed over it."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._stack = ExitStack()  # the atomic writer stays open across batches; __exit__ commits or discards it
        self._file = self._stack.enter_context(atomic_open(self.path, "wb"))
        self._zip = zipfile.ZipFile(self._file, "w", zipfile.ZIP_STORED, allowZip64=True)
        self._open: _Rows | None = None

    def rows(self, name: str, shape: tuple[int, ...], dtype=np.uint8) -> _Rows:
        self._open = _Rows(self._zip.open(f"{name}.npy", "w", force_zip64=True), shape, dtype)
        return self._open

    def add(self, name: str, arr: np.ndarray) -> None:
        with self._zip.open(f"{name}.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array(f, np.ascontiguousarray(arr), allow_pickle=False)

    def __enter__(self) -> _NpzWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self._zip.close()
            else:  # leave whatever was at path untouched: close what is open, the atomic writer drops the temp file
                try:
                    if self._open is not None:
                        self._open._f.close()
                    self._zip.close()
                except Exception:  # noqa: BLE001 - the original error is the one to report
                    pass
        finally:
            self._stack.__exit__(exc_type, exc, tb)


@contextmanager
def _npy_member(path: Path, name: str) -> Iterator[tuple[tuple[int, ...], np.dtype, object]]:
    """(shape, dtype, file positioned at the data) of one member of an npz, without reading the data."""
    with zipfile.ZipFile(path) as z, z.open(f"{name}.npy") as f:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(f)
        if fortran:
            raise RuntimeError(f"{path}: {name} is Fortran-ordered; not written by this sampler")
        yield shape, dtype, f


def _shard_path(out: Path, rank: int) -> Path:
    return out / f"shard-{rank:05d}.npz"


def _assemble(out: Path, world: int, n: int, labels: torch.Tensor, chunk_rows: int) -> tuple[int, ...]:
    """Rank 0: stream every shard, one at a time and ``chunk_rows`` images at a time, into ``samples.npz``."""
    shards, image_shape = [_shard_path(out, r) for r in range(world)], None
    for r, path in enumerate(shards):
        with np.load(path) as z:
            lo, hi, total = (int(v) for v in z["meta"])
        want = share(n, r, world)
        if (lo, hi, total) != (want.start, want.stop, n):
            raise RuntimeError(f"{path} holds samples {lo}..{hi} of {total}, expected {want.start}..{want.stop} of {n}")
        if hi > lo and image_shape is None:
            with _npy_member(path, "arr_0") as (shape, _, _):
                image_shape = tuple(shape[1:])
    final = (n, *image_shape)
    with _NpzWriter(out / "samples.npz") as w:
        rows = w.rows("arr_0", final, np.uint8)
        for path in shards:
            with _npy_member(path, "arr_0") as (shape, dtype, f):
                if shape[0] and (dtype != np.uint8 or tuple(shape[1:]) != image_shape):
                    raise RuntimeError(f"{path}: images of {shape} {dtype}, expected uint8 x {image_shape}")
                row_bytes, left = math.prod(image_shape), shape[0]
                while left:
                    k = min(chunk_rows, left)
                    rows.write(np.frombuffer(f.read(k * row_bytes), dtype=np.uint8).reshape(k, *image_shape))
                    left -= k
        rows.close()
        w.add("labels", labels.numpy())
    for path in shards:
        path.unlink()
    return final


def _heldout(name: str | None) -> str | None:
    """The split a sample set is scored against by default: the dataset's held-out images."""
    try:
        return heldout_split(name) if name else None
    except (KeyError, ValueError):
        return None


def sample(cfg: DictConfig | SampleConfig) -> dict:
    """Sample ``cfg.num_samples`` images (the options are checked first: ``SampleConfigError``) and write the npz."""
    opts = validate(cfg)
    from accelerate import Accelerator

    acc = Accelerator(cpu=not torch.cuda.is_available())
    ck_path = Path(opts.checkpoint)
    ck = load_for_sampling(ck_path, use_ema=opts.use_ema, decoder=opts.decoder, smoothing=opts.smoothing,
                           vq_checkpoint=opts.vq_checkpoint, vq_arch=opts.vq_arch)
    model, vocab, vq = ck.model.to(acc.device), ck.vocabulary, ck.vq.to(acc.device)
    sc = opts.sampling
    check_null_class(model, sc.cfg_scale)
    if model.config.model_type == "t2i":
        return _sample_t2i(opts, acc, ck, ck_path, model, vocab, vq, sc)
    n, bs, world, rank = opts.num_samples or 100, opts.batch_size, acc.num_processes, acc.process_index
    labels = sample_labels(n, model.config.num_classes, opts.labels, opts.seed)
    mine = share(n, rank, world)
    run_dir = ck_path.parent.parent
    out = Path(opts.out_dir) if opts.out_dir else (
        run_dir / "samples" / f"{ck_path.stem}-cfg{opts.cfg_scale:g}-{vocab.decoder if not vocab.is_flat else 'flat'}")
    out.mkdir(parents=True, exist_ok=True)
    from tqdm.auto import tqdm

    # One process: straight into samples.npz. Several: each streams its share to its shard; rank 0 joins them.
    with _NpzWriter(out / "samples.npz" if world == 1 else _shard_path(out, rank)) as w:
        rows = None
        for start in tqdm(range(mine.start, mine.stop, bs), disable=not acc.is_main_process, desc="sample"):
            idx = torch.arange(start, min(start + bs, mine.stop))
            imgs = sample_images(model, vocab, vq, labels[idx], sc, opts.seed, opts.torch_dtype, indices=idx,
                                 image_size=opts.image_size_eval)
            if rows is None:
                rows = w.rows("arr_0", (len(mine), *imgs.shape[1:]), np.uint8)
            rows.write(imgs)
            if opts.png:
                from PIL import Image

                for i, img in zip(idx.tolist(), imgs, strict=True):
                    Image.fromarray(img).save(out / f"{i:06d}_c{int(labels[i])}.png")
            del imgs
        if rows is None:  # more processes than samples: an empty share
            rows = w.rows("arr_0", (0, 0, 0, 3), np.uint8)
        rows.close()
        if world == 1:
            w.add("labels", labels.numpy())
        else:
            w.add("meta", np.array([mine.start, mine.stop, n], dtype=np.int64))
    acc.wait_for_everyone()
    result = {}
    if acc.is_main_process:
        npz = out / "samples.npz"
        shape = _assemble(out, world, n, labels, chunk_rows=bs) if world > 1 else rows.shape
        data_cfg = ck.config.get("data", {})
        meta = {"checkpoint": str(ck_path), "step": ck.step, "ema": bool(opts.use_ema),
                "head": vocab.name, "k": vocab.k, "decoder": None if vocab.is_flat else vocab.decoder,
                "sampling": dataclasses.asdict(opts), "num_samples": int(n),
                "dataset": data_cfg.get("name"), "split": _heldout(data_cfg.get("name")),
                "data_root": data_cfg.get("root"), "image_size": data_cfg.get("image_size"),
                "npz": str(npz)}
        (out / "samples.npz.json").write_text(json.dumps(meta, indent=2))
        print(f"wrote {shape[0]} samples to {npz}")
        result = {"npz": str(npz), "shape": tuple(shape), **meta}
    acc.wait_for_everyone()
    return result


def _sample_t2i(opts, acc, ck: ForSampling, ck_path: Path, model, vocab, vq, sc) -> dict:
    """One image per prompt, as LlamaGen writes them: ``images/%06d.png``, ``captions.txt``, ``result.jsonl``.

    Each rank encodes and samples its own contiguous share and writes its PNGs; nothing is gathered. Sample i is
    seeded by ``(seed, i)``, so the images do not depend on the number of processes or the batch size.
    """
    from masc_llamagen.data.prompts import load_prompts  # a file (one prompt a line), coco or parti
    from masc_llamagen.text import build_text_encoder

    if not opts.prompts:
        raise SampleConfigError("a text-to-image checkpoint samples from prompts: pass prompts=FILE (one prompt a "
                                "line), prompts=coco or prompts=parti")
    prompts = load_prompts(opts.prompts)
    if opts.num_samples is not None:
        prompts = prompts[: opts.num_samples]
    text_cfg = ck.config.get("text", {})
    encoder = build_text_encoder(opts.text_encoder or text_cfg.get("encoder", "wordllama"),
                                 opts.text_path or text_cfg.get("path"), device=acc.device,
                                 max_length=model.config.cls_token_num)  # longer prompts are truncated
    if encoder.dim != model.config.caption_dim:
        raise SampleConfigError(f"text encoder {encoder.name} gives {encoder.dim}-d features but the model takes "
                                f"{model.config.caption_dim}-d: pass text_encoder=<the one it was trained with>")
    n, bs = len(prompts), opts.batch_size
    mine = share(n, acc.process_index, acc.num_processes)
    out = Path(opts.out_dir) if opts.out_dir else (ck_path.parent.parent / "samples" /
                                                   f"{ck_path.stem}-cfg{opts.cfg_scale:g}-{Path(opts.prompts).stem}")
    (out / "images").mkdir(parents=True, exist_ok=True)
    from PIL import Image
    from tqdm.auto import tqdm

    for start in tqdm(range(mine.start, mine.stop, bs), disable=not acc.is_main_process, desc="sample"):
        idx = torch.arange(start, min(start + bs, mine.stop))
        feats, mask = encoder([prompts[i] for i in idx.tolist()], slots=model.config.cls_token_num)
        imgs = sample_images(model, vocab, vq, feats, sc, opts.seed, opts.torch_dtype, indices=idx,
                             image_size=opts.image_size_eval, caption_mask=mask)
        for i, img in zip(idx.tolist(), imgs, strict=True):
            tmp = out / "images" / f".{i:06d}.png.tmp"
            Image.fromarray(img).save(tmp, format="PNG")
            tmp.replace(out / "images" / f"{i:06d}.png")
    acc.wait_for_everyone()
    result = {}
    if acc.is_main_process:
        (out / "captions.txt").write_text("".join(p.replace("\n", " ") + "\n" for p in prompts))
        with open(out / "result.jsonl", "w") as f:
            for i, p in enumerate(prompts):
                f.write(json.dumps({"index": i, "image": f"images/{i:06d}.png", "caption": p}) + "\n")
        data_cfg = ck.config.get("data", {})
        meta = {"checkpoint": str(ck_path), "step": ck.step, "ema": bool(opts.use_ema), "task": "t2i",
                "head": vocab.name, "k": vocab.k, "decoder": None if vocab.is_flat else vocab.decoder,
                "prompts": opts.prompts, "num_samples": n, "text_encoder": encoder.describe(),
                "sampling": dataclasses.asdict(opts), "dataset": data_cfg.get("name"),
                "split": _heldout(data_cfg.get("name")), "data_root": data_cfg.get("root"),
                "image_size": data_cfg.get("image_size"), "images": str(out / "images")}
        (out / "samples.json").write_text(json.dumps(meta, indent=2, default=str))
        print(f"wrote {n} images to {out / 'images'}")
        result = {"out_dir": str(out), **meta}
    acc.wait_for_everyone()
    return result


def _one_line(e: BaseException) -> str:
    return "; ".join(line.strip() for line in str(e).strip().splitlines() if line.strip()) or type(e).__name__


@hydra.main(version_base="1.3", config_path="../configs", config_name="sample")
def main(cfg: DictConfig) -> None:
    """User errors (bad options, unusable checkpoints or heads, unwritable outputs): one line and exit 1."""
    with user_errors():
        try:
            sample(cfg)
        except (CheckpointError, HeadError, SamplingError) as e:  # listed even where they are MascErrors
            raise SystemExit(f"error: {_one_line(e)}") from None


if __name__ == "__main__":
    main()
