"""Caption features for text-to-image: encoders (flan-t5-xl / any local T5, wordllama), caption cleaning, a packed
resumable feature store, and readers for LlamaGen's caption and feature layouts."""

from masc_llamagen.text.clean import clean_caption, first_sentence
from masc_llamagen.text.encoders import (
    DEFAULT_MAX_LENGTH,
    ENCODER_NAMES,
    T5TextEncoder,
    TextEncoder,
    TextEncoderError,
    WordLlamaEncoder,
    build_text_encoder,
)
from masc_llamagen.text.llamagen import (
    CAPTION_KEYS,
    LlamaGenT5Features,
    jsonl_stem,
    llamagen_captions,
    read_llamagen_jsonl,
)
from masc_llamagen.text.store import (
    TextFeatureStore,
    TextStoreError,
    captions_sha256,
    extract_text_features,
    finalize_text_features,
)

__all__ = [
    "CAPTION_KEYS",
    "DEFAULT_MAX_LENGTH",
    "ENCODER_NAMES",
    "LlamaGenT5Features",
    "T5TextEncoder",
    "TextEncoder",
    "TextEncoderError",
    "TextFeatureStore",
    "TextStoreError",
    "WordLlamaEncoder",
    "build_text_encoder",
    "captions_sha256",
    "clean_caption",
    "extract_text_features",
    "finalize_text_features",
    "first_sentence",
    "jsonl_stem",
    "llamagen_captions",
    "read_llamagen_jsonl",
]
