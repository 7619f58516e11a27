"""wtfront: lowers nn.Module models to the wt IR and binds programs to live models.

The names below are what a user calls; each is imported from its module on first use (PEP 562), so
`import wtfront` (and the `wt` command's `--help`) does not import torch. The modules, by concern:
`tracing` (trace a model), `costs` (MACs, bit widths), `prune` (masks, physical pruning, checkpoints),
`train` (tracker, decay, schedules, controller), `cli` (the `wt` command, model references, analysis),
`integrations` (timm, nn.MultiheadAttention, transformers) and `modules` (nn.Module helpers).
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

try:
    __version__ = version("wt")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"

#: exported name -> the module that defines it
_EXPORTS: dict[str, str] = {
    "trace": "wtfront.tracing.entry",
    "effective_params": "wtfront.modules",
    "WeightTracker": "wtfront.train.tracker",
    "ChannelDecay": "wtfront.train.decay",
    "Schedule": "wtfront.train.schedule",
    "ScheduleError": "wtfront.train.schedule",
    "Controller": "wtfront.train.controller",
    "ControllerConfig": "wtfront.train.controller",
    "ControllerError": "wtfront.train.controller",
    "FakePruning": "wtfront.prune.masks",
    "apply_masks": "wtfront.prune.masks",
    "view_zero_units": "wtfront.prune.masks",
    "prune_units": "wtfront.prune.physical",
    "prune_zero_units": "wtfront.prune.physical",
    "PruneError": "wtfront.prune.checks",
    "lossy_groups": "wtfront.prune.checks",
    "register_metadata_hook": "wtfront.prune.metadata",
    "save_pruned": "wtfront.prune.checkpoint",
    "load_pruned": "wtfront.prune.checkpoint",
    "CheckpointError": "wtfront.prune.checkpoint",
    "export_torch_prune": "wtfront.prune.torch_prune",
    "load_model": "wtfront.cli.models",
    "analyze": "wtfront.cli.analyze",
    "AnalysisError": "wtfront.cli.analyze",
}

__all__ = [
    "AnalysisError",
    "ChannelDecay",
    "CheckpointError",
    "Controller",
    "ControllerConfig",
    "ControllerError",
    "FakePruning",
    "PruneError",
    "Schedule",
    "ScheduleError",
    "WeightTracker",
    "analyze",
    "apply_masks",
    "effective_params",
    "export_torch_prune",
    "load_model",
    "load_pruned",
    "lossy_groups",
    "prune_units",
    "prune_zero_units",
    "register_metadata_hook",
    "save_pruned",
    "trace",
    "view_zero_units",
]

if TYPE_CHECKING:  # what the lazy imports resolve to, for type checkers and editors
    from .cli.analyze import AnalysisError, analyze
    from .cli.models import load_model
    from .modules import effective_params
    from .prune.checkpoint import CheckpointError, load_pruned, save_pruned
    from .prune.checks import PruneError, lossy_groups
    from .prune.masks import FakePruning, apply_masks, view_zero_units
    from .prune.metadata import register_metadata_hook
    from .prune.physical import prune_units, prune_zero_units
    from .prune.torch_prune import export_torch_prune
    from .tracing.entry import trace
    from .train.controller import Controller, ControllerConfig, ControllerError
    from .train.decay import ChannelDecay
    from .train.schedule import Schedule, ScheduleError
    from .train.tracker import WeightTracker


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'wtfront' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
