"""One exception hierarchy for wt: every failure a user can act on is a `WtError`."""

from __future__ import annotations


class WtError(Exception):
    """Base class of every error wt raises on purpose."""


class StructureError(WtError):
    """The IR is inconsistent (a slice names an unknown parameter, an index is out of range, ...)."""


class TraceError(WtError):
    """A model could not be lowered to the IR (unsupported module, budget exceeded, bad inputs)."""


class SpecError(WtError):
    """A calculation spec is unknown, badly defined or requested with bad options."""


class ParamsError(WtError):
    """The parameter mapping given to a program does not match the structure it was compiled for."""


class StaleProgramError(ParamsError):
    """A program was called with parameters whose shapes belong to a different (e.g. pruned) structure."""
