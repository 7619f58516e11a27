"""Generate the API reference (docs/api.md) from docstrings: `python -m wtfront.cli.apidoc > docs/api.md`.

Every public module of `wtcore` and `wtfront` with an `__all__` contributes the names it defines, with
signatures and docstrings (re-exports are documented where they are defined; a package lists its exports with
their modules); the registered calculation specs get a table of their options. tests/test_cli.py checks that
docs/api.md is what this prints, so the reference cannot drift from the code: after changing a docstring or
signature, regenerate it.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
import sys
from collections.abc import Iterator
from types import ModuleType
from typing import Any

__all__ = ["render"]

PACKAGES = ("wtcore", "wtfront")
_ADDRESS = re.compile(r" at 0x[0-9a-f]+")


def _modules() -> Iterator[ModuleType]:
    for pkg_name in PACKAGES:
        pkg = importlib.import_module(pkg_name)
        yield pkg
        for info in sorted(pkgutil.walk_packages(pkg.__path__, pkg_name + "."), key=lambda i: i.name):
            if any(part.startswith("_") for part in info.name.split(".")):
                continue
            yield importlib.import_module(info.name)


def _default(value: Any) -> str:
    """repr without memory addresses, with sets sorted (their order follows the per-process hash seed)."""
    if isinstance(value, (set, frozenset)):
        inner = ", ".join(sorted(_default(v) for v in value))
        return f"{type(value).__name__}({{{inner}}})" if value else f"{type(value).__name__}()"
    if isinstance(value, dict) and any(isinstance(v, (set, frozenset)) for v in value.values()):
        return "{" + ", ".join(f"{k!r}: {_default(v)}" for k, v in value.items()) + "}"
    return _ADDRESS.sub("", repr(value))


def signature(obj: Any) -> str:
    """`name(a, b: int = 1, *, c=None) -> T`, annotations as written in the source, no memory addresses."""
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return ""
    parts: list[str] = []
    star = False
    params = list(sig.parameters.values())
    if inspect.isclass(obj) and params and params[0].name == "self":
        params = params[1:]
    for i, p in enumerate(params):
        if p.kind is p.KEYWORD_ONLY and not star:
            parts.append("*")
            star = True
        text = {p.VAR_POSITIONAL: "*", p.VAR_KEYWORD: "**"}.get(p.kind, "") + p.name
        star = star or p.kind is p.VAR_POSITIONAL
        if p.annotation is not p.empty:
            text += f": {p.annotation if isinstance(p.annotation, str) else inspect.formatannotation(p.annotation)}"
        if p.default is not p.empty:
            text += f" = {_default(p.default)}"
        parts.append(text)
        if p.kind is p.POSITIONAL_ONLY and (i + 1 == len(params) or params[i + 1].kind is not p.POSITIONAL_ONLY):
            parts.append("/")
    ret = sig.return_annotation
    tail = "" if ret is sig.empty or inspect.isclass(obj) else \
        f" -> {ret if isinstance(ret, str) else inspect.formatannotation(ret)}"
    return f"({', '.join(parts)}){tail}"


def _doc(obj: Any) -> str:
    doc = inspect.getdoc(obj) or ""
    return doc.replace("```python", "```text")  # examples in docstrings are shown, not run by the docs test


def _members(cls: type) -> Iterator[tuple[str, Any]]:
    for name, value in vars(cls).items():
        if name.startswith("_") or not (inspect.getdoc(value) if not isinstance(value, property) else value.__doc__):
            continue
        if isinstance(value, (staticmethod, classmethod)):
            value = value.__func__
        if inspect.isfunction(value) or isinstance(value, property) or hasattr(value, "func"):
            yield name, value


def _render_object(module: str, name: str, obj: Any, out: list[str]) -> None:
    if inspect.isclass(obj):
        out.append(f"### class `{module}.{name}{signature(obj)}`\n")
        if _doc(obj):
            out.append(_doc(obj) + "\n")
        for mname, member in _members(obj):
            if isinstance(member, property) or hasattr(member, "func"):  # property / cached_property
                out.append(f"- **`{mname}`** (property): {_doc(member).splitlines()[0] if _doc(member) else ''}")
            else:
                first = _doc(member).split("\n\n")[0].replace("\n", " ")
                out.append(f"- **`{mname}{signature(member)}`**: {first}")
        out.append("")
    elif callable(obj):
        out.append(f"### `{module}.{name}{signature(obj)}`\n")
        if _doc(obj):
            out.append(_doc(obj) + "\n")
    else:
        text = _default(obj)
        # a long value by its type alone: a registry's size changes with what users (docs, tests) register
        short = text if len(text) <= 300 else type(obj).__name__
        out.append(f"### `{module}.{name}`\n")
        out.append(f"`{short}`\n")


def _specs(out: list[str]) -> None:
    import wtcore

    out.append("## Calculation specs\n")
    out.append("Registered with `wtcore.define_spec`; request them by name or as `wtcore.Spec(name, **options)`.\n")
    out.append("| spec | options (defaults) | depends on | what it computes |")
    out.append("|---|---|---|---|")
    for name in sorted(wtcore.REGISTRY):
        d = wtcore.REGISTRY[name]
        if not d.fn.__module__.startswith("wtcore.specs."):  # user specs (docs, tests) are not the library's API
            continue
        opts = ", ".join(f"`{k}={_default(v)}`" for k, v in d.defaults) or "—"
        first = (d.doc.split("\n\n")[0] if d.doc else "").replace("\n", " ").replace("|", "\\|")
        out.append(f"| `{name}` | {opts} | {', '.join(d.deps) or '—'} | {first} |")
    out.append("")


def render() -> str:
    """The whole reference as Markdown."""
    out = [
        "# API reference",
        "",
        "Generated from the docstrings by `python -m wtfront.cli.apidoc > docs/api.md` (a test checks it is current).",
        "The guides are listed in [index.md](index.md); the `wt` command is in [cli.md](cli.md).",
        "",
    ]
    _specs(out)
    for mod in _modules():
        names = [n for n in getattr(mod, "__all__", ()) if getattr(getattr(mod, n, None), "__module__", mod.__name__)
                 == mod.__name__ or not hasattr(getattr(mod, n, None), "__module__")]
        names = [n for n in names if hasattr(mod, n) and not isinstance(getattr(mod, n), ModuleType)]  # own section
        exported = [n for n in getattr(mod, "__all__", ()) if hasattr(mod, "__path__") and n not in names]
        if not names and not exported:
            continue
        out.append(f"## `{mod.__name__}`\n")
        if mod.__doc__:
            out.append(_doc(mod).split("\n\n")[0] + "\n")
        if exported:  # a package's exports are documented where they are defined
            out.append(", ".join(f"`{n}` ({getattr(mod, n).__module__})" for n in exported) + "\n")
        for n in names:
            _render_object(mod.__name__, n, getattr(mod, n), out)
    return "\n".join(out).rstrip() + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
