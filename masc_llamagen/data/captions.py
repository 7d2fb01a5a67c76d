"""Captioned image datasets for text-to-image: every item is ``(float tensor (3, S, S) in [-1, 1], int index)``.

The index is the item's position; ``ds.captions[index]`` is its text, so code extraction stores the index as the
label and a t2i batch looks up caption features by it. Three sources, all offline:

* ``twemoji``: the emoji-datasource npm packages (``scripts/fetch_emoji.sh``), Twemoji by default and optionally
  Google's Noto set as a second style, captioned from ``emoji.json`` ("grinning face, a smileys & emotion emoji
  (face-smiling)"). Held-out split: every 10th emoji in file-name order, the rule of ``images.Twemoji``.
* ``llamagen_jsonl``: LlamaGen's jsonl lists (one object a line, ``image_path`` relative to a root and ``text``, a
  list of captions), read with :func:`masc_llamagen.text.llamagen.read_llamagen_jsonl` and its caption keys, so
  item ``i`` is the caption whose LlamaGen/TextFeatureStore features are row ``i``.
* ``caption_folder``: any image folder where ``img.png`` has its caption in ``img.txt`` next to it.

An image that cannot be read does not stop a run: the item is a blank white image and ``valid(i)`` is False (the
t2i model drops such samples with its per-sample valid flag); ``num_invalid`` counts those met so far.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from masc_llamagen.data.images import (
    DATA_ENV,
    IMAGE_EXTENSIONS,
    DatasetNotFoundError,
    center_crop_pil,
    default_root,
    pil_to_tensor,
)
from masc_llamagen.errors import MascError
from masc_llamagen.text.llamagen import read_llamagen_jsonl

CREDITS = "Twemoji graphics (c) Twitter, CC-BY-4.0; Noto Emoji (c) Google, Apache-2.0"
EMOJI_VERSION = "16.0.0"
# style -> (npm package, the words the caption uses for it)
EMOJI_STYLES = {
    "twitter": (f"emoji-datasource-twitter@{EMOJI_VERSION}", "twitter's twemoji style"),
    "google": (f"emoji-datasource-google@{EMOJI_VERSION}", "google's noto style"),
}
SKIN_TONES = {  # emoji.json skin_variations keys (Fitzpatrick modifiers) -> CLDR's words
    "1F3FB": "light skin tone", "1F3FC": "medium-light skin tone", "1F3FD": "medium skin tone",
    "1F3FE": "medium-dark skin tone", "1F3FF": "dark skin tone",
}
TASK = "t2i"
CAPTION_DATASETS = ("twemoji", "llamagen_jsonl", "caption_folder")
DEFAULT_CAPTION_IMAGE_SIZES = {"twemoji": 64, "llamagen_jsonl": 256, "caption_folder": 256}
HELDOUT_CAPTION_SPLITS = {"twemoji": "test", "llamagen_jsonl": "val", "caption_folder": "val"}
_ALIASES = {
    "emoji": "twemoji", "twemoji_captions": "twemoji", "jsonl": "llamagen_jsonl", "llamagen": "llamagen_jsonl",
    "captionfolder": "caption_folder", "caption_dir": "caption_folder", "sidecar": "caption_folder",
}
_UNREADABLE = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


class CaptionDataError(MascError, ValueError):
    """A caption list or sidecar that cannot be used; the message names the file (and line) and the fix."""


def canonical_caption_name(name: str) -> str:
    key = name.strip().lower().replace("-", "_")
    return _ALIASES.get(key, key)


def is_caption_dataset(ds: Any) -> bool:
    """Duck-typed: a dataset with ``task == "t2i"``, ``captions`` and ``valid(i)`` (what extract_codes needs)."""
    return getattr(ds, "task", None) == TASK and getattr(ds, "captions", None) is not None and callable(
        getattr(ds, "valid", None))


# ------------------------------------------------------------------------------------------------------------
# Captions from emoji.json


def _clean(text: str) -> str:
    """Lower-case natural text: one space between words, typographic apostrophes made plain."""
    return " ".join(str(text).replace("\u2019", "'").replace("_", " ").split()).lower()


def skin_tone_words(key: str) -> str:
    """``"1F3FD"`` -> ``"medium skin tone"``; two-person keys ``"1F3FB-1F3FF"`` -> both tones (once if equal)."""
    words: list[str] = []
    for code in key.upper().split("-"):
        w = SKIN_TONES.get(code, f"skin tone {code.lower()}")
        if w not in words:
            words.append(w)
    return ", ".join(words)


def emoji_caption(
    name: str, category: str | None, subcategory: str | None = None, skin: str | None = None,
    style: str | None = None,
) -> str:
    """The caption of one emoji image, deterministic lower-case text a text encoder can use.

    ``emoji_caption("GRINNING FACE", "Smileys & Emotion", "face-smiling")`` ->
    ``"grinning face, a smileys & emotion emoji (face-smiling)"``; ``skin="1F3FD"`` adds ": medium skin tone" after
    the name (", medium skin tone" when the name already has a colon, as in "man: red hair"); ``style`` appends
    ", in twitter's twemoji style" or ", in google's noto style".
    """
    text = _clean(name)
    if skin:
        text += (", " if ":" in text else ": ") + skin_tone_words(skin)
    cat = _clean(category) if category else ""
    text += f", {'an' if cat[:1] in 'aeiou' else 'a'} {cat} emoji" if cat else ", an emoji"
    if subcategory:
        text += f" ({_clean(subcategory)})"
    if style is not None:
        if style not in EMOJI_STYLES:
            raise CaptionDataError(f"unknown emoji style {style!r}; choose from {sorted(EMOJI_STYLES)}")
        text += f", in {EMOJI_STYLES[style][1]}"
    return text


def _entry_names(entries: Sequence[dict]) -> list[str]:
    """Each entry's display name; a name two entries share (emoji.json lists 1F935 under the old name "MAN IN
    TUXEDO") is replaced by the entry's first short name where that differs, so captions tell them apart."""
    def own(e: dict) -> str:
        return str(e.get("name") or (e.get("short_names") or [e.get("short_name") or e.get("image", "emoji")])[0])

    names = [own(e) for e in entries]
    seen: dict[str, int] = {}
    for n in names:
        seen[_clean(n)] = seen.get(_clean(n), 0) + 1
    out = []
    for e, n in zip(entries, names, strict=True):
        short = (e.get("short_names") or [None])[0]
        out.append(short if seen[_clean(n)] > 1 and short and _clean(short) != _clean(n) else n)
    return out


