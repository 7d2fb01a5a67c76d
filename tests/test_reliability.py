"""The hostile-user matrix for training: each case's error (one line, names the problem and the fix), exit path and
what is on disk afterwards (nothing lost, nothing mixed, nothing executed). In-process where it can be; the CLI
cases (exit code, stderr, no traceback) are in the slow tier.
"""

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_utils import compose_cfg, make_assets

from masc_llamagen.checkpoint import TrainingCheckpoint
from masc_llamagen.config import validate
from masc_llamagen.errors import ConfigError, TrainingError, user_errors
from masc_llamagen.train.checkpointing import last_good_checkpoint, list_checkpoints
from masc_llamagen.train.loop import train
from masc_llamagen.weights import CheckpointError, load_gpt

REPO = Path(__file__).resolve().parents[1]
BASE = ["head=random", "head.k=16", "train.global_batch_size=8", "train.log_every=1", "train.ckpt_every=4"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("assets"))


def _snapshot(d: Path) -> dict:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _one_line(e: BaseException) -> str:
    msg = str(e)
    assert "\n" not in msg and "Traceback" not in msg and "weights_only=False" not in msg, msg
    return msg


# -- config values that cannot work: refused before anything runs (one place: masc_llamagen.config.validate) ------
BAD_CONFIGS = [
    (["train.steps=0"], r"train\.steps=0 must be >= 1"),
    (["train.steps=-3"], r"train\.steps=-3 must be >= 1"),
    (["train.ckpt_every=0"], r"train\.ckpt_every=0 must be >= 1"),
    (["train.log_every=0"], r"train\.log_every=0 must be >= 1"),
    (["train.grad_accum=0"], r"train\.grad_accum=0 must be >= 1"),
    (["train.global_batch_size=0"], r"train\.global_batch_size=0 must be >= 1"),
    (["optim.lr=-1e-4"], r"optim\.lr=-0\.0001 must be > 0"),
    (["train.mixed_precision=fp8"], r"train\.mixed_precision='fp8' must be one of no, fp16, bf16"),
    (["head=masc", "head.k=1"], r"head\.k=1 must be >= 2"),
    (["+train.foo=1"], r"train\.foo is not a config key"),
    (["model.class_dropout_prob=1.5"], r"model\.class_dropout_prob=1\.5 must be in \[0, 1\)"),
    (["train.ema_decay=1.0"], r"train\.ema_decay=1\.0 must be in \[0, 1\)"),
    (["optim.schedule=linear"], r"optim\.schedule='linear' must be one of constant, cosine"),
    (["train.distributed=deepspeed"], r"train\.distributed='deepspeed' must be one of ddp, fsdp"),
]


@pytest.mark.parametrize(("overrides", "message"), BAD_CONFIGS, ids=[" ".join(o) for o, _ in BAD_CONFIGS])
def test_bad_config_is_one_line_before_anything_runs(tmp_path, assets, overrides, message):
    cfg = compose_cfg(tmp_path, assets, [*BASE, *overrides])
    with pytest.raises(ConfigError, match=message) as e:
        train(cfg)
    _one_line(e.value)
    assert not (tmp_path / "run").exists()  # nothing written


def test_every_problem_is_named_at_once(tmp_path, assets):
    with pytest.raises(ConfigError) as e:
        validate(compose_cfg(tmp_path, assets, ["train.steps=0", "optim.lr=0", "train.log_every=0"]))
    assert all(k in str(e.value) for k in ("train.steps", "optim.lr", "train.log_every"))


# -- runs are never destroyed or mixed -------------------------------------------------------------------------
def test_fresh_start_over_an_existing_run_is_refused_and_loses_nothing(tmp_path, assets):
    train(compose_cfg(tmp_path, assets, [*BASE, "train.steps=8"], run="r"))
    before = _snapshot(tmp_path / "r")
    with pytest.raises(TrainingError, match=r"already holds a run \(checkpoints up to step 8\).*train\.resume=true"):
        train(compose_cfg(tmp_path, assets, [*BASE, "train.steps=4", "train.resume=false"], run="r"))
    assert _snapshot(tmp_path / "r") == before


