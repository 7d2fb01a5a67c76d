"""The default job end to end: dataset -> tokenizer -> codes -> tree -> GPT -> samples -> FID -> report.

    python -m masc_llamagen.pipeline [pipeline.stages=[tokenizer,codes]] [pipeline.force=[train]] [train overrides]
    python -m masc_llamagen.pipeline experiment=cpu_t2i +pipeline.tokenizer.vq.codebook_size=4096
    make train                                      # the same, CPU-sized default (experiment=cpu_default)

The ``pipeline.*`` keys are :class:`PipelineOptions`; every other key is the training config's (configs/train.yaml),
composed as ``python train.py`` composes it.

Every stage is also its own command (``python -m masc_llamagen.train.tokenizer``, ``python -m masc_llamagen.tree``,
``python train.py``, ``python -m masc_llamagen.sample``, ``scripts/eval.sh``) and is skipped here when its output is
already there and was made from the same inputs (a ``.stage.json`` stamp next to each output records them).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf, open_dict

from masc_llamagen.config import register
from masc_llamagen.errors import ConfigError, TrainingError, user_errors
from masc_llamagen.train.checkpointing import latest_checkpoint
from masc_llamagen.utils.io import atomic_write_json

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
STAGES = ("tokenizer", "codes", "text", "tree", "train", "sample", "eval", "report")  # text: t2i runs only


@dataclass
class PipelineOptions:
    """The ``pipeline.*`` keys of ``python -m masc_llamagen.pipeline`` (configs/pipeline.yaml)."""

    stages: list[str] = field(default_factory=lambda: list(STAGES))  # the stages to run, in pipeline order
    force: list[str] = field(default_factory=list)  # stages to redo even when their output is up to date
    samples: int = 1000  # images to sample for FID
    fid_reference: int = 1000  # held-out real images for FID
    rfid_images: int = 500  # held-out images for the tokenizer's rFID
    # overrides of the tokenizer-training config, e.g. +pipeline.tokenizer.vq.codebook_size=4096
    tokenizer: dict[str, Any] = field(default_factory=dict)


ConfigStore.instance().store(name="base_pipeline", node=PipelineOptions)
register()  # the training schemas configs/pipeline.yaml composes


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _file_id(path: Path) -> str:
    st = Path(path).stat()
    return f"{st.st_size}-{st.st_mtime_ns}"


class Stamp:
    """``<output>.stage.json``: the inputs an output was made from; a stage is skipped when they are unchanged."""

    def __init__(self, output: Path, inputs: dict):
        self.path = Path(str(output).rstrip("/") + ".stage.json")
        self.output, self.key = Path(output), _hash(inputs)

    def fresh(self) -> bool:
        if not (self.output.exists() and self.path.is_file()):
            return False
        return json.loads(self.path.read_text()).get("key") == self.key

    def write(self, summary: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps({"key": self.key, **summary}, indent=2, default=str))

    def summary(self) -> dict:
        return json.loads(self.path.read_text())


def _fetch_emoji(root: Path) -> None:
    """The Twemoji package from the npm registry (scripts/fetch_emoji.sh: a no-op once it is unpacked)."""
    import subprocess

    script = Path(__file__).resolve().parents[1] / "scripts" / "fetch_emoji.sh"
    r = subprocess.run(["bash", str(script), str(root.resolve())], capture_output=True, text=True)
    if r.returncode != 0:
        from masc_llamagen.data.captions import CaptionDataError

        raise CaptionDataError((r.stderr.strip().splitlines() or ["fetch_emoji.sh failed"])[-1].removeprefix("error: "))


def codes_inputs(cfg: DictConfig) -> dict:
    """What the codes are made from: the tokenizer file, the dataset and where its images are actually read."""
    from masc_llamagen.data.images import default_root

    root = cfg.data.root or default_root(cfg.data.name)
    return {"tokenizer": _file_id(Path(cfg.tokenizer.checkpoint)), "data": cfg.data.name,
            "size": cfg.data.image_size, "root": str(Path(root).resolve()) if root else None}


def merge_record(path: Path, results: dict) -> dict:
    """The run's ``pipeline.json``: a rerun of some stages updates their entries and keeps the others."""
    old = {}
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except ValueError:
            old = {}
    merged = {**old, **{k: v for k, v in results.items() if v is not None}}
    merged["timings_s"] = {**old.get("timings_s", {}), **results.get("timings_s", {})}
    atomic_write_json(path, merged)
    return merged


