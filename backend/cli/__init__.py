"""`tridentloop` command line (`python -m backend.cli`, the `tridentloop` script)."""

from .args import recipe_overrides
from .main import build_parser, main

__all__ = ["build_parser", "main", "recipe_overrides"]
