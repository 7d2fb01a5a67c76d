"""MASC: the codebook's average-linkage tree, its cuts, and the baseline mappings behind the same interface.

Modules, bottom up: ``linkage`` (the algorithm), ``members`` (a mapping's validator and member table), ``tree``
(the tree file), ``mappings`` (baselines), ``vocabulary`` (torch: the Vocabulary a head names), ``tree_cli`` and
``replacement`` (the jobs). Names are loaded on first use, so importing the package costs nothing and
``python -m masc_llamagen.masc.tree_cli`` does not import its own module twice.
"""

from importlib import import_module

_EXPORTS = {
    "linkage": ("METHODS", "TreeError", "canonical_labels", "check_k"),
    "members": ("MemberTable", "cluster_members", "size_summary", "validate_mapping"),
    "tree": ("Cut", "Fingerprint", "Tree", "build_tree", "codebook_sha256", "load_tree", "save_mapping",
             "verify_fingerprint"),
    "mappings": ("MAPPING_METHODS", "build_mapping"),
    "tree_cli": ("load_codebook",),
}
_WHERE = {name: mod for mod, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