def compose_train(overrides: list[str]) -> DictConfig:
    """The training config of a pipeline run; its directory is keyed on the overrides (runs/NAME/<hash>)."""
    preset = [] if any(o.startswith("experiment=") for o in overrides) else ["experiment=cpu_default"]
    run_dir = f"paths.output_dir=${{paths.runs}}/${{name}}/{_hash(sorted(overrides))[:8]}"
    if GlobalHydra.instance().is_initialized():  # inside the pipeline's own Hydra app: same configs/
        return compose("train", overrides=[*preset, *overrides, run_dir])
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIGS)):
        return compose("train", overrides=[*preset, *overrides, run_dir])


def _log(stage: str, msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {stage}: {msg}", flush=True)


@dataclass
class Job:
    """What every stage of one pipeline run reads: its training config and the ``pipeline.*`` options."""

    cfg: DictConfig
    samples: int = 1000
    fid_reference: int = 1000
    vq_overrides: Sequence[str] | Mapping[str, Any] = ()
    rfid_images: int = 500
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage run so far (the report shows them)

    @property
    def artifacts(self) -> Path:
        return Path(self.cfg.paths.artifacts)

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.paths.output_dir)

    @property
    def t2i(self) -> bool:
        return self.cfg.model.model_type == "t2i"


def stage_tokenizer(job: Job, force_it: bool):
    """Train the tokenizer (skipped when its report matches the config)."""
    from masc_llamagen.eval.metrics import compute_metrics
    from masc_llamagen.train.tokenizer import train_tokenizer

    cfg, t2i, vq_overrides, rfid_images = job.cfg, job.t2i, job.vq_overrides, job.rfid_images
    data = ({"data": {"name": cfg.data.name, "root": cfg.data.root, "image_size": cfg.data.image_size}}
            if t2i else {})  # c2i: the tokenizer config's own data (Fashion-MNIST)
    extra = (OmegaConf.create(dict(vq_overrides)) if isinstance(vq_overrides, Mapping)
             else OmegaConf.from_dotlist(list(vq_overrides)))
    vq_cfg = OmegaConf.merge(OmegaConf.create({"out": str(cfg.tokenizer.checkpoint), "force": force_it,
                                               "rfid_images": rfid_images, **data}), extra)
    rep = train_tokenizer(vq_cfg, rfid=compute_metrics)  # the report carries rFID, as before the rewrite
    _log("tokenizer", f"{cfg.tokenizer.checkpoint} (PSNR {rep.get('psnr')}, usage {rep.get('codebook_usage')})")
    return rep


def stage_codes(job: Job, force_it: bool):
    """Encode the training images into packed codes."""
    from masc_llamagen.data.extract import extract_codes
    from masc_llamagen.weights import load_vq

    cfg, t2i = job.cfg, job.t2i
    out = Path(cfg.data.codes)
    stamp = Stamp(out, codes_inputs(cfg))
    if stamp.fresh() and not force_it:
        _log("codes", f"up to date: {out}")
        return stamp.summary()
    vq = load_vq(cfg.tokenizer.checkpoint, cfg.tokenizer.arch)
    if out.exists():
        import shutil

        shutil.rmtree(out)
    spec = {"name": cfg.data.name, "split": "train", "image_size": cfg.data.image_size, "root": cfg.data.root}
    extract_codes(vq, {**spec, "task": "t2i"} if t2i else spec, out, tokenizer_path=cfg.tokenizer.checkpoint)
    summary = {"codes": str(out)}
    stamp.write(summary)
    return summary