def test_a_second_process_on_the_run_directory_is_refused(tmp_path, assets):
    run = tmp_path / "busy"
    run.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run / ".lock").write_text(json.dumps({"host": os.uname().nodename, "pid": holder.pid, "started": "then"}))
        with pytest.raises(TrainingError, match=rf"in use by pid {holder.pid} on .* since then"):
            train(compose_cfg(tmp_path, assets, [*BASE, "train.steps=2"], run="busy"))
        assert not (run / "metrics.jsonl").exists() and (run / ".lock").exists()
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone: its lock is stale, taken over, and released at the end
    train(compose_cfg(tmp_path, assets, [*BASE, "train.steps=2"], run="busy"))
    assert not (run / ".lock").exists() and list_checkpoints(run / "checkpoints")


RESUME_CHANGES = [
    (["head.normalize=false"], r"head\.normalize: True -> False"),
    (["model=gpt_micro"], r"model\.arch: 'GPT-nano' -> 'GPT-micro'"),
    (["train.global_batch_size=16"], r"train\.global_batch_size: 8 -> 16"),
    (["optim.lr=3e-4"], r"optim\.lr: 0\.0001 -> 0\.0003"),
    (["train.seed=1"], r"train\.seed: 0 -> 1"),
]


@pytest.mark.parametrize(("change", "message"), RESUME_CHANGES, ids=[c[0] for c, _ in RESUME_CHANGES])
def test_resume_refuses_what_changes_meaning(tmp_path, assets, change, message):
    train(compose_cfg(tmp_path, assets, [*BASE, "train.steps=4"], run="r"))
    before = _snapshot(tmp_path / "r" / "checkpoints")
    with pytest.raises(TrainingError, match=rf"cannot resume ckpt-00000004\.pt: {message}") as e:
        train(compose_cfg(tmp_path, assets, [*BASE, "train.steps=8", *change], run="r"))
    _one_line(e.value)
    assert _snapshot(tmp_path / "r" / "checkpoints") == before


def test_resume_allows_more_steps_and_says_when_exactness_is_lost(tmp_path, assets, capsys):
    train(compose_cfg(tmp_path, assets, [*BASE, "train.steps=4"], run="r"))
    out = train(compose_cfg(tmp_path, assets, [*BASE, "train.steps=6", "train.log_every=2"], run="r"))
    assert out["step"] == 6 and "warning" not in capsys.readouterr().out
    out = train(compose_cfg(tmp_path, assets, [*BASE, "train.steps=8", "train.grad_accum=2"], run="r"))
    assert out["step"] == 8
    said = capsys.readouterr().out
    assert "train.grad_accum: 1 -> 2" in said and "no longer bit-identical" in said


def test_corrupt_newest_checkpoint_names_the_previous_good_one(tmp_path, assets):
    train(compose_cfg(tmp_path, assets, [*BASE, "train.steps=8"], run="c"))
    newest = tmp_path / "c" / "checkpoints" / "ckpt-00000008.pt"
    newest.write_bytes(newest.read_bytes()[:1000])
    with pytest.raises(TrainingError, match=r"ckpt-00000008\.pt is unreadable .* resume from ckpt-00000004\.pt") as e:
        train(compose_cfg(tmp_path, assets, [*BASE, "train.steps=12"], run="c"))
    _one_line(e.value)
    assert (tmp_path / "c" / "checkpoints" / "ckpt-00000004.pt").is_file() and newest.is_file()


