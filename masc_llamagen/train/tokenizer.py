"""Train LlamaGen's VQ tokenizer on an image dataset, then score it on held-out images.

    python -m masc_llamagen.train.tokenizer [steps=3000 vq.arch=VQ-small force=true ...]   (configs/vq_train.yaml)
    accelerate launch -m masc_llamagen.train.tokenizer vq.arch=VQ-16 data.name=imagefolder ...   (DDP, N GPUs)

or, from Python, ``train_tokenizer({"steps": 500, "out": "..."})`` (keys not given take the schema's defaults,
masc_llamagen.train.tokenizer_config.VQTrainConfig).

Losses are upstream's: L2 reconstruction + codebook + beta-weighted commitment (+ the optional entropy term), with
the perceptual and PatchGAN terms of masc_llamagen.tokenizer.losses pluggable but off by default. Ours:

* Dead-code re-seeding (masc_llamagen.tokenizer.reseed) every ``reseed_every`` steps, never in the last
  ``reseed_every`` steps, so the decoder always gets time to learn the codes it will be scored with.
* Exact resume. Every ``ckpt_every`` steps the whole state (weights, optimizer, LR schedule, discriminator, every
  RNG, the dead-code counts, the loss window) goes atomically to ``<run_dir>/train_state.pt``; the data position is
  the step itself (masc_llamagen.train.batches.StepBatches), so a killed run continues bit-identically.
* Skip-if-up-to-date. The weights go to ``out`` (self-describing safetensors: ``load_vq(out)`` and ``tree build``
  take it as is) and a report to ``<out>.json`` holding the config and the weights' SHA-256. A later call with the
  same config returns that report without training (``force=true`` retrains).
"""

from __future__ import annotations

import json
import os
import time
from collections import deque
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import hydra
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import DataLoader, Dataset

from masc_llamagen.errors import ConfigError, TrainingError, first_line, user_errors
from masc_llamagen.tokenizer.evaluate import RFIDScorer, evaluate_reconstruction
from masc_llamagen.tokenizer.losses import PatchDiscriminator, adaptive_gan_weight, build_perceptual, hinge_d_loss
from masc_llamagen.tokenizer.reseed import reseed_dead_codes
from masc_llamagen.tokenizer.vq import VQModel
from masc_llamagen.train.batches import StepBatches
from masc_llamagen.train.checkpointing import capture_rng, restore_rng
from masc_llamagen.train.logging import MetricLogger
from masc_llamagen.train.optim import build_optimizer, warmup_cosine
from masc_llamagen.train.tokenizer_config import build_vq_config, config_record, register, resolve_config
from masc_llamagen.utils.devices import pick_device
from masc_llamagen.utils.io import atomic_open, atomic_write_json
from masc_llamagen.utils.provenance import file_sha256
from masc_llamagen.weights import CheckpointError, read_checkpoint, save_weights

CONFIG_NAME = "vq_train"
STATE_KIND = "vq_train_state"
FINAL_LOSS_WINDOW = 50  # "final" losses are means over the last steps, not one noisy batch


def report_path(out: str | os.PathLike) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".json")


def run_dir_of(cfg: DictConfig) -> Path:
    return Path(cfg.run_dir) if cfg.run_dir else Path(cfg.out).with_suffix(".run")


