"""The tokenizer's training loop: build the run (resuming a saved state), then for each batch one step and the
hooks that are due (dead-code re-seeding, logging, checkpoint).

Exactness contract (tested): the batch at step s depends only on (seed, s), and every RNG and accumulator is saved,
so a run stopped or killed at any step and resumed ends with the uninterrupted run's weights and losses.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import DataLoader, Dataset

from masc_llamagen.errors import ConfigError
from masc_llamagen.tokenizer.losses import PatchDiscriminator, adaptive_gan_weight, build_perceptual, hinge_d_loss
from masc_llamagen.tokenizer.reseed import reseed_dead_codes
from masc_llamagen.tokenizer.vq import VQLosses, VQModel
from masc_llamagen.train.batches import StepBatches
from masc_llamagen.train.checkpointing import restore_rng
from masc_llamagen.train.logging import MetricLogger
from masc_llamagen.train.optim import build_optimizer, warmup_cosine
from masc_llamagen.train.tokenizer_config import build_vq_config, config_record, run_dir_of
from masc_llamagen.train.tokenizer_state import VQRun, VQState, read_state, save_state


def resume_point(cfg: DictConfig) -> dict | None:
    """The saved state to continue from: none for a fresh run (or resume=false)."""
    return read_state(run_dir_of(cfg) / "train_state.pt", config_record(cfg)) if cfg.resume else None


def build(cfg: DictConfig, acc, saved: dict | None) -> tuple[VQRun, VQState]:
    """The order is part of exact resume: the seed is set before the models are made, the saved RNG states are
    restored after Accelerate has prepared them, and nothing in between draws from the global generators."""
    from accelerate.utils import set_seed

    t_start, load_start = time.time(), os.getloadavg()
    if cfg.batch_size % acc.num_processes:
        raise ConfigError(f"batch_size={cfg.batch_size} is not divisible by the {acc.num_processes} processes")
    perceptual = build_perceptual(cfg).to(acc.device) if cfg.perceptual_weight > 0 else None  # before data is read
    train_set, held_set, held_split = _datasets(cfg)
    vq_config = build_vq_config(cfg.vq)
    torch.manual_seed(int(cfg.seed))
    vq = VQModel(vq_config)
    try:
        vq.num_tokens_hw(int(cfg.data.image_size))
    except ValueError as e:
        raise ConfigError(f"data.image_size: {e}") from None
    opt = build_optimizer(vq, cfg.lr, cfg.betas, 1e-8, cfg.weight_decay, device=acc.device)
    warmup, steps, end = int(cfg.warmup_steps), int(cfg.steps), float(cfg.min_lr_ratio)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, steps, warmup, end))
    disc = disc_opt = None
    if cfg.adversarial_weight > 0:
        disc = PatchDiscriminator(vq_config.in_channels, int(cfg.disc_ch), int(cfg.disc_layers)).to(acc.device)
        disc_opt = torch.optim.Adam(disc.parameters(), lr=cfg.disc_lr or cfg.lr, betas=tuple(cfg.betas))
    set_seed(int(cfg.seed) + acc.process_index)  # per-process augmentation draws
    reseed_gen = torch.Generator().manual_seed(int(cfg.seed) + 1)  # the same on every process

    state = VQState(counts=torch.zeros(vq_config.codebook_size, dtype=torch.long))
    if saved is not None:
        for part, key in ((vq, "model"), (opt, "optimizer"), (sched, "scheduler"), (disc, "disc"),
                          (disc_opt, "disc_optimizer")):
            if part is not None:
                part.load_state_dict(saved[key])
        reseed_gen.set_state(saved["reseed_rng"])
        state = VQState.from_saved(saved)
    model, opt = acc.prepare(_StepForward(vq).train(), opt)
    state.counts = state.counts.to(acc.device)
    if saved is not None:
        _restore_after_prepare(acc, saved)

    run_dir = run_dir_of(cfg)
    run = VQRun(cfg=cfg, acc=acc, record=config_record(cfg), run_dir=run_dir, vq_config=vq_config, model=model,
                raw=acc.unwrap_model(model).vq, opt=opt, sched=sched, disc=disc, disc_opt=disc_opt,
                perceptual=perceptual, reseed_gen=reseed_gen, train_set=train_set, held_set=held_set,
                held_split=held_split, logger=_logger(cfg, acc, run_dir, state),
                loader=_loader(cfg, acc, train_set, state.start), t_start=t_start, load_start=load_start)
    return run, state


def fit(run: VQRun, state: VQState) -> None:
    """Train to ``steps``, or until ``stop_after`` steps of this invocation (saved, to resume from)."""
    from tqdm.auto import tqdm

    acc = run.acc
    bar = tqdm(total=run.steps, initial=state.start, desc="tokenizer",
               disable=not (run.cfg.progress and acc.is_main_process))
    state.t_train = time.time()
    for x, _ in run.loader:
        terms, latents, usage = train_step(run, state, x.to(acc.device, non_blocking=True))
        bar.update(1)
        due = due_after(run, state)
        if due.reseed:
            reseed(run, state, latents)
        if due.log:
            log_step(run, state, terms, usage, bar)
        if due.save:
            save_state(run, state)
        if due.stop:
            break
    bar.close()
    state.train_time += time.time() - state.t_train


def train_step(run: VQRun, state: VQState, x: torch.Tensor):
    """One generator step on the VQ losses (plus the GAN term once it starts), then the discriminator's step;
    returns this step's loss terms, the batch's latents (for re-seeding) and the codebook usage."""
    cfg, acc = run.cfg, run.acc
    gan_on = run.disc is not None and state.step >= cfg.disc_start
    with acc.autocast():
        recon, latents, idx, q = run.model(x)
        state.counts += torch.bincount(idx.flatten(), minlength=run.vq_config.codebook_size)
        terms, loss = _generator_loss(run, x, recon, q, gan_on)
    terms["total"] = loss

    run.opt.zero_grad(set_to_none=True)
    acc.backward(loss)
    if cfg.grad_clip > 0:
        acc.clip_grad_norm_(run.model.parameters(), cfg.grad_clip)
    run.opt.step()
    run.sched.step()
    if gan_on:
        terms["d_adv"] = _discriminator_step(run, x, recon)
    state.step += 1
    state.record(terms)
    return terms, latents, q.codebook_usage


def _generator_loss(run: VQRun, x: torch.Tensor, recon: torch.Tensor, q: VQLosses, gan_on: bool):
    cfg = run.cfg
    rec = F.mse_loss(recon, x) if cfg.recon_loss == "l2" else F.l1_loss(recon, x)
    terms = {"recon": rec, "codebook": q.codebook_loss, "commit": q.commit_loss, "entropy": q.entropy_loss}
    nll = rec
    if run.perceptual is not None:
        terms["perceptual"] = run.perceptual(recon, x)
        nll = nll + cfg.perceptual_weight * terms["perceptual"]
    loss = nll + cfg.codebook_weight * (q.codebook_loss + q.commit_loss + q.entropy_loss)
    if gan_on:
        run.disc.requires_grad_(False)
        g_loss = -run.disc(recon).mean()
        run.disc.requires_grad_(True)
        w = adaptive_gan_weight(nll, g_loss, run.raw.last_layer) if cfg.disc_adaptive_weight else 1.0
        terms["g_adv"] = g_loss
        loss = loss + cfg.adversarial_weight * w * g_loss
    return terms, loss


def _discriminator_step(run: VQRun, x: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    """fp32, outside autocast; the discriminator is not DDP-wrapped, so its gradients are averaged here."""
    d_loss = hinge_d_loss(run.disc(x), run.disc(recon.detach().float()))
    run.disc_opt.zero_grad(set_to_none=True)
    d_loss.backward()
    if run.acc.num_processes > 1:
        for p in run.disc.parameters():
            p.grad = run.acc.reduce(p.grad, reduction="mean")
    run.disc_opt.step()
    return d_loss


@dataclass
class Due:
    """Which hooks run after a step. Re-seeding never falls in the last ``reseed_every`` steps, so the decoder
    always gets time to learn the codes it will be scored with; the finished run's state is never saved."""

    reseed: bool
    log: bool
    save: bool
    stop: bool


