"""The residual width of attention modules whose fused qkv weight is read functionally (Swin, BEiT, EVA-02).

Torch-Pruning follows modules, not `F.linear(x, self.qkv.weight)`: the qkv weight's input columns (the width
the attention reads) and, where the output projection is also read functionally, its output rows are in no
group. `attach_attention_widths` finds the tensor the attention reads by one forward pass with hooks: the
module that produced it (a LayerNorm, say) has a parameter axis in a group, with the same channel order, so
the qkv input columns join that group with that index. Where the attention returns a tensor of its input's
shape, its output rows are that width too (a residual branch). Since Torch-Pruning's walk misses these axes,
physical pruning through it would cut the width everywhere but here: every group they join is not prunable,
with the reason. Where no producer's axis is in a group, they get a group of their own, also not prunable.
The same pass follows the data through parameter-free ops (autograd): the groups of the modules that feed the
attention's input or read its output are not prunable either, so no prunable group can miss these axes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn as nn

from wtcore.ir import Slice, Structure, UnitGroup, runs_from_list

from ..modules import canonical_names
from .attention import AttentionLayout
from .inputs import iter_tensors, run_with_hooks
from .units import HEAD_KINDS

__all__ = ["attach_attention_widths"]

_REASON = (
    "attention {name!r} reads its qkv weight outside the qkv module (F.linear on qkv.weight, or a function given "
    "the weights), which Torch-Pruning's walk does not "
    "follow: its input columns (and output rows) share this width but would not be cut with it, so the "
    "width is not prunable"
)


_SHARED_REASON = (
    "attention {name!r} takes tensors besides its input (e.g. a relative-position bias shared by all blocks), "
    "which wt cannot cut per head: its heads are not prunable"
)


_WALK = 256  # autograd nodes a search for an attention's neighbours visits at most


@dataclass
class _Pass:
    io: dict[str, tuple[torch.Tensor, Any, int]]
    produced: dict[int, list[str]]
    consumed: dict[str, list[torch.Tensor]]
    keep: list[Any]


def _io(model: nn.Module, inputs: tuple[Any, ...] | dict[str, Any], names: Sequence[str]) -> _Pass:
    """One forward pass (autograd on, to follow data through parameter-free ops): each named attention's
    (input tensor, output, number of tensor arguments), the modules producing each tensor (by id; the tensors
    stay referenced until the pass is read, so ids are not reused) and each module's input tensors."""
    run = _Pass({}, {}, {}, [])

    def on_out(name: str):
        def hook(_m: nn.Module, args: Any, out: Any) -> None:
            run.consumed[name] = [t for t in iter_tensors(args) if t.grad_fn is not None]
            for t in iter_tensors(out):
                if t.grad_fn is not None:
                    run.produced.setdefault(id(t.grad_fn), []).append(name)
                run.keep.append(t)

        return hook

    def on_attn(name: str):
        def hook(_m: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
            xs = list(iter_tensors((args, kwargs)))
            if xs and name not in run.io:
                run.io[name] = (xs[0], out, len(xs))

        return hook

    wanted = set(names)
    leaves = [(n, m) for n, m in model.named_modules() if n and not m._modules and m._parameters]
    handles = [m.register_forward_hook(on_out(n)) for n, m in leaves]
    handles += [m.register_forward_hook(on_attn(n), with_kwargs=True) for n, m in model.named_modules() if n in wanted]
    run_with_hooks(model, inputs, handles, grad=True)
    return run


def _reaches(start: Any, stop: Callable[[Any], bool], limit: int = _WALK) -> list[Any]:
    """Autograd nodes upstream of `start` (itself included) where `stop` holds, not walking past them; at most
    `limit` nodes are visited."""
    found, seen, todo = [], set(), [start]
    while todo and len(seen) < limit:
        fn = todo.pop(0)
        if fn is None or id(fn) in seen:
            continue
        seen.add(id(fn))
        if stop(fn):
            found.append(fn)
            continue
        todo.extend(f for f, _ in getattr(fn, "next_functions", ()))
    return found


def _neighbours(run: _Pass, x: torch.Tensor | None, y: Any) -> tuple[set[str], set[str]]:
    """Leaf modules with parameters whose output reaches the attention's input `x`, and those whose input
    derives from its output `y`, through parameter-free ops only (the first such module on each path)."""
    producers: set[str] = set()
    if x is not None and x.grad_fn is not None:
        for fn in _reaches(x.grad_fn, lambda f: id(f) in run.produced):
            producers.update(run.produced[id(fn)])
    ys = {id(t.grad_fn) for t in iter_tensors(y) if t.grad_fn is not None}
    consumers = {
        name
        for name, xs in run.consumed.items()
        for t in xs
        if any(id(fn) in ys for fn in _reaches(t.grad_fn, lambda f: id(f) in run.produced or id(f) in ys))
    }
    return producers, consumers


def _producer_slice(
    model: nn.Module, structure: Structure, producers: Sequence[str], width: int, canon: dict[int, str]
) -> tuple[str, Slice] | None:
    """(group, slice) of the first producer parameter whose axis 0 has `width` entries and is in a group: its
    units are the channels of the produced tensor's last dimension."""
    where = {(s.param, s.axis): (g.name, s) for g in structure.groups for s in g.slices}
    for name in producers:
        mod = model.get_submodule(name)
        if isinstance(mod, nn.modules.conv._ConvNd):  # channels first: not the last dim the attention reads
            continue
        for t in mod.parameters(recurse=False):
            p = canon.get(id(t))
            if p is not None and t.dim() >= 1 and t.shape[0] == width and (p, 0) in where:
                return where[(p, 0)]
    return None


def _unread(model: nn.Module, lay: AttentionLayout, covered: set[tuple[str, int]]) -> bool:
    """A `qkv`/`proj` attention whose qkv input columns Torch-Pruning coupled to nothing."""
    m = model.get_submodule(lay.module)
    linear = all(isinstance(getattr(m, a, None), nn.Linear) for a in ("qkv", "proj"))
    return linear and bool(lay.inputs) and lay.inputs[0] not in covered


def attach_attention_widths(
    structure: Structure, model: nn.Module, layouts: Sequence[AttentionLayout], inputs: tuple[Any, ...] | dict[str, Any]
) -> Structure:
    """Put the input columns of every attention's qkv weight that Torch-Pruning coupled to nothing (read
    functionally: `functional_qkv`, or EVA's `F.linear` with separate biases) and its proj's output rows, if in
    no group, in the group of the width they read, made not prunable; see the module docstring."""
    covered = {(s.param, s.axis) for g in structure.groups for s in g.slices}
    lays = [lay for lay in layouts if lay.family == "functional_qkv" or _unread(model, lay, covered)]
    if not lays:
        return structure
    run = _io(model, inputs, [lay.module for lay in lays])
    where = {(sl.param, sl.axis): g.name for g in structure.groups for sl in g.slices}
    canon = canonical_names(model)
    added: dict[str, list[Slice]] = {}
    blocked: dict[str, str] = {}
    own: list[UnitGroup] = []
    heads_blocked: dict[str, str] = {}
    for lay in lays:
        m = model.get_submodule(lay.module)
        qkv_w, width = lay.inputs[0][0], m.qkv.in_features
        outs = [(canon[id(t)], 0) for t in (m.proj.weight, m.proj.bias) if t is not None and id(t) in canon]
        free_outs = [k for k in outs if k not in covered]
        reason = _REASON.format(name=lay.module)
        x, y, n_in = run.io.get(lay.module, (None, None, 0))
        if n_in > 1 and lay.family == "functional_qkv":  # e.g. a relative-position bias shared by all blocks: its
            # heads cannot be cut per module (EVA's second tensor is its rotary embedding, per head dim: no matter)
            heads_blocked[lay.module] = _SHARED_REASON.format(name=lay.module)
        residual = isinstance(y, torch.Tensor) and x is not None and y.shape == x.shape and m.proj.out_features == width
        direct = run.produced.get(id(x.grad_fn), ()) if x is not None and x.grad_fn is not None else ()
        found = _producer_slice(model, structure, direct, width, canon)
        producers, consumers = _neighbours(run, x, y)
        for names, n, axis_of in (
            (producers, width, lambda t: 0),
            (consumers, m.proj.out_features, lambda t: 1 if t.dim() >= 2 else 0),
        ):
            for name in names:  # the widths around the attention: Torch-Pruning would not cut it with them
                for t in model.get_submodule(name).parameters(recurse=False):
                    key = (canon.get(id(t)), axis_of(t))
                    if key[0] is not None and t.dim() > key[1] and t.shape[key[1]] == n and key in where:
                        blocked.setdefault(where[key], reason)
        if found is not None:
            gname, src = found
            new = [Slice(qkv_w, 1, src.index)] + ([Slice(p, a, src.index) for p, a in free_outs] if residual else [])
            added.setdefault(gname, []).extend(new)
            blocked[gname] = reason
            free_outs = [] if residual else free_outs
        else:
            ident = runs_from_list(list(range(width)))
            new = [Slice(qkv_w, 1, ident)] + ([Slice(p, a, ident) for p, a in free_outs] if residual else [])
            own.append(
                UnitGroup(
                    f"{lay.module}.width", "hidden", width, tuple(new), prunable=False, root=lay.module, reason=reason
                )
            )
            free_outs = [] if residual else free_outs
        if free_outs:  # output rows of another width: a group of their own, not prunable
            n = m.proj.out_features
            rows = runs_from_list(list(range(n)))
            slices = tuple(Slice(p, a, rows) for p, a in free_outs)
            own.append(
                UnitGroup(
                    f"{lay.module}.out_width", "hidden", n, slices, prunable=False, root=lay.module, reason=reason
                )
            )
        for g in structure.groups:  # the width its proj writes, if Torch-Pruning grouped it: not prunable either
            if any((s.param, s.axis) in set(outs) for s in g.slices):
                blocked.setdefault(g.name, reason)
    order = {p.name: i for i, p in enumerate(structure.params)}
    out = []
    for g in structure.groups:
        if g.kind in HEAD_KINDS and g.root in heads_blocked and g.prunable:
            g = replace(g, prunable=False, reason=heads_blocked[g.root])
        if g.name in blocked:
            slices = tuple(sorted((*g.slices, *added.get(g.name, ())), key=lambda s: (order[s.param], s.axis)))
            why = "; ".join(r for r in (g.reason, blocked[g.name]) if r)
            kind = "hidden" if g.name in added else g.kind  # the width an attention reads
            g = replace(g, kind=kind, slices=slices, prunable=False, reason=why)
        out.append(g)
    position = {n: i for i, (n, _) in enumerate(model.named_modules())}
    out += own  # trace's rule: groups in the order of their roots in named_modules() (a stable sort)
    out.sort(key=lambda g: position.get(g.root, position.get(g.root.rpartition(".")[0], len(position))))
    in_groups = {s.param for g in out for s in g.slices}
    return replace(structure, groups=tuple(out), uncoupled=tuple(p for p in structure.uncoupled if p not in in_groups))
