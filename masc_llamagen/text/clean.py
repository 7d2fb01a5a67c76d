"""Caption cleaning before a text encoder sees a caption (web alt-text is full of links, markup and noise).

:func:`clean_caption` lower-cases and removes what carries no description of the image: links and e-mail
addresses, HTML tags and entities, @handles, image file names, long numeric ids, runs of decoration characters;
it unifies dashes and quotes, squeezes repeated punctuation and whitespace, and trims stray punctuation at the ends.
It is idempotent (a cleaned caption cleans to itself), so cleaning twice, as some pipelines do, changes nothing.

:func:`first_sentence` keeps a caption up to its first sentence end (used for LlamaGen's truncated captions).
"""

from __future__ import annotations

import html
import re
import unicodedata
import urllib.parse

__all__ = ["clean_caption", "first_sentence"]

_TLD = r"(?:com|net|org|edu|gov|io|co|uk|de|ru|fr|it|jp|cn|info|biz|me|ly|tv)"
_URL = re.compile(
    r"(?:\b[a-z][a-z0-9+.-]*://\S+)"  # scheme://anything
    r"|(?:\bwww\.\S+)"  # www.anything
    r"|(?:\b[a-z0-9][a-z0-9-]*(?:\.[a-z0-9-]+)*\." + _TLD + r"\b(?:[/?#]\S*)?)",  # bare domain[/path]
    re.IGNORECASE,
)
_EMAIL = re.compile(r"\b[\w.+-]+@[\w-]+(?:\.[\w-]+)+\b")
_HANDLE = re.compile(r"(?<!\w)@\w+")
_TAG = re.compile(r"<\s*/?\s*[a-z][^<>]{0,300}>", re.IGNORECASE)
_FILENAME = re.compile(r"\S+\.(?:png|jpe?g|gif|bmp|webp|tiff?|svg|eps|pdf|mp4|apk)\b", re.IGNORECASE)
_LONG_NUMBER = re.compile(r"\b\d{6,}\b")  # stock-photo and article ids
_HASH_NUMBER = re.compile(r"#\d+\b")
_DASHES = re.compile(r"[\u2010-\u2015\u2212\u2e3a\u2e3b\ufe58\ufe63\uff0d\u058a\u05be]")
_DOUBLE_QUOTES = re.compile(r"[\u201c\u201d\u201e\u201f\u00ab\u00bb\u2033`\u00b4]")
_SINGLE_QUOTES = re.compile(r"[\u2018\u2019\u201a\u201b\u2032]")
_DECORATION = re.compile(r"[#*~|\\/^_=<>{}\[\]()\u2022\u00b7\u00a9\u00ae\u2122\u00a7\u00b6\u2605\u2606\u25cf\u25a0]+")
_PUNCT_RUN = re.compile(r"([.!?,;:])[.!?,;:]+")
_SAME_DASH_RUN = re.compile(r"-{2,}")
_QUOTE_RUN = re.compile(r"([\"'])[\"']+")
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([.!?,;:])")
_SPACES = re.compile(r"\s+")
_LEADING = re.compile(r"^[\s.,;:!?-]+")
_TRAILING = re.compile(r"[\s,;:-]+$")
_QUOTED = re.compile(r"^([\"'])([^\"']*)\1$")  # a caption wholly in one pair of quotes
_PERCENT_ESCAPE = re.compile(r"%[0-9a-fA-F]{2}")
_SENTENCE_END = re.compile(r"[.!?](?=\s|$)")


def _one_pass(text: str) -> str:
    if _PERCENT_ESCAPE.search(text):
        text = urllib.parse.unquote(text)
    for _ in range(3):  # "&amp;quot;" needs two rounds; stop once stable
        unescaped = html.unescape(text)
        if unescaped == text:
            break
        text = unescaped
    text = unicodedata.normalize("NFC", text)
    text = text.replace("\\n", " ").replace("\\t", " ")
    text = "".join(" " if unicodedata.category(c)[0] in "CZ" else c for c in text)  # control/odd spaces
    text = text.lower()
    text = re.sub(r"<\s*person\s*>", "person", text)
    text = _TAG.sub(" ", text)
    text = _EMAIL.sub(" ", text)
    text = _URL.sub(" ", text)
    text = _HANDLE.sub(" ", text)
    text = _FILENAME.sub(" ", text)
    text = _LONG_NUMBER.sub(" ", text)
    text = _HASH_NUMBER.sub(" ", text)
    text = _DASHES.sub("-", text)
    text = _DOUBLE_QUOTES.sub('"', text)
    text = _SINGLE_QUOTES.sub("'", text)
    text = _DECORATION.sub(" ", text)
    text = _SAME_DASH_RUN.sub("-", text)
    text = _QUOTE_RUN.sub(r"\1", text)
    text = _SPACES.sub(" ", text)
    text = _SPACE_BEFORE_PUNCT.sub(r"\1", text)
    text = _PUNCT_RUN.sub(r"\1", text)
    text = _LEADING.sub("", text)
    text = _TRAILING.sub("", text)
    text = _QUOTED.sub(r"\2", text.strip())
    return text.strip()


def clean_caption(text: str) -> str:
    """Lower-cased caption without links, markup, handles, file names, ids and punctuation noise.

    >>> clean_caption("Cute CAT!!!  <b>photo</b> https://example.com/cat.jpg @bob")
    'cute cat! photo'
    """
    text = str(text)
    for _ in range(4):  # each pass can expose more (an entity that decodes to a tag); stop once stable
        cleaned = _one_pass(text)
        if cleaned == text:
            break
        text = cleaned
    return text


def first_sentence(text: str) -> str:
    """The caption up to and without its first sentence end ('.', '!' or '?' followed by a space or the end).

    A dot inside a number or a name ("3.5", "node.js") does not end a sentence. A caption without one is returned whole.
    """
    text = str(text).strip()
    m = _SENTENCE_END.search(text)
    return text[: m.start()].strip() if m else text
