"""``csg-counterfactual``'s entry point (also ``python -m csg.cli``); the command lives in
``csg.commands.counterfactual``."""

import sys

from .commands.counterfactual import build_parser, main

__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    sys.exit(main())
