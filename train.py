"""Hydra entry point: `python train.py model=llamagen_xl head=masc` (see configs/train.yaml)."""

import hydra
from omegaconf import DictConfig

from masc_llamagen.config import register

register()


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> None:
    from masc_llamagen.errors import user_errors
    from masc_llamagen.train.loop import train

    with user_errors():  # a bad value, a wrong file, a run dir in use ...: one line, exit 1, no traceback
        train(cfg)


if __name__ == "__main__":
    main()
