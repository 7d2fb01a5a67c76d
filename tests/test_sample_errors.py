"""Bad sampler options stop up front with one line naming the option and the fix; the CLI prints no traceback."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from masc_llamagen.sample import sample
from masc_llamagen.sample_config import SampleConfigError, validate

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A torch archive: enough for the checks made before anything is loaded."""
    path = tmp_path_factory.mktemp("e") / "ckpt-00000004.pt"
    torch.save({"weights": torch.zeros(1)}, path)
    return path


def _cfg(*overrides):
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "configs")):
        return compose("sample", overrides=list(overrides))


BAD = {
    "num_samples=0": "num_samples=0 must be >= 1: it is the number of images to write",
    "num_samples=-5": "num_samples=-5 must be >= 1: it is the number of images to write",
    "batch_size=0": "batch_size=0 must be >= 1: images sampled per forward pass",
    "batch_size=-2": "batch_size=-2 must be >= 1: images sampled per forward pass",
    "cfg_scale=-1": "cfg_scale=-1.0 must be >= 1: use cfg_scale=1.0 for no guidance",
    "cfg_scale=0.5": "cfg_scale=0.5 must be >= 1: use cfg_scale=1.0 for no guidance",
    "top_p=0": "top_p=0.0 must be in (0, 1]: use top_p=1.0 to turn nucleus filtering off",
    "top_p=1.5": "top_p=1.5 must be in (0, 1]: use top_p=1.0 to turn nucleus filtering off",
    "top_k=-1": "top_k=-1 must be >= 0: use top_k=0 to keep every token",
    "temperature=0": "temperature=0.0 must be > 0: use a positive temperature, or greedy=true for argmax decoding",
    "cfg_interval=-3": "cfg_interval=-3 must be >= -1: use -1 to guide every token",
    "decoder=popular": "decoder=popular is unknown: use decoder=null (as trained), decoder=uniform or "
                       "decoder=frequency",
    "dtype=float16": "dtype=float16 is unknown: use dtype=float32 or dtype=bfloat16",
    "labels=uniform": "labels=uniform is unknown: use labels=balanced or labels=random",
    "smoothing=-1": "smoothing=-1.0 must be >= 0: add-alpha for the frequency decoder",
}


@pytest.mark.parametrize("override", sorted(BAD))
def test_each_bad_option_is_one_line_naming_it_and_the_fix(ckpt, override):
    with pytest.raises(SampleConfigError) as e:
        validate(_cfg(f"checkpoint={ckpt}", override))
    assert str(e.value) == BAD[override]


def test_greedy_is_a_sampler_option_and_good_options_pass(ckpt):
    opts = validate(_cfg(f"checkpoint={ckpt}", "greedy=true", "top_k=5", "dtype=bfloat16", "decoder=uniform"))
    assert opts.sampling.greedy and opts.sampling.top_k == 5 and opts.torch_dtype == torch.bfloat16
    assert not validate(_cfg(f"checkpoint={ckpt}")).sampling.greedy
    with pytest.raises(SampleConfigError, match=r"^temperature=0.0 must be > 0: greedy=true already takes the argmax"):
        validate(_cfg(f"checkpoint={ckpt}", "greedy=true", "temperature=0"))


def test_checkpoint_paths_that_cannot_work_are_refused(tmp_path):
    text = tmp_path / "notes.pt"
    text.write_text("not weights\n")
    cases = {
        None: "checkpoint is required: pass checkpoint=PATH to a training checkpoint "
              "(runs/NAME/checkpoints/ckpt-XXXXXXXX.pt)",
        str(tmp_path / "missing.pt"): f"checkpoint={tmp_path / 'missing.pt'} does not exist: "
                                      "pass checkpoint=PATH to an existing file",
        str(tmp_path): f"checkpoint={tmp_path} is a directory: pass checkpoint=PATH to a checkpoint file inside it",
        str(text): f"checkpoint={text} is not a training checkpoint (a torch .pt archive written by "
                   "masc_llamagen.train): pass runs/NAME/checkpoints/ckpt-XXXXXXXX.pt",
    }
    for path, msg in cases.items():
        with pytest.raises(SampleConfigError) as e:
            sample(_cfg(*([] if path is None else [f"checkpoint={path}"])))  # before any Accelerator or load
        assert str(e.value) == msg
    torch.save({"x": torch.zeros(1)}, tmp_path / "x.pt")
    with pytest.raises(SampleConfigError, match=r"^vq_checkpoint=\S+ does not exist"):
        validate(_cfg(f"checkpoint={tmp_path / 'x.pt'}", f"vq_checkpoint={tmp_path / 'vq.pt'}"))


@pytest.mark.slow  # a subprocess: the slow tier
@pytest.mark.parametrize("case", ["text file", "not a training checkpoint"])
def test_cli_prints_one_error_line_and_no_traceback(ckpt, tmp_path, case):
    if case == "text file":
        path = tmp_path / "ckpt.pt"
        path.write_text("hello\n")
        want = (f"error: checkpoint={path} is not a training checkpoint (a torch .pt archive written by "
                "masc_llamagen.train): pass runs/NAME/checkpoints/ckpt-XXXXXXXX.pt")
    else:  # passes the up-front checks; the loader refuses it (CheckpointError)
        path = ckpt
        want = f"error: {ckpt} is not a masc-llamagen training checkpoint (no 'model'); "
    r = subprocess.run([sys.executable, "-m", "masc_llamagen.sample", f"checkpoint={path}", "num_samples=2",
                        f"out_dir={tmp_path / 'o'}"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(want), r.stderr