# ------------------------------------------------------------------------------------------------------------
# Base class


def to_rgb_on_white(img: Image.Image) -> Image.Image:
    """RGB, with any transparency (RGBA, LA, palette or colour-key) composited on white."""
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
    if not has_alpha:
        return img.convert("RGB")
    rgba = img.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


class CaptionImageDataset(Dataset):
    """Common behaviour: ``paths``/``captions`` lists, ADM centre crop to ``image_size``, invalid-image tracking.

    ``labels`` is ``arange(len)`` (the item index), ``num_classes`` is the item count and ``classes`` None, so the
    class-conditional tooling (extraction, ten-crop views) handles these sets unchanged.
    """

    name = "captions"
    task = TASK
    random_flip = False
    classes = None

    def _setup(self, root: Path, split: str, image_size: int, paths: Sequence[Path], captions: Sequence[str]) -> None:
        if len(paths) != len(captions):
            raise ValueError(f"{len(paths)} images but {len(captions)} captions")
        self.root, self.split, self.image_size = root, split, int(image_size)
        if self.image_size < 4:
            raise ValueError(f"image_size={image_size} is too small")
        self.paths = list(paths)
        self.captions = [str(c) for c in captions]
        self.labels = np.arange(len(self.paths), dtype=np.int64)
        self.num_classes = len(self.paths)
        self._valid: dict[int, bool] = {}

    def __len__(self) -> int:
        return len(self.paths)

    def _read(self, i: int) -> Image.Image | None:
        try:
            with Image.open(self.paths[i]) as img:
                img.load()
                return to_rgb_on_white(img)
        except _UNREADABLE:
            return None

    def load_image(self, i: int) -> Image.Image:
        """The decoded RGB image (transparency on white), before cropping; a blank white square if unreadable."""
        img = self._read(i)
        self._valid[int(i)] = img is not None
        if img is None:
            return Image.new("RGB", (self.image_size, self.image_size), (255, 255, 255))
        return img

    def valid(self, i: int) -> bool:
        """False when item ``i``'s image cannot be read (its tensor is then blank); reads the image once if needed."""
        i = int(i) % len(self) if len(self) else int(i)
        if i not in self._valid:
            self._valid[i] = self._read(i) is not None
        return self._valid[i]

    @property
    def num_invalid(self) -> int:
        """Unreadable images met so far (by ``__getitem__``, ``load_image`` or ``valid``)."""
        return sum(not v for v in self._valid.values())

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {n} items")
        i = int(i) % n
        img = self.load_image(i)
        if img.size != (self.image_size, self.image_size):
            img = center_crop_pil(img, self.image_size)
        return pil_to_tensor(img), i

    def describe(self) -> dict[str, Any]:
        """Options that change the items, for the extraction job and meta.json (cheap: no image is read)."""
        return {"task": TASK}


