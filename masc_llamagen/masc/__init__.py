"""MASC: the codebook's average-linkage tree, its cuts, and the baseline mappings behind the same interface.

Modules, bottom up: ``linkage`` (the algorithm), ``members`` (a mapping's validator and member table), ``tree``
(the tree file), ``mappings`` (baselines), ``vocabulary`` (torch: the Vocabulary a head names), ``tree_cli`` and
``replacement`` (the jobs). Import names from their module; importing the package itself loads nothing, so
``python -m masc_llamagen.masc.tree_cli`` does not import its own module twice.
"""

