"""The `wt` command (`commands`) and what it shows and reads: model references, reports, checkpoint analysis,
the floor-ratio benchmark and the API reference generator. Importing it does not import torch."""

from .commands import build_parser, main, parse_spec

__all__ = ["build_parser", "main", "parse_spec"]
