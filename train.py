"""Hydra entry point: `python train.py model=llamagen_xl head=masc` (see configs/train.yaml)."""

import hydra
from omegaconf import DictConfig

from masc_llamagen.config import register

register()


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> None:
    from masc_llamagen.train.loop import train

    train(cfg)


if __name__ == "__main__":
    main()