# ------------------------------------------------------------------------------------------------------------
# Twemoji (+ Noto) with emoji.json captions


class TwemojiCaptions(CaptionImageDataset):
    """The emoji-datasource packages as (image, caption) pairs; ``root`` holds ``package/`` (or is it).

    ``styles``: ``("twitter",)`` (default) and/or ``"google"``; each style is one image per emoji, items ordered
    style by style. ``style_in_caption`` (default: only when more than one style is used) appends the style's
    name to each caption. Splits: ``test`` is every 10th emoji in file-name order (the rule of images.Twemoji, so
    the twitter ``test`` images are exactly Twemoji's ``test`` split), the same emoji in every style; ``train``
    the rest, ``all`` everything. The 5 ``Component`` skin-tone swatches are dropped by default, as in Twemoji.
    Credit the art wherever it is shown (:data:`CREDITS`).
    """

    name = "twemoji"

    def __init__(
        self, root: str | os.PathLike | None = None, image_size: int = 64, split: str = "train",
        styles: Sequence[str] = ("twitter",), exclude_categories: Sequence[str] = ("Component",),
        style_in_caption: bool | None = None,
    ) -> None:
        if split not in ("train", "test", "all"):
            raise ValueError(f"twemoji split must be 'train', 'test' or 'all', got {split!r}")
        styles = (styles,) if isinstance(styles, str) else tuple(styles)
        bad = [s for s in styles if s not in EMOJI_STYLES]
        if not styles or bad or len(set(styles)) != len(styles):
            raise CaptionDataError(
                f"styles={styles!r}: give one or more distinct emoji styles from {sorted(EMOJI_STYLES)}, "
                f"e.g. styles=('twitter', 'google')"
            )
        base = Path(root) if root is not None else default_root(self.name)
        pkg = None
        if base is not None:
            pkg = base if (base / "emoji.json").is_file() else base / "package"
        fetch = f"scripts/fetch_emoji.sh {base if base is not None else 'DEST'} {' '.join(styles)}"
        if pkg is None or not (pkg / "emoji.json").is_file():
            raise DatasetNotFoundError(
                f"emoji set not found{f' under {base}' if base is not None else ''}: run `{fetch}` (npm pack "
                f"{EMOJI_STYLES[styles[0]][0]}), then pass root=<that folder> or use ${DATA_ENV}/twemoji"
            )
        for s in styles:
            if not (pkg / "img" / s / "64").is_dir():
                raise DatasetNotFoundError(
                    f"{pkg / 'img' / s / '64'} is missing (style {s!r}): run `{fetch}` to add "
                    f"{EMOJI_STYLES[s][0]}"
                )
        try:
            with open(pkg / "emoji.json", encoding="utf-8") as f:
                entries = json.load(f)
        except (OSError, ValueError) as e:
            raise CaptionDataError(
                f"{pkg / 'emoji.json'} cannot be read ({e}); delete {pkg} and rerun `{fetch}`") from None
        if not isinstance(entries, list):
            raise CaptionDataError(f"{pkg / 'emoji.json'} is not a list of emoji entries; rerun `{fetch}`")
        entries = [e for e in entries if isinstance(e, dict) and e.get("category") not in tuple(exclude_categories)]
        names = _entry_names(entries)
        # image file -> (entry, display name, skin key or None); skin variants in their key order
        listing: dict[str, tuple[dict, str, str | None, dict]] = {}
        for e, nm in zip(entries, names, strict=True):
            for skin, v in [(None, e), *sorted((e.get("skin_variations") or {}).items())]:
                if v.get("image"):
                    listing[v["image"]] = (e, nm, skin, v)
        present: dict[str, set[str]] = {}
        for s in styles:
            img_dir = pkg / "img" / s / "64"
            on_disk = {p.name for p in img_dir.iterdir()}
            present[s] = {f for f, (_, _, _, v) in listing.items() if v.get(f"has_img_{s}") and f in on_disk}
        order = sorted(set().union(*present.values()))
        if not order:
            raise DatasetNotFoundError(
                f"{pkg / 'emoji.json'} lists no images present in {pkg / 'img'}; rerun `{fetch}`")
        if split != "all":
            order = [f for k, f in enumerate(order) if (k % 10 == 0) == (split == "test")]
        self.styles = styles
        self.exclude_categories = tuple(exclude_categories)
        self.style_in_caption = len(styles) > 1 if style_in_caption is None else bool(style_in_caption)
        paths, captions, self.images = [], [], []
        for s in styles:
            for f in order:
                if f not in present[s]:
                    continue
                e, nm, skin, _ = listing[f]
                paths.append(pkg / "img" / s / "64" / f)
                captions.append(emoji_caption(nm, e.get("category"), e.get("subcategory"), skin,
                                              s if self.style_in_caption else None))
                self.images.append(f)
        self._setup(pkg, split, image_size, paths, captions)

    def describe(self) -> dict[str, Any]:
        return {"task": TASK, "styles": list(self.styles), "exclude_categories": list(self.exclude_categories),
                "style_in_caption": self.style_in_caption}