def up_to_date_report(cfg: Mapping[str, Any] | DictConfig | None = None) -> dict | None:
    """The existing report when ``out`` and ``<out>.json`` hold exactly this config's result, else None."""
    cfg = resolve_config(cfg)
    out = Path(cfg.out)
    if not (out.is_file() and report_path(out).is_file()):
        return None
    try:
        report = json.loads(report_path(out).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if report.get("config") != config_record(cfg) or report.get("weights_sha256") != file_sha256(out):
        return None
    return report


def train_tokenizer(cfg: Mapping[str, Any] | DictConfig | None = None, rfid: RFIDScorer | None = None
                    ) -> dict[str, Any]:
    """Train (or reuse) a VQ tokenizer; returns the report also written to ``<out>.json``.

    ``cfg`` overlays the schema's defaults (a partial dict is enough). ``rfid``: the scorer for rFID (e.g.
    ``masc_llamagen.eval.metrics.compute_metrics``); without one the report's ``rfid`` is None. The returned dict has
    ``skipped=True`` when an up-to-date result was reused, ``stopped=True`` when ``stop_after`` ended this
    invocation early (the run resumes from its checkpoint next time).
    """
    cfg = resolve_config(cfg)
    if not cfg.force:
        report = up_to_date_report(cfg)
        if report is not None:
            return {**report, "skipped": True}
    threads = torch.get_num_threads()
    if cfg.num_threads:
        torch.set_num_threads(int(cfg.num_threads))
    try:
        with _accelerator(cfg) as acc:
            return _train(cfg, acc, rfid)
    finally:
        torch.set_num_threads(threads)  # a library call must not leave the process's thread count changed


@contextmanager
def _accelerator(cfg: DictConfig) -> Iterator[Any]:
    """An Accelerator for this run. In a single process Accelerate's global state is reset before and after:
    it refuses a second Accelerator with other precision or device, and a pipeline trains the GPT next."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    device = pick_device(cfg.device)
    single = int(os.environ.get("WORLD_SIZE", "1")) == 1
    if single:
        AcceleratorState._reset_state(reset_partial_state=True)
        if device.type == "cuda" and device.index is not None:
            torch.cuda.set_device(device)
    try:
        acc = Accelerator(cpu=device.type == "cpu", mixed_precision=cfg.mixed_precision)
    except ValueError as e:  # e.g. bf16 on a GPU without it
        raise ConfigError(f"mixed_precision={cfg.mixed_precision} on {device}: {first_line(e)}") from None
    try:
        yield acc
    finally:
        if single:
            AcceleratorState._reset_state(reset_partial_state=True)


class _Step(nn.Module):
    """The whole forward of a training step in one module call, as DDP needs to synchronise its gradients."""

    def __init__(self, vq: VQModel) -> None:
        super().__init__()
        self.vq = vq

    def forward(self, x: torch.Tensor):
        latents = self.vq.quant_conv(self.vq.encoder(x))
        zq, idx, q = self.vq.quantize(latents)
        return self.vq.decode(zq), latents, idx, q


class _ByIndex(Dataset):
    """StepBatches' (epoch, index) keys onto a plain image dataset."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        return self.dataset[key[1]]


def _load_state(path: Path, record: dict) -> dict | None:
    if not path.is_file():
        return None
    try:
        state = read_checkpoint(path)
    except CheckpointError as e:
        raise TrainingError(f"{e}; delete it to start over, or pass resume=false") from None
    if state.get("kind") != STATE_KIND:
        raise TrainingError(f"{path} is not a tokenizer-training state; delete it or pass resume=false")
    if state["config"] != record:
        a, b = _flatten(state["config"]), _flatten(record)
        diff = [f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}" for k in sorted(set(a) | set(b))
                if a.get(k) != b.get(k)]
        raise TrainingError(f"{path} belongs to a run with another config ({'; '.join(diff)}); rerun with that "
                            "config to finish it, or pass resume=false (or another run_dir) to start over")
    return state


def _flatten(d: Mapping, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, Mapping) else {f"{prefix}{k}": v})
    return out


