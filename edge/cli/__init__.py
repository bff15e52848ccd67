"""The ``floorline`` command line (``main``) and its plain-text tables."""

from floorline.edge.cli.main import main

__all__ = ["main"]
