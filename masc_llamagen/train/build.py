"""From a resolved config (and the checkpoint a run resumes from) to the built objects the loop trains with.

The order below is part of the exactness contract: the seed is set before the model is made, the resumed RNG
state is restored after Accelerate has prepared it, and nothing in between draws from the global generators.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from omegaconf import DictConfig, open_dict
from torch.utils.data import DataLoader

from masc_llamagen.checkpoint import TokenizerRecord, TrainingCheckpoint
from masc_llamagen.data.images import build_image_dataset, heldout_split
from masc_llamagen.errors import ConfigError, TrainingError
from masc_llamagen.masc.vocabulary import Vocabulary, vocabulary_from_config
from masc_llamagen.models.gpt import GPT, TransformerBlock, gpt_config
from masc_llamagen.train.batches import CaptionCollate, EpochIndexed, EpochIndexedCaptions, StepBatches, collate
from masc_llamagen.train.checkpointing import restore_rng
from masc_llamagen.train.ema import EMA
from masc_llamagen.train.evaluate import TrainingSampler
from masc_llamagen.train.logging import MetricLogger
from masc_llamagen.train.optim import build_optimizer, build_scheduler
from masc_llamagen.train.run_info import write_run_info
from masc_llamagen.train.state import Run
from masc_llamagen.train.throughput import flops_per_token, peak_flops
from masc_llamagen.weights import read_codebook


def accelerator(cfg: DictConfig) -> Accelerator:
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


def check_codes_match_tokenizer(cfg: DictConfig, codes, codebook: np.ndarray) -> TokenizerRecord:
    """The codes were extracted with this tokenizer (its codebook's fingerprint), or training would learn noise."""
    from masc_llamagen.masc.tree import codebook_sha256

    fp = (codes.meta.get("tokenizer") or {}).get("fingerprint")
    ours = codebook_sha256(codebook)
    if not fp:
        raise TrainingError(f"codes in {cfg.data.codes} carry no tokenizer fingerprint, so nothing shows they match "
                            f"{cfg.tokenizer.checkpoint}; re-extract them with it (the pipeline's codes stage)")
    if fp != ours:
        raise TrainingError(f"codes in {cfg.data.codes} were extracted with tokenizer {fp[:12]} but "
                            f"{cfg.tokenizer.checkpoint} is {ours[:12]}; re-extract the codes or use that tokenizer")
    if codes.codebook_size != codebook.shape[0]:
        raise TrainingError(f"codes use a {codes.codebook_size}-entry codebook, tokenizer has {codebook.shape[0]}")
    return TokenizerRecord(checkpoint=str(cfg.tokenizer.checkpoint), codebook_sha256=ours)


def build_vocabulary(cfg: DictConfig, acc: Accelerator, codebook: np.ndarray, counts: np.ndarray):
    """(vocabulary, head info, compare mapping): rank 0 builds (and caches) the tree or mapping, then the others
    load it from the cache. A flat run with ``head.compare_k`` also gets that MASC cut, to log its marginal CE."""
    cache_dir = Path(cfg.paths.artifacts) / "trees"
    built = vocabulary_from_config(cfg.head, codebook, counts, cache_dir) if acc.is_main_process else None
    acc.wait_for_everyone()
    vocab, head_info = built or vocabulary_from_config(cfg.head, codebook, counts, cache_dir)
    compare_mapping = None
    if vocab.is_flat and cfg.head.compare_k:
        masc_head = cfg.head.copy()
        with open_dict(masc_head):
            masc_head.name, masc_head.k = "masc", cfg.head.compare_k
        compare_mapping = vocabulary_from_config(masc_head, codebook, None, cache_dir)[0].mapping
    return vocab, head_info, compare_mapping


def build_model(cfg: DictConfig, vocab: Vocabulary, grid: int, num_classes: int,
                caption_dim: int | None = None) -> GPT:
    m = cfg.model
    cond = ({"model_type": "t2i", "caption_dim": caption_dim, "cls_token_num": m.cls_token_num or 120}
            if m.model_type == "t2i" else {"null_class": True})  # CFG (grids, FID, sampler) needs the null class
    gcfg = gpt_config(m.arch, vocab_size=vocab.vocab_size, block_size=grid, num_classes=num_classes,
                      token_dropout_p=m.token_dropout_p, resid_dropout_p=m.resid_dropout_p,
                      ffn_dropout_p=m.ffn_dropout_p, attn_dropout_p=m.attn_dropout_p,
                      drop_path_rate=m.drop_path_rate, class_dropout_prob=m.class_dropout_prob,
                      zero_init_head=vocab.is_flat, **cond)
    model = GPT(gcfg)
    model.cls_embedding.dropout_prob = 0.0  # class/caption dropout is drawn in the data pipeline (batches.py)
    return model


def check_heldout_classes(cfg: DictConfig, num_classes: int) -> None:
    """Refuse now, not at the first evaluation hours in: held-out images of more classes than the codes have mean the
    codes come from another dataset (and the FID reference would be the wrong one too)."""
    held = build_image_dataset(cfg.data.name, heldout_split(cfg.data.name), image_size=cfg.data.image_size,
                               root=cfg.data.root)
    if held.num_classes > num_classes:
        raise ConfigError(f"{cfg.data.name}'s held-out images have {held.num_classes} classes but the codes "
                          f"({cfg.data.codes}) have {num_classes}: point data.codes at this dataset's codes, or set "
                          "train.eval_heldout=0")


def load_text_features(cfg: DictConfig, codes):
    """The training captions' features (a packed store, or LlamaGen's per-line files), checked against the codes."""
    from masc_llamagen.text import LlamaGenT5Features, TextFeatureStore

    path = Path(cfg.text.features)
    slots = cfg.model.cls_token_num or 120
    if cfg.text.llamagen_jsonl:  # a missing or unreadable .npy is an invalid sample, never a crash
        store = LlamaGenT5Features(path, cfg.text.llamagen_jsonl, dim=cfg.text.llamagen_dim, max_length=slots)
    elif not (path / "meta.json").is_file():
        raise TrainingError(f"no caption features in {path}; extract them first: python -m "
                            f"masc_llamagen.data.extract_text codes={cfg.data.codes} encoder={cfg.text.encoder} "
                            f"out={path}")
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


def load_resumed_weights(cfg: DictConfig, ck: TrainingCheckpoint, source: Path, vocab: Vocabulary, model: GPT,
                         opt: torch.optim.Optimizer, sched) -> None:
    """Model, optimizer (FSDP: after sharding, in :func:`prepare_model`) and scheduler state of the resumed run."""
    saved = ck.head
    if saved.get("k") != vocab.k or saved.get("name") != vocab.name:
        raise TrainingError(f"{source} was trained with head={saved.get('name')} k={saved.get('k')} "
                            f"but the config asks for head={vocab.name} k={vocab.k}; use another run directory")
    model.load_state_dict(ck.model, strict=True)
    if cfg.train.distributed != "fsdp":
        opt.load_state_dict(ck.optimizer)
    sched.load_state_dict(ck.scheduler)


def prepare_model(acc: Accelerator, cfg: DictConfig, model: GPT, opt: torch.optim.Optimizer,
                  ck: TrainingCheckpoint | None):
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

        load_full_optimizer_state(raw, opt, ck.optimizer)
    ema = EMA(raw, t.ema_decay) if t.ema else None
    if ema is not None and ck is not None and ck.ema is not None:
        saved = {k: v for k, v in ck.ema.items() if k in ema.shadow}
        if fsdp:
            from masc_llamagen.train.sharding import shard_like

            saved = shard_like(saved, ema.shadow)
        ema.load_state_dict(saved, ck.ema_updates)
    return model, opt, raw, ema


def build_loader(cfg: DictConfig, acc: Accelerator, codes, text, raw: GPT, start: int) -> DataLoader:
    """Batches of the steps ``start ..``: the batch at step s depends only on (seed, s)."""
    t = cfg.train
    if cfg.model.model_type == "t2i":
        data = EpochIndexedCaptions(codes, t.seed, cfg.model.class_dropout_prob)
        collate_fn = CaptionCollate(text, raw.config.cls_token_num, getattr(codes, "valid", None))
    else:
        data, collate_fn = EpochIndexed(codes, t.seed, cfg.model.class_dropout_prob, codes.num_classes), collate
    batches = StepBatches(len(codes), t.global_batch_size, acc.process_index, acc.num_processes, t.seed,
                          start, t.steps)
    return DataLoader(data, batch_sampler=batches, collate_fn=collate_fn, num_workers=cfg.data.num_workers,
                      pin_memory=acc.device.type == "cuda", persistent_workers=False,
                      generator=torch.Generator())  # own generator: creating the iterator must not consume the
    # global RNG, or a resumed run's dropout masks would drift from the uninterrupted run's


def build_run(cfg: DictConfig, acc: Accelerator, run_dir: Path, ck: TrainingCheckpoint | None,
              resumed_from: Path | None) -> tuple[Run, int, float]:
    """Model, data, optimizer, EMA and logger, with the resumed state loaded: ``(run, start step, elapsed_s)``."""
    t = cfg.train
    set_seed(t.seed + acc.process_index)
    codes = load_codes(cfg)
    codebook = read_codebook(cfg.tokenizer.checkpoint)
    tokenizer = check_codes_match_tokenizer(cfg, codes, codebook)
    counts = codes.code_counts()
    vocab, head_info, compare_mapping = build_vocabulary(cfg, acc, codebook, counts)
    grid = int(np.prod(codes.grid))
    text = load_text_features(cfg, codes) if cfg.model.model_type == "t2i" else None
    model = build_model(cfg, vocab, grid, codes.num_classes, caption_dim=text.dim if text is not None else None)
    if t.eval_every and t.eval_heldout and cfg.model.model_type == "c2i":
        check_heldout_classes(cfg, codes.num_classes)
    if cfg.model.class_dropout_prob == 0 and t.sample_cfg_scale > 1 and (t.sample_every or t.eval_every) \
            and acc.is_main_process:
        print("warning: model.class_dropout_prob=0 never trains the null class, so the CFG of sample grids and "
              "in-training FID (train.sample_cfg_scale>1) guides against an untrained embedding", flush=True)
    if t.global_batch_size % (acc.num_processes * t.grad_accum):
        raise TrainingError(f"train.global_batch_size={t.global_batch_size} must be divisible by processes "
                            f"({acc.num_processes}) x grad_accum ({t.grad_accum})")
    o = cfg.optim
    opt = build_optimizer(model, o.lr, o.betas, o.eps, o.weight_decay, device=acc.device)
    sched = build_scheduler(opt, t.steps, o.schedule, o.warmup_steps, o.lr, o.final_lr)
    start, elapsed = 0, 0.0
    if ck is not None:
        load_resumed_weights(cfg, ck, resumed_from, vocab, model, opt, sched)
        start, elapsed = ck.step, float(ck.elapsed_s)
    model, opt, raw, ema = prepare_model(acc, cfg, model, opt, ck)
    if ck is not None and len(ck.rng) == acc.num_processes:  # else: warned about in resume_differences
        restore_rng(ck.rng[acc.process_index])
    loader = build_loader(cfg, acc, codes, text, raw, start)

    n_params = sum(p.numel() for p in raw.parameters())
    if acc.is_main_process:
        write_run_info(run_dir, cfg, {"world_size": acc.num_processes, "n_params": n_params, **head_info,
                                      "resumed_from": str(resumed_from) if resumed_from else None})
    logger = MetricLogger(cfg, run_dir, acc.is_main_process, resumed_at=start if ck is not None else None)
    device_peak = t.peak_tflops * 1e12 if t.peak_tflops else peak_flops(acc.device)
    run = Run(cfg=cfg, acc=acc, run_dir=run_dir, model=model, raw=raw, opt=opt, sched=sched, ema=ema, vocab=vocab,
              head_info=head_info, token_counts=counts, tokenizer=tokenizer, compare_mapping=compare_mapping,
              loader=loader, logger=logger,
              sampler=TrainingSampler(cfg, vocab, run_dir, resumed_at=start, compare_mapping=compare_mapping),
              tokens_per_image=grid, flops_per_token=flops_per_token(raw.config, n_params),
              peak_flops=device_peak * acc.num_processes if device_peak else None, resumed_from=resumed_from)
    return run, start, elapsed
