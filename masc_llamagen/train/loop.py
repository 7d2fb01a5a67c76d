"""The training loop: built objects in, checkpoints and metrics out (Accelerate for processes and precision).

Exactness contract (tested): the batch at step s depends only on (seed, s); a run interrupted at any step and resumed
reproduces the uninterrupted run's losses exactly on CPU; 2 processes x b equal 1 process x 2b; grad accumulation
4 x b equals one batch of 4b.
"""

from __future__ import annotations

import math
import signal
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from masc_llamagen.checkpoint import CheckpointError, read_state_dict
from masc_llamagen.config import validate
from masc_llamagen.errors import TrainingError
from masc_llamagen.masc.heads import Vocabulary, bits, marginal_coarse_nll
from masc_llamagen.masc.vocab import vocabulary_from_config
from masc_llamagen.models.gpt import GPT, TransformerBlock, gpt_config
from masc_llamagen.train.batches import CaptionCollate, EpochIndexed, EpochIndexedCaptions, StepBatches, collate
from masc_llamagen.train.checkpointing import (
    atomic_save,
    capture_rng,
    checkpoint_path,
    last_good_checkpoint,
    latest_checkpoint,
    prune,
    restore_rng,
    resume_differences,
)
from masc_llamagen.train.ema import EMA
from masc_llamagen.train.evaluate import TrainingSampler
from masc_llamagen.train.logging import MetricLogger
from masc_llamagen.train.optim import build_optimizer, build_scheduler
from masc_llamagen.train.run_info import write_run_info
from masc_llamagen.train.rundir import (
    RunLock,
    load_newest_checkpoint,
    refuse_fresh_start_over_a_run,
    remove_stale_temp_files,
)
from masc_llamagen.train.throughput import flops_per_token, peak_flops


def _accelerator(cfg: DictConfig) -> Accelerator:
    t = cfg.train
    kwargs = {}
    if t.distributed == "fsdp":
        from accelerate.utils import FullyShardedDataParallelPlugin

        kwargs["fsdp_plugin"] = FullyShardedDataParallelPlugin(
            fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
            transformer_cls_names_to_wrap=[TransformerBlock.__name__], reshard_after_forward=True,
            state_dict_type="FULL_STATE_DICT")
        if t.sample_every or t.eval_every:
            raise TrainingError("train.sample_every/eval_every are not supported with train.distributed=fsdp yet "
                                "(the EMA is sharded); sample and score saved checkpoints instead")
    elif t.distributed != "ddp":
        raise TrainingError(f"train.distributed={t.distributed!r}; use 'ddp' or 'fsdp'")
    return Accelerator(cpu=t.cpu, mixed_precision=t.mixed_precision, **kwargs)


def load_codes(cfg: DictConfig):
    from masc_llamagen.data.codes import CodeDataset

    return CodeDataset(cfg.data.codes, augment=cfg.data.augment, seed=cfg.train.seed)


def tokenizer_codebook(cfg: DictConfig) -> np.ndarray:
    sd, _ = read_state_dict(cfg.tokenizer.checkpoint)
    if "quantize.embedding.weight" not in sd:
        raise CheckpointError(f"{cfg.tokenizer.checkpoint} has no quantize.embedding.weight; is it a VQ tokenizer?")
    return sd["quantize.embedding.weight"].float().numpy()


def build_model(cfg: DictConfig, vocab: Vocabulary, grid: int, num_classes: int,
                caption_dim: int | None = None) -> GPT:
    m = cfg.model
    cond = ({"model_type": "t2i", "caption_dim": caption_dim, "cls_token_num": m.cls_token_num or 120}
            if m.model_type == "t2i" else {"null_class": True})  # CFG (grids, FID, sampler) needs the null class
    gcfg = gpt_config(m.arch, vocab_size=vocab.vocab_size, block_size=grid, num_classes=num_classes,
                      token_dropout_p=m.token_dropout_p, resid_dropout_p=m.resid_dropout_p,
                      ffn_dropout_p=m.ffn_dropout_p, attn_dropout_p=m.attn_dropout_p,
                      class_dropout_prob=m.class_dropout_prob, zero_init_head=vocab.is_flat, **cond)
    model = GPT(gcfg)
    model.cls_embedding.dropout_prob = 0.0  # class/caption dropout is drawn in the data pipeline (batches.py)
    return model