def due_after(run: VQRun, state: VQState) -> Due:
    cfg, step, steps, every = run.cfg, state.step, run.steps, run.cfg.reseed_every
    stop_at = min(steps, state.start + cfg.stop_after) if cfg.stop_after else steps
    return Due(reseed=bool(every) and step % every == 0 and step + every <= steps,
               log=step % cfg.log_every == 0 or step == steps,
               save=step < steps and (step % cfg.ckpt_every == 0 or step == stop_at),
               stop=step == stop_at)


def reseed(run: VQRun, state: VQState, latents: torch.Tensor) -> None:
    """Codes no process used since the last check move onto this step's (gathered) encoder outputs."""
    acc = run.acc
    dead = acc.reduce(state.counts, reduction="sum") == 0 if acc.num_processes > 1 else state.counts == 0
    n = reseed_dead_codes(run.raw.quantize, acc.gather(latents.detach()), dead, run.reseed_gen, run.opt.optimizer)
    state.reseeded_total += n
    state.reseed_events += int(n > 0)
    state.counts.zero_()


def log_step(run: VQRun, state: VQState, terms: dict, usage: torch.Tensor, bar) -> None:
    usage, lr, last = float(usage), run.sched.get_last_lr()[0], {n: state.history[n][-1] for n in terms}
    bar.set_postfix(loss=f"{last['total']:.4f}", rec=f"{last['recon']:.4f}", usage=f"{usage:.2f}", lr=f"{lr:.1e}")
    run.logger.log({**{f"train/{n}": v for n, v in last.items()}, "train/lr": lr, "train/codebook_usage": usage},
                   state.step)


