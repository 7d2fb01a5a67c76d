"""Every config option and experiment preset composes against the typed schemas; bad keys fail at compose time."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from masc_llamagen.config import register
from masc_llamagen.models.gpt import GPT_CONFIGS

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


def _compose(overrides):
    register()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIGS)):
        return compose("train", overrides=overrides)


@pytest.mark.parametrize("group", ["model", "head", "tokenizer", "data", "optim", "train", "logger"])
def test_every_group_option_composes(group):
    for option in _options(group):
        cfg = _compose([f"{group}={option}"])
        assert OmegaConf.select(cfg, group) is not None
        if group == "model":
            assert cfg.model.arch in GPT_CONFIGS


@pytest.mark.parametrize("preset", _options("experiment"))
def test_every_experiment_preset_composes(preset):
    cfg = _compose([f"experiment={preset}"])
    assert cfg.name == preset
    assert cfg.model.arch in GPT_CONFIGS
    if "masc" in preset or "kmeans" in preset:
        assert cfg.head.k is not None


def test_paper_presets_carry_the_paper_numbers():
    xl = _compose(["experiment=paper_xl_masc"])
    assert (xl.model.arch, xl.head.name, xl.head.k) == ("GPT-XL", "masc", 8192)
    assert (xl.optim.schedule, xl.optim.lr, xl.optim.final_lr, xl.train.global_batch_size) == ("cosine", 2e-4, 2e-5,
                                                                                                512)
    b = _compose(["experiment=paper_b_flat"])
    assert (b.head.name, b.optim.lr, b.optim.final_lr, b.train.global_batch_size) == ("flat", 1e-4, 1e-5, 256)
    assert b.train.sample_cfg_scale == 2.0 and xl.train.sample_cfg_scale == 2.5
    # the paper's runs (and LlamaGen's trainer) keep no EMA; the project's default does
    assert not xl.train.ema and not b.train.ema and _compose([]).train.ema


def test_cli_override_beats_preset():
    cfg = _compose(["experiment=paper_xl_masc", "head.k=4096"])
    assert cfg.head.k == 4096


@pytest.mark.parametrize("bad", ["train.stepz=3", "train.steps=abc", "head.k=many", "optim.nonsense=1"])
def test_unknown_key_or_wrong_type_fails_at_compose(bad):
    with pytest.raises(ConfigCompositionException):
        _compose([bad])


def test_sweep_config_declares_a_multirun_grid():
    sweep = OmegaConf.load(CONFIGS / "sweep" / "heads_k.yaml")
    assert sweep.hydra.mode == "MULTIRUN"
    assert set(sweep.hydra.sweeper.params.head.split(",")) >= {"masc", "kmeans", "random"}
