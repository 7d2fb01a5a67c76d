"""Sampling during training, always from the EMA weights: decoded sample grids and FID/KID curves for W&B."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from masc_llamagen.data.images import heldout_split
from masc_llamagen.eval.model_eval import HeldoutCodes, as_scalars, evaluate_model
from masc_llamagen.masc.vocabulary import Vocabulary
from masc_llamagen.models.gpt import GPT
from masc_llamagen.models.sampling import SamplingConfig
from masc_llamagen.train.ema import EMA
from masc_llamagen.utils.images import save_grid
from masc_llamagen.weights import load_vq


class TrainingSampler:
    """Holds the tokenizer's decoder and a scratch model that receives the EMA weights before each use."""

    def __init__(self, cfg: DictConfig, vocab: Vocabulary, run_dir: Path, resumed_at: int = 0,
                 compare_mapping: torch.Tensor | None = None):
        """``resumed_at``: a resumed run's FID curve continues from the points its earlier invocations logged.
        ``compare_mapping``: a flat run's MASC mapping, for the held-out marginal coarse CE."""
        from masc_llamagen.eval.acceleration import load_curve

        self.cfg, self.vocab, self.run_dir = cfg, vocab, run_dir
        self.compare = {"masc": compare_mapping} if compare_mapping is not None else None
        self._vq = None
        self._heldout = None  # t2i: the held-out captions' features, opened on first use
        self._heldout_codes: HeldoutCodes | None = None  # c2i with train.eval_heldout: encoded (or read) once
        self._encoder = None  # t2i with train.eval_prompts: the run's text encoder, built on first use
        self.fid_curve: list[tuple[float, float]] = []
        if resumed_at and (run_dir / "metrics.jsonl").is_file():
            try:
                self.fid_curve = [(s, f) for s, f in load_curve(run_dir / "metrics.jsonl") if s <= resumed_at]
            except ValueError:  # no FID logged yet
                pass
        self._baseline = load_curve(cfg.train.baseline_curve) if cfg.train.baseline_curve else None

    @property
    def vq(self):
        if self._vq is None:
            self._vq = load_vq(self.cfg.tokenizer.checkpoint, self.cfg.tokenizer.arch)
        return self._vq

    def _model(self, raw: GPT, ema: EMA | None) -> GPT:
        model = GPT(raw.config).to(raw.output.weight.device)
        model.load_state_dict(ema.model_state(raw) if ema is not None else raw.state_dict())
        return model.eval()

    def conditions(self, config, n: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """n class-balanced ids, or for a t2i model the first n held-out captions' features (cycled) with their
        masks; ``n=None``: the sample grid's rows of 8 (8 per class for up to 10 classes, or 80 captions)."""
        if config.model_type == "t2i":
            n = 80 if n is None else n
            from masc_llamagen.text import TextFeatureStore

            if self._heldout is None:
                self._heldout = TextFeatureStore(self.cfg.text.heldout_features)
            feats, mask = self._heldout.batch(np.arange(n) % len(self._heldout), slots=config.cls_token_num)
            return torch.as_tensor(feats, dtype=torch.float32), torch.as_tensor(mask, dtype=torch.bool)
        if n is None:
            return torch.arange(min(config.num_classes, 10)).repeat_interleave(8), None
        return torch.arange(n) * config.num_classes // n, None

    @torch.no_grad()
    def images(self, model: GPT, labels: torch.Tensor, seed: int, batch: int = 100,
               caption_mask: torch.Tensor | None = None) -> np.ndarray:
        from masc_llamagen.sample import sample_images

        sc = SamplingConfig(cfg_scale=self.cfg.train.sample_cfg_scale)
        device = model.output.weight.device
        vq = self.vq.to(device)
        # per-sample seeds: sample i is the same image whatever the batch size or device
        return np.concatenate([
            sample_images(model, self.vocab, vq, labels[s : s + batch].to(device), sc, seed,
                          indices=torch.arange(s, min(s + batch, len(labels))),
                          caption_mask=None if caption_mask is None else caption_mask[s : s + batch].to(device))
            for s in range(0, len(labels), batch)])

    def grid(self, raw: GPT, ema: EMA | None, step: int) -> Path:
        model = self._model(raw, ema)
        labels, mask = self.conditions(raw.config)
        arr = self.images(model, labels, seed=step, caption_mask=mask)
        return save_grid(arr, self.run_dir / "samples" / f"step{step:08d}.png", nrow=8)

    def prompt_fid(self, model: GPT, step: int) -> dict:
        """t2i with ``train.eval_prompts``: the first ``eval_samples`` prompts, one image each, written as the
        sampler writes them and scored by the COCO protocol (clean-fid FID, CLIP score with weights)."""
        from PIL import Image

        from masc_llamagen.data.prompts import load_prompts
        from masc_llamagen.eval.coco import evaluate_coco30k
        from masc_llamagen.text import build_text_encoder

        t, device = self.cfg.train, model.output.weight.device
        prompts = load_prompts(t.eval_prompts)[: t.eval_samples]
        if self._encoder is None:
            self._encoder = build_text_encoder(self.cfg.text.encoder, self.cfg.text.path, device=device,
                                               max_length=model.config.cls_token_num)
        feats, mask = self._encoder(prompts, slots=model.config.cls_token_num)
        arr = self.images(model, feats, seed=10_000 + step, caption_mask=mask)
        out_dir = self.run_dir / "eval" / f"step{step:08d}"
        (out_dir / "images").mkdir(parents=True, exist_ok=True)
        for i, img in enumerate(arr):
            Image.fromarray(img).save(out_dir / "images" / f"{i:06d}.png")
        (out_dir / "captions.txt").write_text("".join(p.replace("\n", " ") + "\n" for p in prompts))
        m = evaluate_coco30k(out_dir, t.eval_reference_dir, clip_weights=t.eval_clip_weights,
                             cache_dir=Path(self.cfg.paths.artifacts) / "fid")
        out = {"eval/fid": m["fid"]}
        if m.get("clip_score") is not None:
            out["eval/clip_score"] = m["clip_score"]
        return out

    def fid(self, raw: GPT, ema: EMA | None, step: int, wall_s: float) -> dict:
        """The model's scores under W&B names (``eval/fid``, ``eval/heldout/coarse_ce`` ...): c2i through
        :func:`evaluate_model` (samples and, with ``train.eval_heldout``, held-out likelihood), t2i by the COCO
        protocol on ``train.eval_prompts``."""
        t = self.cfg.train
        model = self._model(raw, ema)
        if t.eval_prompts:
            return self._with_acceleration(step, {**self.prompt_fid(model, step), "eval/wall_clock_s": wall_s})
        labels, mask = self.conditions(raw.config, t.eval_samples)
        arr = self.images(model, labels, seed=10_000 + step, caption_mask=mask)
        if t.eval_heldout and raw.config.model_type == "c2i" and self._heldout_codes is None:
            self._heldout_codes = HeldoutCodes.encode(
                self.vq.to(model.output.weight.device), self.cfg.data.name, t.eval_heldout,
                image_size=self.cfg.data.image_size, root=self.cfg.data.root,
                cache_dir=Path(self.cfg.paths.artifacts) / "heldout")
        result = evaluate_model(
            model, {self.cfg.head.decoder: self.vocab}, heldout=self._heldout_codes, mappings=self.compare, images=arr,
            reference=self.cfg.data.name, reference_split=heldout_split(self.cfg.data.name),
            reference_image_size=self.cfg.data.image_size, reference_root=self.cfg.data.root,
            reference_limit=t.eval_reference, cache_dir=Path(self.cfg.paths.artifacts) / "fid",
            feature_layer=str(t.eval_feature_layer))
        return self._with_acceleration(step, as_scalars(result) | {"eval/wall_clock_s": wall_s})

    def _with_acceleration(self, step: int, out: dict) -> dict:
        """Append the FID to the run's curve and add the acceleration against the baseline run, if one is set."""
        self.fid_curve.append((float(step), float(out["eval/fid"])))
        if self._baseline is not None:
            from masc_llamagen.eval.acceleration import acceleration

            acc = acceleration(self.fid_curve, self._baseline)
            for k in ("acceleration", "step_ratio"):
                if acc[k] is not None:
                    out[f"eval/{k}"] = acc[k]
        return out
