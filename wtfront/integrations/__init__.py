"""Metadata sync for model families whose modules record head counts and widths next to their weights.

Importing this package registers the hooks (`wtfront.prune.register_metadata_hook`) that physical pruning
and `load_pruned` run after shapes change; `wtfront.prune` imports it, so no user hook is needed.
"""

from __future__ import annotations

from . import timm, torch_mha, transformers

__all__ = ["timm", "torch_mha", "transformers"]
