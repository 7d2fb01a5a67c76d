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

Here: the entry points, the up-to-date check and the final report; the loop (build -> step -> scheduled hooks) is
masc_llamagen.train.tokenizer_loop, what it holds and saves masc_llamagen.train.tokenizer_state.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig

from masc_llamagen.errors import ConfigError, first_line, user_errors
from masc_llamagen.tokenizer.evaluate import RFIDScorer, evaluate_reconstruction
from masc_llamagen.train.tokenizer_config import config_record, register, resolve_config
from masc_llamagen.train.tokenizer_loop import build, fit, resume_point
from masc_llamagen.train.tokenizer_state import FINAL_LOSS_WINDOW, VQRun, VQState
from masc_llamagen.utils.devices import pick_device
from masc_llamagen.utils.io import atomic_write_json
from masc_llamagen.utils.provenance import file_sha256
from masc_llamagen.weights import save_weights

CONFIG_NAME = "vq_train"


def report_path(out: str | os.PathLike) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".json")


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


def _train(cfg: DictConfig, acc, rfid: RFIDScorer | None) -> dict[str, Any]:
    run, state = build(cfg, acc, resume_point(cfg))
    fit(run, state)
    if state.step < run.steps:
        run.logger.close()
        return {"skipped": False, "stopped": True, "step": state.step, "state": str(run.state_path)}
    return finish(run, state, rfid)


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


def finish(run: VQRun, state: VQState, rfid: RFIDScorer | None) -> dict[str, Any]:
    """Rank 0 scores the trained model on held-out images and writes the weights and the report; every rank
    returns the report. The training state goes: a forced rerun starts over instead of resuming at the end."""
    cfg, acc, raw = run.cfg, run.acc, run.raw
    train_usage = raw.codebook_usage()
    report = None
    if acc.is_main_process:
        t_eval = time.time()
        metrics = evaluate_reconstruction(raw, run.held_set, int(cfg.eval_images), int(cfg.rfid_images),
                                          int(cfg.eval_batch_size), acc.device, bool(cfg.progress), rfid)
        eval_time = time.time() - t_eval
        run.logger.log({f"eval/{n}": metrics[n] for n in ("psnr", "ssim", "codebook_usage", "perplexity", "rfid")
                        if metrics.get(n) is not None}, run.steps)
        raw.cpu().eval()
        save_weights(run.out, raw, run.vq_config, kind="vq")
        report = _report(run, state, metrics, train_usage, eval_time)
        atomic_write_json(report_path(run.out), report)
        run.state_path.unlink(missing_ok=True)
    run.logger.close()
    acc.wait_for_everyone()
    if report is None:
        report = json.loads(report_path(run.out).read_text())
    return {**report, "skipped": False}


def _report(run: VQRun, state: VQState, metrics: dict, train_usage: float, eval_time: float) -> dict[str, Any]:
    cfg, data, steps, batch = run.cfg, run.cfg.data, run.steps, int(run.cfg.batch_size)
    return {
        "config": run.record,
        "vq_config": run.vq_config.to_dict(),
        "out": str(run.out),
        "weights_sha256": file_sha256(run.out),
        "parameters": sum(p.numel() for p in run.raw.parameters()),
        "dataset": {"name": data.name, "train_split": data.split, "train_images": len(run.train_set),
                    "heldout_split": run.held_split, "image_size": int(data.image_size)},
        "steps": steps,
        "images_seen": steps * batch,
        "resumed_from": state.start if state.resumed else None,
        "wall_time_s": round(time.time() - run.t_start, 1),
        "train_time_s": round(state.train_time, 1),
        "eval_time_s": round(eval_time, 1),
        "train_images_per_s": round((steps - state.start) * batch / max(time.time() - state.t_train, 1e-9), 1),
        "final_losses": state.final_losses(),
        "final_losses_window": min(FINAL_LOSS_WINDOW, steps),
        "train_codebook_usage_window": train_usage,
        "reseeded_codes_total": state.reseeded_total,
        "reseed_events": state.reseed_events,
        **metrics,
        "device": str(run.acc.device),
        "processes": run.acc.num_processes,
        "mixed_precision": cfg.mixed_precision,
        "torch_threads": torch.get_num_threads(),
        "load_average_start_end": [round(run.load_start[0], 2), round(os.getloadavg()[0], 2)],
        "cpu_count": os.cpu_count(),
        "torch_version": torch.__version__,
        "perceptual": cfg.perceptual if run.perceptual is not None else None,
        "adversarial": run.disc is not None,
        "run_dir": str(run.run_dir),
    }


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
