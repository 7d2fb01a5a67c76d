"""Hydra entry point: `python train.py model=llamagen_xl head=masc` (see configs/train.yaml)."""

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from masc_llamagen.config import register

register()


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> None:
    from masc_llamagen.errors import ConfigError, user_errors
    from masc_llamagen.train.loop import train

    with user_errors():  # a bad value, a wrong file, a run dir in use ...: one line, exit 1, no traceback
        hydra_cfg = HydraConfig.get()
        if any(o.startswith("paths.output_dir=") for o in hydra_cfg.overrides.task):
            raise ConfigError("paths.output_dir is the run directory Hydra picks (configs/hydra/default.yaml): "
                              "pass hydra.run.dir=DIR instead")
        # The one place that reads the Hydra runtime: the library gets the run directory as a plain config value.
        cfg.paths.output_dir = hydra_cfg.runtime.output_dir
        train(cfg)


if __name__ == "__main__":
    main()