def _train(cfg: DictConfig, acc, rfid: RFIDScorer | None) -> dict[str, Any]:
    from accelerate.utils import gather_object, set_seed
    from tqdm.auto import tqdm

    from masc_llamagen.data.images import build_image_dataset, heldout_split

    t_start = time.time()
    load_start = os.getloadavg()
    out, run_dir, record = Path(cfg.out), run_dir_of(cfg), config_record(cfg)
    state_path = run_dir / "train_state.pt"
    vq_config = build_vq_config(cfg.vq)
    steps, world = int(cfg.steps), acc.num_processes
    if cfg.batch_size % world:
        raise ConfigError(f"batch_size={cfg.batch_size} is not divisible by the {world} processes")
    use_perceptual, use_gan = cfg.perceptual_weight > 0, cfg.adversarial_weight > 0
    perceptual = build_perceptual(cfg).to(acc.device) if use_perceptual else None  # fails before data is read

    data = cfg.data
    train_set = build_image_dataset(data.name, data.split, image_size=data.image_size, root=data.root,
                                    random_flip=bool(data.random_flip))
    held_split = data.heldout_split or heldout_split(data.name)
    held_set = build_image_dataset(data.name, held_split, image_size=data.image_size, root=data.root)
    if len(train_set) < cfg.batch_size:
        raise ConfigError(f"{len(train_set)} training images are fewer than batch_size={cfg.batch_size}")

    torch.manual_seed(int(cfg.seed))
    vq = VQModel(vq_config)
    try:
        vq.num_tokens_hw(int(data.image_size))
    except ValueError as e:
        raise ConfigError(f"data.image_size: {e}") from None
    opt = build_optimizer(vq, cfg.lr, cfg.betas, 1e-8, cfg.weight_decay, device=acc.device)
    warmup, end = int(cfg.warmup_steps), float(cfg.min_lr_ratio)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, steps, warmup, end))
    disc = disc_opt = None
    if use_gan:
        disc = PatchDiscriminator(vq_config.in_channels, int(cfg.disc_ch), int(cfg.disc_layers)).to(acc.device)
        disc_opt = torch.optim.Adam(disc.parameters(), lr=cfg.disc_lr or cfg.lr, betas=tuple(cfg.betas))
    set_seed(int(cfg.seed) + acc.process_index)  # per-process augmentation draws
    reseed_gen = torch.Generator().manual_seed(int(cfg.seed) + 1)  # the same on every process

    k = vq_config.codebook_size
    counts = torch.zeros(k, dtype=torch.long)  # assignments since the last dead-code check
    history: dict[str, deque] = {}
    reseeded_total = reseed_events = start = 0
    train_time = 0.0
    state = _load_state(state_path, record) if cfg.resume else None
    if state is not None:
        vq.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        if disc is not None:
            disc.load_state_dict(state["disc"])
            disc_opt.load_state_dict(state["disc_optimizer"])
        reseed_gen.set_state(state["reseed_rng"])
        counts = state["counts"].clone()
        history = {name: deque(v, maxlen=FINAL_LOSS_WINDOW) for name, v in state["history"].items()}
        start, train_time = int(state["step"]), float(state["train_time_s"])
        reseeded_total, reseed_events = int(state["reseeded_total"]), int(state["reseed_events"])

    model, opt = acc.prepare(_Step(vq).train(), opt)
    raw = acc.unwrap_model(model).vq
    counts = counts.to(acc.device)
    if state is not None:
        if acc.scaler is not None and state.get("scaler"):
            acc.scaler.load_state_dict(state["scaler"])
        if len(state["rng"]) == world:
            restore_rng(state["rng"][acc.process_index])
        elif acc.is_main_process:
            print(f"resuming on {world} processes a run saved on {len(state['rng'])}: the augmentation draws "
                  "differ from an uninterrupted run's", flush=True)

    def save_state(step: int) -> None:
        rngs = gather_object([capture_rng()])
        if not acc.is_main_process:
            return
        blob = {"kind": STATE_KIND, "step": step, "config": record, "model": raw.state_dict(),
                "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "scaler": acc.scaler.state_dict() if acc.scaler is not None else None,
                "disc": disc.state_dict() if disc is not None else None,
                "disc_optimizer": disc_opt.state_dict() if disc_opt is not None else None,
                "rng": rngs, "reseed_rng": reseed_gen.get_state(), "counts": counts.cpu(),
                "history": {name: list(v) for name, v in history.items()}, "reseeded_total": reseeded_total,
                "reseed_events": reseed_events, "train_time_s": train_time + time.time() - t_train}
        with atomic_open(state_path, "wb") as f:
            torch.save(blob, f)

    run_dir.mkdir(parents=True, exist_ok=True)
    log_cfg = OmegaConf.create({**OmegaConf.to_container(cfg, resolve=True), "name": out.stem})
    logger = MetricLogger(log_cfg, run_dir, acc.is_main_process, resumed_at=start if state is not None else None)
    loader = DataLoader(_ByIndex(train_set), num_workers=int(data.num_workers),
                        batch_sampler=StepBatches(len(train_set), int(cfg.batch_size), acc.process_index, world,
                                                  int(cfg.seed), start, steps),
                        generator=torch.Generator())  # own generator: the iterator must not consume the global RNG
    bar = tqdm(total=steps, initial=start, desc="tokenizer", disable=not (cfg.progress and acc.is_main_process))
    t_train = time.time()
    stop_at = min(steps, start + cfg.stop_after) if cfg.stop_after else steps
    step = start
    for x, _ in loader:
        x = x.to(acc.device, non_blocking=True)
        with acc.autocast():
            recon, latents, idx, q = model(x)
            counts += torch.bincount(idx.flatten(), minlength=k)
            rec = F.mse_loss(recon, x) if cfg.recon_loss == "l2" else F.l1_loss(recon, x)
            terms = {"recon": rec, "codebook": q.codebook_loss, "commit": q.commit_loss, "entropy": q.entropy_loss}
            nll = rec
            if perceptual is not None:
                terms["perceptual"] = perceptual(recon, x)
                nll = nll + cfg.perceptual_weight * terms["perceptual"]
            loss = nll + cfg.codebook_weight * (q.codebook_loss + q.commit_loss + q.entropy_loss)
            gan_on = use_gan and step >= cfg.disc_start
            if gan_on:
                disc.requires_grad_(False)
                g_loss = -disc(recon).mean()
                disc.requires_grad_(True)
                w = adaptive_gan_weight(nll, g_loss, raw.last_layer) if cfg.disc_adaptive_weight else 1.0
                terms["g_adv"] = g_loss
                loss = loss + cfg.adversarial_weight * w * g_loss
        terms["total"] = loss

        opt.zero_grad(set_to_none=True)
        acc.backward(loss)
        if cfg.grad_clip > 0:
            acc.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()

        if gan_on:  # fp32, outside autocast; the discriminator is not DDP-wrapped, so its gradients are averaged here
            d_loss = hinge_d_loss(disc(x), disc(recon.detach().float()))
            disc_opt.zero_grad(set_to_none=True)
            d_loss.backward()
            if world > 1:
                for p in disc.parameters():
                    p.grad = acc.reduce(p.grad, reduction="mean")
            disc_opt.step()
            terms["d_adv"] = d_loss

        step += 1
        if cfg.reseed_every and step % cfg.reseed_every == 0 and step + cfg.reseed_every <= steps:
            dead = acc.reduce(counts, reduction="sum") == 0 if world > 1 else counts == 0
            n = reseed_dead_codes(raw.quantize, acc.gather(latents.detach()), dead, reseed_gen, opt.optimizer)
            reseeded_total += n
            reseed_events += int(n > 0)
            counts.zero_()

        for name, v in terms.items():
            history.setdefault(name, deque(maxlen=FINAL_LOSS_WINDOW)).append(float(v.detach()))
        bar.update(1)
        if step % cfg.log_every == 0 or step == steps:
            usage = float(q.codebook_usage)
            bar.set_postfix(loss=f"{loss.item():.4f}", rec=f"{rec.item():.4f}", usage=f"{usage:.2f}",
                            lr=f"{sched.get_last_lr()[0]:.1e}")
            logger.log({**{f"train/{n}": history[n][-1] for n in terms}, "train/lr": sched.get_last_lr()[0],
                        "train/codebook_usage": usage}, step)
        if step < steps and (step % cfg.ckpt_every == 0 or step == stop_at):
            save_state(step)
        if step == stop_at:
            break
    bar.close()
    train_time += time.time() - t_train
    if step < steps:
        logger.close()
        return {"skipped": False, "stopped": True, "step": step, "state": str(state_path)}
    train_usage = raw.codebook_usage()

    report = None
    if acc.is_main_process:
        t_eval = time.time()
        metrics = evaluate_reconstruction(raw, held_set, int(cfg.eval_images), int(cfg.rfid_images),
                                          int(cfg.eval_batch_size), acc.device, bool(cfg.progress), rfid)
        eval_time = time.time() - t_eval
        logger.log({f"eval/{n}": metrics[n] for n in ("psnr", "ssim", "codebook_usage", "perplexity", "rfid")
                    if metrics.get(n) is not None}, steps)
        raw.cpu().eval()
        save_weights(out, raw, vq_config, kind="vq")
        report = {
            "config": record,
            "vq_config": vq_config.to_dict(),
            "out": str(out),
            "weights_sha256": file_sha256(out),
            "parameters": sum(p.numel() for p in raw.parameters()),
            "dataset": {"name": data.name, "train_split": data.split, "train_images": len(train_set),
                        "heldout_split": held_split, "image_size": int(data.image_size)},
            "steps": steps,
            "images_seen": steps * int(cfg.batch_size),
            "resumed_from": start if state is not None else None,
            "wall_time_s": round(time.time() - t_start, 1),
            "train_time_s": round(train_time, 1),
            "eval_time_s": round(eval_time, 1),
            "train_images_per_s": round((steps - start) * int(cfg.batch_size) / max(time.time() - t_train, 1e-9), 1),
            "final_losses": {name: sum(v) / len(v) for name, v in history.items()},
            "final_losses_window": min(FINAL_LOSS_WINDOW, steps),
            "train_codebook_usage_window": train_usage,
            "reseeded_codes_total": reseeded_total,
            "reseed_events": reseed_events,
            **metrics,
            "device": str(acc.device),
            "processes": world,
            "mixed_precision": cfg.mixed_precision,
            "torch_threads": torch.get_num_threads(),
            "load_average_start_end": [round(load_start[0], 2), round(os.getloadavg()[0], 2)],
            "cpu_count": os.cpu_count(),
            "torch_version": torch.__version__,
            "perceptual": cfg.perceptual if use_perceptual else None,
            "adversarial": use_gan,
            "run_dir": str(run_dir),
        }
        atomic_write_json(report_path(out), report)
        state_path.unlink(missing_ok=True)  # finished: a forced rerun starts over instead of resuming at the end
    logger.close()
    acc.wait_for_everyone()
    if report is None:
        report = json.loads(report_path(out).read_text())
    return {**report, "skipped": False}


