"""Caption features as a job: ``python -m masc_llamagen.data.extract_text codes=DIR out=DIR [encoder=... path=...]``.

Encodes the captions of a t2i code directory (``captions.jsonl``, in item order) or of a text file (``captions=FILE``,
one caption a line) into a packed store that training reads (``text.features``). Resumable and skip-if-done;
under ``torchrun --nproc_per_node N`` each rank encodes its own contiguous share and rank 0 joins them.

    python -m masc_llamagen.data.extract_text codes=artifacts/codes/twemoji_emoji_vq_tiny/train \
        out=artifacts/text/twemoji_wordllama/train
    torchrun --nproc_per_node 8 -m masc_llamagen.data.extract_text codes=... out=... encoder=flan_t5_xl \
        path=/models/flan-t5-xl
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from masc_llamagen.errors import ConfigError, user_errors


@dataclass
class ExtractConfig:
    out: str = MISSING  # the store to write
    codes: str | None = None  # a t2i code directory: its captions
    captions: str | None = None  # or a text file, one caption a line
    encoder: str = "wordllama"  # wordllama | flan_t5_xl | t5
    path: str | None = None  # local model directory (T5)
    max_length: int = 120  # token slots; the model's cls_token_num
    batch_size: int = 64
    device: str = "auto"  # auto | cpu | cuda[:N]
    overwrite: bool = False


ConfigStore.instance().store(name="base_text_extract", node=ExtractConfig)


def _captions(cfg: ExtractConfig) -> list[str]:
    if (cfg.codes is None) == (cfg.captions is None):
        raise ConfigError("pass exactly one of codes=DIR (a t2i code directory) or captions=FILE (one a line)")
    if cfg.codes is not None:
        from masc_llamagen.data.codes import CodeDataset

        captions = CodeDataset(cfg.codes).captions
        if captions is None:
            raise ConfigError(f"{cfg.codes} holds class-conditional codes (no captions.jsonl); pass t2i codes")
        return captions
    path = Path(cfg.captions)
    if not path.is_file():
        raise ConfigError(f"captions={path} does not exist; pass a text file with one caption a line")
    return path.read_text().splitlines()


def extract(cfg: ExtractConfig) -> None:
    """Encode the captions into ``cfg.out``; every rank of a torchrun job takes its share."""
    from accelerate import PartialState

    from masc_llamagen.text import build_text_encoder, extract_text_features, finalize_text_features
    from masc_llamagen.utils.devices import pick_device

    captions = _captions(cfg)
    state = PartialState(cpu=cfg.device == "cpu")
    device = state.device if cfg.device == "auto" else pick_device(cfg.device)
    enc = build_text_encoder(cfg.encoder, cfg.path, device=device, max_length=cfg.max_length)
    store = extract_text_features(enc, captions, cfg.out, batch_size=cfg.batch_size, rank=state.process_index,
                                  world=state.num_processes, overwrite=cfg.overwrite, progress=state.is_main_process)
    state.wait_for_everyone()
    if state.is_main_process:
        store = store or finalize_text_features(cfg.out)
        print(f"{len(store)} captions -> {cfg.out} ({enc.name}, {store.dim}-d)")


@hydra.main(version_base="1.3", config_path="../../configs", config_name="text_extract")
def main(cfg: DictConfig) -> None:
    with user_errors():
        if OmegaConf.is_missing(cfg, "out"):
            raise ConfigError("out=DIR is required: where to write the packed features")
        extract(OmegaConf.to_object(cfg))


if __name__ == "__main__":
    main()
