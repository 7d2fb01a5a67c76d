"""The hostile-user matrix as a measurement: run each case through the real CLIs of a checkout and classify it.

    python benchmarks/hostile_matrix.py [repo=PATH] [json=OUT]

Classes: ``error`` (non-zero exit, last stderr line ``error: ...``, no traceback), ``traceback``, ``accepted`` (exit 0:
silently wrong for every case here, each being a mistake the tool should refuse), ``lost`` (a case that destroyed or
mixed an earlier run's checkpoints) and ``executed`` (a planted pickle ran). Run it on two revisions to count the
categories before and after a change; the unit tests (tests/test_reliability.py) are what guards them.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

HERE = Path(__file__).resolve()


@dataclass
class HostileMatrix:
    """configs/bench/hostile_matrix.yaml only keeps Hydra from making output folders."""

    repo: str | None = None  # the checkout whose CLIs are measured; null: this one
    json: str | None = None  # also write the classes and their counts here


ConfigStore.instance().store(name="base_hostile_matrix", node=HostileMatrix)


class _Evil:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _run(cmd: list[str], cwd: Path, repo: Path) -> tuple[int, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "PYTHONPATH": str(repo),
           "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    return r.returncode, r.stderr


def _classify(rc: int, err: str) -> str:
    if "Traceback" in err:
        return "traceback"
    if rc == 0:
        return "accepted"
    last = err.strip().splitlines()[-1] if err.strip() else ""
    return "error" if last.startswith("error") else "traceback"


def measure(args: HostileMatrix) -> None:
    repo = Path(args.repo or HERE.parents[1]).resolve()
    py = sys.executable
    work = Path(tempfile.mkdtemp(prefix="hostile-"))
    sys.path.insert(0, str(repo / "tests"))
    sys.path.insert(0, str(repo))
    from train_utils import make_assets  # the tests' tiny tokenizer + codes (present in every revision measured)

    assets = make_assets(work / "assets")
    defaults = {"tokenizer.checkpoint": str(assets["tokenizer"]), "data.codes": str(assets["codes"]),
                "model": "gpt_nano", "train": "cpu", "logger": "none", "head": "random", "head.k": "16",
                "train.global_batch_size": "8", "train.ckpt_every": "2", "train.steps": "2",
                "paths.artifacts": str(work / "a")}

    def cmd(*extra: str) -> list[str]:
        """train.py with the defaults, each overridden by a same-key extra (Hydra refuses a key given twice)."""
        given = dict(e.split("=", 1) for e in extra)
        merged = {**defaults, **given}
        if merged.get("head") == "masc":
            merged.pop("head.k", None) if "head.k" not in given else None
        return [py, str(repo / "train.py"), *(f"{k}={v}" for k, v in merged.items())]

    results: dict[str, str] = {}

    def slug(name: str) -> str:  # '=' or '+' in hydra.run.dir would be parsed as override syntax
        return "".join(c if c.isalnum() else "_" for c in name)

    def train_case(name, extra):
        rc, err = _run([*cmd(*extra), f"hydra.run.dir={work / slug(name)}"], work, repo)
        results[name] = _classify(rc, err)

    for name, extra in {
        "train.steps=0": ["train.steps=0"], "+train.foo=1 (typo)": ["+train.foo=1"],
        "head.k=1": ["head=masc", "head.k=1"], "ckpt_every=0": ["train.ckpt_every=0"],
        "log_every=0": ["train.log_every=0"], "grad_accum=0": ["train.grad_accum=0"],
        "global_batch_size=0": ["train.global_batch_size=0"], "negative lr": ["optim.lr=-1e-4"],
        "mixed_precision=fp8": ["train.mixed_precision=fp8"],
    }.items():
        train_case(name, extra)

    text = work / "text.pt"
    text.write_text("not a checkpoint\n")
    rc, err = _run([*cmd(f"tokenizer.checkpoint={text}"), f"hydra.run.dir={work / 'tok'}"], work, repo)
    results["text file as tokenizer"] = _classify(rc, err)

    # codes without a tokenizer fingerprint
    codes = work / "codes-nofp"
    shutil.copytree(assets["codes"], codes)
    meta = json.loads((codes / "meta.json").read_text())
    meta.pop("tokenizer", None)
    (codes / "meta.json").write_text(json.dumps(meta))
    rc, err = _run([*cmd(f"data.codes={codes}"), f"hydra.run.dir={work / 'nofp'}"], work, repo)
    results["codes without fingerprint"] = _classify(rc, err)

    # resume cases: a finished 4-step run, then a changed command in the same directory
    def resumed(name, extra, check_lost=False):
        d = work / slug(name)
        _run([*cmd("train.steps=4"), f"hydra.run.dir={d}"], work, repo)
        before = sorted(p.name for p in (d / "checkpoints").glob("ckpt-*.pt"))
        rc, err = _run([*cmd("train.steps=6", *extra), f"hydra.run.dir={d}"], work, repo)
        after = sorted(p.name for p in (d / "checkpoints").glob("ckpt-*.pt"))
        cls = _classify(rc, err)
        if check_lost and (not set(before) <= set(after) or (rc == 0 and after != before)):
            cls = "lost"
        results[name] = cls

    resumed("resume=false over a run", ["train.resume=false"], check_lost=True)
    resumed("resume with head.normalize changed", ["head.normalize=false"])
    resumed("resume with another model size", ["model=gpt_micro"])
    resumed("resume with another batch size", ["train.global_batch_size=16"])
    d = work / "corrupt"
    _run([*cmd("train.steps=4"), f"hydra.run.dir={d}"], work, repo)
    newest = sorted((d / "checkpoints").glob("ckpt-*.pt"))[-1]
    newest.write_bytes(newest.read_bytes()[:500])
    rc, err = _run([*cmd("train.steps=6"), f"hydra.run.dir={d}"], work, repo)
    results["corrupt newest checkpoint"] = _classify(rc, err)

    # sampling options on a good checkpoint
    good = sorted((work / slug("resume with another batch size") / "checkpoints").glob("ckpt-*.pt"))[-1]
    options = ("num_samples=0", "cfg_scale=-1", "top_p=0", "temperature=0", "decoder=bogus", "dtype=fp8")
    for name, opt in ((o, o) for o in options):
        rc, err = _run([py, "-m", "masc_llamagen.sample", f"checkpoint={good}", opt, f"out_dir={work / 's'}",
                        "num_samples=2" if name != "num_samples=0" else "batch_size=2"], work, repo)
        results[f"sample {name}"] = _classify(rc, err)

    # a planted pickle handed to the sampler as a checkpoint
    marker = work / "pwned"
    evil = work / "evil.pt"
    with open(evil, "wb") as f:
        pickle.dump({"model": _Evil(str(marker))}, f)
    rc, err = _run([py, "-m", "masc_llamagen.sample", f"checkpoint={evil}", f"out_dir={work / 's2'}"], work, repo)
    results["pickle as checkpoint"] = "executed" if marker.exists() else _classify(rc, err)

    # eval inputs
    import numpy as np

    (work / "text.npz").write_text("hello\n")
    np.savez(work / "obj.npz", arr_0=np.array([object(), 1], dtype=object))
    evals = {"eval on a text .npz": (work / "text.npz", "fashion_mnist"),
             "eval on an object-array npz": (work / "obj.npz", "fashion_mnist"),
             "eval with a mistyped reference folder": (work / "obj.npz", work / "refs_fodler")}
    for name, (generated, reference) in evals.items():
        rc, err = _run([py, "-m", "masc_llamagen.eval", f"generated={generated}", f"reference={reference}",
                        "device=cpu"], work, repo)
        results[name] = _classify(rc, err)

    rc, err = _run([py, "-m", "masc_llamagen.tree", "action=cut", f"tree={text}", "k=4", f"mapping={work / 'm.npy'}"],
                   work, repo)
    results["tree cut on a non-tree"] = _classify(rc, err)

    counts: dict[str, int] = {}
    for v in results.values():
        counts[v] = counts.get(v, 0) + 1
    width = max(map(len, results))
    for k, v in results.items():
        print(f"{k:<{width}}  {v}")
    print(json.dumps(counts))
    if args.json:
        Path(args.json).write_text(json.dumps({"repo": str(repo), "results": results, "counts": counts}, indent=2))
    shutil.rmtree(work, ignore_errors=True)



@hydra.main(version_base="1.3", config_path=str(HERE.parents[1] / "configs" / "bench"), config_name="hostile_matrix")
def main(cfg: DictConfig) -> None:
    measure(OmegaConf.to_object(cfg))


if __name__ == "__main__":
    main()