def stage_text(job: Job, force_it: bool):
    """t2i: the training and held-out captions' features."""
    from masc_llamagen.data.captions import heldout_captions
    from masc_llamagen.data.codes import CodeDataset
    from masc_llamagen.text import build_text_encoder, extract_text_features

    cfg = job.cfg
    enc = build_text_encoder(cfg.text.encoder, cfg.text.path, max_length=cfg.model.cls_token_num or 120)
    train_captions = CodeDataset(cfg.data.codes).captions
    held = heldout_captions(cfg.data.name, root=cfg.data.root, image_size=cfg.data.image_size)
    for captions, out in ((train_captions, cfg.text.features), (held, cfg.text.heldout_features)):
        extract_text_features(enc, captions, out, overwrite=force_it)  # skipped when already done
    _log("text", f"{len(train_captions)} + {len(held)} captions with {enc.name} -> {cfg.text.features}")
    return {"encoder": enc.name, "train": len(train_captions), "heldout": len(held)}


def stage_tree(job: Job, force_it: bool):
    """Build (or read from the cache) the head's tree or mapping and report its cluster sizes."""
    from masc_llamagen.data.codes import CodeDataset
    from masc_llamagen.masc.members import size_summary
    from masc_llamagen.masc.vocabulary import vocabulary_from_config
    from masc_llamagen.weights import read_codebook

    cfg, artifacts = job.cfg, job.artifacts
    codebook = read_codebook(cfg.tokenizer.checkpoint)
    voc, info = vocabulary_from_config(cfg.head, codebook, CodeDataset(cfg.data.codes).code_counts(),
                                       artifacts / "trees")
    stats = size_summary(voc.sizes().numpy())
    _log("tree", f"head={voc.name} k={voc.k}: {stats}")
    return {**info, "sizes": stats}


def stage_train(job: Job, force_it: bool):
    """Train the GPT (a rerun resumes the run directory's last checkpoint)."""
    from masc_llamagen.train.loop import train

    cfg = job.cfg
    with open_dict(cfg):
        cfg.train.resume = not force_it
    out = train(cfg)
    return {k: out[k] for k in ("step", "checkpoint", "run_dir")} | {"final_loss": out["losses"][-1]
                                                                     if out["losses"] else None}


def stage_sample(job: Job, force_it: bool):
    """Sample the last checkpoint: class-balanced for c2i, one image per held-out caption for t2i."""
    from masc_llamagen.sample import sample
    from masc_llamagen.sample_config import SampleConfig

    cfg, run_dir, t2i, samples = job.cfg, job.run_dir, job.t2i, job.samples
    ckpt = latest_checkpoint(run_dir / "checkpoints")
    if ckpt is None:
        raise TrainingError(f"no checkpoint in {run_dir}; run the train stage first (add train to pipeline.stages)")
    out_dir = run_dir / "samples" / "default"
    stamp = Stamp(out_dir / ("images" if t2i else "samples.npz"),
                  {"ckpt": _file_id(ckpt), "n": samples, "cfg": cfg.train.sample_cfg_scale})
    if stamp.fresh() and not force_it:
        _log("sample", f"up to date: {out_dir}")
        return stamp.summary()
    extra = {"png": False}
    if t2i:  # one image per held-out caption (its images are the FID reference)
        from masc_llamagen.data.captions import heldout_captions

        prompts = out_dir.parent / "heldout_prompts.txt"
        prompts.parent.mkdir(parents=True, exist_ok=True)
        held = heldout_captions(cfg.data.name, root=cfg.data.root, image_size=cfg.data.image_size)
        prompts.write_text("".join(c + "\n" for c in held))
        extra = {"prompts": str(prompts)}
    res = sample(SampleConfig(checkpoint=str(ckpt), num_samples=samples, cfg_scale=cfg.train.sample_cfg_scale,
                              out_dir=str(out_dir), batch_size=100, **extra))
    summary = {"npz" if not t2i else "images": res.get("npz") or res.get("images"), "checkpoint": str(ckpt),
               "num_samples": res["num_samples"]}
    stamp.write(summary)
    return summary