# ------------------------------------------------------------------------------------------------------------
# LlamaGen jsonl lists


def _jsonl_files(root: Path, split: str) -> list[Path]:
    if root.is_file():
        return [root]
    if (root / f"{split}.jsonl").is_file():
        return [root / f"{split}.jsonl"]
    if (root / split).is_dir() and list((root / split).glob("*.jsonl")):
        return sorted((root / split).glob("*.jsonl"))
    if split in ("train", "all") and list(root.glob("*.jsonl")):
        return sorted(root.glob("*.jsonl"))
    return []


class LlamaGenJsonl(CaptionImageDataset):
    """LlamaGen's caption lists: ``root`` is a ``.jsonl`` file or a folder with ``<split>.jsonl``, ``<split>/*.jsonl``
    or (for ``train``/``all``) ``*.jsonl``, read in name order (LlamaGen's and ``LlamaGenT5Features``' order).
    ``image_path`` is relative to ``image_root`` (default: the folder holding ``root``'s lists; absolute paths are
    kept). ``caption_key``/``first_sentence``: which caption of ``text`` (``blip`` = ``text[0]``, ``llava``,
    ``llava_first``; see :mod:`masc_llamagen.text.llamagen`)."""

    name = "llamagen_jsonl"

    def __init__(
        self, root: str | os.PathLike | None = None, image_size: int = 256, split: str = "train",
        image_root: str | os.PathLike | None = None, caption_key: str = "blip", first_sentence: bool = False,
    ) -> None:
        base = Path(root) if root is not None else default_root(self.name)
        if base is None or not base.exists():
            raise DatasetNotFoundError(
                f"LlamaGen jsonl list not found{f' at {base}' if base is not None else ''}: pass root=<file.jsonl or "
                f"folder with {split}.jsonl> (lines {{\"image_path\": ..., \"text\": [...]}}) or use "
                f"${DATA_ENV}/llamagen_jsonl"
            )
        files = _jsonl_files(base, split)
        if not files:
            raise DatasetNotFoundError(
                f"no {split!r} caption list under {base}: expected {base / f'{split}.jsonl'}, {base / split}/*.jsonl"
                + (f" or {base}/*.jsonl" if split in ("train", "all") else "")
            )
        img_root = Path(image_root) if image_root is not None else (base.parent if base.is_file() else base)
        paths, captions = [], []
        for f in files:
            for rel, cap in read_llamagen_jsonl(f, caption_key, first_sentence):
                paths.append(Path(rel) if Path(rel).is_absolute() else img_root / rel)
                captions.append(cap)
        if not paths:
            raise DatasetNotFoundError(f"the caption lists {', '.join(map(str, files))} hold no lines")
        probe = paths[:8]
        if not any(p.is_file() for p in probe):
            raise DatasetNotFoundError(
                f"none of the first {len(probe)} images exists (first: {probe[0]}): image_path is read relative "
                f"to {img_root}; pass image_root=<the folder those paths start from>"
            )
        self.files = files
        self.caption_key, self.first_sentence = caption_key, bool(first_sentence)
        self._setup(base, split, image_size, paths, captions)

    def describe(self) -> dict[str, Any]:
        return {"task": TASK, "caption_key": self.caption_key, "first_sentence": self.first_sentence,
                "lists": [f.name for f in self.files]}


# ------------------------------------------------------------------------------------------------------------
# Image folder with caption sidecars


