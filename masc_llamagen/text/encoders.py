"""Caption encoders: captions -> right-aligned features for the t2i model's caption slots.

Every encoder maps a list of captions to ``(features (B, slots, C) float32, mask (B, slots) bool)``, captions
right-aligned (caption ``b`` fills the last ``L_b`` slots, the padding rows in front are exactly zero, the mask is
True on the caption rows): the layout ``GPT(model_type="t2i")`` takes as ``cond_idx`` / ``caption_mask``. The
per-caption features (``encode_tokens``) are what a :class:`~masc_llamagen.text.store.TextFeatureStore` keeps.

Backends (:func:`build_text_encoder`):

* ``"flan_t5_xl"`` / ``"t5"``: a transformers ``T5EncoderModel`` and its tokenizer read from a local directory
  only (LlamaGen's text encoder is flan-t5-xl, 2048 wide; ``"t5"`` takes any T5 encoder, e.g. a small one for
  experiments or tests). Captions are cleaned and lower-cased, tokenised with the end-of-sequence token, truncated
  to ``max_length`` (120) tokens, and the last hidden state of the real tokens is the feature.
* ``"wordllama"``: the offline CPU default. Contextless per-token embeddings from the wordllama package (256 wide).

Each encoder has a ``fingerprint``: sha256 over its weight and tokenizer files and the settings that change the
features (backend, ``max_length``, cleaning), so stored features can be matched to the encoder that made them.
The compute dtype and the device are left out on purpose: bf16 on a GPU and float32 on a CPU are the same encoder.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import numpy as np
import torch

from masc_llamagen.errors import MascError
from masc_llamagen.models.gpt import right_align_captions
from masc_llamagen.text.clean import clean_caption
from masc_llamagen.utils.provenance import file_sha256

__all__ = [
    "DEFAULT_MAX_LENGTH",
    "ENCODER_NAMES",
    "T5TextEncoder",
    "TextEncoder",
    "TextEncoderError",
    "WordLlamaEncoder",
    "build_text_encoder",
]

DEFAULT_MAX_LENGTH = 120  # LlamaGen's caption slots (cls_token_num) and T5 truncation length
FLAN_T5_XL_DIM = 2048
ENCODER_NAMES = ("flan_t5_xl", "t5", "wordllama")
WORDLLAMA_WEIGHTS = "weights/l2_supercat_256.safetensors"
WORDLLAMA_TOKENIZER = "tokenizers/l2_supercat_tokenizer_config.json"
WORDLLAMA_KEY = "embedding.weight"
# Files of a transformers T5 directory that decide its features (weights, config, tokenizer).
_T5_TOKENIZER_FILES = ("spiece.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                       "added_tokens.json")
_T5_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".safetensors.index.json", ".bin.index.json")


class TextEncoderError(MascError, ValueError):
    """A text encoder that cannot be built or used (missing files, wrong name, caption too long for the slots)."""


def files_fingerprint(settings: dict, files: dict[str, Path]) -> str:
    """sha256 over the settings (canonical JSON) and each file's name, size and content hash, in name order."""
    h = hashlib.sha256(b"masc-text-encoder-v1\0")
    h.update(json.dumps(settings, sort_keys=True, separators=(",", ":")).encode())
    for name in sorted(files):
        p = files[name]
        h.update(f"\0{name}\0{p.stat().st_size}\0{file_sha256(p)}".encode())
    return h.hexdigest()


