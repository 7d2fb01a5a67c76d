"""``python -m masc_llamagen.eval generated=SAMPLES [reference=REF] [key=value ...]``: FID/KID/precision/recall,
printed and written as JSON (``protocol=coco30k``: the COCO-30k text-to-image protocol). Every option and its default
is in :class:`masc_llamagen.eval.job.EvalJob`; ``scripts/eval.sh`` is the positional front end. Errors: one line,
exit 1.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from masc_llamagen.errors import ConfigError, user_errors
from masc_llamagen.eval.job import GENERATED_REQUIRED, evaluate
from masc_llamagen.eval.metrics import format_metrics, log_to_wandb

CONFIGS = str(Path(__file__).resolve().parents[2] / "configs")  # absolute: also found when main() is called in-process


@hydra.main(version_base="1.3", config_path=CONFIGS, config_name="eval")
def main(cfg: DictConfig) -> None:
    with user_errors():
        if OmegaConf.is_missing(cfg, "generated"):
            raise ConfigError(GENERATED_REQUIRED)
        job = OmegaConf.to_object(cfg)
        result, out = evaluate(job)
        coco = job.protocol == "coco30k"
        if coco:
            from masc_llamagen.eval.coco import format_result

            print(format_result(result))
        else:
            print(format_metrics(result))
        print(f"wrote {out}")
        if log_to_wandb(result, force=job.wandb, prefix="eval/coco30k/" if coco else "eval/"):
            print("logged to W&B")


if __name__ == "__main__":
    main()