class CaptionFolder(CaptionImageDataset):
    """``root/**/name.<image ext>`` with its caption in ``name.txt`` beside it (whitespace collapsed to one line).

    ``root/<split>/`` is used when it exists; a bare folder serves ``train`` (without any ``val/`` or ``test/``
    folder in it, the held-out splits) and ``all``. Images are in relative path order. An image without a
    non-empty sidecar is an error unless ``missing_captions="skip"``.
    """

    name = "caption_folder"

    def __init__(
        self, root: str | os.PathLike | None = None, image_size: int = 256, split: str = "train",
        missing_captions: str = "error",
    ) -> None:
        if missing_captions not in ("error", "skip"):
            raise ValueError(f"missing_captions must be 'error' or 'skip', got {missing_captions!r}")
        base = Path(root) if root is not None else default_root(self.name)
        if base is None or not base.is_dir():
            raise DatasetNotFoundError(
                f"caption folder not found{f' at {base}' if base is not None else ''}: pass root=<folder of "
                f"img.png + img.txt pairs> or use ${DATA_ENV}/caption_folder"
            )
        if (base / split).is_dir():
            folder = base / split
        elif split in ("train", "all"):
            folder = base
        else:
            raise DatasetNotFoundError(
                f"no {split!r} split under {base}: expected {base / split}/ with img + txt pairs")
        skip_top = {"val", "test"} if folder == base and split == "train" else set()
        images = sorted(
            (p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
             and not any(part.startswith(".") for part in p.relative_to(folder).parts)
             and p.relative_to(folder).parts[0] not in skip_top),
            key=lambda p: p.relative_to(folder).as_posix(),
        )
        if not images:
            raise DatasetNotFoundError(f"{folder} holds no images ({', '.join(IMAGE_EXTENSIONS)}) with .txt captions")
        paths, captions, missing = [], [], []
        for p in images:
            txt = p.with_suffix(".txt")
            cap = ""
            if txt.is_file():
                try:
                    cap = " ".join(txt.read_text(encoding="utf-8").split())
                except (OSError, UnicodeDecodeError):
                    cap = ""
            if not cap:
                missing.append(txt)
                continue
            paths.append(p)
            captions.append(cap)
        if missing and missing_captions == "error":
            raise CaptionDataError(
                f"{len(missing)} of {len(images)} images in {folder} have no readable, non-empty caption file "
                f"(first: {missing[0]}); write one UTF-8 .txt per image or pass missing_captions='skip'"
            )
        if not paths:
            raise DatasetNotFoundError(f"{folder}: no image has a caption file; expected img.png + img.txt pairs")
        self.missing_captions, self.skipped = missing_captions, len(missing)
        self._setup(base, split, image_size, paths, captions)

    def describe(self) -> dict[str, Any]:
        return {"task": TASK, "missing_captions": self.missing_captions, "skipped": self.skipped}


# ------------------------------------------------------------------------------------------------------------
# Registry


def heldout_caption_split(name: str) -> str:
    """The split never trained on: twemoji's every-10th ``test``; ``val`` for the generic sets."""
    key = canonical_caption_name(name)
    if key not in HELDOUT_CAPTION_SPLITS:
        raise ValueError(f"unknown caption dataset {name!r}; choose one of {list(CAPTION_DATASETS)}")
    return HELDOUT_CAPTION_SPLITS[key]


def build_caption_dataset(
    name: str, split: str = "train", image_size: int | None = None, root: str | os.PathLike | None = None, **kw,
) -> CaptionImageDataset:
    """Build ``twemoji`` (kw: styles, exclude_categories, style_in_caption), ``llamagen_jsonl`` (image_root,
    caption_key, first_sentence) or ``caption_folder`` (missing_captions); ``image_size=None`` -> its default."""
    key = canonical_caption_name(name)
    if key not in DEFAULT_CAPTION_IMAGE_SIZES:
        raise ValueError(f"unknown caption dataset {name!r}; choose one of {list(CAPTION_DATASETS)}")
    size = DEFAULT_CAPTION_IMAGE_SIZES[key] if image_size is None else int(image_size)
    cls = {"twemoji": TwemojiCaptions, "llamagen_jsonl": LlamaGenJsonl, "caption_folder": CaptionFolder}[key]
    return cls(root=root, image_size=size, split=split, **kw)


def heldout_captions(
    name: str = "twemoji", root: str | os.PathLike | None = None, image_size: int | None = None, **kw,
) -> list[str]:
    """The captions of the held-out split (one per held-out image, in item order), e.g. the prompts for FID.

    The matching images are ``build_caption_dataset(name, heldout_caption_split(name), ...)``'s items.
    """
    return build_caption_dataset(name, heldout_caption_split(name), image_size, root, **kw).captions