def load_text_features(cfg: DictConfig, codes):
    """The training captions' features (a packed store, or LlamaGen's per-line files), checked against the codes."""
    from masc_llamagen.text import LlamaGenT5Features, TextFeatureStore

    path = Path(cfg.text.features)
    slots = cfg.model.cls_token_num or 120
    if cfg.text.llamagen_jsonl:  # a missing or unreadable .npy is an invalid sample, never a crash
        store = LlamaGenT5Features(path, cfg.text.llamagen_jsonl, dim=cfg.text.llamagen_dim, max_length=slots)
    elif not (path / "meta.json").is_file():
        raise TrainingError(f"no caption features in {path}; extract them first: python -m masc_llamagen.text.extract "
                            f"codes={cfg.data.codes} encoder={cfg.text.encoder} out={path}")
    else:
        store = TextFeatureStore(path)
    captions = getattr(codes, "captions", None)
    if captions is None:
        raise TrainingError(f"codes in {cfg.data.codes} carry no captions; task=t2i needs codes of a captioned "
                            "dataset (data=twemoji_t2i, llamagen_jsonl or caption_folder)")
    if len(store) != len(captions):
        raise TrainingError(f"{path} holds features of {len(store)} captions but the codes have {len(captions)}; "
                            "re-extract the features from these codes")
    longest = int(np.max(store.lengths())) if hasattr(store, "lengths") else 0
    if longest > slots:
        raise TrainingError(f"{path} holds captions of up to {longest} tokens but model.cls_token_num={slots}; "
                            f"re-extract with max_length={slots} or give the model {longest} slots")
    return store


def prepare_model(acc: Accelerator, cfg: DictConfig, model: GPT, opt: torch.optim.Optimizer, ck: dict | None):
    """Compile, wrap and place the model; then build the EMA from the *prepared* weights.

    The EMA is made after ``acc.prepare`` so its shadows live on the prepared model's device and, under FSDP, carry
    its sharding (each rank averages its own shard): a shadow made before would stay on the CPU. Compilation is
    in place (``nn.Module.compile``), so state-dict keys carry no ``_orig_mod.`` prefix and checkpoints stay
    loadable by ``load_gpt`` and strict resume. Returns ``(model, opt, raw, ema)``; ``raw`` is the unwrapped module.
    """
    t = cfg.train
    if t.compile:
        model.compile()
    model, opt = acc.prepare(model, opt)
    raw = acc.unwrap_model(model)
    fsdp = t.distributed == "fsdp"
    if fsdp and ck is not None:
        from masc_llamagen.train.sharding import load_full_optimizer_state

        load_full_optimizer_state(raw, opt, ck["optimizer"])
    ema = EMA(raw, t.ema_decay) if t.ema else None
    if ema is not None and ck is not None and "ema" in ck:
        saved = {k: v for k, v in ck["ema"].items() if k in ema.shadow}
        if fsdp:
            from masc_llamagen.train.sharding import shard_like

            saved = shard_like(saved, ema.shadow)
        ema.load_state_dict(saved, ck.get("ema_updates", int(ck["step"])))
    return model, opt, raw, ema


def _prediction_entropy(logits: torch.Tensor) -> float:
    """Mean normalised entropy H / log V of the predictive distributions."""
    logp = torch.log_softmax(logits.float(), -1)
    h = -(logp.exp() * logp).sum(-1).mean().item()
    return h / math.log(logits.shape[-1])


