"""``csg-evaluate``'s entry point (also ``python -m csg.evaluate``, as ``accelerate launch -m csg.evaluate``
starts it); the command lives in ``csg.commands.evaluate``."""

import sys

from .commands.evaluate import build_parser, main

__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    sys.exit(main())