def stage_eval(job: Job, force_it: bool):
    """Sample quality of the sampled set and (c2i) held-out likelihood of its checkpoint, by the one evaluation
    that training and the benchmarks use."""
    from masc_llamagen.checkpoint import load_for_sampling
    from masc_llamagen.data.images import heldout_split
    from masc_llamagen.eval.metrics import write_metrics_json
    from masc_llamagen.eval.model_eval import HeldoutCodes, evaluate_model

    cfg, artifacts, run_dir, t2i, fid_reference = job.cfg, job.artifacts, job.run_dir, job.t2i, job.fid_reference
    npz = run_dir / "samples" / "default" / ("images" if t2i else "samples.npz")
    out = npz.with_name("metrics.json")
    ckpt = latest_checkpoint(run_dir / "checkpoints")
    if ckpt is None:
        raise TrainingError(f"no checkpoint in {run_dir}; run the train stage first (add train to pipeline.stages)")
    heldout_n = 0 if t2i else cfg.train.eval_heldout
    stamp = Stamp(out, {"npz": _file_id(npz), "ref": fid_reference, "ckpt": _file_id(ckpt),
                        "heldout": heldout_n})
    if stamp.fresh() and not force_it:
        _log("eval", f"up to date: {out}")
        return json.loads(out.read_text())
    loaded = load_for_sampling(ckpt, decoder=cfg.head.decoder, smoothing=cfg.head.smoothing)
    heldout = HeldoutCodes.encode(loaded.vq, cfg.data.name, heldout_n, image_size=cfg.data.image_size,
                                  cache_dir=artifacts / "heldout") if heldout_n else None
    m = evaluate_model(loaded.model, {cfg.head.decoder: loaded.vocabulary}, heldout=heldout, images=npz,
                       reference=cfg.data.name, reference_split=heldout_split(cfg.data.name),
                       reference_image_size=cfg.data.image_size, reference_limit=fid_reference,
                       reference_root=cfg.data.root if t2i else None, cache_dir=artifacts / "fid")
    write_metrics_json(m, out)
    stamp.write({"metrics": str(out)})
    nll = f", held-out fine NLL {m['heldout'][f'fine_nll_{cfg.head.decoder}']:.3f} bits" if heldout else ""
    _log("eval", f"FID {m['fid']:.2f} ({m.get('n_generated')} vs {m.get('n_reference')} images){nll}")
    return m


def stage_report(job: Job, force_it: bool):
    """The run's markdown report: numbers, curves and sample grids."""
    from masc_llamagen.report import class_grid, plot_curves, read_metrics, write_report

    cfg, run_dir, t2i = job.cfg, job.run_dir, job.t2i
    rows = read_metrics(run_dir)
    images = {}
    curves = plot_curves(rows, run_dir / "report" / "curves.png")
    if curves:
        images["Training curves"] = curves
    npz = run_dir / "samples" / "default" / "samples.npz"
    if npz.is_file():
        images["Samples, one row per class (EMA weights)"] = class_grid(npz, run_dir / "report" / "samples.png")
    if t2i and (npz.parent / "captions.txt").is_file():
        from masc_llamagen.data.captions import CREDITS
        from masc_llamagen.report import captioned_grid

        images["Samples for held-out captions (EMA weights)"] = captioned_grid(
            npz.parent, run_dir / "report" / "samples_captioned.png", credit=CREDITS)
    metrics_json = npz.with_name("metrics.json")
    sections = {"Run": {"name": cfg.name, "model": cfg.model.arch, "head": cfg.head.name, "k": cfg.head.k,
                        "steps": cfg.train.steps, "global batch": cfg.train.global_batch_size,
                        "run dir": str(run_dir)}}
    tok_report = Path(str(cfg.tokenizer.checkpoint) + ".json")
    if tok_report.is_file():
        tr = json.loads(tok_report.read_text())
        sections["Tokenizer"] = {k: tr[k] for k in ("psnr", "ssim", "rfid", "codebook_usage", "perplexity",
                                                     "steps", "wall_time_s") if k in tr}
    if metrics_json.is_file():
        m = json.loads(metrics_json.read_text())
        sections["Sample quality"] = {k: m[k] for k in ("fid", "kid_mean", "kid_std", "precision", "recall",
                                                        "n_generated", "n_reference") if k in m}
        if m.get("heldout"):
            sections["Held-out likelihood (bits per token; entropy_norm: H / log V)"] = m["heldout"]
    if rows:
        last = rows[-1]
        sections["Final training metrics"] = {k.split("/")[-1]: v for k, v in last.items() if k != "step"}
    sections["Stage wall times (s)"] = dict(job.timings)
    notes = [f"Data: {cfg.data.name}."]
    if "twemoji" in str(cfg.data.name):
        from masc_llamagen.data.captions import CREDITS

        notes.append(CREDITS)
        notes.append("Caption features: " + ("wordllama's static token embeddings (contextless, not a T5)"
                                             if cfg.text.encoder == "wordllama" else cfg.text.encoder))
    else:
        notes.append("Fashion-MNIST is MIT-licensed (Zalando Research).")
    return str(write_report(run_dir / "report" / "README.md", sections, images, notes))