class _Throughput:
    """Images and tokens per second over training time only: evaluation and checkpoint time is paused out.

    On CUDA the clock is read after a device sync, and only where the loop syncs anyway (log steps) or is about to
    do slow work (hooks), so it adds no per-step host sync.
    """

    def __init__(self, step: int):
        self.last_step, self.busy = step, 0.0
        self.last = time.perf_counter()

    def rates(self, step: int, batch: int, tokens_per_image: int, device: torch.device) -> dict:
        _sync(device)
        now = time.perf_counter()
        dt = max(now - self.last - self.busy, 1e-9)
        steps = max(step - self.last_step, 1)
        self.last, self.last_step, self.busy = now, step, 0.0
        out = {"train/images_per_s": steps * batch / dt, "train/tokens_per_s": steps * batch * tokens_per_image / dt,
               "train/step_time_s": dt / steps}
        if device.type == "cuda":
            out["train/peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        return out

    @contextmanager
    def paused(self, device: torch.device):
        _sync(device)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            _sync(device)
            self.busy += time.perf_counter() - t0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Stop:
    """SIGTERM/SIGINT (cluster pre-emption, Ctrl-C): finish the step, save, exit cleanly."""

    def __init__(self):
        self.requested = False
        self._old = {}

    def __enter__(self):
        for s in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread (e.g. some test runners): signals stay as they are
                pass
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


def train(cfg: DictConfig) -> dict:
    """Run (or resume) training as configured; returns a summary dict (final step, last losses, paths).

    Rank 0 holds the run directory's lock for the whole run: a second launch on the same directory stops at once.
    """
    validate(cfg)
    acc = _accelerator(cfg)
    run_dir = Path(cfg.paths.output_dir)
    with RunLock(run_dir) if acc.is_main_process else nullcontext():
        return _train(cfg, acc, run_dir)


def _train(cfg: DictConfig, acc: Accelerator, run_dir: Path) -> dict:
    t = cfg.train
    ckpt_dir = run_dir / "checkpoints"
    if not t.resume:
        refuse_fresh_start_over_a_run(ckpt_dir)
    if acc.is_main_process and (stale := remove_stale_temp_files(ckpt_dir)):
        print(f"removed {len(stale)} half-written checkpoint file(s) of an interrupted run in {ckpt_dir}", flush=True)
    resume_from, ck = load_newest_checkpoint(ckpt_dir) if t.resume else (None, None)
    if ck is not None and ck.get("config"):
        refused, inexact = resume_differences(ck["config"], OmegaConf.to_container(cfg, resolve=True),
                                              len(ck["rng"]), acc.num_processes)
        if refused:
            raise TrainingError(f"cannot resume {resume_from.name}: {'; '.join(refused)} would change what its "
                                "weights and state mean; restore those values or start another run directory "
                                "(name=... or hydra.run.dir=...)")
        if inexact and acc.is_main_process:
            print(f"warning: resuming {resume_from.name} with {'; '.join(inexact)}: the run continues, but no longer "
                  "bit-identical to an uninterrupted one", flush=True)
    set_seed(t.seed + acc.process_index)

    codes = load_codes(cfg)
    codebook = tokenizer_codebook(cfg)
    fp = (codes.meta.get("tokenizer") or {}).get("fingerprint")
    from masc_llamagen.masc.tree import codebook_sha256

    ours = codebook_sha256(codebook)
    if not fp:
        raise TrainingError(f"codes in {cfg.data.codes} carry no tokenizer fingerprint, so nothing shows they match "
                            f"{cfg.tokenizer.checkpoint}; re-extract them with it (the pipeline's codes stage)")
    if fp != ours:
        raise TrainingError(f"codes in {cfg.data.codes} were extracted with tokenizer {fp[:12]} but "
                            f"{cfg.tokenizer.checkpoint} is {ours[:12]}; re-extract the codes or use that tokenizer")
    if codes.codebook_size != codebook.shape[0]:
        raise TrainingError(f"codes use a {codes.codebook_size}-entry codebook, tokenizer has {codebook.shape[0]}")
    cache_dir = Path(cfg.paths.artifacts) / "trees"
    counts = codes.code_counts()
    # Rank 0 builds (and caches) the tree or mapping first; the other ranks then load it from the cache.
    built = vocabulary_from_config(cfg.head, codebook, counts, cache_dir) if acc.is_main_process else None
    acc.wait_for_everyone()
    vocab, head_info = built or vocabulary_from_config(cfg.head, codebook, counts, cache_dir)
    compare_mapping = None
    if vocab.is_flat and cfg.head.compare_k:
        from omegaconf import open_dict

        masc_head = cfg.head.copy()
        with open_dict(masc_head):
            masc_head.name, masc_head.k = "masc", cfg.head.compare_k
        compare_mapping = vocabulary_from_config(masc_head, codebook, None, cache_dir)[0].mapping
    grid = int(np.prod(codes.grid))
    t2i = cfg.model.model_type == "t2i"
    text = load_text_features(cfg, codes) if t2i else None
    model = build_model(cfg, vocab, grid, codes.num_classes, caption_dim=text.dim if t2i else None)
    if cfg.model.class_dropout_prob == 0 and t.sample_cfg_scale > 1 and (t.sample_every or t.eval_every) \
            and acc.is_main_process:
        print("warning: model.class_dropout_prob=0 never trains the null class, so the CFG of sample grids and "
              "in-training FID (train.sample_cfg_scale>1) guides against an untrained embedding", flush=True)

    per_step = t.global_batch_size // acc.num_processes
    if t.global_batch_size % (acc.num_processes * t.grad_accum):
        raise TrainingError(f"train.global_batch_size={t.global_batch_size} must be divisible by processes "
                            f"({acc.num_processes}) x grad_accum ({t.grad_accum})")
    o = cfg.optim
    opt = build_optimizer(model, o.lr, o.betas, o.eps, o.weight_decay, device=acc.device)
    sched = build_scheduler(opt, t.steps, o.schedule, o.warmup_steps, o.lr, o.final_lr)

    start, elapsed = 0, 0.0  # elapsed: training wall time of earlier invocations (for FID vs wall-clock)
    rng_state = None
    if resume_from is not None:
        saved_head = ck.get("head", {})
        if saved_head.get("k") != vocab.k or saved_head.get("name") != vocab.name:
            raise TrainingError(f"{resume_from} was trained with head={saved_head.get('name')} k={saved_head.get('k')} "
                                f"but the config asks for head={vocab.name} k={vocab.k}; use another run directory")
        model.load_state_dict(ck["model"], strict=True)
        if t.distributed != "fsdp":  # FSDP loads its (full) optimizer state after sharding, below
            opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        start = int(ck["step"])
        elapsed = float(ck.get("elapsed_s", 0.0))
        per_rank = ck["rng"]
        if len(per_rank) == acc.num_processes:
            rng_state = per_rank[acc.process_index]

    model, opt, raw, ema = prepare_model(acc, cfg, model, opt, ck if resume_from is not None else None)
    fsdp = t.distributed == "fsdp"
    if rng_state is not None:
        restore_rng(rng_state)

    if t2i:
        data = EpochIndexedCaptions(codes, t.seed, cfg.model.class_dropout_prob)
        collate_fn = CaptionCollate(text, raw.config.cls_token_num, getattr(codes, "valid", None))
    else:
        data, collate_fn = EpochIndexed(codes, t.seed, cfg.model.class_dropout_prob, codes.num_classes), collate
    batches = StepBatches(len(codes), t.global_batch_size, acc.process_index, acc.num_processes, t.seed,
                          start, t.steps)
    loader = DataLoader(data, batch_sampler=batches, collate_fn=collate_fn, num_workers=cfg.data.num_workers,
                        pin_memory=acc.device.type == "cuda", persistent_workers=False,
                        generator=torch.Generator())  # own generator: creating the iterator must not consume the
    # global RNG, or a resumed run's dropout masks would drift from the uninterrupted run's

    n_params = sum(p.numel() for p in raw.parameters())
    if acc.is_main_process:
        write_run_info(run_dir, cfg, {"world_size": acc.num_processes, "n_params": n_params, **head_info,
                                      "resumed_from": str(resume_from) if resume_from else None})
    logger = MetricLogger(cfg, run_dir, acc.is_main_process, resumed_at=start if resume_from is not None else None)
    fpt = flops_per_token(raw.config, n_params)
    device_peak = t.peak_tflops * 1e12 if t.peak_tflops else peak_flops(acc.device)
    peak = device_peak * acc.num_processes if device_peak else None

    def save(step: int) -> Path:
        if not _weights_finite(raw, acc):
            good = last_good_checkpoint(ckpt_dir)
            raise TrainingError(f"the weights hold NaN/inf at step {step}; not saving them. Last good checkpoint: "
                                f"{good or 'none'}. Lower optim.lr or check the data")
        rng_all = _gather_rng(acc)
        path = checkpoint_path(ckpt_dir, step)
        # Gathering full tensors is collective under FSDP: every rank takes part, rank 0 writes.
        model_sd = acc.get_state_dict(model)
        ema_sd = ema.model_state(raw) if ema is not None else None
        if fsdp:
            from masc_llamagen.train.sharding import full_optimizer_state, full_tensors

            ema_sd = full_tensors(ema_sd) if ema_sd is not None else None
            opt_sd = full_optimizer_state(raw, opt)
        else:
            opt_sd = opt.state_dict()
        if acc.is_main_process:
            state = {
                "model": model_sd,
                "ema": ema_sd,
                "optimizer": opt_sd,
                "scheduler": sched.state_dict(),
                "rng": rng_all,
                "step": step,
                "ema_updates": ema.num_updates if ema is not None else 0,
                "elapsed_s": elapsed + time.perf_counter() - t_start,
                "model_config": asdict(raw.config),
                "model_kind": "gpt",
                "head": {**vocab.to_state(), "token_counts": torch.from_numpy(counts)},
                "head_info": head_info,
                "config": OmegaConf.to_container(cfg, resolve=True),
                "tokenizer": {"checkpoint": str(cfg.tokenizer.checkpoint), "codebook_sha256": ours},
            }
            if state["ema"] is None:
                del state["ema"]
            atomic_save(state, path)
            prune(ckpt_dir, t.keep_last)
        acc.wait_for_everyone()
        return path

    sampler = TrainingSampler(cfg, vocab, run_dir, resumed_at=start)
    history: list[float] = []
    pending: list[torch.Tensor] = []  # per-step global losses not yet read back: one host sync per log, not per step
    invalid = torch.zeros((), dtype=torch.long, device=acc.device)  # t2i samples without readable image or caption
    step = start
    micro = per_step // t.grad_accum
    t_start = time.perf_counter()
    meter = _Throughput(step)
    model.train()
    progress = _progress(acc.is_main_process, start, t.steps)
    stopped_early = False
    single = acc.num_processes == 1

    def drain() -> None:
        """Read back the pending losses; stop before anything is saved if one is not finite."""
        if not pending:
            return
        values = torch.stack(pending).tolist()
        first = step - len(pending) + 1
        pending.clear()
        for i, v in enumerate(values):
            if not math.isfinite(v):
                good = last_good_checkpoint(ckpt_dir)
                raise TrainingError(f"loss became {v} at step {first + i}; stopping. Last good checkpoint: "
                                    f"{good or 'none'}. Lower optim.lr or check the data")
        history.extend(values)

    with _Stop() as stop:
        for tokens, cond in loader:
            tokens = tokens.to(acc.device, non_blocking=True)
            cond = {k: v.to(acc.device, non_blocking=True) for k, v in cond.items()}
            if "valid" in cond:
                invalid += (~cond["valid"]).sum()
            ids = vocab.encode(tokens)
            loss_sum = torch.zeros((), device=acc.device)
            last_logits = None
            for a in range(t.grad_accum):
                sl = slice(a * micro, (a + 1) * micro)
                sync = a == t.grad_accum - 1
                ctx = acc.no_sync(model) if not sync else nullcontext()
                with ctx, acc.autocast():
                    logits, loss = model(ids[sl, :-1], targets=ids[sl], **{k: v[sl] for k, v in cond.items()})
                    acc.backward(loss / t.grad_accum)
                loss_sum += loss.detach() / t.grad_accum
                last_logits = logits.detach()
            grad_norm = acc.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip) if cfg.optim.grad_clip > 0 \
                else None
            pending.append(acc.reduce(loss_sum, reduction="mean"))
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update(raw)
            step += 1
            progress.update(1)
            log_now = step % t.log_every == 0 or step == t.steps
            save_now = step % t.ckpt_every == 0 or step == t.steps
            if log_now:
                drain()
                metrics = meter.rates(step, t.global_batch_size, grid, acc.device)
                with torch.no_grad():
                    target = tokens[-micro:]
                    fine = bits(vocab.fine_nll(last_logits, target).mean().item())
                metrics.update({
                    "train/loss": history[-1],
                    "train/fine_nll_bits": fine,
                    "train/lr": sched.get_last_lr()[0],
                    "train/pred_entropy_norm": _prediction_entropy(last_logits),
                })
                if not vocab.is_flat:
                    metrics["train/coarse_ce_bits"] = bits(history[-1])
                elif compare_mapping is not None:
                    with torch.no_grad():
                        marginal = marginal_coarse_nll(last_logits, target, compare_mapping).mean().item()
                    metrics["train/marginal_coarse_ce_bits"] = bits(marginal)
                if grad_norm is not None:
                    metrics["train/grad_norm"] = float(grad_norm)
                if t2i:  # samples whose image or caption features could not be read (no gradient, not in the mean)
                    metrics["train/invalid_samples"] = int(acc.reduce(invalid.clone(), reduction="sum"))
                if peak:
                    metrics["train/mfu"] = metrics["train/tokens_per_s"] * fpt / peak
                logger.log(metrics, step)
                progress.set_postfix(loss=f"{history[-1]:.4f}")
            want_stop = t.stop_after is not None and step - start >= t.stop_after  # the same on every rank
            # A signal may reach one rank only: agree on it, but without a collective (and host sync) every step.
            if single:
                want_stop = want_stop or stop.requested
            elif log_now or save_now:
                flag = torch.tensor(float(stop.requested), device=acc.device)
                want_stop = want_stop or bool(acc.reduce(flag, reduction="sum") > 0)
            grid_now = bool(t.sample_every) and step % t.sample_every == 0
            eval_now = bool(t.eval_every) and step % t.eval_every == 0
            if not (grid_now or eval_now or save_now or want_stop):
                continue
            with meter.paused(acc.device):  # evaluation and checkpoints do not count as training time
                if grid_now and acc.is_main_process:
                    logger.image("samples/grid", sampler.grid(raw, ema, step), step)
                if eval_now:
                    if acc.is_main_process:
                        logger.log(sampler.fid(raw, ema, step, elapsed + time.perf_counter() - t_start), step)
                    acc.wait_for_everyone()
                if save_now or want_stop:
                    drain()
                    path = save(step)
                    if want_stop and step < t.steps and acc.is_main_process:
                        print(f"stopped at step {step} (signal or train.stop_after); saved {path}; rerun the same "
                              "command to continue", flush=True)
            if want_stop and step < t.steps:
                stopped_early = True
                break
    drain()
    progress.close()
    logger.close()
    return {"step": step, "losses": history, "run_dir": str(run_dir), "stopped_early": stopped_early,
            "checkpoint": str(latest_checkpoint(ckpt_dir)) if latest_checkpoint(ckpt_dir) else None,
            "resumed_from": str(resume_from) if resume_from else None}


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
