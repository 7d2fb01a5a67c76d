"""``python -m masc_llamagen.tree action=build|cut|stats ...``: the tree job (masc_llamagen.masc.tree_cli)."""

from masc_llamagen.masc.tree_cli import main

if __name__ == "__main__":
    main()