class TextEncoder:
    """Base class: ``name``, ``dim`` (C), ``max_length``, ``device``, ``fingerprint`` and the encoding calls.

    Subclasses implement :meth:`_encode_batch` (preprocessed captions -> per-caption (L_i, C) float32 tensors,
    1 <= L_i <= max_length) and :meth:`_fingerprint_parts`."""

    name: str
    dim: int
    max_length: int
    device: torch.device
    clean: bool

    def __init__(self):
        self._fingerprint: str | None = None

    # -- what subclasses provide ------------------------------------------------------------------------------
    def _encode_batch(self, texts: list[str]) -> list[torch.Tensor]:
        raise NotImplementedError

    def _fingerprint_parts(self) -> tuple[dict, dict[str, Path]]:
        raise NotImplementedError

    # -- shared --------------------------------------------------------------------------------------------------
    @property
    def fingerprint(self) -> str:
        """sha256 of the weights/tokenizer files and the feature-changing settings (computed once, on first use)."""
        if self._fingerprint is None:
            settings, files = self._fingerprint_parts()
            self._fingerprint = files_fingerprint(settings, files)
        return self._fingerprint

    def preprocess(self, caption: str) -> str:
        """The text the tokenizer sees: :func:`clean_caption` (which lower-cases), or just lower-cased and stripped."""
        return clean_caption(caption) if self.clean else str(caption).lower().strip()

    def encode_tokens(self, captions: list[str]) -> list[torch.Tensor]:
        """Per-caption features, unpadded: a list of ``(L_i, dim)`` float32 tensors on ``device``,
        ``1 <= L_i <= max_length``."""
        if isinstance(captions, str):
            captions = [captions]
        for i, c in enumerate(captions):
            if not isinstance(c, str):
                raise TextEncoderError(f"caption {i} is a {type(c).__name__}, not a str; pass a list of strings")
        if not captions:
            return []
        return self._encode_batch([self.preprocess(c) for c in captions])

    def __call__(self, captions: list[str], slots: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(features (B, slots, dim) float32, mask (B, slots) bool)``, right-aligned, zero padding rows.

        ``slots`` defaults to ``max_length`` (120: the t2i model's caption slots)."""
        return align_features(self.encode_tokens(captions), slots or self.max_length, what="caption")

    encode = __call__

    def describe(self) -> dict:
        """Settings for a store's meta.json (informative; the fingerprint is what is checked)."""
        return {"name": self.name, "dim": self.dim, "max_length": self.max_length, "clean": self.clean}

    def __repr__(self):
        return f"{type(self).__name__}(name={self.name!r}, dim={self.dim}, max_length={self.max_length})"


def align_features(items: list[torch.Tensor], slots: int, what: str = "item") -> tuple[torch.Tensor, torch.Tensor]:
    """Right-align per-caption features into ``slots`` rows (the model's helper), with a user-facing error."""
    if not items:
        raise TextEncoderError(f"no {what}s to encode; pass at least one")
    longest = max(int(x.shape[0]) for x in items)
    if longest > slots:
        raise TextEncoderError(f"a {what} has {longest} tokens but there are only {slots} caption slots; "
                               f"build the encoder with max_length={slots} (or give the model more slots)")
    return right_align_captions(items, slots)


# ---------------------------------------------------------------------------------------------------------------
# T5 (flan-t5-xl)
# ---------------------------------------------------------------------------------------------------------------


def _t5_missing(name: str, path, why: str) -> TextEncoderError:
    if name == "flan_t5_xl":
        return TextEncoderError(
            f"{why}: flan-t5-xl must be downloaded (google/flan-t5-xl: config.json, spiece.model or tokenizer.json, "
            f"the safetensors weights) to a local directory and passed as path=... (got {path})")
    return TextEncoderError(f"{why}: a T5 encoder needs a local transformers directory (config.json, tokenizer "
                            f"files, weights) passed as path=... (got {path})")


class T5TextEncoder(TextEncoder):
    """A transformers ``T5EncoderModel`` + tokenizer from a local directory (never the hub).

    Captions are cleaned (:func:`~masc_llamagen.text.clean.clean_caption`, lower-casing) unless ``clean=False``
    (then only lower-cased), tokenised with the end-of-sequence token and truncated to ``max_length`` tokens (the
    end token kept last); the features are the encoder's last hidden state on those tokens, in float32. Runs in
    bf16 on CUDA and float32 on a CPU unless ``dtype`` is given."""

    def __init__(self, path, name: str = "t5", device="cpu", dtype: torch.dtype | None = None,
                 max_length: int = DEFAULT_MAX_LENGTH, clean: bool = True):
        super().__init__()
        self.name, self.clean, self.max_length = name, bool(clean), int(max_length)
        if self.max_length < 2:
            raise TextEncoderError(f"max_length={max_length} leaves no room for a token and the end token; use >= 2")
        if path is None:
            raise _t5_missing(name, path, "no T5 directory given")
        self.path = Path(path).expanduser()
        if not self.path.is_dir():
            raise _t5_missing(name, path, f"{self.path} is not a directory")
        config_file = self.path / "config.json"
        if not config_file.is_file():
            raise _t5_missing(name, path, f"{self.path} has no config.json")
        try:
            config = json.loads(config_file.read_text())
        except (OSError, ValueError) as e:
            raise _t5_missing(name, path, f"{config_file} is not readable JSON ({e})") from None
        if config.get("model_type") not in ("t5", "mt5", "umt5"):
            raise _t5_missing(name, path, f"{self.path} holds a {config.get('model_type')!r} model, not a T5")
        if name == "flan_t5_xl" and config.get("d_model") != FLAN_T5_XL_DIM:
            raise TextEncoderError(f"{self.path} holds a T5 with d_model={config.get('d_model')}, not flan-t5-xl "
                                   f"({FLAN_T5_XL_DIM}); pass name='t5' to use this T5 as it is")
        if not self._weight_files():
            raise _t5_missing(name, path, f"{self.path} has no weights (*.safetensors or *.bin)")
        if not any((self.path / f).is_file() for f in ("spiece.model", "tokenizer.json")):
            raise _t5_missing(name, path, f"{self.path} has no tokenizer (spiece.model or tokenizer.json)")

        self.device = torch.device(device)
        if dtype is None:
            dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.dtype = dtype
        from transformers import AutoTokenizer, T5EncoderModel

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(self.path), local_files_only=True)
            model = T5EncoderModel.from_pretrained(str(self.path), local_files_only=True, **_dtype_kwarg(dtype))
        except Exception as e:  # a corrupt or partial download: transformers/safetensors raise many types
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
            raise _t5_missing(name, path, f"{self.path} could not be loaded ({type(e).__name__}: {first})") from None
        self.tokenizer.padding_side = "right"
        if self.tokenizer.pad_token_id is None:
            raise _t5_missing(name, path, f"the tokenizer in {self.path} has no pad token")
        self.model = model.to(device=self.device, dtype=dtype).eval().requires_grad_(False)
        self.dim = int(self.model.config.d_model)

    def _weight_files(self) -> list[Path]:
        """The weight files transformers loads: the safetensors ones when there are any, else the .bin ones."""
        files = sorted(p for p in self.path.iterdir() if p.is_file() and p.name.endswith(_T5_WEIGHT_SUFFIXES))
        safe = [p for p in files if ".safetensors" in p.name]
        return safe or files

    def _fingerprint_parts(self):
        files = {p.name: p for p in self._weight_files()}
        for f in ("config.json", *_T5_TOKENIZER_FILES):
            if (self.path / f).is_file():
                files[f] = self.path / f
        return {"backend": "t5", "max_length": self.max_length, "clean": self.clean}, files

    @torch.inference_mode()
    def _encode_batch(self, texts: list[str]) -> list[torch.Tensor]:
        tok = self.tokenizer(texts, max_length=self.max_length, truncation=True, padding="longest",
                             add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
        ids = tok["input_ids"].to(self.device)
        attn = tok["attention_mask"].to(self.device)
        hidden = self.model(input_ids=ids, attention_mask=attn).last_hidden_state.float()
        lengths = attn.sum(1).tolist()
        return [hidden[b, :n] for b, n in enumerate(lengths)]

    def describe(self) -> dict:
        return {**super().describe(), "backend": "t5", "path": str(self.path), "dtype": str(self.dtype)}


def _dtype_kwarg(dtype: torch.dtype) -> dict:
    import transformers

    major = int(transformers.__version__.split(".")[0])
    return {"dtype": dtype} if major >= 5 else {"torch_dtype": dtype}


# ---------------------------------------------------------------------------------------------------------------
# wordllama
# ---------------------------------------------------------------------------------------------------------------


def wordllama_root() -> Path:
    """The installed wordllama package folder (found without importing it)."""
    spec = importlib.util.find_spec("wordllama")
    if spec is None or not spec.submodule_search_locations:
        raise TextEncoderError("the wordllama package is not installed; pip install wordllama==0.4.0.post1 "
                               "(or pass path= to a folder holding its weights/ and tokenizers/)")
    return Path(next(iter(spec.submodule_search_locations)))


class WordLlamaEncoder(TextEncoder):
    """Contextless per-token embeddings, NOT a T5: each token's row of wordllama's static embedding table.

    wordllama (``l2_supercat``, 256 wide) is a table of 32000 float16 vectors distilled from Llama-2's token
    embeddings; a caption's feature row ``i`` depends on its ``i``-th token only, never on the other words (no
    attention, no order, no context). It is the offline CPU default because it installs with pip (no download) and
    still separates meanings ("red apple" is nearer "green apple" than an unrelated caption); it cannot resolve
    what a T5 resolves from context. The files are read directly (``weights/l2_supercat_256.safetensors``, key
    ``embedding.weight``; ``tokenizers/l2_supercat_tokenizer_config.json``, a Llama-2 tokenizer in HF tokenizers
    JSON) from the installed package, or from ``path`` laid out the same way.

    Captions are cleaned and lower-cased like the T5 path (``clean=False``: lower-cased only), tokenised without
    special tokens (as wordllama itself does), truncated to ``max_length`` tokens. An empty caption gives one zero
    row (a caption needs at least one slot)."""

    def __init__(self, path=None, device="cpu", max_length: int = DEFAULT_MAX_LENGTH, clean: bool = True):
        super().__init__()
        self.name, self.clean, self.max_length = "wordllama", bool(clean), int(max_length)
        if self.max_length < 1:
            raise TextEncoderError(f"max_length={max_length} must be >= 1")
        self.device = torch.device(device)
        root = Path(path).expanduser() if path is not None else wordllama_root()
        self.weights_file, self.tokenizer_file = root / WORDLLAMA_WEIGHTS, root / WORDLLAMA_TOKENIZER
        for f in (self.weights_file, self.tokenizer_file):
            if not f.is_file():
                raise TextEncoderError(f"{f} is missing; reinstall wordllama==0.4.0.post1 (pip install --force-"
                                       f"reinstall wordllama==0.4.0.post1) or pass path= to a folder with its files")
        from safetensors.numpy import load_file

        from tokenizers import Tokenizer

        try:
            tensors = load_file(str(self.weights_file))
            self.tokenizer = Tokenizer.from_file(str(self.tokenizer_file))
        except Exception as e:  # safetensors and tokenizers raise their own (or plain) exception types
            raise TextEncoderError(f"wordllama files in {root} cannot be read ({type(e).__name__}: "
                                   f"{str(e).splitlines()[0] if str(e) else ''}); reinstall wordllama") from None
        table = tensors.get(WORDLLAMA_KEY)
        if table is None or table.ndim != 2:
            raise TextEncoderError(f"{self.weights_file} has no 2-D {WORDLLAMA_KEY!r}; reinstall wordllama")
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        if self.tokenizer.get_vocab_size(with_added_tokens=True) > table.shape[0]:
            raise TextEncoderError(f"the wordllama tokenizer has more ids than {self.weights_file} has rows; "
                                   f"the two files do not belong together: reinstall wordllama")
        self.table = torch.from_numpy(table.astype(np.float32)).to(self.device)
        self.dim = int(table.shape[1])
        self.dtype = torch.float32

    def _fingerprint_parts(self):
        settings = {"backend": "wordllama", "key": WORDLLAMA_KEY, "max_length": self.max_length, "clean": self.clean}
        return settings, {"weights": self.weights_file, "tokenizer": self.tokenizer_file}

    def token_ids(self, texts: list[str]) -> list[list[int]]:
        """Token ids of preprocessed texts, truncated to ``max_length``."""
        return [e.ids[: self.max_length] for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]

    def _encode_batch(self, texts: list[str]) -> list[torch.Tensor]:
        out = []
        for ids in self.token_ids(texts):
            if ids:
                out.append(self.table[torch.tensor(ids, dtype=torch.long, device=self.device)])
            else:
                out.append(self.table.new_zeros(1, self.dim))
        return out

    def describe(self) -> dict:
        return {**super().describe(), "backend": "wordllama", "path": str(self.weights_file.parent.parent)}


# ---------------------------------------------------------------------------------------------------------------


def build_text_encoder(name: str, path=None, device="cpu", dtype: torch.dtype | None = None,
                       max_length: int = DEFAULT_MAX_LENGTH, clean: bool = True) -> TextEncoder:
    """The encoder called ``name``: ``"flan_t5_xl"`` (LlamaGen's; ``path`` = a local flan-t5-xl directory),
    ``"t5"`` (any local T5 directory) or ``"wordllama"`` (the offline default; ``path`` optional).

    ``dtype``: T5 compute dtype (default bf16 on CUDA, float32 on a CPU); features are always float32. wordllama
    ignores it (its table is float16, looked up in float32)."""
    key = str(name).strip().lower().replace("-", "_")
    if key in ("flan_t5_xl", "t5"):
        return T5TextEncoder(path, name=key, device=device, dtype=dtype, max_length=max_length, clean=clean)
    if key == "wordllama":
        return WordLlamaEncoder(path, device=device, max_length=max_length, clean=clean)
    raise TextEncoderError(f"unknown text encoder {name!r}; use one of {', '.join(ENCODER_NAMES)}")
