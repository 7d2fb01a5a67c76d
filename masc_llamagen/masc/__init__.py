"""MASC: the codebook's average-linkage tree, its cuts, and the baseline mappings behind the same interface.

Names are loaded on first use, so ``python -m masc_llamagen.masc.tree`` does not import its own module twice.
"""

from importlib import import_module

_EXPORTS = {
    "tree": ("Cut", "Fingerprint", "Tree", "TreeError", "build_tree", "load_codebook", "load_tree",
             "verify_fingerprint"),
    "mappings": ("MAPPING_METHODS", "MemberTable", "build_mapping", "cluster_members", "cluster_sizes"),
}
_WHERE = {name: mod for mod, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