def test_half_written_files_of_a_kill_are_cleaned(tmp_path, assets, capsys):
    train(compose_cfg(tmp_path, assets, [*BASE, "train.steps=4"], run="k"))
    ckpts = tmp_path / "k" / "checkpoints"
    junk = [ckpts / ".ckpt-00000008.pt.tmp-99999", ckpts / ".ckpt-00000008.pt.x1y2z3.tmp"]  # older and current
    for p in junk:
        p.write_bytes(b"half")
    train(compose_cfg(tmp_path, assets, [*BASE, "train.steps=6"], run="k"))
    assert not any(p.exists() for p in junk) and "removed 2 half-written" in capsys.readouterr().out


def test_non_finite_weights_are_never_saved(tmp_path, assets, monkeypatch):
    """NaN in a weight the loss does not see (the null class at class dropout 0): the loss stays finite."""
    over = [*BASE, "model.class_dropout_prob=0", "train.log_every=100"]
    train(compose_cfg(tmp_path, assets, [*over, "train.steps=4"], run="w"))
    real_step = torch.optim.AdamW.step

    def poisoning_step(self, *a, **kw):
        out = real_step(self, *a, **kw)
        for g in self.param_groups:
            for p in g["params"]:
                if p.shape[0] == 5:  # the (num_classes + 1, dim) class table
                    p.data[-1] = float("nan")
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", poisoning_step)
    with pytest.raises(TrainingError, match=r"weights hold NaN/inf at step 8.*Last good checkpoint: .*ckpt-00000004"):
        train(compose_cfg(tmp_path, assets, [*over, "train.steps=8"], run="w"))
    assert [s for s, _ in list_checkpoints(tmp_path / "w" / "checkpoints")] == [4]


def test_last_good_checkpoint_skips_one_with_nan_weights(tmp_path, assets):
    train(compose_cfg(tmp_path, assets, [*BASE, "train.steps=8"], run="g"))
    bad = tmp_path / "g" / "checkpoints" / "ckpt-00000008.pt"
    ck = torch.load(bad, weights_only=True)
    next(iter(ck["model"].values())).fill_(float("nan"))
    torch.save(ck, bad)
    assert last_good_checkpoint(tmp_path / "g" / "checkpoints").name == "ckpt-00000004.pt"


def test_codes_without_a_tokenizer_fingerprint_are_refused(tmp_path, assets):
    codes = tmp_path / "codes"
    codes.mkdir()
    for p in Path(assets["codes"]).iterdir():
        (codes / p.name).write_bytes(p.read_bytes())
    meta = json.loads((codes / "meta.json").read_text())
    meta.pop("tokenizer")
    (codes / "meta.json").write_text(json.dumps(meta))
    cfg = compose_cfg(tmp_path, {**assets, "codes": codes}, [*BASE, "train.steps=2"])
    with pytest.raises(TrainingError, match="carry no tokenizer fingerprint.*re-extract"):
        train(cfg)


# -- files that are not what they claim ------------------------------------------------------------------------
def _evil_pickle(path: Path, marker: Path) -> None:
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with open(path, "wb") as f:
        pickle.dump({"model": Evil()}, f)


@pytest.mark.parametrize("kind", ["text", "random", "pickle", "torch-pickle", "truncated"])
def test_bad_checkpoint_files_are_one_line_and_execute_nothing(tmp_path, kind):
    path, marker = tmp_path / "x.pt", tmp_path / "pwned"
    if kind == "text":
        path.write_text("this is not a checkpoint\n")
    elif kind == "random":
        path.write_bytes(os.urandom(4096))
    elif kind == "pickle":
        _evil_pickle(path, marker)
    elif kind == "torch-pickle":
        class Evil:
            def __reduce__(self):
                return (os.system, (f"touch {marker}",))

        torch.save({"model": Evil()}, path)
    else:
        torch.save({"model": {"w": torch.zeros(1000)}}, path)
        path.write_bytes(path.read_bytes()[:600])
    with pytest.raises(CheckpointError) as e:
        load_gpt(path)
    msg = _one_line(e.value)
    assert not marker.exists()
    expected = {"text": "not a PyTorch checkpoint", "random": "not a PyTorch checkpoint",
                "pickle": "refused to unpickle", "torch-pickle": "refused to unpickle the Python object posix.system",
                "truncated": "truncated or corrupt"}[kind]
    assert expected in msg


