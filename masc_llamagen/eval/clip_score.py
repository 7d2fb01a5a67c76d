"""CLIP score of the COCO-30k protocol: OpenAI CLIP ViT-B/32, mean cosine of (image, "A photo depicts " + caption).

Each image is read as RGB, centre-cropped on its short side and Lanczos-resized to 256 (the FID's transform,
:func:`masc_llamagen.eval.coco_images.center_crop_lanczos`), then given CLIP's own preprocessing (bicubic resize of
the short side to 224, centre crop 224, OpenAI mean/std). The score is the mean over all pairs of the cosine between the
L2-normalised image and text embeddings: not multiplied by 100, not clipped at 0.

The model is open_clip's ``ViT-B-32`` with QuickGELU (OpenAI's architecture; open_clip also ships the BPE vocabulary,
so tokenising needs no network). Weights are never faked: they come from ``clip_weights=PATH`` (OpenAI's
``ViT-B-32.pt``, accepted only with its published sha256 because TorchScript carries code; or an open_clip/OpenAI
state dict as ``.safetensors`` or a plain ``torch.save`` file, read with ``weights_only=True``), or are downloaded by
open_clip (``pretrained="openai"``) when ``allow_download=true`` is given; otherwise the score is absent and the result
says why.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from masc_llamagen.errors import first_line
from masc_llamagen.eval.coco_images import EVAL_RESOLUTION, center_crop_lanczos, read_rgb
from masc_llamagen.eval.inception import _is_torchscript
from masc_llamagen.eval.metrics import EvalError

CLIP_PREFIX = "A photo depicts "
CLIP_ARCH = "ViT-B-32"
CLIP_DESCRIPTION = "OpenAI CLIP ViT-B/32 (open_clip ViT-B-32, QuickGELU)"
# The sha256 OpenAI publishes in the download URL of ViT-B-32.pt (openaipublic.azureedge.net/clip/models/<sha256>/).
OPENAI_VIT_B_32_SHA256 = "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af"
_TORCHSCRIPT_EXTRAS = ("input_resolution", "context_length", "vocab_size")
CLIP_IMAGE_PREPROCESSING = (f"center-crop + PIL Lanczos to {EVAL_RESOLUTION}, then CLIP's Resize(224, bicubic) + "
                            "CenterCrop(224) + Normalize(OpenAI mean/std)")


def clip_absent_reason() -> str:
    return ("no CLIP ViT-B/32 weights: pass clip_weights=PATH (OpenAI's ViT-B-32.pt, or an open_clip ViT-B-32 "
            "state dict / .safetensors), or allow_download=true on a machine with internet")


@contextlib.contextmanager
def _quiet_open_clip():
    """open_clip logs 'No pretrained weights loaded ... initialized randomly' for the skeleton built here; the weights
    are loaded right after, so that line would only mislead."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def clip_skeleton() -> torch.nn.Module:
    """OpenAI's ViT-B/32 architecture (open_clip ``ViT-B-32`` with QuickGELU), randomly initialised, in eval mode."""
    import open_clip

    with _quiet_open_clip():
        model = open_clip.create_model(CLIP_ARCH, pretrained=None, force_quick_gelu=True)
    return model.eval().requires_grad_(False)


def _read_state(path: Path) -> tuple[dict[str, torch.Tensor], str, str]:
    """(state dict, sha256 of the file, what the file was) without running any code from an unverified file."""
    data = path.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    if _is_torchscript(path):
        if sha != OPENAI_VIT_B_32_SHA256:
            raise EvalError(f"{path}: a TorchScript archive whose sha256 {sha[:16]}... is not OpenAI's ViT-B-32.pt "
                            f"({OPENAI_VIT_B_32_SHA256[:16]}...); TorchScript carries code, so only that file is "
                            "loaded: pass OpenAI's file or a plain state dict / .safetensors")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = torch.jit.load(io.BytesIO(data), map_location="cpu")
        state = {k: v for k, v in module.state_dict().items() if k not in _TORCHSCRIPT_EXTRAS}
        return state, sha, "OpenAI ViT-B-32.pt (TorchScript, sha256 verified)"
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load as load_safetensors

        try:
            state = load_safetensors(data)
        except Exception as e:
            raise EvalError(f"{path}: not a readable .safetensors file ({first_line(e)})") from None
        kind = "safetensors state dict"
    else:
        try:
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as e:  # pickled code is refused by weights_only=True
            raise EvalError(f"{path}: not a plain CLIP state dict ({first_line(e)}); pass OpenAI's ViT-B-32.pt, a "
                            "state dict saved with torch.save, or .safetensors") from None
        kind = "torch state dict"
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise EvalError(f"{path}: expected a dict of tensors (a CLIP state dict), got {type(state).__name__}")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state, sha, kind