STAGE_FUNCTIONS = {"tokenizer": stage_tokenizer, "codes": stage_codes, "text": stage_text, "tree": stage_tree,
                   "train": stage_train, "sample": stage_sample, "eval": stage_eval, "report": stage_report}


def run(overrides: list[str], stages: Sequence[str] = STAGES, force: Sequence[str] = (), samples: int = 1000,
        fid_reference: int = 1000, vq_overrides: Sequence[str] | Mapping[str, Any] = (),
        rfid_images: int = 500) -> dict:
    """Run ``stages`` of the job the training ``overrides`` describe; ``vq_overrides`` (a dotlist or a nested
    mapping) go to the tokenizer-training config. Returns what each stage did, also merged into pipeline.json."""
    for key, names in (("stages", stages), ("force", force)):
        bad = [s for s in names if s not in STAGES]
        if bad:
            raise ConfigError(f"pipeline.{key}: unknown stage(s) {', '.join(bad)}; choose from [{','.join(STAGES)}]")
    job = Job(compose_train(overrides), samples, fid_reference, vq_overrides, rfid_images)
    if job.t2i and job.cfg.data.name == "twemoji":
        _fetch_emoji(Path(job.cfg.data.root))
    results: dict = {"timings_s": job.timings}
    t_all = time.perf_counter()
    for stage in STAGES:
        if stage in stages and (stage != "text" or job.t2i):
            t0 = time.perf_counter()
            results[stage] = STAGE_FUNCTIONS[stage](job, stage in force)
            job.timings[stage] = round(time.perf_counter() - t0, 1)
    results["total_s"] = round(time.perf_counter() - t_all, 1)
    job.run_dir.mkdir(parents=True, exist_ok=True)
    merge_record(job.run_dir / "pipeline.json", results)
    _log("done", f"{results['total_s']} s; report: {results.get('report')}")
    return results


@hydra.main(version_base="1.3", config_path=str(CONFIGS), config_name="pipeline")
def main(cfg: DictConfig) -> None:
    """The app composes the training config only to check the overrides; ``run`` composes it again from the same
    overrides (less ``pipeline.*``), so the CLI and the library name the same run directory."""
    from hydra.core.hydra_config import HydraConfig

    with user_errors():  # a missing dataset, a wrong file, k out of range ...: one line, exit 1, no traceback
        train_overrides = [o for o in HydraConfig.get().overrides.task
                           if o.lstrip("+~").split("=")[0].split(".")[0] != "pipeline"]
        opts: PipelineOptions = OmegaConf.to_object(cfg.pipeline)
        run(train_overrides, opts.stages, opts.force, opts.samples, opts.fid_reference, opts.tokenizer,
            opts.rfid_images)


if __name__ == "__main__":
    main()