def test_masc_data_without_the_dataset_folder_is_said(tmp_path, monkeypatch, capsys):
    from masc_llamagen.data.images import default_root

    monkeypatch.setenv("MASC_DATA", str(tmp_path))
    default_root("fashion_mnist")
    assert f"$MASC_DATA={tmp_path} has no fashion_mnist/ folder" in capsys.readouterr().err


# -- one exit path: a user error is one line and exit 1 ----------------------------------------------------------
@pytest.mark.parametrize(("error", "expected"), [
    (OSError(errno.ENOSPC, "No space left on device", "/runs/x/ckpt.pt"),
     "no space left on the device /runs/x/ckpt.pt; free space (earlier checkpoints are intact) and rerun"),
    (PermissionError(errno.EACCES, "Permission denied", "/runs/x"),
     "cannot write /runs/x: Permission denied; pick a writable place"),
    (FileNotFoundError(errno.ENOENT, "No such file", "/data/codes"), "/data/codes does not exist; check the path"),
    (TrainingError("the run stopped; do this"), "the run stopped; do this"),
])
def test_user_errors_exit_1_with_one_line(capsys, error, expected):
    with pytest.raises(SystemExit) as e, user_errors():
        raise error
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.count("\n") == 1 and err.startswith("error: ") and expected in err


def test_every_error_class_is_a_mascerror():
    """Every exception class the package defines reaches MascError (read from the source: no module is imported)."""
    import ast
    import builtins

    bases: dict[str, list[str]] = {}
    for path in (REPO / "masc_llamagen").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                bases[node.name] = [b.id if isinstance(b, ast.Name) else b.attr for b in node.bases
                                    if isinstance(b, (ast.Name, ast.Attribute))]

    def reaches(name: str, goal) -> bool:
        return goal(name) or any(reaches(b, goal) for b in bases.get(name, ()) if b != name)

    def builtin_exception(n: str) -> bool:
        return isinstance(getattr(builtins, n, None), type) and issubclass(getattr(builtins, n), BaseException)

    errors = [n for n in bases if n != "MascError" and reaches(n, builtin_exception)]
    assert len(errors) >= 10 and "CheckpointError" in errors and "SamplingError" in errors
    assert [n for n in errors if not reaches(n, lambda b: b == "MascError")] == []


def test_a_full_disk_keeps_the_previous_checkpoint(tmp_path, assets, monkeypatch):
    train(compose_cfg(tmp_path, assets, [*BASE, "train.steps=4"], run="d"))
    def full(self, path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(TrainingCheckpoint, "save", full)
    with pytest.raises(OSError):
        train(compose_cfg(tmp_path, assets, [*BASE, "train.steps=8"], run="d"))
    monkeypatch.undo()
    assert [s for s, _ in list_checkpoints(tmp_path / "d" / "checkpoints")] == [4]
    assert not (tmp_path / "d" / ".lock").exists()  # released on the way out


# -- the CLI: exit code, one stderr line, no traceback (subprocess: slow tier) ------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("overrides", [["train.ckpt_every=0"], ["+train.foo=1"], ["head=masc", "head.k=1"],
                                       ["tokenizer.checkpoint=/no/such/file.pt"]])
