"""From a head config and a tokenizer's codebook to the Vocabulary a model trains on.

Trees are built once per (codebook, linkage, normalisation) and cached by codebook fingerprint, so every k of a sweep
cuts the same dendrogram; a tree given explicitly is checked against the codebook in use.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from masc_llamagen.masc.heads import HeadError, Vocabulary, build_vocabulary
from masc_llamagen.masc.linkage import check_k
from masc_llamagen.masc.mappings import LINKAGES, MAPPING_METHODS, build_mapping
from masc_llamagen.masc.members import validate_mapping
from masc_llamagen.masc.tree import build_tree, codebook_sha256, load_tree, save_mapping, verify_fingerprint

HEADS = ("flat", *MAPPING_METHODS)


def tree_for(codebook: np.ndarray, method: str, normalize: bool, tree_path: str | None, cache_dir: Path):
    """Load (and verify) or build-and-cache the dendrogram of ``codebook``."""
    if tree_path:
        tree = load_tree(tree_path)
        verify_fingerprint(tree.fingerprint, codebook, source="the tokenizer in use")
        if tree.method != method or tree.normalized != normalize:
            raise HeadError(f"tree {tree_path} was built with method={tree.method}, normalize={tree.normalized} but "
                            f"the head asks for method={method}, normalize={normalize}; rebuild or change the head")
        return tree
    sha = codebook_sha256(np.asarray(codebook, dtype=np.float32))[:16]
    path = Path(cache_dir) / f"tree-{method}-{'l2' if normalize else 'raw'}-{sha}.npz"
    if path.is_file():
        tree = load_tree(path)
        verify_fingerprint(tree.fingerprint, codebook, source="the tokenizer in use")
        return tree
    tree = build_tree(codebook, normalize=normalize, method=method)
    tree.save(path)
    return tree


def mapping_for(codebook: np.ndarray, method: str, k: int, seed: int, normalize: bool, cache_dir: Path) -> np.ndarray:
    """Baseline mappings (k-means takes minutes at N = 16384) are computed once per codebook and cached."""
    sha = codebook_sha256(np.asarray(codebook, dtype=np.float32))[:16]
    path = Path(cache_dir) / f"mapping-{method}-k{k}-seed{seed}-{'l2' if normalize else 'raw'}-{sha}.npy"
    if path.is_file():
        return validate_mapping(np.load(path, allow_pickle=False), int(codebook.shape[0]), k, source=str(path))
    mapping = build_mapping(method, codebook, k, seed=seed, normalize=normalize)
    save_mapping(path, mapping)
    return mapping


def vocabulary_from_config(head: Any, codebook: np.ndarray, counts: np.ndarray | None,
                           cache_dir: Path) -> tuple[Vocabulary, dict]:
    """(Vocabulary, provenance dict) for a head config (name, k, decoder, smoothing, normalize, seed, tree)."""
    name = head.name
    n = int(codebook.shape[0])
    if name not in HEADS:
        raise HeadError(f"unknown head {name!r}; choose one of {', '.join(HEADS)}")
    info: dict = {"head": name, "codebook_sha256": codebook_sha256(np.asarray(codebook, dtype=np.float32))}
    if name == "flat":
        return build_vocabulary("flat", n), info
    k = check_k(head.k, n)
    if name == "masc" or name in LINKAGES:
        method = "average" if name == "masc" else name
        tree = tree_for(codebook, method, head.normalize, head.tree, cache_dir)
        mapping = tree.mapping(k)
        info.update(tree_method=method, tree_normalized=tree.normalized)
    else:
        mapping = mapping_for(codebook, name, k, head.seed, head.normalize, cache_dir)
        info.update(seed=head.seed, normalized=head.normalize)
    voc = build_vocabulary(name, n, mapping, decoder=head.decoder, counts=counts, smoothing=head.smoothing)
    info.update(k=k, decoder=head.decoder)
    return voc, info
