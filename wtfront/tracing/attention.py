"""Attention discovery: heads, grouped-query KV heads and MLP features as canonical units.

Torch-Pruning couples a transformer's q/k/v rows and output-projection columns row by row: it does not know
that `head_dim` consecutive rows of q, k and v form one head, nor that under grouped-query attention one
KV head serves `n_rep` query heads. This module reads the layout from the modules themselves (timm
`Attention` with a fused `qkv`, `nn.MultiheadAttention`, Hugging Face self-attention with separate
`q_proj/k_proj/v_proj` or `query/key/value`, GPT-2's fused `Conv1D` `c_attn`) and, after Torch-Pruning's
groups are lowered, replaces every group slice of a head axis by one head-level group per attention module:

- `head`: one unit per query head, with its q/k/v rows and output-projection input columns (multi-head
  attention). Under grouped-query attention (`num_kv_heads < num_heads`) a `head` unit is a query-head
  *slot* `r` in `0..n_rep-1`: query head `r` of every KV group (q rows and output columns only), so removing
  it keeps the same number of query heads per KV head everywhere.
- `kv_head` (the default under grouped-query attention): one unit per KV head, with its k/v rows and the
  q rows / output columns of the `n_rep` query heads that share it.
- `head_dim` (instead of heads, `units=("head_dim", ...)`): one unit per head dimension `d`, coupling q/k row
  `d` of every head (the q.k dimension), v row `d` of every head and the output projection's input column `d`
  of every head. It excludes `head`/`kv_head` (an entry would sit in two groups, and a projection's cost axis
  cannot follow both). Removing dims keeps each module's attention scale at its original value (timm `scale`,
  HF `scaling`), so outputs are unchanged; rotary attention (entry `d` paired with `d + head_dim/2`) and
  `nn.MultiheadAttention` (its forward derives the scale from `head_dim`) are refused / not prunable.
- `mlp_feature`: the other Linear feature groups of a model with attention (MLP hidden features).
- `hidden`: the residual width (the group of the attention's input columns), coupled across all blocks.

Kinds that are not selected (`trace(units=...)`) stay in the IR but are not prunable, with a reason
saying how to select them. Head groups are pruned physically by surgery from the IR (`remove_units`), not
by Torch-Pruning, and module metadata (`num_heads`, ...) is synced by the hooks of `wtfront.integrations`.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from wtcore.errors import TraceError, WtError
from wtcore.ir import AxisPart, CostAxis, Slice, Structure, UnitGroup, runs_from_list

__all__ = [
    "ALL_UNIT_KINDS",
    "DEFAULT_UNITS",
    "HEAD_KINDS",
    "HIDDEN_REASON",
    "AttentionLayout",
    "Segment",
    "apply_attention_costs",
    "apply_attention_units",
    "discover_attention",
    "remove_units",
]

#: Unit kinds that `trace(units=...)` can select.
ALL_UNIT_KINDS = ("head", "kv_head", "head_dim", "mlp_feature", "hidden")
#: Default: attention heads (KV heads under grouped-query attention) and MLP features; the residual width
#: stays in the IR but is not prunable.
DEFAULT_UNITS = ("head", "kv_head", "mlp_feature")
#: Group kinds pruned physically by surgery from the IR instead of Torch-Pruning.
HEAD_KINDS = frozenset({"head", "kv_head", "head_dim"})

HeadOverride = int | tuple[int, int] | None


@dataclass(frozen=True)
class Segment:
    """`count * head_dim` consecutive positions of `param` along `axis`, from `offset`: head `i` of `role`
    (q, k, v, or o for the output projection's input) owns positions `offset + i*head_dim ...`."""

    param: str
    axis: int
    offset: int
    role: str


@dataclass(frozen=True)
class AttentionLayout:
    """The head structure of one attention module (qualified name `module`)."""

    module: str
    family: str
    num_heads: int
    num_kv_heads: int
    head_dim: int
    segments: tuple[Segment, ...]
    inputs: tuple[tuple[str, int], ...]  # (param, axis) of the attention's input width (the residual stream)
    blocked: str = ""  # why its heads cannot be pruned (stays in the IR, not prunable)

    @property
    def n_rep(self) -> int:
        return self.num_heads // self.num_kv_heads

    def kind(self, units: Collection[str]) -> str:
        """The head-level unit kind used for this module given the selected kinds."""
        if "head_dim" in units:
            return "head_dim"
        if self.num_kv_heads == self.num_heads:
            return "head"
        return "kv_head" if "kv_head" in units or "head" not in units else "head"

    def unit_of_head(self, kind: str, role: str, h: int) -> int:
        if kind == "head_dim":
            raise ValueError("head_dim units are per position within a head, not per head")
        if self.num_kv_heads == self.num_heads:
            return h
        if kind == "kv_head":
            return h if role in ("k", "v") else h // self.n_rep
        return -1 if role in ("k", "v") else h % self.n_rep  # GQA query-head slot

    def group_size(self, kind: str) -> int:
        if kind == "head_dim":
            return self.head_dim
        if self.num_kv_heads == self.num_heads:
            return self.num_heads
        return self.num_kv_heads if kind == "kv_head" else self.n_rep

    def group_name(self, kind: str) -> str:
        return f"{self.module}.{ {'kv_head': 'kv_heads', 'head_dim': 'head_dims'}.get(kind, 'heads')}"

    def head_units(self, kind: str) -> list[int]:
        """The unit of each query head (the `heads` axis of the attention matmuls)."""
        return [self.unit_of_head(kind, "q", h) for h in range(self.num_heads)]


# ============================================================================================ discovery
def _linear_like(m: Any) -> bool:
    return isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"


def _int_attr(m: nn.Module, *names: str) -> int | None:
    for n in names:
        v = getattr(m, n, None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def _hf_parts(m: nn.Module) -> tuple[nn.Module, nn.Module, nn.Module] | None:
    for names in (("q_proj", "k_proj", "v_proj"), ("query", "key", "value")):
        mods = [getattr(m, n, None) for n in names]
        if all(isinstance(x, nn.Linear) for x in mods):
            return mods[0], mods[1], mods[2]
    return None


def _hf_out(model: nn.Module, name: str, m: nn.Module, inner: int) -> tuple[str, nn.Linear] | None:
    """The output projection of a separate-q/k/v attention: `o_proj`/`out_proj`/`dense` on the module, or
    (BERT) the sibling `output.dense` of the parent `BertAttention`."""
    for n in ("o_proj", "out_proj", "dense"):
        o = getattr(m, n, None)
        if isinstance(o, nn.Linear) and o.in_features == inner:
            return f"{name}.{n}" if name else n, o
    parent_name = name.rpartition(".")[0]
    try:
        parent = model.get_submodule(parent_name) if parent_name else model
    except AttributeError:
        return None
    out = getattr(getattr(parent, "output", None), "dense", None)
    if isinstance(out, nn.Linear) and out.in_features == inner:
        prefix = f"{parent_name}." if parent_name else ""
        return f"{prefix}output.dense", out
    return None


def _canonical(model: nn.Module) -> dict[int, str]:
    out: dict[int, str] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        out.setdefault(id(p), n)
    return out


def _pname(canon: Mapping[int, str], t: torch.Tensor | None) -> str | None:
    return canon.get(id(t)) if t is not None else None


def _heads_from(name: str, rows: int, head_dim: int | None, override: HeadOverride, default_heads: int | None,
                kv_rows: int | None = None) -> tuple[int, int, int]:
    """(num_heads, num_kv_heads, head_dim) of a module with `rows` q rows (and `kv_rows` k rows)."""
    kv_rows = rows if kv_rows is None else kv_rows
    if override is not None:
        nh, nkv = (override, None) if isinstance(override, int) else override
        if nh <= 0 or rows % nh:
            raise TraceError(f"heads={{{name!r}: {override!r}}}: {rows} query rows are not a multiple of {nh} heads")
        hd = rows // nh
        nkv = kv_rows // hd if nkv is None else nkv
    else:
        if head_dim is None:
            if default_heads is None:
                raise TraceError(f"cannot tell the head size of attention {name!r}; pass heads={{{name!r}: N}}")
            head_dim = rows // default_heads
        hd, nh, nkv = head_dim, rows // head_dim, kv_rows // head_dim
    if nh * hd != rows or nkv * hd != kv_rows or nkv <= 0 or nh % nkv:
        raise TraceError(
            f"attention {name!r}: {rows} query rows and {kv_rows} key rows do not split into heads of {hd} with a "
            f"whole number of query heads per KV head; pass heads={{{name!r}: (num_heads, num_kv_heads)}}"
        )
    return nh, nkv, hd


#: a child module every recognized attention layout has (fused timm `qkv`, GPT-2 `c_attn`, HF `q_proj`/`query`)
_ATTENTION_CHILDREN = frozenset({"qkv", "c_attn", "q_proj", "query"})


def _may_be_attention(m: nn.Module) -> bool:
    """Cheap test that `_layout` can recognize `m`: its projections are registered submodules, so a module
    without one of those children (every conv, norm and leaf of a CNN) is skipped without attribute probes."""
    return isinstance(m, nn.MultiheadAttention) or not _ATTENTION_CHILDREN.isdisjoint(m._modules)


def _layout(model: nn.Module, name: str, m: nn.Module, canon: Mapping[int, str],
            override: HeadOverride) -> AttentionLayout | None:
    def seg(t: torch.Tensor | None, axis: int, offset: int, role: str) -> list[Segment]:
        p = _pname(canon, t)
        return [Segment(p, axis, offset, role)] if p is not None else []

    qkv, proj = getattr(m, "qkv", None), getattr(m, "proj", None)
    if isinstance(qkv, nn.Linear) and isinstance(proj, nn.Linear) and _int_attr(m, "head_dim") is not None:
        nh, nkv, hd = _heads_from(name, qkv.out_features // 3, _int_attr(m, "head_dim"), override, None)
        a = nh * hd
        if qkv.out_features != 3 * a or proj.in_features != a or nkv != nh:
            return None
        segs = [s for off, r in ((0, "q"), (a, "k"), (2 * a, "v")) for s in seg(qkv.weight, 0, off, r)
                + seg(qkv.bias, 0, off, r)] + seg(proj.weight, 1, 0, "o")
        blocked = ""
        if not isinstance(getattr(m, "norm", nn.Identity()), nn.Identity) or getattr(m, "gate", None) is not None:
            blocked = f"attention {name!r} normalizes or gates over all heads (scale_norm, gated): not modelled"
        return AttentionLayout(name, "timm", nh, nkv, hd, tuple(segs), ((_pname(canon, qkv.weight), 1),), blocked)
    if isinstance(m, nn.MultiheadAttention):
        if not m._qkv_same_embed_dim or m.in_proj_weight is None:
            return None
        e = m.in_proj_weight.shape[0] // 3  # embed_dim, or fewer rows once heads are pruned
        nh, nkv, hd = _heads_from(name, e, m.head_dim if override is None else None, override, m.num_heads)
        segs = [s for off, r in ((0, "q"), (e, "k"), (2 * e, "v")) for s in seg(m.in_proj_weight, 0, off, r)
                + seg(m.in_proj_bias, 0, off, r)] + seg(m.out_proj.weight, 1, 0, "o")
        blocked = f"MultiheadAttention {name!r} has bias_k/bias_v" if m.bias_k is not None else ""
        return AttentionLayout(name, "torch_mha", nh, nkv, hd, tuple(segs), ((_pname(canon, m.in_proj_weight), 1),),
                               blocked)
    c_attn, c_proj = getattr(m, "c_attn", None), getattr(m, "c_proj", None)
    if _linear_like(c_attn) and _linear_like(c_proj) and type(c_attn).__name__ == "Conv1D":
        if getattr(m, "is_cross_attention", False):
            return None
        rows = c_attn.weight.shape[1] // 3
        nh, nkv, hd = _heads_from(name, rows, _int_attr(m, "head_dim"), override, _int_attr(m, "num_heads"))
        segs = [s for off, r in ((0, "q"), (rows, "k"), (2 * rows, "v")) for s in seg(c_attn.weight, 1, off, r)
                + seg(c_attn.bias, 0, off, r)] + seg(c_proj.weight, 0, 0, "o")
        return AttentionLayout(name, "gpt2", nh, nkv, hd, tuple(segs), ((_pname(canon, c_attn.weight), 0),))
    parts = _hf_parts(m)
    if parts is None:
        return None
    q, k, v = parts
    hd = _int_attr(m, "head_dim", "attention_head_size")
    cfg = getattr(m, "config", None)
    default = _int_attr(m, "num_heads", "num_attention_heads") or (
        _int_attr(cfg, "num_attention_heads") if cfg is not None else None)
    nh, nkv, hd = _heads_from(name, q.out_features, hd, override, default, k.out_features)
    if v.out_features != k.out_features:
        return None
    out = _hf_out(model, name, m, q.out_features)
    if out is None:
        return None
    _, o = out
    segs = [s for t, r in ((q, "q"), (k, "k"), (v, "v")) for s in seg(t.weight, 0, 0, r) + seg(t.bias, 0, 0, r)]
    segs += seg(o.weight, 1, 0, "o")
    blocked = ""
    extra = [n for n, p in m.named_parameters() if _pname(canon, p) not in {s.param for s in segs}
             and not any(n.startswith(f"{x}.") for x in ("q_proj", "k_proj", "v_proj", "o_proj", "query", "key",
                                                         "value", "out_proj", "dense"))]
    if extra:  # e.g. Qwen3's per-head-dim q_norm/k_norm are fine for heads, anything else is unknown
        if not all(n.split(".")[0] in ("q_norm", "k_norm") for n in extra):
            blocked = f"attention {name!r} has parameters {extra[:3]} that wt does not map to heads"
    return AttentionLayout(name, "hf", nh, nkv, hd, tuple(segs), ((_pname(canon, q.weight), 1),), blocked)


def discover_attention(model: nn.Module, heads: Mapping[str, HeadOverride] | None = None) -> list[AttentionLayout]:
    """Every attention module of `model` whose heads wt recognizes, in `named_modules()` order.

    `heads` overrides, by qualified module name: `N` (N query heads, head size = rows / N), `(N, N_kv)`
    (grouped-query attention), or None (leave the module to Torch-Pruning's row-level groups).
    """
    heads = dict(heads or {})
    out: list[AttentionLayout] = []
    taken: set[str] = set()
    named = dict(model.named_modules())
    unknown = [n for n in heads if n not in named]
    if unknown:
        raise TraceError(f"heads= names module(s) {unknown[:3]} that are not in the model (qualified module names)")
    canon: dict[int, str] | None = None  # built on the first candidate: most CNNs have none
    for name, m in named.items():
        if name in heads and heads[name] is None:
            continue
        if name not in heads and not _may_be_attention(m):
            continue
        if canon is None:
            canon = _canonical(model)
        lay = _layout(model, name, m, canon, heads.get(name))
        if lay is None:
            if name in heads:
                raise TraceError(f"heads= names {name!r} ({type(m).__name__}), but wt does not recognize its q/k/v "
                                 "layout (fused qkv, nn.MultiheadAttention, q_proj/k_proj/v_proj, query/key/value)")
            continue
        keys = {(s.param, s.axis) for s in lay.segments}
        if keys & taken:  # e.g. an outer wrapper seeing the same projections: the innermost module wins
            continue
        taken |= keys
        out.append(lay)
    return out


# ============================================================================================ Conv1D
def _is_conv1d(m: Any) -> bool:
    """transformers' `Conv1D` (GPT-2): a linear layer whose weight is stored `[in, out]`."""
    return type(m).__name__ == "Conv1D" and isinstance(getattr(m, "weight", None), torch.Tensor)


def ir_surgery_groups(model: nn.Module, structure: Structure, names: Iterable[str]) -> set[str]:
    """Groups among `names` that physical pruning cuts from the IR instead of through Torch-Pruning: head
    groups, and groups with a `Conv1D` parameter (Torch-Pruning cannot prune those layers)."""
    conv_params: set[str] = set()
    for n, m in model.named_modules():
        if _is_conv1d(m):
            prefix = f"{n}." if n else ""
            conv_params.update(f"{prefix}{a}" for a in ("weight", "bias"))
    out = set()
    for gname in names:
        g = structure.group_map[gname]
        if g.kind in HEAD_KINDS or any(s.param in conv_params for s in g.slices):
            out.add(gname)
    return out


def ir_lossy_reason(model: nn.Module, structure: Structure, gname: str) -> str | None:
    """Why removing units of a group cut from the IR is not the same function as zeroing them (a LayerNorm or
    GroupNorm normalizes over them), or None."""
    for s in structure.group_map[gname].slices:
        owner = structure.param_map[s.param].module
        try:
            m = model.get_submodule(owner) if owner else model
        except AttributeError:
            continue
        if isinstance(m, (nn.LayerNorm, nn.GroupNorm)) or type(m).__name__.endswith("RMSNorm"):
            return f"{type(m).__name__} {owner!r} normalizes over its units (zeroing a unit changes the statistics)"
    return None


# ============================================================================================ the IR pass
def _check_units(units: Iterable[str]) -> tuple[str, ...]:
    units = tuple(units)
    bad = [u for u in units if u not in ALL_UNIT_KINDS]
    if bad:
        raise TraceError(f"units={units!r}: unknown unit kind(s) {bad}; choose from {ALL_UNIT_KINDS}")
    if "head_dim" in units and HEAD_KINDS.intersection(units) - {"head_dim"}:
        raise TraceError(
            f"units={units!r}: 'head_dim' excludes 'head' and 'kv_head' (a q/k/v row would belong to a head unit and "
            "a head-dim unit, and a projection's cost axis cannot follow both); trace with units=('head_dim', "
            "'mlp_feature') to prune head dimensions, or without 'head_dim' to prune heads"
        )
    return units


HIDDEN_REASON = (
    "the residual (hidden) width, coupled across all blocks; pass units=(..., 'hidden') to trace() to prune it "
    "(a LayerNorm or RMSNorm over it makes removal lossy: prune_units(..., strict=False))"
)


def _not_selected(kind: str) -> str:
    return f"unit kind {kind!r} is not selected; pass units=(..., {kind!r}) to trace() to prune it"


def _head_group(lay: AttentionLayout, kind: str, structure: Structure, units: Collection[str]) -> UnitGroup:
    by_key: dict[tuple[str, int], np.ndarray] = {}
    for s in lay.segments:
        length = structure.param_map[s.param].shape[s.axis]
        idx = by_key.setdefault((s.param, s.axis), np.full(length, -1, dtype=np.int64))
        count = lay.num_kv_heads if s.role in ("k", "v") else lay.num_heads
        for h in range(count):
            a = s.offset + h * lay.head_dim
            if kind == "head_dim":
                idx[a: a + lay.head_dim] = np.arange(lay.head_dim)
            else:
                idx[a: a + lay.head_dim] = lay.unit_of_head(kind, s.role, h)
    order = {p.name: i for i, p in enumerate(structure.params)}
    slices = tuple(Slice(p, axis, runs_from_list(idx)) for (p, axis), idx in
                   sorted(by_key.items(), key=lambda kv: (order[kv[0][0]], kv[0][1])) if (idx >= 0).any())
    active = kind in units or (kind == "head" and lay.num_kv_heads == lay.num_heads and "kv_head" in units)
    reason = lay.blocked or ("" if active else _not_selected(kind))
    if kind == "head_dim" and lay.family == "torch_mha" and not reason:
        reason = (f"nn.MultiheadAttention {lay.module!r} derives its attention scale from head_dim: removing head "
                  "dimensions would change its output; prune heads instead")
    return UnitGroup(lay.group_name(kind), kind, lay.group_size(kind), slices, prunable=not reason,
                     root=lay.module, reason=reason)


def _refuse_rotary(model: nn.Module, layouts: Sequence[AttentionLayout]) -> None:
    """Rotary embeddings rotate entry d of each head with entry d + head_dim/2 by frequencies derived from
    head_dim (`inv_freq`): a head-dim unit would have to be a rotary pair and the frequencies re-derived."""
    rope = [n for n, m in model.named_modules() if "rotary" in type(m).__name__.lower()]
    cfg = getattr(model, "config", None)
    if not rope and not any(getattr(cfg, a, None) is not None for a in ("rope_theta", "rope_parameters")):
        return
    lay = next((x for x in layouts if x.family == "hf"), layouts[0])
    raise TraceError(
        f"units=('head_dim', ...): attention {lay.module!r} uses rotary position embeddings"
        f"{f' ({rope[0]!r})' if rope else ''}, which pair entry d of each head with entry d + head_dim/2 and derive "
        "their frequencies from head_dim; head_dim units are not supported for rotary attention, prune heads "
        "(units=('kv_head', ...)) instead"
    )


def apply_attention_units(
    structure: Structure,
    model: nn.Module,
    units: Iterable[str] = DEFAULT_UNITS,
    heads: Mapping[str, HeadOverride] | None = None,
) -> tuple[Structure, list[AttentionLayout]]:
    """Replace the row-level groups of every discovered attention's head axes by one head-level group per
    attention module, and classify the hidden and MLP groups (see the module docstring).

    Returns the new structure (no cost ops yet) and the layouts (for `apply_attention_costs`).
    """
    units = _check_units(units)
    layouts = discover_attention(model, heads)
    if not layouts:
        return structure, layouts
    if "head_dim" in units:
        _refuse_rotary(model, layouts)
    head_keys = {(s.param, s.axis) for lay in layouts for s in lay.segments}
    input_keys = {k for lay in layouts for k in lay.inputs}
    new_groups: list[UnitGroup] = []
    placed: dict[int, list[UnitGroup]] = {}
    pending: list[UnitGroup] = []
    lay_of_group = {}
    for lay in layouts:
        kind = lay.kind(units)
        hg = _head_group(lay, kind, structure, units)
        keys = {(s.param, s.axis) for s in lay.segments}
        lay_of_group[hg.name] = keys
        pending.append(hg)
    for g in structure.groups:
        kept = tuple(s for s in g.slices if (s.param, s.axis) not in head_keys)
        touched = len(kept) != len(g.slices)
        if touched:  # insert the head groups whose slices this group held, where it was
            for hg in list(pending):
                if any((s.param, s.axis) in lay_of_group[hg.name] for s in g.slices):
                    placed.setdefault(len(new_groups), []).append(hg)
                    pending.remove(hg)
        if not kept:
            continue
        g = replace(g, slices=kept) if touched else g
        if any((s.param, s.axis) in input_keys for s in g.slices):
            mha = [lay.module for lay in layouts if lay.family == "torch_mha"
                   and any((sl.param, sl.axis) in set(lay.inputs) for sl in g.slices)]
            why = "" if "hidden" in units else HIDDEN_REASON
            if mha and not why:
                why = (f"nn.MultiheadAttention {mha[0]!r} ties its q/k/v width to embed_dim, which Torch-Pruning "
                       f"prunes with the hidden width; trace with heads={{{mha[0]!r}: None}} to prune the hidden width")
            reason = "; ".join(r for r in (g.reason, why) if r)
            g = replace(g, kind="hidden", prunable=g.prunable and not why, reason=reason)
        elif g.kind == "feature" and g.prunable:
            on = "mlp_feature" in units
            g = replace(g, kind="mlp_feature", prunable=on, reason="" if on else _not_selected("mlp_feature"))
        new_groups.append(g)
    out: list[UnitGroup] = []
    for i, g in enumerate(new_groups):
        out.extend(placed.get(i, ()))
        out.append(g)
    out.extend(placed.get(len(new_groups), ()))
    out.extend(pending)  # heads whose rows Torch-Pruning left in no group
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}

    def position(g: UnitGroup) -> int:  # trace's rule: groups in the order of their roots in named_modules()
        if g.root in order:
            return order[g.root]
        return order.get(g.root.rpartition(".")[0], len(order))

    out.sort(key=position)
    touched_params = {s.param for g in out for s in g.slices}
    uncoupled = tuple(p for p in structure.uncoupled if p not in touched_params)
    return replace(structure, groups=tuple(out), ops=(), uncoupled=uncoupled), layouts


def apply_attention_costs(structure: Structure, layouts: Sequence[AttentionLayout],
                          units: Iterable[str] = DEFAULT_UNITS) -> Structure:
    """Make the `heads` axis (or, for `head_dim` units, the `head_dim` axis) of every attention score/context
    matmul (`attn_qk`/`attn_av` ops in an attention module's scope) follow that module's head group, so active
    MACs drop with pruned heads."""
    units = tuple(units)
    by_module = {lay.module: lay for lay in layouts}
    ops = []
    for op in structure.ops:
        lay = by_module.get(op.module)
        if lay is None or op.kind not in ("attn_qk", "attn_av"):
            ops.append(op)
            continue
        kind = lay.kind(units)
        gname = lay.group_name(kind)
        axes = []
        for a in op.axes:
            if kind == "head_dim" and a.name == "head_dim" and a.size == lay.head_dim and gname in structure.group_map:
                a = CostAxis("head_dim", a.size, parts=(AxisPart(gname, runs_from_list(list(range(a.size)))),))
            elif kind != "head_dim" and a.name == "heads" and a.size == lay.num_heads and gname in structure.group_map:
                a = CostAxis("heads", a.size, parts=(AxisPart(gname, runs_from_list(lay.head_units(kind))),))
            axes.append(a)
        ops.append(replace(op, axes=tuple(axes)))
    return replace(structure, ops=tuple(ops))


# ============================================================================================ surgery
def _owner(model: nn.Module, pname: str) -> tuple[nn.Module, str]:
    mod_name, _, attr = pname.rpartition(".")
    return (model.get_submodule(mod_name) if mod_name else model), attr


@torch.no_grad()
def remove_units(model: nn.Module, structure: Structure, removed: Mapping[str, Iterable[int]]) -> None:
    """Physically remove units of head groups from the IR: every slice keeps the entries whose unit is kept
    (or -1), by `index_select`; each parameter is replaced by a new Parameter (same dtype, device and
    `requires_grad`) under every name it is reachable by. Module metadata is synced separately, except the
    head size of modules that lost head dims (`head_dim`/`attention_head_size`), which the shapes alone cannot
    tell from a change in head count; their attention scale is left at its original value."""
    cuts: dict[str, dict[int, torch.Tensor]] = {}
    for gname, us in removed.items():
        g = structure.group_map[gname]
        gone = torch.zeros(g.size + 1, dtype=torch.bool)
        gone[torch.as_tensor(sorted({int(u) for u in us}), dtype=torch.long)] = True
        for s in g.slices:
            if s.groups != 1:
                raise WtError(f"group {gname!r}: grouped slice of {s.param!r} cannot be cut from the IR")
            idx = s.index_tensor()
            drop = gone[torch.where(idx >= 0, idx, torch.full_like(idx, g.size))]
            prev = cuts.setdefault(s.param, {}).get(s.axis)
            cuts[s.param][s.axis] = drop if prev is None else prev | drop
        if g.kind == "head_dim":
            root = model.get_submodule(g.root) if g.root else model
            for attr in ("head_dim", "attention_head_size"):
                if isinstance(getattr(root, attr, None), int):
                    setattr(root, attr, g.size - int(gone[:-1].sum()))
    aliases = {p.name: (p.name, *p.aliases) for p in structure.params}
    for pname, axes in cuts.items():
        p = model.get_parameter(pname)
        t = p.detach()
        for axis, drop in axes.items():
            t = t.index_select(axis, (~drop).nonzero().flatten().to(t.device))
        new = nn.Parameter(t.clone(), requires_grad=p.requires_grad)
        for name in aliases.get(pname, (pname,)):
            mod, attr = _owner(model, name)
            mod._parameters[attr] = new
