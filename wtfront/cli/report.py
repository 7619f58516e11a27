"""Rich tables of a structure and of metrics, for the `wt` command (and for notebooks: `rich` renders there too).

Each function returns a `rich.table.Table` (or `None` when there is nothing to show); `console()` makes a
console that keeps its width when the output is piped, so tables stay readable in logs and tests.
Every table that shows MACs says that 1 MAC = one multiply-add.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import IO, Any

from wtcore.errors import WtError
from wtcore.ir import Structure, UnitGroup

from ..tracing.units import HEAD_KINDS

__all__ = [
    "add_row",
    "analysis_table",
    "collapse_summary",
    "comparison_table",
    "console",
    "fmt_count",
    "groups_table",
    "heads_table",
    "ops_table",
    "params_table",
    "phases",
    "summary_line",
    "table",
    "values_table",
]

def _rich() -> Any:
    try:
        import rich  # noqa: F401
        from rich import box
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        raise WtError("the wt command's tables need rich: pip install rich") from None
    return Console, Table, box


def console(file: IO[str] | None = None, width: int | None = None) -> Any:
    """A console on `file` (stdout by default); when it is not a terminal, 160 columns (not rich's 80)."""
    Console, _, _ = _rich()
    stream = file if file is not None else sys.stdout
    if width is None and not (hasattr(stream, "isatty") and stream.isatty()):
        width = max(160, shutil.get_terminal_size((160, 24)).columns)
    return Console(file=file, width=width, highlight=False, soft_wrap=False)


@contextmanager
def phases(first: str) -> Iterator[Callable[[str], None]]:
    """A spinner with the current phase and the elapsed time on stderr (transient; silent when stderr is not a
    terminal), for the steps of a command that have no known length (tracing, pruning, timing). Yields a
    function that names the next phase."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                  console=console(sys.stderr), transient=True) as bar:
        task = bar.add_task(first, total=None)
        yield lambda text: bar.update(task, description=text)


def fmt_count(n: float) -> str:
    """`1234567` → `1.23M`; small numbers stay exact (`512`)."""
    a = abs(n)
    for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if a >= div:
            return f"{n / div:.3g}{suffix}"
    return f"{n:.4g}" if n != int(n) else str(int(n))


def table(title: str, columns: Sequence[tuple[str, str]], caption: str | None = None) -> Any:
    """An empty table in the style of the others: `columns` are (name, justify) pairs."""
    _, Table, box = _rich()
    t = Table(title=title, caption=caption, box=box.SIMPLE_HEAD, title_justify="left", caption_justify="left")
    for name, justify in columns:
        t.add_column(name, justify=justify, overflow="fold")
    return t


def add_row(t: Any, *cells: object) -> None:
    """Add a row of plain-text cells: names like `conv[3]` or `[group]` must not be read as rich markup."""
    from rich.text import Text

    t.add_row(*(Text(str(c)) for c in cells))


def _limit(n: int, rows: int | None) -> int:
    return n if not rows or rows <= 0 else min(n, rows)


def _more(t: Any, shown: int, total: int, what: str) -> None:
    if shown < total:
        add_row(t, "…", *[""] * (len(t.columns) - 1))
        t.caption = f"{total - shown} more {what} (--rows 0 shows all)"


def _members(g: UnitGroup, limit: int = 3) -> str:
    mods = list(dict.fromkeys(p.rsplit(".", 1)[0] if "." in p else p for p in g.params))
    head = ", ".join(mods[:limit])
    return head + (f", … (+{len(mods) - limit})" if len(mods) > limit else "")


def summary_line(structure: Structure) -> str:
    n = sum(p.numel for p in structure.params)
    macs = sum(o.macs for o in structure.ops)
    prunable = sum(g.size for g in structure.groups if g.prunable)
    return (f"{structure.model or 'model'}: {len(structure.groups)} unit groups, {structure.num_units} units "
            f"({prunable} prunable), {len(structure.params)} parameters ({fmt_count(n)} elements), "
            f"{len(structure.ops)} cost ops, {fmt_count(macs)} MACs (1 MAC = one multiply-add) "
            f"[fingerprint {structure.fingerprint}]")


def groups_table(structure: Structure, rows: int | None = None) -> Any:
    """Unit groups: kind, units (active size / original size after physical pruning), prunable (or why not),
    slices and member modules."""
    t = table("Unit groups", [("#", "right"), ("group", "left"), ("kind", "left"), ("units", "right"),
                               ("prunable", "left"), ("slices", "right"), ("members", "left")])
    n = _limit(len(structure.groups), rows)
    for i, g in enumerate(structure.groups[:n]):
        size = f"{g.size}" if g.size == g.baseline_size else f"{g.size}/{g.baseline_size}"
        add_row(t, str(i), g.name, g.kind, size, "yes" if g.prunable else f"no: {g.reason}", str(len(g.slices)),
                  _members(g))
    _more(t, n, len(structure.groups), "groups")
    return t


def heads_table(structure: Structure) -> Any | None:
    """Groups of attention heads, KV heads and head dimensions (kinds `HEAD_KINDS`), or None if there are none."""
    heads = [g for g in structure.groups if g.kind in HEAD_KINDS]
    if not heads:
        return None
    t = table("Attention heads", [("group", "left"), ("kind", "left"), ("units", "right"), ("prunable", "left"),
                                   ("members", "left")])
    for g in heads:
        add_row(t, g.name, g.kind, str(g.size), "yes" if g.prunable else f"no: {g.reason}", _members(g))
    return t


def _axes(structure: Structure, op: Any) -> str:
    parts = []
    for a in op.axes:
        gs = a.groups
        tail = f"[{gs[0]}{f' +{len(gs) - 1}' if len(gs) > 1 else ''}]" if gs else ""
        parts.append(f"{a.name}={a.size}{tail}")
    return " × ".join(parts)


def ops_table(structure: Structure, rows: int | None = None) -> Any | None:
    """Cost ops with their MACs (1 MAC = one multiply-add), share of the total, and axes (with the unit group
    each prunable axis follows). None if the structure has no cost ops."""
    if not structure.ops:
        return None
    total = sum(o.macs for o in structure.ops) or 1
    t = table(f"Cost ops: {fmt_count(total)} MACs in total (1 MAC = one multiply-add)",
               [("op", "left"), ("kind", "left"), ("MACs", "right"), ("share", "right"), ("axes", "left")])
    n = _limit(len(structure.ops), rows)
    for o in structure.ops[:n]:
        add_row(t, o.name, o.kind, fmt_count(o.macs), f"{100 * o.macs / total:.1f}%", _axes(structure, o))
    _more(t, n, len(structure.ops), "ops")
    return t


def params_table(structure: Structure, rows: int | None = None) -> Any:
    """Parameters by canonical name: shape, elements, share, the unit groups that slice them, aliases (ties)."""
    total = sum(p.numel for p in structure.params) or 1
    groups_of: dict[str, list[str]] = {}
    for g in structure.groups:
        for s in g.slices:
            groups_of.setdefault(s.param, []).append(f"{g.name}@{s.axis}")
    t = table(f"Parameters: {fmt_count(total)} elements",
               [("parameter", "left"), ("shape", "left"), ("elements", "right"), ("share", "right"),
                ("groups (axis)", "left"), ("aliases", "left")])
    n = _limit(len(structure.params), rows)
    for p in structure.params[:n]:
        gs = groups_of.get(p.name, [])
        shown = ", ".join(gs[:2]) + (f", +{len(gs) - 2}" if len(gs) > 2 else "") if gs else "(none)"
        add_row(t, p.name, "×".join(map(str, p.shape)) or "scalar", fmt_count(p.numel),
                  f"{100 * p.numel / total:.1f}%", shown, ", ".join(p.aliases))
    _more(t, n, len(structure.params), "parameters")
    return t


def _value(v: Any) -> str:
    if hasattr(v, "numel") and v.numel() == 1:
        v = float(v)
    if isinstance(v, float):
        return f"{v:.6g}"
    if hasattr(v, "shape"):
        return f"tensor of shape {tuple(v.shape)}, {str(v.dtype).replace('torch.', '')}"
    return str(v)


def values_table(structure: Structure, values: Mapping[str, Any], title: str = "Program outputs") -> Any:
    """Outputs of a program: scalars printed, tensors summarized (active units per group are totalled)."""
    t = table(title, [("output", "left"), ("value", "right")])
    for key, v in values.items():
        if key.endswith("group_active_units") and getattr(v, "dim", lambda: 0)() == 1:
            add_row(t, key, f"{int(v.sum())}/{structure.num_units} units active in {len(structure.groups)} groups")
        else:
            add_row(t, key, _value(v))
    return t


def comparison_table(before: Structure, after: Structure, rows: int | None = None) -> Any:
    """Before/after physical pruning: MACs (1 MAC = one multiply-add), parameters and units per group."""
    t = table("Before → after", [("", "left"), ("before", "right"), ("after", "right"), ("kept", "right")])

    def row(label: str, a: float, b: float) -> None:
        add_row(t, label, fmt_count(a), fmt_count(b), f"{100 * b / a:.1f}%" if a else "")

    row("MACs (1 MAC = one multiply-add)", sum(o.macs for o in before.ops), sum(o.macs for o in after.ops))
    row("parameters", sum(p.numel for p in before.params), sum(p.numel for p in after.params))
    row("units", before.num_units, after.num_units)
    sizes = {g.name: g.size for g in after.groups}
    changed = [g for g in before.groups if sizes.get(g.name, g.size) != g.size]
    n = _limit(len(changed), rows)
    for g in changed[:n]:
        row(f"  {g.name} ({g.kind})", g.size, sizes[g.name])
    if n < len(changed):
        add_row(t, "  …", "", "", "")
        t.caption = f"{len(changed) - n} more groups changed (--rows 0 shows all)"
    return t


def analysis_table(analysis: Any, metrics: Sequence[str] = ("group_lasso", "macs_ratio", "params_ratio", "sparsity",
                                                             "active_units", "units_below_threshold",
                                                             "collapsed_units", "macs_ratio_pruned")) -> Any:
    """One row per checkpoint of a `wtfront.cli.analyze.Analysis`."""
    t = table(f"{analysis.model}: {len(analysis.checkpoints)} checkpoints (ratios of the unpruned model; "
               "1 MAC = one multiply-add)", [("checkpoint", "left"), *((m, "right") for m in metrics)])
    for c in analysis.checkpoints:
        add_row(t, c.label, *(_value(float(c.scalars[m])) for m in metrics))
    return t


def collapse_summary(analysis: Any) -> str:
    """What the unit norms say: the suggested threshold and the gap it sits in, the first checkpoint where the
    collapse is complete and the MACs left there if the collapsed units were pruned, and skipped files."""
    lines = []
    gap = analysis.gap
    if gap is None:
        lines.append("no gap in the size-normalized unit norms (L2 / sqrt(elements)): no units have collapsed yet")
    else:
        where = analysis.checkpoints[gap.checkpoint].label
        lines.append(f"suggested threshold {gap.threshold:.3g} on size-normalized unit norms (L2 / sqrt(elements)): "
                     f"{gap.units_below} units below, {gap.separation:.1f} decades under the rest, in {where}")
        ready = analysis.ready
        if ready is not None:
            lines.append(f"ready to prune: {ready.label}: {int(ready.scalars['collapsed_units'])} of "
                         f"{int(ready.scalars['units'])} units collapsed; pruning them leaves "
                         f"{ready.scalars['macs_ratio_pruned']:.3f} of the MACs")
    if analysis.skipped:
        lines.append(f"skipped {len(analysis.skipped)} unreadable file(s): {', '.join(analysis.skipped[:3])}")
    return "\n".join(lines)
