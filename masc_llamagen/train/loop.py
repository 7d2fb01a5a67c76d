"""The training loop: built objects in, checkpoints and metrics out (Accelerate for processes and precision).

    train(cfg): lock the run directory -> find the checkpoint to resume -> build (model, data, optimizer, EMA,
    logger) -> for each batch: one optimizer step, then the hooks that are due (log, sample grid, FID, checkpoint).

Exactness contract (tested): the batch at step s depends only on (seed, s); a run interrupted at any step and resumed
reproduces the uninterrupted run's losses exactly on CPU; 2 processes x b equal 1 process x 2b; grad accumulation
4 x b equals one batch of 4b.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from omegaconf import DictConfig, OmegaConf

from masc_llamagen.checkpoint import TrainingCheckpoint
from masc_llamagen.config import validate
from masc_llamagen.errors import TrainingError
from masc_llamagen.eval.likelihood import normalized_entropy
from masc_llamagen.masc.vocabulary import bits, marginal_coarse_nll
from masc_llamagen.train.build import accelerator, build_run
from masc_llamagen.train.checkpointing import (
    capture_rng,
    checkpoint_path,
    last_good_checkpoint,
    latest_checkpoint,
    prune,
    resume_differences,
)
from masc_llamagen.train.meter import StopSignal, Throughput
from masc_llamagen.train.rundir import (
    RunLock,
    load_newest_checkpoint,
    refuse_fresh_start_over_a_run,
    remove_stale_temp_files,
)
from masc_llamagen.train.state import Run, TrainState


def train(cfg: DictConfig) -> dict:
    """Run (or resume) training as configured; returns a summary dict (final step, last losses, paths).

    Rank 0 holds the run directory's lock for the whole run: a second launch on the same directory stops at once.
    """
    validate(cfg)
    acc = accelerator(cfg)
    run_dir = Path(cfg.paths.output_dir)
    with RunLock(run_dir) if acc.is_main_process else nullcontext():
        resumed_from, ck = resume_point(cfg, acc, run_dir / "checkpoints")
        run, start, elapsed = build_run(cfg, acc, run_dir, ck, resumed_from)
        state = TrainState(step=start, start=start, elapsed_before=elapsed,
                           invalid=torch.zeros((), dtype=torch.long, device=acc.device))
        stopped_early = fit(run, state)
        latest = latest_checkpoint(run.ckpt_dir)
        return {"step": state.step, "losses": state.history, "run_dir": str(run_dir), "stopped_early": stopped_early,
                "checkpoint": str(latest) if latest else None,
                "resumed_from": str(resumed_from) if resumed_from else None}


def resume_point(cfg: DictConfig, acc: Accelerator, ckpt_dir: Path) -> tuple[Path | None, TrainingCheckpoint | None]:
    """The newest checkpoint of this run directory, if resuming and its config allows it; none for a fresh run."""
    if not cfg.train.resume:
        refuse_fresh_start_over_a_run(ckpt_dir)
    if acc.is_main_process and (stale := remove_stale_temp_files(ckpt_dir)):
        print(f"removed {len(stale)} half-written checkpoint file(s) of an interrupted run in {ckpt_dir}", flush=True)
    if not cfg.train.resume:
        return None, None
    path, ck = load_newest_checkpoint(ckpt_dir)
    if ck is not None and ck.config:
        refused, inexact = resume_differences(ck.config, OmegaConf.to_container(cfg, resolve=True), len(ck.rng),
                                              acc.num_processes)
        if refused:
            raise TrainingError(f"cannot resume {path.name}: {'; '.join(refused)} would change what its "
                                "weights and state mean; restore those values or start another run directory "
                                "(name=... or hydra.run.dir=...)")
        if inexact and acc.is_main_process:
            print(f"warning: resuming {path.name} with {'; '.join(inexact)}: the run continues, but no longer "
                  "bit-identical to an uninterrupted one", flush=True)
    return path, ck


@dataclass
class Due:
    """Which hooks run after a step. ``stop``: the same answer on every rank."""

    log: bool
    save: bool
    grid: bool
    eval: bool
    stop: bool

    @property
    def any_hook(self) -> bool:
        return self.grid or self.eval or self.save or self.stop


def fit(run: Run, state: TrainState) -> bool:
    """Train to ``train.steps`` (or until stopped); True when stopped early with a checkpoint to resume from."""
    t, acc = run.cfg.train, run.acc
    meter = Throughput(state.step)
    run.model.train()
    progress = _progress(acc.is_main_process, state.start, t.steps)
    stopped_early = False
    with StopSignal() as signal:
        for tokens, cond in run.loader:
            tokens = tokens.to(acc.device, non_blocking=True)
            cond = {k: v.to(acc.device, non_blocking=True) for k, v in cond.items()}
            last_logits, grad_norm = train_step(run, state, tokens, cond)
            progress.update(1)
            due = due_after(run, state, signal)
            if due.log:
                state.drain(run.ckpt_dir)
                rates = meter.rates(state.step, t.global_batch_size, run.tokens_per_image, acc.device)
                run.logger.log(step_metrics(run, state, rates, tokens, last_logits, grad_norm), state.step)
                progress.set_postfix(loss=f"{state.history[-1]:.4f}")
            if due.any_hook:
                with meter.paused(acc.device):  # evaluation and checkpoints do not count as training time
                    run_hooks(run, state, due)
            if due.stop and state.step < t.steps:
                stopped_early = True
                break
    state.drain(run.ckpt_dir)
    progress.close()
    run.logger.close()
    return stopped_early


def train_step(run: Run, state: TrainState, tokens: torch.Tensor, cond: dict):
    """One optimizer step over ``train.grad_accum`` micro-batches; the loss stays on the device (``pending``)."""
    t, acc, model = run.cfg.train, run.acc, run.model
    if "valid" in cond:
        state.invalid += (~cond["valid"]).sum()
    ids = run.vocab.encode(tokens)
    micro = run.micro_batch
    loss_sum = torch.zeros((), device=acc.device)
    last_logits = None
    for a in range(t.grad_accum):
        sl = slice(a * micro, (a + 1) * micro)
        sync = a == t.grad_accum - 1
        with acc.no_sync(model) if not sync else nullcontext(), acc.autocast():
            logits, loss = model(ids[sl, :-1], targets=ids[sl], **{k: v[sl] for k, v in cond.items()})
            acc.backward(loss / t.grad_accum)
        loss_sum += loss.detach() / t.grad_accum
        last_logits = logits.detach()
    clip = run.cfg.optim.grad_clip
    grad_norm = acc.clip_grad_norm_(model.parameters(), clip) if clip > 0 else None
    state.pending.append(acc.reduce(loss_sum, reduction="mean"))
    run.opt.step()
    run.sched.step()
    run.opt.zero_grad(set_to_none=True)
    if run.ema is not None:
        run.ema.update(run.raw)
    state.step += 1
    return last_logits, grad_norm


def due_after(run: Run, state: TrainState, signal: StopSignal) -> Due:
    t, acc, step = run.cfg.train, run.acc, state.step
    log = step % t.log_every == 0 or step == t.steps
    save = step % t.ckpt_every == 0 or step == t.steps
    stop = t.stop_after is not None and step - state.start >= t.stop_after  # the same on every rank
    # A signal may reach one rank only: agree on it, but without a collective (and host sync) every step.
    if acc.num_processes == 1:
        stop = stop or signal.requested
    elif log or save:
        flag = torch.tensor(float(signal.requested), device=acc.device)
        stop = stop or bool(acc.reduce(flag, reduction="sum") > 0)
    return Due(log=log, save=save, stop=stop, grid=bool(t.sample_every) and step % t.sample_every == 0,
               eval=bool(t.eval_every) and step % t.eval_every == 0)


def step_metrics(run: Run, state: TrainState, rates: dict, tokens: torch.Tensor, last_logits: torch.Tensor,
                 grad_norm) -> dict:
    """What a log step reports, after the throughput ``rates`` (the pending losses are already read back)."""
    vocab, loss = run.vocab, state.history[-1]
    with torch.no_grad():
        target = tokens[-run.micro_batch:]
        fine = bits(vocab.fine_nll(last_logits, target).mean().item())
        out = {**rates, "train/loss": loss, "train/fine_nll_bits": fine, "train/lr": run.sched.get_last_lr()[0],
               "train/pred_entropy_norm": normalized_entropy(last_logits).mean().item()}
        if not vocab.is_flat:
            out["train/coarse_ce_bits"] = bits(loss)
        elif run.compare_mapping is not None:
            marginal = marginal_coarse_nll(last_logits, target, run.compare_mapping).mean().item()
            out["train/marginal_coarse_ce_bits"] = bits(marginal)
    if grad_norm is not None:
        out["train/grad_norm"] = float(grad_norm)
    if run.cfg.model.model_type == "t2i":  # samples whose image or caption features could not be read
        out["train/invalid_samples"] = int(run.acc.reduce(state.invalid.clone(), reduction="sum"))
    if run.peak_flops:
        out["train/mfu"] = rates["train/tokens_per_s"] * run.flops_per_token / run.peak_flops
    return out


def run_hooks(run: Run, state: TrainState, due: Due) -> None:
    acc, step = run.acc, state.step
    if due.grid and acc.is_main_process:
        run.logger.image("samples/grid", run.sampler.grid(run.raw, run.ema, step), step)
    if due.eval:
        if acc.is_main_process:
            run.logger.log(run.sampler.fid(run.raw, run.ema, step, state.elapsed()), step)
        acc.wait_for_everyone()
    if due.save or due.stop:
        state.drain(run.ckpt_dir)
        path = save_checkpoint(run, state)
        if due.stop and step < run.cfg.train.steps and acc.is_main_process:
            print(f"stopped at step {step} (signal or train.stop_after); saved {path}; rerun the same "
                  "command to continue", flush=True)


def save_checkpoint(run: Run, state: TrainState) -> Path:
    """Gathering full tensors is collective under FSDP: every rank takes part, rank 0 writes."""
    acc, step = run.acc, state.step
    if not _weights_finite(run.raw, acc):
        good = last_good_checkpoint(run.ckpt_dir)
        raise TrainingError(f"the weights hold NaN/inf at step {step}; not saving them. Last good checkpoint: "
                            f"{good or 'none'}. Lower optim.lr or check the data")
    rng = _gather_rng(acc)
    model_sd = acc.get_state_dict(run.model)
    ema_sd = run.ema.model_state(run.raw) if run.ema is not None else None
    if run.fsdp:
        from masc_llamagen.train.sharding import full_optimizer_state, full_tensors

        ema_sd = full_tensors(ema_sd) if ema_sd is not None else None
        opt_sd = full_optimizer_state(run.raw, run.opt)
    else:
        opt_sd = run.opt.state_dict()
    path = checkpoint_path(run.ckpt_dir, step)
    if acc.is_main_process:
        TrainingCheckpoint(
            step=step, model=model_sd, ema=ema_sd, optimizer=opt_sd, scheduler=run.sched.state_dict(), rng=rng,
            ema_updates=run.ema.num_updates if run.ema is not None else 0, elapsed_s=state.elapsed(),
            model_config=asdict(run.raw.config),
            head={**run.vocab.to_state(), "token_counts": torch.from_numpy(run.token_counts)},
            head_info=run.head_info, config=OmegaConf.to_container(run.cfg, resolve=True), tokenizer=run.tokenizer,
        ).save(path)
        prune(run.ckpt_dir, run.cfg.train.keep_last)
    acc.wait_for_everyone()
    return path


def _weights_finite(model: torch.nn.Module, acc: Accelerator) -> bool:
    """Every rank checks its own (shard of the) parameters; all agree on the answer."""
    bad = torch.zeros((), device=acc.device)
    for p in model.parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        bad += (~torch.isfinite(local.detach())).any().float()
    return float(acc.reduce(bad, reduction="sum")) == 0


def _gather_rng(acc: Accelerator) -> list:
    state = capture_rng()
    if acc.num_processes == 1:
        return [state]
    import torch.distributed as dist

    out: list = [None] * acc.num_processes
    dist.all_gather_object(out, state)
    return out


def _progress(main: bool, start: int, total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, disable=not main, desc="train", dynamic_ncols=True)
