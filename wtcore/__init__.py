"""wtcore: the IR of canonical units and the compiler of structured-sparsity programs.

wtcore knows the IR and tensors only; it never imports wtfront, torch_pruning, fvcore, timm or transformers.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("wt")  # one distribution ships wtcore and wtfront
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"

from .errors import ParamsError, SpecError, StaleProgramError, StructureError, TraceError, WtError
from .ir import CostAxis, CostOp, Param, Run, Slice, Structure, UnitGroup, runs_from_list, runs_to_list

__all__ = [
    "CostAxis",
    "CostOp",
    "Param",
    "ParamsError",
    "Run",
    "Slice",
    "SpecError",
    "StaleProgramError",
    "Structure",
    "StructureError",
    "TraceError",
    "UnitGroup",
    "WtError",
    "runs_from_list",
    "runs_to_list",
]

from . import specs as _builtin_specs  # noqa: F401  (registers the built-in specs)
from .compiler import PASSES, clear_cache, compile, lower
from .filters import select_slices
from .interpret import interpret
from .lang import Builder, Eqn, Graph, Var
from .primitives import PRIMITIVES
from .program import Program
from .spec import REGISTRY, Context, Spec, define_spec

__all__ += ["PASSES", "PRIMITIVES", "REGISTRY", "Builder", "Context", "Eqn", "Graph", "Program", "Spec", "Var",
            "clear_cache", "compile", "define_spec", "interpret", "lower", "select_slices"]
