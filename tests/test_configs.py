"""Every config option and experiment preset composes against the typed schemas; bad keys fail at compose time."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from masc_llamagen.config import GROUPS, register
from masc_llamagen.models.gpt import GPT_CONFIGS
from masc_llamagen.sample_config import SampleConfig

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
    assert cfg.name.startswith(preset)
    assert cfg.model.arch in GPT_CONFIGS
    if cfg.head.name != "flat":
        assert cfg.head.k is not None
    # resolves without a Hydra runtime: callers of compose() need not patch anything, the run directory included
    assert OmegaConf.to_container(cfg, resolve=True)["paths"]["output_dir"] == f"{cfg.paths.runs}/{cfg.name}"


@pytest.mark.parametrize("sub", ["model", "head"])
def test_experiment_deltas_name_an_experiment_and_an_option(sub):
    """train.yaml picks experiment/<sub>/<experiment>_<option>.yaml if it exists: a misnamed one would be skipped."""
    names = {f"{e}_{o}" for e in _options("experiment") for o in _options(sub)}
    assert set(_options(f"experiment/{sub}")) <= names


def _paper(model, head):
    return _compose(["experiment=paper", f"model=llamagen_{model}", f"head={head}"])


def test_paper_preset_carries_the_paper_numbers():
    xl = _paper("xl", "masc")
    assert (xl.model.arch, xl.head.name, xl.head.k) == ("GPT-XL", "masc", 8192)
    assert (xl.optim.schedule, xl.optim.lr, xl.optim.final_lr, xl.train.global_batch_size) == ("cosine", 2e-4, 2e-5,
                                                                                                512)
    b = _paper("b", "flat")
    assert (b.head.name, b.optim.lr, b.optim.final_lr, b.train.global_batch_size) == ("flat", 1e-4, 1e-5, 256)
    assert _paper("l", "kmeans").train.global_batch_size == 256 and _paper("l", "kmeans").head.k == 8192
    # 300 epochs of ImageNet's 1,281,167 images at either batch size
    assert (b.train.steps, xl.train.steps) == (-(-1281167 // 256) * 300, -(-1281167 // 512) * 300)
    assert b.train.sample_cfg_scale == 2.0 and xl.train.sample_cfg_scale == 2.5
    assert _paper("xl", "flat").train.sample_cfg_scale == 1.75 and _paper("b", "kmeans").train.sample_cfg_scale == 2.5
    # the paper's runs (and LlamaGen's trainer) keep no EMA; the project's default does
    assert not xl.train.ema and not b.train.ema and _compose([]).train.ema
    default = _compose(["experiment=paper"])
    assert (default.model.arch, default.head.name) == ("GPT-B", "masc")


def test_cli_override_beats_preset():
    cfg = _compose(["experiment=paper", "model=llamagen_xl", "head.k=4096", "train.sample_cfg_scale=3"])
    assert (cfg.head.k, cfg.train.sample_cfg_scale) == (4096, 3.0)


def _restated(yaml_cfg, defaults, identity=("name", "kind", "arch", "encoder")) -> list[str]:
    values = OmegaConf.to_container(yaml_cfg, resolve=False)
    return [k for k, v in values.items() if k not in ("defaults", "hydra", *identity) and k in defaults
            and defaults[k] == v]


@pytest.mark.parametrize("group", sorted(GROUPS))
def test_group_options_restate_no_schema_default(group):
    """One place per default: an option holds its identity and what it changes, never a copy of the schema."""
    defaults = OmegaConf.to_container(OmegaConf.structured(GROUPS[group]), resolve=False)
    for option in _options(group):
        assert not _restated(OmegaConf.load(CONFIGS / group / f"{option}.yaml"), defaults), option


def test_sample_yaml_restates_no_schema_default():
    defaults = OmegaConf.to_container(OmegaConf.structured(SampleConfig), resolve=False)
    assert not _restated(OmegaConf.load(CONFIGS / "sample.yaml"), defaults)


@pytest.mark.parametrize("bad", ["train.stepz=3", "train.steps=abc", "head.k=many", "optim.nonsense=1"])
def test_unknown_key_or_wrong_type_fails_at_compose(bad):
    with pytest.raises(ConfigCompositionException):
        _compose([bad])