def test_train_cli_user_errors(tmp_path, assets, overrides):
    args = [f"tokenizer.checkpoint={assets['tokenizer']}", f"data.codes={assets['codes']}", "model=gpt_nano",
            "train=cpu", "logger=none", f"paths.root={tmp_path}", f"paths.artifacts={tmp_path / 'a'}",
            f"hydra.run.dir={tmp_path / 'r'}", *overrides]
    r = subprocess.run([sys.executable, str(REPO / "train.py"), *args], cwd=tmp_path, capture_output=True, text=True,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1, r.stderr


@pytest.mark.parametrize("kind", ["text", "other-npz", "missing"])
def test_tree_cut_given_a_non_tree_is_one_line(tmp_path, capsys, kind):
    import numpy as np

    from masc_llamagen.masc.tree_cli import TreeJob
    from masc_llamagen.masc.tree_cli import run as run_tree_job

    path = tmp_path / "t.npz"
    if kind == "text":
        path.write_text("not a tree\n")
    elif kind == "other-npz":
        np.savez(path, a=np.zeros(3))
    with pytest.raises(SystemExit) as e, user_errors():
        run_tree_job(TreeJob(action="cut", tree=str(path), k=4, mapping=str(tmp_path / "m.npy")))
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "allow_pickle" not in err
    assert "python -m masc_llamagen.tree action=build" in err and not (tmp_path / "m.npy").exists()


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory, assets):
    root = tmp_path_factory.mktemp("good")
    out = train(compose_cfg(root, assets, [*BASE, "train.steps=2", "train.ckpt_every=2"], run="g"))
    return Path(out["checkpoint"])


# Every other entry point, through its real CLI: (module, arguments, what the one line must say).
CLI_CASES = [
    ("masc_llamagen.sample", ["num_samples=0"], "num_samples=0 must be >= 1"),
    ("masc_llamagen.sample", ["cfg_scale=-1"], "cfg_scale"),
    ("masc_llamagen.sample", ["top_p=0"], "top_p"),
    ("masc_llamagen.sample", ["temperature=0"], "temperature"),
    ("masc_llamagen.sample", ["decoder=bogus"], "decoder=bogus is unknown"),
    ("masc_llamagen.sample", ["dtype=fp8"], "dtype=fp8 is unknown"),
    ("masc_llamagen.eval", ["generated=TEXT_NPZ", "reference=fashion_mnist"], ".npz"),
    ("masc_llamagen.eval", ["generated=OBJECT_NPZ", "reference=fashion_mnist"], "arr_0"),
    ("masc_llamagen.eval", ["generated=GOOD_NPZ", "reference=MISSING_DIR"], "refs_fodler"),
    ("masc_llamagen.tree", ["action=cut", "tree=text.npz", "k=4", "mapping=m.npy"], "not a MASC tree file"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("module", "args", "says"), CLI_CASES, ids=[f"{m.split('.')[-1]} {' '.join(a)}"
                                                                      for m, a, _ in CLI_CASES])
def test_cli_matrix(tmp_path, good_checkpoint, module, args, says):
    import numpy as np

    (tmp_path / "text.npz").write_text("hello\n")
    np.savez(tmp_path / "obj.npz", arr_0=np.array([object(), 1], dtype=object))
    np.savez(tmp_path / "good.npz", arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    subst = {"TEXT_NPZ": str(tmp_path / "text.npz"), "OBJECT_NPZ": str(tmp_path / "obj.npz"),
             "GOOD_NPZ": str(tmp_path / "good.npz"),
             "MISSING_DIR": str(tmp_path / "refs_fodler"), "OUT": str(tmp_path / "m.npy")}
    argv = [f"{k}={subst.get(v, v)}" for k, v in (a.split("=", 1) for a in args)]  # every CLI takes key=value
    if module == "masc_llamagen.sample":
        argv = [f"checkpoint={good_checkpoint}", f"out_dir={tmp_path / 's'}", *argv]
    before = _snapshot(good_checkpoint.parent)
    r = subprocess.run([sys.executable, "-m", module, *argv], cwd=tmp_path, capture_output=True, text=True,
                       env={**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}, timeout=300)
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert lines and lines[-1].startswith("error") and says in lines[-1], r.stderr[-2000:]
    assert _snapshot(good_checkpoint.parent) == before and not (tmp_path / "m.npy").exists()
