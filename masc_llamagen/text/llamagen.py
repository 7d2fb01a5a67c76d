"""LlamaGen's caption files and extracted T5 features, read as they are (so existing extractions are reused).

Captions: JSON Lines, one object per image with ``image_path`` and ``text``, a list of captions of that image. The
caption keys index that list: ``blip`` is ``text[0]`` (a BLIP caption), ``llava`` is ``text[1]`` (a LLaVA caption,
usually several sentences), ``llava_first`` is ``text[2]`` (the first sentence of the LLaVA caption; when a line
has no third entry it is derived from ``text[1]`` with :func:`~masc_llamagen.text.clean.first_sentence`). A line
whose ``text`` is a single string has only a ``blip`` caption. ``first_sentence=True`` additionally cuts any
chosen caption at its first sentence end (LlamaGen's truncated-caption option).

Features: LlamaGen's extraction writes one ``.npy`` per caption line, ``{t5_root}/{stem}/{line}.npy``, where
``stem`` is the jsonl file name up to its first dot and ``line`` the 0-based line number; each array is float32
``(1, L, 2048)`` (or ``(L, 2048)``), the flan-t5-xl hidden states of the ``L`` real tokens.
:class:`LlamaGenT5Features` reads such a folder with the interface of
:class:`~masc_llamagen.text.store.TextFeatureStore`, plus ``valid(i)``: False when the file is missing or
corrupt (never an exception).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from masc_llamagen.text.clean import first_sentence as _first_sentence
from masc_llamagen.text.encoders import DEFAULT_MAX_LENGTH, FLAN_T5_XL_DIM, TextEncoder, align_features
from masc_llamagen.text.store import TextStoreError, checked_row

__all__ = ["CAPTION_KEYS", "LlamaGenT5Features", "jsonl_stem", "llamagen_captions", "read_llamagen_jsonl"]

CAPTION_KEYS = {"blip": 0, "llava": 1, "llava_first": 2}


def jsonl_stem(path) -> str:
    """The feature folder name LlamaGen derives from a jsonl file: its name up to the first dot."""
    return Path(path).name.split(".")[0]


def _pick_caption(obj: dict, caption_key: str, where: str) -> str:
    text = obj.get("text")
    if isinstance(text, str):
        text = [text]
    if not isinstance(text, list) or not all(isinstance(t, str) for t in text):
        raise TextStoreError(f"{where}: 'text' must be a list of caption strings; fix the line")
    k = CAPTION_KEYS[caption_key]
    if k < len(text):
        return text[k]
    if caption_key == "llava_first" and len(text) > CAPTION_KEYS["llava"]:
        return _first_sentence(text[CAPTION_KEYS["llava"]])
    raise TextStoreError(f"{where}: no {caption_key!r} caption (text has {len(text)} entries); pick another "
                         f"caption_key")


def read_llamagen_jsonl(path, caption_key: str = "blip", first_sentence: bool = False) -> list[tuple[str, str]]:
    """``[(image_path, caption), ...]``, one per line of a LlamaGen jsonl file, in line order (position ``i`` is
    line ``i``, the name of its feature file). See the module docstring for the caption keys."""
    if caption_key not in CAPTION_KEYS:
        raise TextStoreError(f"caption_key={caption_key!r}; use one of {', '.join(CAPTION_KEYS)}")
    path = Path(path)
    if not path.is_file():
        raise TextStoreError(f"{path} does not exist; pass a LlamaGen .jsonl caption file")
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f):
            where = f"{path} line {n + 1}"
            try:
                obj = json.loads(line)
            except ValueError:
                raise TextStoreError(f"{where} is not a JSON object; fix or remove the line (lines are numbered, "
                                     f"removing one renumbers the features)") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("image_path"), str):
                raise TextStoreError(f"{where} has no 'image_path' string; fix the line")
            caption = _pick_caption(obj, caption_key, where)
            out.append((obj["image_path"], _first_sentence(caption) if first_sentence else caption))
    return out


def _count_lines(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(1 for _ in f)


class LlamaGenT5Features:
    """Per-line ``.npy`` features of LlamaGen's layout, for the lines of one or more jsonl files.

    ``jsonl``: a jsonl file, a list of them, or a folder (its ``*.jsonl`` files in sorted order, as LlamaGen lists
    them); item ``i`` runs over their lines in that order. ``dim``/``max_length``: what a valid array must fit
    (flan-t5-xl: 2048 wide, at most 120 tokens). Nothing is read until asked: ``valid(i)`` loads the file once and
    remembers the answer. ``fingerprint`` is ``None`` (LlamaGen stores no encoder identity), so :meth:`check`
    can only compare the width."""

    encoder_name = "flan_t5_xl"
    fingerprint = None

    def __init__(self, t5_root, jsonl, dim: int = FLAN_T5_XL_DIM, max_length: int = DEFAULT_MAX_LENGTH):
        self.root = Path(t5_root)
        if not self.root.is_dir():
            raise TextStoreError(f"{self.root} is not a folder of LlamaGen T5 features; pass the t5 feature root")
        if isinstance(jsonl, (str, os.PathLike)):
            p = Path(jsonl)
            files = sorted(p.glob("*.jsonl")) if p.is_dir() else [p]
        else:
            files = [Path(x) for x in jsonl]
        for p in files:
            if not p.is_file():
                raise TextStoreError(f"{p} does not exist; pass LlamaGen .jsonl caption files")
        if not files:
            raise TextStoreError(f"no .jsonl files in {jsonl}; pass LlamaGen caption files")
        self.dim, self.max_length = int(dim), int(max_length)
        self._items: list[tuple[str, int]] = []
        for p in files:
            stem = jsonl_stem(p)
            self._items.extend((stem, n) for n in range(_count_lines(p)))
        self._valid = np.full(len(self._items), -1, dtype=np.int8)  # -1 unknown, 0 invalid, 1 valid
        self._why: dict[int, str] = {}

    def __len__(self) -> int:
        return len(self._items)

    def _row(self, i: int) -> int:
        return checked_row(i, len(self), "lines in the jsonl files")

    def file(self, i: int) -> Path:
        stem, line = self._items[self._row(i)]
        return self.root / stem / f"{line}.npy"

    def _load(self, i: int) -> np.ndarray | None:
        i = self._row(i)
        p = self.file(i)
        why = None
        arr = None
        try:
            a = np.load(p, allow_pickle=False)
        except FileNotFoundError:
            why = "missing"
        except Exception as e:  # a truncated or garbage file: numpy raises ValueError, OSError, EOFError...
            why = f"unreadable ({type(e).__name__})"
        else:
            if not isinstance(a, np.ndarray):  # an .npz archive under an .npy name
                a.close()
                why = "an .npz archive, not one .npy array"
            elif a.ndim == 3 and a.shape[0] == 1:
                a = a[0]
            if why:
                pass
            elif not (a.ndim == 2 and np.issubdtype(a.dtype, np.floating)):
                why = f"shape {a.shape} dtype {a.dtype}, not float (1, L, {self.dim}) or (L, {self.dim})"
            elif a.shape[1] != self.dim or not 1 <= a.shape[0] <= self.max_length:
                why = f"shape {a.shape}, need 1 <= L <= {self.max_length} rows of width {self.dim}"
            elif not np.isfinite(a).all():
                why = "non-finite values"
            else:
                arr = a.astype(np.float32)
        self._valid[i] = arr is not None
        if why:
            self._why[i] = why
        return arr

    def valid(self, i: int) -> bool:
        """True when item ``i``'s file exists and holds a finite float array that fits; never raises for a bad
        file."""
        i = self._row(i)
        if self._valid[i] < 0:
            self._load(i)
        return bool(self._valid[i])

    def problem(self, i: int) -> str | None:
        """Why item ``i`` is invalid (``None`` when valid)."""
        return None if self.valid(i) else self._why.get(self._row(i))

    def numpy(self, i: int) -> np.ndarray:
        a = self._load(i)
        if a is None:
            raise TextStoreError(f"{self.file(i)}: {self._why[self._row(i)]}; re-extract it or skip items whose "
                                 f"valid(i) is False")
        return a

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(self.numpy(i))

    def batch(self, indices, slots: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Like :meth:`TextFeatureStore.batch`; an invalid item gives an all-zero row with an all-False mask."""
        indices = list(indices)
        items, ok = [], []
        for i in indices:
            a = self._load(i)
            ok.append(a is not None)
            items.append(torch.from_numpy(a) if a is not None else torch.zeros(1, self.dim))
        feats, mask = align_features(items, slots or self.max_length)
        bad = torch.tensor([not v for v in ok], dtype=torch.bool)
        feats[bad] = 0
        mask[bad] = False
        return feats, mask

    def check(self, encoder_fingerprint) -> None:
        """Only the width can be checked (no fingerprint is stored): raise unless an encoder's ``dim`` matches."""
        if isinstance(encoder_fingerprint, TextEncoder) and encoder_fingerprint.dim != self.dim:
            raise TextStoreError(f"{self.root} holds {self.dim}-wide features, encoder {encoder_fingerprint.name} "
                                 f"gives {encoder_fingerprint.dim}; use flan-t5-xl or extract with this encoder")

    def __repr__(self):
        return f"LlamaGenT5Features({str(self.root)!r}, items={len(self)}, dim={self.dim})"


def llamagen_captions(jsonl_files: Sequence, caption_key: str = "blip", first_sentence: bool = False) -> list[str]:
    """The captions of several jsonl files in item order (matches :class:`LlamaGenT5Features` indexing)."""
    return [c for p in jsonl_files for _, c in read_llamagen_jsonl(p, caption_key, first_sentence)]
