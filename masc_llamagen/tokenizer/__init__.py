"""Image tokenizers (LlamaGen's VQ)."""

from masc_llamagen.tokenizer.vq import VQ_CONFIGS, VectorQuantizer, VQConfig, VQLosses, VQModel, build_vq

__all__ = ["VQ_CONFIGS", "VQConfig", "VQLosses", "VQModel", "VectorQuantizer", "build_vq"]
