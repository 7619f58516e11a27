"""Compile filters: which parameters (and so which slices) a program reads, by name or glob."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence

from .errors import SpecError
from .ir import Slice, Structure

__all__ = ["matches", "select_slices"]


def matches(patterns: Sequence[str], param: str, module: str) -> bool:
    """Whether a pattern (fnmatch glob, or a module name selecting everything below it) names the parameter
    or its module."""
    for pat in patterns:
        for name in (param, module):
            if fnmatch.fnmatchcase(name, pat) or (name and (name.startswith(pat + ".") or name == pat)):
                return True
    return False


def select_slices(
    structure: Structure, include: Iterable[str] | None = None, ignore: Iterable[str] | None = None
) -> dict[str, tuple[Slice, ...]]:
    """The slices kept by the filters, per group. Patterns are parameter or module names, or fnmatch globs;
    a module name also selects everything below it."""
    inc = list(include) if include is not None else None
    ign = list(ignore or ())
    if inc is not None and not any(matches(inc, p.name, p.module) for p in structure.params):
        raise SpecError(f"include={inc!r} matches no parameter or module of the structure")
    out: dict[str, tuple[Slice, ...]] = {}
    for g in structure.groups:
        kept = []
        for s in g.slices:
            p = structure.param_map[s.param]
            if inc is not None and not matches(inc, p.name, p.module):
                continue
            if ign and matches(ign, p.name, p.module):
                continue
            kept.append(s)
        out[g.name] = tuple(kept)
    return out