def summary(report: Mapping[str, Any]) -> str:
    """One line with the numbers that matter."""
    def f(v, fmt):
        return "n/a" if v is None else format(v, fmt)

    if report.get("stopped"):
        return f"tokenizer: stopped after step {report['step']}; rerun the same command to resume ({report['state']})"
    head = "up to date" if report.get("skipped") else f"trained {report['steps']} steps in {report['wall_time_s']} s"
    return (f"tokenizer {report['out']}: {head}; held-out PSNR {f(report.get('psnr'), '.2f')} dB, "
            f"SSIM {f(report.get('ssim'), '.4f')}, codebook usage {f(report.get('codebook_usage'), '.1%')}, "
            f"perplexity {f(report.get('perplexity'), '.0f')}, rFID {f(report.get('rfid'), '.2f')}")


register()


@hydra.main(version_base="1.3", config_path="../../configs", config_name=CONFIG_NAME)
def main(cfg: DictConfig) -> None:
    # The entry point wires rFID in: eval sits above the tokenizer, so only this top-level caller imports it.
    from masc_llamagen.eval.metrics import compute_metrics

    with user_errors():
        report = train_tokenizer(cfg, rfid=compute_metrics)
    print(summary(report))
    if not report.get("stopped") and report.get("rfid") is None:
        print(f"rFID {report.get('rfid_note')}")


if __name__ == "__main__":
    main()