def _load_into(model: torch.nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    shape = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or extra or shape:
        hint = (" (HF transformers' CLIPModel layout is not read: use OpenAI's ViT-B-32.pt or open_clip's "
                "open_clip_model.safetensors from timm/vit_base_patch32_clip_224.openai)"
                if any(k.startswith(("vision_model.", "text_model.")) for k in state) else "")
        raise EvalError(f"{path}: not CLIP ViT-B/32 weights (missing {missing[:2]}, unexpected {extra[:2]}, wrong "
                        f"shape {shape[:2]}){hint}")
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=True)


class _ClipImages(Dataset):
    def __init__(self, files: Sequence[Path], preprocess):
        self.files, self.preprocess = list(files), preprocess

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        from PIL import Image

        try:
            img = Image.fromarray(center_crop_lanczos(read_rgb(self.files[i])))
            return self.preprocess(img), ""
        except Exception as e:
            return torch.zeros(3, 224, 224), f"{self.files[i]}: unreadable image ({first_line(e)})"


class ClipScorer:
    """OpenAI CLIP ViT-B/32 with real weights (a file, or open_clip's download when allowed); see the module doc."""

    def __init__(self, weights: str | os.PathLike | None = None, *, allow_download: bool = False,
                 device: str | torch.device = "cpu"):
        import open_clip

        self.device = torch.device(device)
        if weights is not None:
            path = Path(weights).expanduser()
            if not path.is_file():
                raise EvalError(f"{path}: CLIP weights file not found; pass OpenAI's ViT-B-32.pt or an open_clip "
                                "ViT-B-32 state dict (.pt/.bin/.safetensors)")
            try:
                state, sha, kind = _read_state(path)
            except OSError as e:
                raise EvalError(f"{path}: cannot read CLIP weights ({e.strerror or e})") from None
            model = clip_skeleton()
            _load_into(model, state, path)
            self.info = {"model": CLIP_DESCRIPTION, "weights": str(path.resolve()), "weights_sha256": sha,
                         "weights_source": kind}
        elif allow_download:
            try:
                with _quiet_open_clip():
                    model = open_clip.create_model(CLIP_ARCH, pretrained="openai", force_quick_gelu=True)
            except Exception as e:
                raise EvalError(f"downloading OpenAI CLIP ViT-B/32 weights failed ({first_line(e)}); pass "
                                "clip_weights=PATH instead") from None
            self.info = {"model": CLIP_DESCRIPTION, "weights": "open_clip pretrained='openai' (downloaded)",
                         "weights_sha256": None, "weights_source": "open_clip download"}
        else:
            raise EvalError(f"CLIP score needs weights: {clip_absent_reason()}")
        self.model = model.eval().requires_grad_(False).to(self.device)
        size = self.model.visual.image_size
        self.preprocess = open_clip.image_transform(
            size, is_train=False, mean=open_clip.OPENAI_DATASET_MEAN, std=open_clip.OPENAI_DATASET_STD,
            resize_mode="shortest", interpolation="bicubic",
        )
        self.tokenizer = open_clip.get_tokenizer(CLIP_ARCH)
        self.info.update(prefix=CLIP_PREFIX, image_preprocessing=CLIP_IMAGE_PREPROCESSING,
                         open_clip_version=getattr(open_clip, "__version__", "unknown"))

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        tokens = self.tokenizer(list(texts)).to(self.device)
        return torch.nn.functional.normalize(self.model.encode_text(tokens).float(), dim=-1)

    @torch.no_grad()
    def embed_images(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(self.model.encode_image(x.to(self.device)).float(), dim=-1)

    def cosines(self, files: Sequence[str | os.PathLike], captions: Sequence[str], *, batch_size: int = 64,
                num_workers: int = 0, verbose: bool = False) -> np.ndarray:
        """Per-pair cosine of image ``i`` and ``CLIP_PREFIX + captions[i]``."""
        from tqdm.auto import tqdm

        if len(files) != len(captions):
            raise EvalError(f"{len(files)} images but {len(captions)} captions; CLIP pairs need one caption per image")
        loader = DataLoader(_ClipImages([Path(f) for f in files], self.preprocess), batch_size=batch_size,
                            shuffle=False, num_workers=num_workers)
        out, start = [], 0
        with tqdm(total=len(files), disable=not verbose, leave=False, unit="images", desc="CLIP") as bar:
            for x, errors in loader:
                bad = [e for e in errors if e]
                if bad:
                    raise EvalError(f"{bad[0]}; remove or replace that file")
                texts = [CLIP_PREFIX + c for c in captions[start : start + len(x)]]
                cos = (self.embed_images(x) * self.embed_texts(texts)).sum(-1)
                out.append(cos.double().cpu().numpy())
                start += len(x)
                bar.update(len(x))
        return np.concatenate(out)

    def score(self, files: Sequence[str | os.PathLike], captions: Sequence[str], **kw) -> dict[str, Any]:
        cos = self.cosines(files, captions, **kw)
        return {"clip_score": float(cos.mean()), "n_pairs": int(len(cos))}
