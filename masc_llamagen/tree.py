"""``python -m masc_llamagen.tree {build,cut,stats}``: the CLI of masc_llamagen.masc.tree under a short name."""

import sys

from masc_llamagen.masc.tree import main

if __name__ == "__main__":
    sys.exit(main())
