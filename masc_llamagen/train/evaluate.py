"""Sampling during training, always from the EMA weights: decoded sample grids and FID/KID curves for W&B."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from masc_llamagen.checkpoint import load_vq
from masc_llamagen.masc.heads import Vocabulary
from masc_llamagen.models.gpt import GPT
from masc_llamagen.models.sampling import SamplingConfig
from masc_llamagen.train.ema import EMA
from masc_llamagen.train.images import save_grid


class TrainingSampler:
    """Holds the tokenizer's decoder and a scratch model that receives the EMA weights before each use."""

    def __init__(self, cfg: DictConfig, vocab: Vocabulary, run_dir: Path, resumed_at: int = 0):
        """``resumed_at``: a resumed run's FID curve continues from the points its earlier invocations logged."""
        from masc_llamagen.eval.acceleration import load_curve

        self.cfg, self.vocab, self.run_dir = cfg, vocab, run_dir
        self._vq = None
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

    @torch.no_grad()
    def images(self, model: GPT, labels: torch.Tensor, seed: int, batch: int = 100) -> np.ndarray:
        from masc_llamagen.sample import sample_images

        sc = SamplingConfig(cfg_scale=self.cfg.train.sample_cfg_scale)
        vq = self.vq.to(model.output.weight.device)
        # per-sample seeds: sample i is the same image whatever the batch size or device
        return np.concatenate([
            sample_images(model, self.vocab, vq, labels[s : s + batch], sc, seed,
                          indices=torch.arange(s, min(s + batch, len(labels))))
            for s in range(0, len(labels), batch)])

    def grid(self, raw: GPT, ema: EMA | None, step: int) -> Path:
        model = self._model(raw, ema)
        n_cls = min(raw.config.num_classes, 10)
        labels = torch.arange(n_cls).repeat_interleave(8)
        arr = self.images(model, labels, seed=step)
        t = torch.from_numpy(arr).permute(0, 3, 1, 2).float().sub(128.0).div(127.5)
        return save_grid(t, self.run_dir / "samples" / f"step{step:08d}.png", nrow=8)

    def fid(self, raw: GPT, ema: EMA | None, step: int, wall_s: float) -> dict:
        from masc_llamagen.data.images import heldout_split
        from masc_llamagen.eval.metrics import compute_metrics

        t = self.cfg.train
        model = self._model(raw, ema)
        n = t.eval_samples
        labels = torch.arange(n) * raw.config.num_classes // n  # class-balanced
        arr = self.images(model, labels, seed=10_000 + step)
        m = compute_metrics(arr, self.cfg.data.name, reference_split=heldout_split(self.cfg.data.name),
                            reference_image_size=self.cfg.data.image_size, reference_root=self.cfg.data.root,
                            reference_limit=t.eval_reference, cache_dir=Path(self.cfg.paths.artifacts) / "fid",
                            feature_layer=str(t.eval_feature_layer))
        out = {"eval/fid": m["fid"], "eval/kid_mean": m["kid_mean"], "eval/kid_std": m["kid_std"],
               "eval/precision": m["precision"], "eval/recall": m["recall"], "eval/wall_clock_s": wall_s}
        self.fid_curve.append((float(step), float(m["fid"])))
        if self._baseline is not None:
            from masc_llamagen.eval.acceleration import acceleration

            acc = acceleration(self.fid_curve, self._baseline)
            for k in ("acceleration", "step_ratio"):
                if acc[k] is not None:
                    out[f"eval/{k}"] = acc[k]
        return out
