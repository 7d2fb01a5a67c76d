"""The paper's Table 1 comparison at CPU scale: flat vs MASC vs k-means vs random heads, seeds, FID and diagnostics.

    python benchmarks/convergence.py [--quick] [--workers 2] [--root artifacts/bench]

Every arm trains the same GPT on the same codes with the same data order and initialisation per seed (both come
from ``train.seed`` only), then its EMA checkpoints are scored: FID on ``fid_samples`` class-balanced samples against
held-out real images (real Inception, offline), for the member decoders the plan names, and held-out diagnostics
(fine NLL, coarse CE, the flat model marginalised onto every coarse head's clusters, normalised entropy). Runs are
spread over ``--workers`` single-threaded processes (on two cores that does ~1.3x the work of one two-threaded one)
and each writes one JSON, so an interrupted benchmark continues where it stopped. ``benchmarks/run.py`` turns the
JSONs into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Tokenizer:
    name: str  # configs/tokenizer/<name>.yaml
    codebook_size: int
    vq: tuple[str, ...] = ()  # tokenizer-training overrides (configs/vq_train.yaml keys)
    images: int | None = None  # train images to encode (None: all 60k, as the default job does)


@dataclass(frozen=True)
class Arm:
    tokenizer: str
    head: str  # flat | masc | kmeans | random
    k: int | None = None

    @property
    def label(self) -> str:
        return "flat" if self.head == "flat" else f"{self.head}-k{self.k}"


@dataclass
class Plan:
    name: str
    model: str
    steps: int
    batch: int
    lr: float
    seeds: tuple[int, ...]
    cfg_scale: float
    fid_samples: int
    fid_reference: int
    heldout_codes: int
    tokenizers: tuple[Tokenizer, ...]
    arms: tuple[Arm, ...]
    # (arm label or "*", tokenizer or "*", fraction of steps, decoder): which checkpoints get an FID
    fids: tuple[tuple[str, str, float, str], ...]
    threads: int = 1
    extra: tuple[str, ...] = field(default_factory=tuple)

    def evals(self, arm: Arm) -> list[tuple[int, str]]:
        out = []
        for label, tok, frac, decoder in self.fids:
            if label in ("*", arm.label) and tok in ("*", arm.tokenizer) and not (arm.head == "flat"
                                                                                   and decoder != "uniform"):
                out.append((int(round(self.steps * frac)), decoder))
        return sorted(set(out))

    def eval_steps(self, arm: Arm) -> list[int]:
        return sorted({s for s, _ in self.evals(arm)})


TOK_1024 = Tokenizer("fmnist_vq_tiny", 1024)
TOK_4096 = Tokenizer("fmnist_vq_4096", 4096, ("vq.codebook_size=4096",))


def _arms(tok: Tokenizer, heads: list[tuple[str, int | None]]) -> tuple[Arm, ...]:
    return tuple(Arm(tok.name, h, k) for h, k in heads)


def full_plan() -> Plan:
    """Sized for 2 CPU cores and 2 hours. FID's Inception costs ~0.2 s per image on one core, so the 33 FIDs of
    1,000 samples below take about an hour on two workers, and 21 training runs of 300 steps about 25 minutes; the
    tokenizers and codes another ~20 minutes when they are not built yet."""
    n1, n2 = TOK_1024.codebook_size, TOK_4096.codebook_size
    arms = _arms(TOK_1024, [("flat", None), ("masc", n1 // 2), ("masc", n1 // 4), ("kmeans", n1 // 2),
                            ("random", n1 // 2)]) + _arms(TOK_4096, [("flat", None), ("masc", n2 // 2)])
    t1 = TOK_1024.name
    fids = (
        ("*", "*", 1.0, "uniform"),  # every arm, both tokenizers, at the full budget
        (f"masc-k{n1 // 2}", t1, 1.0, "frequency"),
        (f"kmeans-k{n1 // 2}", t1, 1.0, "frequency"),
        ("flat", t1, 0.5, "uniform"),
        (f"masc-k{n1 // 2}", t1, 0.5, "uniform"),
    )
    return Plan(name="full", model="gpt_micro", steps=300, batch=32, lr=1e-3, seeds=(0, 1, 2), cfg_scale=2.0,
                fid_samples=1000, fid_reference=1000, heldout_codes=2000, tokenizers=(TOK_1024, TOK_4096),
                arms=arms, fids=fids)


def quick_plan() -> Plan:
    """Minutes, not hours: its own small tokenizer and code set, one seed, few steps; FID on 250 samples is only a
    smoke figure (far from comparable with the full plan's)."""
    tok = Tokenizer("fmnist_vq_quick", 1024, ("steps=120", "eval_images=500"), images=4000)
    arms = _arms(tok, [("flat", None), ("masc", 512), ("kmeans", 512)])
    fids = (("*", "*", 1.0, "uniform"), ("masc-k512", "*", 1.0, "frequency"), ("*", "*", 0.5, "uniform"))
    return Plan(name="quick", model="gpt_nano", steps=60, batch=32, lr=1e-3, seeds=(0,), cfg_scale=2.0,
                fid_samples=250, fid_reference=250, heldout_codes=500, tokenizers=(tok,), arms=arms, fids=fids)


PLANS = {"full": full_plan, "quick": quick_plan}


# -- configs -------------------------------------------------------------------------------------------------------
def tokenizer_overrides(tok: Tokenizer, root: Path) -> list[str]:
    if tok.name == "fmnist_vq_quick":  # not a config group option: the tiny tokenizer's settings under another name
        return ["tokenizer=fmnist_vq_tiny", f"tokenizer.name={tok.name}",
                f"tokenizer.checkpoint={root / 'tokenizers' / (tok.name + '.safetensors')}",
                f"data.codes={root / 'codes' / tok.name}"]
    return [f"tokenizer={tok.name}"]


def train_overrides(plan: Plan, arm: Arm, seed: int, root: Path) -> list[str]:
    tok = next(t for t in plan.tokenizers if t.name == arm.tokenizer)
    o = ["experiment=cpu_default", f"model={plan.model}", f"head={arm.head}", *tokenizer_overrides(tok, root),
         f"train.seed={seed}", f"train.steps={plan.steps}", f"train.global_batch_size={plan.batch}",
         f"optim.lr={plan.lr}", "logger=none", "train.log_every=10", "train.sample_every=0", "train.eval_every=0",
         f"train.ckpt_every={math.gcd(*plan.eval_steps(arm), plan.steps)}", "train.keep_last=100",
         f"train.sample_cfg_scale={plan.cfg_scale}", *plan.extra]
    if arm.head == "flat":
        ks = [a.k for a in plan.arms if a.tokenizer == arm.tokenizer and a.head == "masc"]
        if ks:  # the training log then carries flat's CE marginalised onto MASC k = N/2 clusters, step by step
            o.append(f"head.compare_k={max(ks)}")
    else:
        o.append(f"head.k={arm.k}")
    return o


def compose(overrides: list[str], run_dir: Path):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import open_dict

    from masc_llamagen.config import register

    register()
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "configs")):
        cfg = hydra_compose("train", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(run_dir)
    return cfg


def tokenizer_cfg(tok: Tokenizer, root: Path):
    """The default training config on this tokenizer: where its checkpoint, codes and data settings are."""
    return compose(["experiment=cpu_default", *tokenizer_overrides(tok, root)], root / "scratch")


def run_dir(root: Path, arm: Arm, seed: int) -> Path:
    return root / "runs" / arm.tokenizer / arm.label / f"seed{seed}"


# -- stage 0: tokenizers and codes -----------------------------------------------------------------------------------
def build_tokenizer(plan: Plan, tok: Tokenizer, root: Path) -> dict:
    """Train the tokenizer and encode the training set (skipped when up to date), then the held-out code set."""
    import torch

    torch.set_num_threads(plan.threads)
    t0 = time.perf_counter()
    if tok.images is None:
        from masc_llamagen import pipeline

        skipped = pipeline.run([f"tokenizer={tok.name}"], stages=("tokenizer", "codes"), vq_overrides=list(tok.vq),
                               rfid_images=500)["tokenizer"].get("skipped")
    else:
        skipped = _build_small_tokenizer(tok, root)
    cfg = tokenizer_cfg(tok, root)
    heldout = heldout_codes(cfg, plan.heldout_codes, root)
    report = json.loads(Path(str(cfg.tokenizer.checkpoint) + ".json").read_text())
    return {"tokenizer": tok.name, "wall_s": round(time.perf_counter() - t0, 1), "heldout": str(heldout),
            "report": {k: report.get(k) for k in ("psnr", "ssim", "rfid", "codebook_usage", "perplexity", "steps",
                                                  "wall_time_s")} | {"skipped": bool(skipped)}}


def _build_small_tokenizer(tok: Tokenizer, root: Path) -> bool:
    from omegaconf import OmegaConf
    from torch.utils.data import Subset

    from masc_llamagen.checkpoint import load_vq
    from masc_llamagen.data.extract import extract_codes
    from masc_llamagen.data.images import build_image_dataset
    from masc_llamagen.tokenizer.train import train_tokenizer

    ckpt = root / "tokenizers" / f"{tok.name}.safetensors"
    rep = train_tokenizer(OmegaConf.merge(OmegaConf.create({"out": str(ckpt), "rfid_images": 0, "progress": False}),
                                          OmegaConf.from_dotlist(list(tok.vq))))
    out = root / "codes" / tok.name
    if not (out / "meta.json").is_file():
        ds = build_image_dataset("fashion_mnist", "train", image_size=32)
        extract_codes(load_vq(ckpt), Subset(ds, range(tok.images)), out, variants=("center", "hflip"),
                      tokenizer_path=str(ckpt))
    return bool(rep.get("skipped"))


def heldout_codes(cfg, n: int, root: Path) -> Path:
    """Codes of the first n held-out images: the diagnostics' test set (no training sequence is among them)."""
    import numpy as np
    import torch

    from masc_llamagen.checkpoint import load_vq
    from masc_llamagen.data.images import build_image_dataset, heldout_split

    path = root / "heldout" / f"{cfg.tokenizer.name}-{n}.npz"
    if path.is_file():
        return path
    vq = load_vq(cfg.tokenizer.checkpoint).eval()
    ds = build_image_dataset(cfg.data.name, heldout_split(cfg.data.name), image_size=cfg.data.image_size)
    x = torch.stack([ds[i][0] for i in range(n)])
    y = np.array([int(ds[i][1]) for i in range(n)])
    with torch.no_grad():
        codes = torch.cat([vq.encode(x[s : s + 250]).reshape(min(250, n - s), -1) for s in range(0, n, 250)])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
    np.savez(tmp, codes=codes.numpy(), labels=y)
    os.replace(tmp, path)
    return path


# -- stage 1: one arm x seed -----------------------------------------------------------------------------------------
def coarse_mappings(plan: Plan, tokenizer: str, root: Path) -> dict:
    """label -> (N,) mapping of every coarse arm on this tokenizer (built once, cached under artifacts/trees)."""
    from masc_llamagen.data.codes import CodeDataset
    from masc_llamagen.masc.vocab import vocabulary_from_config
    from masc_llamagen.train.loop import tokenizer_codebook

    out = {}
    for arm in plan.arms:
        if arm.tokenizer != tokenizer or arm.head == "flat":
            continue
        cfg = compose(train_overrides(plan, arm, 0, root), root / "scratch")
        voc, _ = vocabulary_from_config(cfg.head, tokenizer_codebook(cfg), CodeDataset(cfg.data.codes).code_counts(),
                                        Path(cfg.paths.artifacts) / "trees")
        out[arm.label] = voc.mapping
    return out


def run_arm(plan_name: str, arm: Arm, seed: int, root: str) -> dict:
    import torch

    plan, root = PLANS[plan_name](), Path(root)
    torch.set_num_threads(plan.threads)
    rd = run_dir(root, arm, seed)
    result_path = rd / "bench.json"
    key = json.dumps({"plan": asdict(plan), "arm": asdict(arm), "seed": seed}, sort_keys=True)
    if result_path.is_file() and json.loads(result_path.read_text()).get("key") == key:
        return json.loads(result_path.read_text())
    from masc_llamagen.train.checkpointing import checkpoint_path
    from masc_llamagen.train.loop import train

    cfg = compose(train_overrides(plan, arm, seed, root), rd)
    t0 = time.perf_counter()
    out = train(cfg)
    train_s = time.perf_counter() - t0
    metrics = [json.loads(line) for line in (rd / "metrics.jsonl").read_text().splitlines() if line.strip()]
    mappings = coarse_mappings(plan, arm.tokenizer, root) if arm.head == "flat" else {}
    evals = []
    for step in plan.eval_steps(arm):
        ck = checkpoint_path(rd / "checkpoints", step)
        decoders = [d for s, d in plan.evals(arm) if s == step]
        t1 = time.perf_counter()
        ev = evaluate_checkpoint(plan, cfg, ck, decoders, mappings, seed, root,
                                 grid=rd / "report" / f"samples-step{step}.png")
        ev["wall_s"] = round(time.perf_counter() - t1, 1)
        evals.append({"step": step, **ev})
    res = {"key": key, "arm": asdict(arm) | {"label": arm.label}, "seed": seed, "train_wall_s": round(train_s, 1),
           "final_step": out["step"], "metrics": metrics, "evals": evals, "run_dir": str(rd),
           "threads": torch.get_num_threads()}
    tmp = result_path.with_name(".bench.json.tmp")
    tmp.write_text(json.dumps(res, default=float))
    os.replace(tmp, result_path)
    return res


@functools.lru_cache(maxsize=1)
def inception():
    """One Inception per process: loading it takes seconds, and a worker scores many checkpoints."""
    from masc_llamagen.eval.fid import InceptionFeatures

    return InceptionFeatures(batch_size=100)


def reference_features(plan: Plan, cfg):
    """(npz, Inception features) of the held-out reference images, cached under artifacts/fid."""
    from masc_llamagen.data.images import heldout_split
    from masc_llamagen.eval.metrics import dataset_reference_npz

    cache = Path(cfg.paths.artifacts) / "fid"
    npz = dataset_reference_npz(cfg.data.name, heldout_split(cfg.data.name), image_size=cfg.data.image_size,
                                limit=plan.fid_reference, cache=cache)
    return npz, inception().cached(npz, cache=cache)


def evaluate_checkpoint(plan: Plan, cfg, ck: Path, decoders: list[str], mappings: dict, seed: int, root: Path,
                        grid: Path) -> dict:
    import numpy as np
    import torch

    from masc_llamagen.checkpoint import load_gpt, load_vq
    from masc_llamagen.eval.fid import frechet_distance
    from masc_llamagen.masc.heads import bits, marginal_coarse_nll
    from masc_llamagen.models.sampling import SamplingConfig, generate
    from masc_llamagen.report import class_grid
    from masc_llamagen.sample import head_from_checkpoint
    from masc_llamagen.train.checkpointing import load_training_checkpoint
    from masc_llamagen.train.images import to_uint8

    state = load_training_checkpoint(ck)
    model = load_gpt(ck, prefer_ema=True).eval()
    vq = load_vq(cfg.tokenizer.checkpoint).eval()
    out: dict = {"checkpoint": str(ck)}

    # held-out diagnostics -----------------------------------------------------------------------------------------
    z = np.load(heldout_codes(cfg, plan.heldout_codes, root))
    codes, labels = torch.from_numpy(z["codes"].astype(np.int64)), torch.from_numpy(z["labels"].astype(np.int64))
    vocabs = {d: head_from_checkpoint(state, d, cfg.head.smoothing) for d in ("uniform", "frequency")}
    voc = vocabs["uniform"]
    sums: dict[str, float] = {}
    with torch.no_grad():
        for s in range(0, len(codes), 250):
            fine, y = codes[s : s + 250], labels[s : s + 250]
            ids = voc.encode(fine)
            logits = model(ids[:, :-1], y)[0].float()
            logp = logits.log_softmax(-1)
            ce = torch.nn.functional.cross_entropy(logp.reshape(-1, logp.shape[-1]), ids.reshape(-1), reduction="sum")
            sums["coarse_ce"] = sums.get("coarse_ce", 0.0) + ce.item()
            ent = -(logp.exp() * logp).sum(-1) / math.log(logp.shape[-1])
            sums["entropy_norm"] = sums.get("entropy_norm", 0.0) + ent.sum().item()
            for d, v in vocabs.items():
                sums[f"fine_nll_{d}"] = sums.get(f"fine_nll_{d}", 0.0) + v.fine_nll(logits, fine).sum().item()
            for label, mapping in mappings.items():
                key = f"marginal_ce/{label}"
                sums[key] = sums.get(key, 0.0) + marginal_coarse_nll(logits, fine, mapping).sum().item()
    n_tok = codes.numel()
    diag = {k: (v / n_tok if k == "entropy_norm" else bits(v / n_tok)) for k, v in sums.items()}
    if voc.is_flat:
        diag["fine_nll_frequency"] = diag["fine_nll_uniform"] = diag["coarse_ce"]
    out["heldout"] = diag | {"tokens": n_tok}

    # samples -> FID ------------------------------------------------------------------------------------------------
    n = plan.fid_samples
    cls = torch.arange(n) * model.config.num_classes // n
    sc = SamplingConfig(cfg_scale=plan.cfg_scale)
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(20_000 + seed)
    ids = torch.cat([generate(model, cls[s : s + 250], sampling=sc, generator=g) for s in range(0, n, 250)])
    out["sample_s"] = round(time.perf_counter() - t0, 1)
    fe = inception()
    ref_npz, ref = reference_features(plan, cfg)
    side = math.isqrt(model.config.block_size)
    out["fid"] = {}
    for d in decoders:
        v = vocabs[d]
        tokens = v.decode(ids, generator=torch.Generator().manual_seed(30_000 + seed))
        with torch.no_grad():
            imgs = np.concatenate([to_uint8(vq.decode_code(tokens[s : s + 250].reshape(-1, side, side)))
                                   for s in range(0, n, 250)])
        t1 = time.perf_counter()
        out["fid"][d] = frechet_distance(fe(imgs), ref)
        out[f"inception_s_{d}"] = round(time.perf_counter() - t1, 1)
        if d == "uniform":
            npz = grid.with_suffix(".npz")
            npz.parent.mkdir(parents=True, exist_ok=True)
            np.savez(npz, arr_0=imgs[: 10 * 10 * 10], labels=cls.numpy()[:1000])
            class_grid(npz, grid)
            out["grid"] = str(grid)
    out["fid_reference"] = str(ref_npz)
    return out


# -- driver ----------------------------------------------------------------------------------------------------------
def _pool(workers: int) -> ProcessPoolExecutor:
    return ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"))


def run_plan(plan_name: str, root: Path, workers: int = 2, log=print) -> dict:
    plan = PLANS[plan_name]()
    root.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("OMP_NUM_THREADS", str(plan.threads))
    timings: dict = {}
    t0 = time.perf_counter()
    with _pool(workers) as pool:
        futs = {pool.submit(build_tokenizer, plan, tok, root): tok.name for tok in plan.tokenizers}
        toks = {}
        for f in as_completed(futs):
            toks[futs[f]] = f.result()
            log(f"tokenizer {futs[f]}: {toks[futs[f]]['wall_s']} s", flush=True)
    timings["tokenizers_codes_s"] = round(time.perf_counter() - t0, 1)
    # Build every tree/mapping once here, so parallel runs never race to create the same cache file.
    t1 = time.perf_counter()
    for tok in plan.tokenizers:
        coarse_mappings(plan, tok.name, root)
    # ... and the reference features, once, before two workers could both miss the cache
    reference_features(plan, tokenizer_cfg(plan.tokenizers[0], root))
    timings["mappings_and_reference_s"] = round(time.perf_counter() - t1, 1)

    t2 = time.perf_counter()
    # Seed by seed (an interrupted study still has every arm at the first seeds), the most expensive runs first
    # within a seed (more FIDs, larger vocabularies) so no worker is left alone with a long one at the end.
    def cost(arm: Arm) -> float:
        return len(plan.evals(arm)) * 3 + (arm.k or next(t.codebook_size for t in plan.tokenizers
                                                          if t.name == arm.tokenizer)) / 1024

    jobs = [(arm, seed) for seed in plan.seeds for arm in sorted(plan.arms, key=cost, reverse=True)]
    results, failed = [], []
    with _pool(workers) as pool:
        futs = {pool.submit(run_arm, plan.name, arm, seed, str(root)): (arm, seed) for arm, seed in jobs}
        for f in as_completed(futs):
            arm, seed = futs[f]
            try:
                r = f.result()
            except Exception as e:  # one broken run must not throw away the others' hours
                failed.append(f"{arm.tokenizer} {arm.label} seed {seed}: {type(e).__name__}: {e}")
                log(f"FAILED {failed[-1]}", flush=True)
                continue
            results.append(r)
            fids = {e["step"]: {d: round(v, 2) for d, v in e["fid"].items()} for e in r["evals"]}
            log(f"[{time.strftime('%H:%M:%S')}] {arm.tokenizer} {arm.label} seed {seed}: train "
                f"{r['train_wall_s']} s, FID {fids} ({len(results)}/{len(jobs)})", flush=True)
    timings["runs_s"] = round(time.perf_counter() - t2, 1)
    summary = {"plan": asdict(plan), "tokenizers": toks, "timings": timings, "workers": workers,
               "results": [str(Path(r["run_dir"]) / "bench.json") for r in results]}
    (root / "convergence.json").write_text(json.dumps(summary, indent=2))
    if failed:
        raise SystemExit("runs failed (their results are missing from the report):\n" + "\n".join(failed))
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the reduced plan (minutes)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--root", default=None, help="where runs and results go (default artifacts/bench/<plan>)")
    args = ap.parse_args(argv)
    name = "quick" if args.quick else "full"
    root = Path(args.root or REPO / "artifacts" / "bench" / name)
    run_plan(name, root, args.workers)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
