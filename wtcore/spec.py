"""Calculation specs: named, parametrized recipes that emit equations through a `Builder`.

A spec is a function `fn(ctx, **options) -> Var | dict[str, Var]` registered with `define_spec`.
Built-in specs use exactly this API, so a user's spec is a first-class citizen:

    @wtcore.define_spec("unit_linf_proxy", deps=("unit_sumsq",))
    def unit_rms(ctx, eps: float = 0.0):
        b = ctx.b
        return b.safe_sqrt(b.div(ctx.dep("unit_sumsq"), b.maximum(ctx.params_per_unit(), 1.0)))
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .errors import SpecError
from .lang import Var

__all__ = ["REGISTRY", "Spec", "SpecDef", "as_spec", "define_spec"]


@dataclass(frozen=True)
class SpecDef:
    name: str
    fn: Callable[..., Var | Mapping[str, Var]]
    deps: tuple[str, ...]
    defaults: tuple[tuple[str, Any], ...]
    doc: str = ""


REGISTRY: dict[str, SpecDef] = {}


def define_spec(
    name: str | None = None, *, deps: tuple[str, ...] = (), replace: bool = False
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a spec. Keyword arguments of `fn` (after `ctx`) are its options, with their defaults."""

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        spec_name = name or fn.__name__
        if spec_name in REGISTRY and not replace and REGISTRY[spec_name].fn is not fn:
            raise SpecError(f"a spec named {spec_name!r} is already defined; pass replace=True to redefine it")
        params = list(inspect.signature(fn).parameters.values())[1:]
        for p in params:
            if p.default is inspect.Parameter.empty:
                raise SpecError(f"spec {spec_name!r}: option {p.name!r} needs a default value")
        defaults = tuple((p.name, p.default) for p in params)
        REGISTRY[spec_name] = SpecDef(spec_name, fn, tuple(deps), defaults, inspect.getdoc(fn) or "")
        return fn

    return deco


@dataclass(frozen=True, init=False)
class Spec:
    """A request for a spec with options, e.g. `Spec("group_lasso", weighted=False, key="gl_plain")`."""

    name: str
    options: tuple[tuple[str, Any], ...]
    key: str

    def __init__(self, name: str, key: str | None = None, **options: Any) -> None:
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "options", tuple(sorted(options.items())))
        object.__setattr__(self, "key", key or name)

    def resolved(self) -> tuple[SpecDef, dict[str, Any]]:
        d = REGISTRY.get(self.name)
        if d is None:
            raise SpecError(f"unknown spec {self.name!r}; known specs: {', '.join(sorted(REGISTRY))}")
        allowed = dict(d.defaults)
        for k, _ in self.options:
            if k not in allowed:
                raise SpecError(
                    f"spec {self.name!r} has no option {k!r}; its options are: {', '.join(allowed) or '(none)'}"
                )
        return d, {**allowed, **dict(self.options)}


def as_spec(s: str | Spec) -> Spec:
    if isinstance(s, Spec):
        return s
    if isinstance(s, str):
        return Spec(s)
    raise SpecError(f"a spec must be a name or a wtcore.Spec, got {type(s).__name__}")
