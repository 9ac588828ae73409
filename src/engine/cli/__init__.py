"""The command line (``python -m engine``, ``engine``): see :mod:`engine.cli.commands`."""
from engine.cli.commands import main

__all__ = ["main"]
