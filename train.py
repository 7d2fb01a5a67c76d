"""Hydra entry point: `python train.py model=llamagen_xl head=masc` (see configs/train.yaml)."""

import hydra
from omegaconf import DictConfig

from masc_llamagen.config import register

register()


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> None:
    from masc_llamagen.checkpoint import CheckpointError
    from masc_llamagen.masc.heads import HeadError
    from masc_llamagen.masc.tree import TreeError
    from masc_llamagen.train.loop import TrainingError, train

    try:
        train(cfg)
    except (FileNotFoundError, CheckpointError, HeadError, TreeError, TrainingError) as e:
        # A user error (missing file, wrong tokenizer, k out of range...): one line, no traceback.
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
