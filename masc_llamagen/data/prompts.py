"""Prompt lists for text-to-image sampling and evaluation: the shipped COCO-30k captions and PartiPrompts (see
``masc_llamagen/assets/prompts/README.md`` for their protocol and credits), or any UTF-8 file, one prompt a line."""

from __future__ import annotations

import importlib.resources
import os
from pathlib import Path

from masc_llamagen.errors import MascError


class PromptError(MascError, ValueError):
    """A prompt list that cannot be read."""


PROMPT_FILES = {
    "coco": "coco_captions.txt",
    "coco30k": "coco_captions.txt",
    "coco_captions": "coco_captions.txt",
    "parti": "partiprompts.txt",
    "partiprompts": "partiprompts.txt",
}


def read_lines(path: str | os.PathLike) -> list[str]:
    """The lines of a UTF-8 text file exactly as written: no quoting, no stripping beyond the line ending itself
    (``\\n`` or ``\\r\\n``); a final newline does not add an empty line."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise PromptError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start}); save the prompts as UTF-8, "
                          "one per line") from None
    except OSError as e:
        raise PromptError(f"{p}: cannot read ({e.strerror or e})") from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [ln[:-1] if ln.endswith("\r") else ln for ln in lines]


def prompts_path(name: str) -> Path:
    """Where a shipped prompt list lies (``coco``/``coco30k``: 30,000 COCO captions; ``parti``: 1,632 PartiPrompts)."""
    fname = PROMPT_FILES[name.lower()]
    return Path(str(importlib.resources.files("masc_llamagen").joinpath("assets", "prompts", fname)))


def load_prompts(name_or_path: str | os.PathLike) -> list[str]:
    """Prompts, one per line: a shipped list by name (``coco``, ``coco30k``, ``parti``, ``partiprompts``) or any UTF-8
    text file with one prompt a line. Lines are returned as they are (a leading double quote stays)."""
    if isinstance(name_or_path, str) and name_or_path.lower() in PROMPT_FILES:
        path = prompts_path(name_or_path)
        if not path.is_file():
            raise PromptError(f"{path}: the shipped prompt list is missing from this install; reinstall masc-llamagen "
                            "(its package data includes masc_llamagen/assets/prompts/*.txt)")
        return read_lines(path)
    path = Path(name_or_path).expanduser()
    if not path.is_file():
        raise PromptError(f"{path}: no such prompt file; pass a text file with one prompt a line, or one of "
                        f"{', '.join(sorted(PROMPT_FILES))}")
    return read_lines(path)