def _datasets(cfg: DictConfig) -> tuple[Dataset, Dataset, str]:
    """(training set, held-out set, the held-out split's name)."""
    from masc_llamagen.data.images import build_image_dataset, heldout_split

    data = cfg.data
    train_set = build_image_dataset(data.name, data.split, image_size=data.image_size, root=data.root,
                                    random_flip=bool(data.random_flip))
    held_split = data.heldout_split or heldout_split(data.name)
    held_set = build_image_dataset(data.name, held_split, image_size=data.image_size, root=data.root)
    if len(train_set) < cfg.batch_size:
        raise ConfigError(f"{len(train_set)} training images are fewer than batch_size={cfg.batch_size}")
    return train_set, held_set, held_split


def _logger(cfg: DictConfig, acc, run_dir: Path, state: VQState) -> MetricLogger:
    run_dir.mkdir(parents=True, exist_ok=True)
    log_cfg = OmegaConf.create({**OmegaConf.to_container(cfg, resolve=True), "name": Path(cfg.out).stem})
    return MetricLogger(log_cfg, run_dir, acc.is_main_process, resumed_at=state.start if state.resumed else None)


def _loader(cfg: DictConfig, acc, train_set: Dataset, start: int) -> DataLoader:
    """This process's share of each step's batch, from ``start`` on."""
    sampler = StepBatches(len(train_set), int(cfg.batch_size), acc.process_index, acc.num_processes, int(cfg.seed),
                          start, int(cfg.steps))
    return DataLoader(_ByIndex(train_set), batch_sampler=sampler, num_workers=int(cfg.data.num_workers),
                      generator=torch.Generator())  # its own generator: iterating must not consume the global RNG


def _restore_after_prepare(acc, saved: dict) -> None:
    """The grad scaler (Accelerate makes it in prepare) and the RNG states (last: nothing may draw after them)."""
    if acc.scaler is not None and saved.get("scaler"):
        acc.scaler.load_state_dict(saved["scaler"])
    if len(saved["rng"]) == acc.num_processes:
        restore_rng(saved["rng"][acc.process_index])
    elif acc.is_main_process:
        print(f"resuming on {acc.num_processes} processes a run saved on {len(saved['rng'])}: the augmentation "
              "draws differ from an uninterrupted run's", flush=True)


class _StepForward(nn.Module):
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
