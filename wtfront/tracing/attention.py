"""Attention discovery: the head layout of every attention module, read from the modules themselves.

Torch-Pruning couples a transformer's q/k/v rows and output-projection columns row by row: it does not know
that `head_dim` consecutive rows of q, k and v form one head, nor that under grouped-query attention one
KV head serves `n_rep` query heads. `discover_attention` reads the layout from the modules (timm `Attention`
with a fused `qkv`, `nn.MultiheadAttention`, Hugging Face self-attention with separate `q_proj/k_proj/v_proj`
or `query/key/value`, GPT-2's fused `Conv1D` `c_attn`, a fused `qkv` read functionally as in Swin and BEiT, a
separate `q` with a fused `kv` as in PVT-v2): where each head's rows and columns are, and how many query and KV
heads there are. `wtfront.tracing.units` makes them the IR's units.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from wtcore.errors import TraceError

from ..modules import canonical_names, is_hf_conv1d

__all__ = ["AttentionLayout", "HeadOverride", "Segment", "discover_attention", "hf_parts"]

#: A head-count override of `discover_attention`: N query heads, (N, N_kv), or None (not attention).
HeadOverride = int | tuple[int, int] | None


@dataclass(frozen=True)
class Segment:
    """Positions of `param` along `axis`: head `i` of `role` (q, k, v, or o for the output projection's input)
    owns the `head_dim` positions from `offset + i*stride`. `stride` 0 means `head_dim` (the heads of a role
    are consecutive); GPT-NeoX interleaves q, k and v per head (`stride = 3 * head_dim`). A per-head table
    (role "b", e.g. a relative-position bias with one column per head) sets `width` (positions per head)
    instead of the head size."""

    param: str
    axis: int
    offset: int
    role: str
    width: int = field(default=0, kw_only=True)  # positions per head of a per-head table; 0: head_dim
    stride: int = field(default=0, kw_only=True)  # distance between heads; 0: head_dim


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
def _int_attr(m: nn.Module, *names: str) -> int | None:
    for n in names:
        v = getattr(m, n, None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def hf_parts(m: nn.Module) -> tuple[nn.Module, nn.Module, nn.Module] | None:
    """The separate q, k and v projections of a Hugging Face attention module (`q_proj`/`k_proj`/`v_proj`,
    `query`/`key`/`value` or DistilBERT's `q_lin`/`k_lin`/`v_lin`), or None."""
    for names in (("q_proj", "k_proj", "v_proj"), ("query", "key", "value"), ("q_lin", "k_lin", "v_lin")):
        mods = [getattr(m, n, None) for n in names]
        if all(isinstance(x, nn.Linear) for x in mods):
            return mods[0], mods[1], mods[2]
    return None


def _hf_out(model: nn.Module, name: str, m: nn.Module, inner: int) -> tuple[str, nn.Linear] | None:
    """The output projection of a separate-q/k/v attention: `o_proj`/`out_proj`/`dense` on the module, or
    (BERT) the sibling `output.dense` of the parent `BertAttention`."""
    for n in ("o_proj", "out_proj", "dense", "out_lin"):
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
_ATTENTION_CHILDREN = frozenset({"qkv", "c_attn", "q_proj", "query", "q_lin", "qkv_proj", "query_key_value", "to_qkv",
                                  "kv"})


def _may_be_attention(m: nn.Module) -> bool:
    """Cheap test that `_layout` can recognize `m`: its projections are registered submodules, so a module
    without one of those children (every conv, norm and leaf of a CNN) is skipped without attribute probes."""
    return isinstance(m, nn.MultiheadAttention) or not _ATTENTION_CHILDREN.isdisjoint(m._modules)


def _layout(model: nn.Module, name: str, m: nn.Module, canon: Mapping[int, str],
            override: HeadOverride) -> AttentionLayout | None:
    def seg(t: torch.Tensor | None, axis: int, offset: int, role: str) -> list[Segment]:
        p = _pname(canon, t)
        return [Segment(p, axis, offset, role)] if p is not None else []

    separate_bias = _qkv_separate_bias(name, m, canon, override)
    if separate_bias is not None:
        return separate_bias
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
    fused = _fused_qkv_proj(name, m, canon, override) or _q_and_fused_kv(name, m, canon, override)
    if fused is not None:
        return fused
    interleaved = _interleaved_qkv(name, m, canon, override)
    if interleaved is not None:
        return interleaved
    head_first = _head_first_qkv(name, m, canon, override)
    if head_first is not None:
        return head_first
    functional = _functional_qkv(name, m, canon, override)
    if functional is not None:
        return functional
    c_attn, c_proj = getattr(m, "c_attn", None), getattr(m, "c_proj", None)
    if is_hf_conv1d(c_attn) and (isinstance(c_proj, nn.Linear) or is_hf_conv1d(c_proj)):
        if getattr(m, "is_cross_attention", False):
            return None
        rows = c_attn.weight.shape[1] // 3
        nh, nkv, hd = _heads_from(name, rows, _int_attr(m, "head_dim"), override, _int_attr(m, "num_heads"))
        segs = [s for off, r in ((0, "q"), (rows, "k"), (2 * rows, "v")) for s in seg(c_attn.weight, 1, off, r)
                + seg(c_attn.bias, 0, off, r)] + seg(c_proj.weight, 0, 0, "o")
        return AttentionLayout(name, "gpt2", nh, nkv, hd, tuple(segs), ((_pname(canon, c_attn.weight), 0),))
    parts = hf_parts(m)
    if parts is None:
        return _chunked_qkv(name, m, canon, override)
    q, k, v = parts
    hd = _int_attr(m, "head_dim", "attention_head_size")
    cfg = getattr(m, "config", None)
    default = _int_attr(m, "num_heads", "num_attention_heads", "n_heads") or (
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
                                                         "value", "out_proj", "dense", "q_lin", "k_lin", "v_lin",
                                                         "out_lin"))]
    tables = {n: t for n, t in m.named_parameters() if n in extra and t.dim() == 2 and t.shape[1] == nh}
    segs += [Segment(p, 1, 0, "b", width=1) for t in tables.values() if (p := _pname(canon, t))]
    extra = [n for n in extra if n not in tables]
    if extra:  # e.g. Qwen3's per-head-dim q_norm/k_norm are fine for heads, anything else is unknown
        if not all(n.split(".")[0] in ("q_norm", "k_norm") for n in extra):
            blocked = f"attention {name!r} has parameters {extra[:3]} that wt does not map to heads"
    if tables and not blocked:  # HF Swin's relative-position bias: its module records the head count
        blocked = (f"attention {name!r} adds a per-head bias table ({sorted(tables)[0]}) whose module records the "
                   "head count: its heads, with the table's columns, are units of the IR but not prunable")
    return AttentionLayout(name, "hf", nh, nkv, hd, tuple(segs), ((_pname(canon, q.weight), 1),), blocked)


def _fused_qkv_proj(name: str, m: nn.Module, canon: Mapping[int, str], override: HeadOverride
                    ) -> AttentionLayout | None:
    """Phi-3's fused `qkv_proj` (q rows, then k, then v) and `o_proj`. Its forward splits the fused output at
    `config.num_attention_heads * head_dim`, a count every layer shares: pruning one layer's heads would move
    the split, so the heads are units of the IR but not prunable."""
    qkv, o = getattr(m, "qkv_proj", None), getattr(m, "o_proj", None)
    if not (isinstance(qkv, nn.Linear) and isinstance(o, nn.Linear)):
        return None
    cfg = getattr(m, "config", None)
    hd = _int_attr(m, "head_dim")
    nh = _int_attr(cfg, "num_attention_heads") if cfg is not None else None
    nkv = _int_attr(m, "num_key_value_heads") or (_int_attr(cfg, "num_key_value_heads") if cfg is not None else None)
    if hd is None or nh is None:
        return None
    nkv = nkv or nh
    nh, nkv, hd = _heads_from(name, o.in_features, hd, override, nh, nkv * hd)
    if qkv.out_features != (nh + 2 * nkv) * hd:
        return None
    segs = []
    for off, r in ((0, "q"), (nh * hd, "k"), ((nh + nkv) * hd, "v")):
        for t in (qkv.weight, qkv.bias):
            p = _pname(canon, t)
            if p is not None:
                segs.append(Segment(p, 0, off, r))
    p = _pname(canon, o.weight)
    segs += [Segment(p, 1, 0, "o")] if p is not None else []
    blocked = (f"attention {name!r} splits its fused qkv_proj at config.num_attention_heads * head_dim, a count "
               "every layer shares: pruning one layer's heads would misplace the split, so its heads stay whole")
    return AttentionLayout(name, "hf_fused", nh, nkv, hd, tuple(segs), ((_pname(canon, qkv.weight), 1),), blocked)


def _q_and_fused_kv(name: str, m: nn.Module, canon: Mapping[int, str], override: HeadOverride
                    ) -> AttentionLayout | None:
    """A query projection `q` and a fused key/value projection `kv` (k rows, then v rows) with output `proj`, as
    in spatial-reduction attention (timm's PVT-v2, Twins): `kv` may read a reduced input (`sr` conv and norm).
    Such forwards reshape the heads' output back to the *input* width (`reshape(B, N, C)`) and split `kv` by the
    recorded `head_dim`, so removing heads would break them: the heads are units of the IR, not prunable."""
    q, kv, proj = getattr(m, "q", None), getattr(m, "kv", None), getattr(m, "proj", None)
    if not (isinstance(q, nn.Linear) and isinstance(kv, nn.Linear) and isinstance(proj, nn.Linear)):
        return None
    if kv.out_features != 2 * q.out_features or proj.in_features != q.out_features:
        return None
    nh, nkv, hd = _heads_from(name, q.out_features, _int_attr(m, "head_dim"), override, _int_attr(m, "num_heads"))
    if nkv != nh:
        return None
    a = nh * hd
    segs = []
    for t, off, r in ((q.weight, 0, "q"), (q.bias, 0, "q"), (kv.weight, 0, "k"), (kv.bias, 0, "k"),
                      (kv.weight, a, "v"), (kv.bias, a, "v"), (proj.weight, 0, "o")):
        p = _pname(canon, t)
        if p is not None:
            segs.append(Segment(p, 1 if r == "o" else 0, off, r))
    blocked = (f"attention {name!r} (separate q, fused kv) reshapes its heads' output to its input width and "
               "splits kv by its recorded head_dim, so removing heads would break its forward: its heads stay whole")
    return AttentionLayout(name, "q_kv", nh, nkv, hd, tuple(segs), ((_pname(canon, q.weight), 1),), blocked)


#: why heads of a `functional_qkv` layout stay whole
_FUNCTIONAL_REASON = (
    "attention {name!r} reads its qkv weight outside the qkv module (F.linear on qkv.weight, or a function "
    "given the weights) and records no head size: such forwards derive the head size from, or reshape the heads' "
    "output to, the input width (as torchvision's shifted_window_attention and timm BEiT do, whose forwards wt "
    "replaces), so removing heads could break it; its heads are units of the IR but not prunable"
)


#: attention classes read functionally whose forward wt replaces once heads are removed (the hooks of
#: `wtfront.prune.metadata`): their heads are prunable
_HEAD_FORWARDS = frozenset({"timm.models.beit.Attention", "torchvision.models.swin_transformer.ShiftedWindowAttention"})


def _functional_qkv(name: str, m: nn.Module, canon: Mapping[int, str], override: HeadOverride
                    ) -> AttentionLayout | None:
    """A fused `qkv` Linear [3*A, C] and `proj` Linear [C', A] with `num_heads` but no recorded head size
    (torchvision `ShiftedWindowAttention`, timm BEiT `Attention`): q, k and v rows in that order, each head's
    `A / num_heads` rows consecutive. Also per head: 2-D parameters of the module with one column per head
    (relative-position bias tables) and BEiT's separate `q_bias`/`v_bias`. `apply_attention_units` keeps the
    layout only where the trace shows the qkv weight is read functionally (Torch-Pruning couples none of its
    axes). Its heads are prunable only for classes whose forward wt replaces after pruning (`_HEAD_FORWARDS`:
    BEiT, whose head size is `scale ** -2`, and torchvision's Swin v1); otherwise not (`_FUNCTIONAL_REASON`)."""
    qkv, proj, nh0 = getattr(m, "qkv", None), getattr(m, "proj", None), _int_attr(m, "num_heads")
    if not (isinstance(qkv, nn.Linear) and isinstance(proj, nn.Linear)) or nh0 is None:
        return None
    if _int_attr(m, "head_dim") is not None or qkv.out_features != 3 * proj.in_features:
        return None
    a = proj.in_features
    if override is None and a % nh0:
        return None
    nh, nkv, hd = _heads_from(name, a, None, override, nh0)
    if nkv != nh:
        return None
    segs = [Segment(p, 0, off, r) for off, r in ((0, "q"), (a, "k"), (2 * a, "v")) for t in (qkv.weight, qkv.bias)
            if (p := _pname(canon, t)) is not None]
    segs += [Segment(p, 1, 0, "o")] if (p := _pname(canon, proj.weight)) is not None else []
    for n, t in m.named_parameters(recurse=False):
        p = _pname(canon, t)
        if p is None:
            continue
        if t.dim() == 2 and t.shape[1] == nh:  # one column per head: a relative-position bias table
            segs.append(Segment(p, 1, 0, "b", width=1))
        elif n in ("q_bias", "v_bias") and t.shape == (a,):
            segs.append(Segment(p, 0, 0, n[0]))
    scale = getattr(m, "scale", None)
    known = (f"{type(m).__module__}.{type(m).__qualname__}" in _HEAD_FORWARDS and override is None
             and (scale is None or (isinstance(scale, float) and scale > 0 and round(scale ** -2) == hd)))
    blocked = "" if known else _FUNCTIONAL_REASON.format(name=name)
    return AttentionLayout(name, "functional_qkv", nh, nkv, hd, tuple(segs), ((_pname(canon, qkv.weight), 1),),
                           blocked)


#: why heads of a `_head_first_qkv` layout stay whole
_HEAD_FIRST_REASON = (
    "attention {name!r} views its qkv output with its recorded num_heads and adds a per-head relative-position "
    "bias whose module (rel_pos) records the head count too: its heads (with the bias table's columns) are units "
    "of the IR but not prunable"
)


def _is_projection(m: object) -> bool:
    """A Linear, or a 1x1 ungrouped Conv2d (a Linear over channels)."""
    if isinstance(m, nn.Linear):
        return True
    return isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.groups == 1


def _head_first_qkv(name: str, m: nn.Module, canon: Mapping[int, str], override: HeadOverride
                    ) -> AttentionLayout | None:
    """timm MaxxViT/CoAtNet's `Attention2d`/`AttentionCl`: a fused `qkv` (Linear or 1x1 Conv2d) and `proj`,
    `dim_head` per head, and `head_first`: True views the rows as `[heads, 3 * dim_head]` (q, k and v
    interleaved per head, `stride = 3 * dim_head`), False as `[3, heads, dim_head]` (q, k, v blocks)."""
    qkv, proj, hd = getattr(m, "qkv", None), getattr(m, "proj", None), _int_attr(m, "dim_head")
    head_first = getattr(m, "head_first", None)
    if not (_is_projection(qkv) and _is_projection(proj)) or hd is None or not isinstance(head_first, bool):
        return None
    rows, a = qkv.weight.shape[0], proj.weight.shape[1]
    if rows != 3 * a:
        return None
    nh, nkv, hd = _heads_from(name, a, hd, override, None)
    if nkv != nh:
        return None
    step, part = (3 * hd, hd) if head_first else (hd, a)
    segs = [Segment(p, 0, off * part, r, stride=step) for off, r in enumerate("qkv") for t in (qkv.weight, qkv.bias)
            if (p := _pname(canon, t))]
    segs += [Segment(p, 1, 0, "o")] if (p := _pname(canon, proj.weight)) else []
    rel_pos = getattr(m, "rel_pos", None)
    if isinstance(rel_pos, nn.Module):  # a bias table with one column per head (RelPosBias)
        segs += [Segment(p, 1, 0, "b", width=1) for t in rel_pos.parameters(recurse=False)
                 if t.dim() == 2 and t.shape[1] == nh and (p := _pname(canon, t))]
    return AttentionLayout(name, "head_first", nh, nkv, hd, tuple(segs), ((_pname(canon, qkv.weight), 1),),
                           _HEAD_FIRST_REASON.format(name=name))


def _qkv_separate_bias(name: str, m: nn.Module, canon: Mapping[int, str], override: HeadOverride
                       ) -> AttentionLayout | None:
    """A fused `qkv` Linear without bias, its q and v biases separate parameters `q_bias`/`v_bias` (timm EVA's
    `EvaAttention`; the k bias is a zero buffer), and `proj`: q, k and v rows in that order, `head_dim` rows
    per head. Its forward reshapes the heads' output to the input width: after pruning, the metadata hook
    (`wtfront.integrations.timm.sync_eva_attention`) installs one that does not. A norm over all heads or a
    gate is not modelled: those heads stay whole."""
    qkv, proj, hd = getattr(m, "qkv", None), getattr(m, "proj", None), _int_attr(m, "head_dim")
    q_bias, v_bias = getattr(m, "q_bias", None), getattr(m, "v_bias", None)
    if not (isinstance(qkv, nn.Linear) and isinstance(proj, nn.Linear)) or hd is None or qkv.bias is not None:
        return None
    a = proj.in_features
    if not (isinstance(q_bias, nn.Parameter) and isinstance(v_bias, nn.Parameter)) or qkv.out_features != 3 * a:
        return None
    if q_bias.shape != (a,) or v_bias.shape != (a,):
        return None
    nh, nkv, hd = _heads_from(name, a, hd, override, None)
    if nkv != nh:
        return None
    segs = [Segment(p, 0, off, r) for off, r in ((0, "q"), (a, "k"), (2 * a, "v")) if (p := _pname(canon, qkv.weight))]
    segs += [Segment(p, 0, 0, r) for t, r in ((q_bias, "q"), (v_bias, "v")) if (p := _pname(canon, t))]
    segs += [Segment(p, 1, 0, "o")] if (p := _pname(canon, proj.weight)) else []
    blocked = ""
    if not isinstance(getattr(m, "norm", nn.Identity()), nn.Identity) or getattr(m, "gate", None) is not None:
        blocked = f"attention {name!r} normalizes or gates over all heads (scale_norm, gated): not modelled"
    return AttentionLayout(name, "separate_bias", nh, nkv, hd, tuple(segs), ((_pname(canon, qkv.weight), 1),),
                           blocked)


#: why heads of a `_chunked_qkv` layout stay whole
_CHUNKED_REASON = (
    "attention {name!r} reshapes its heads' output back to the input width (reshape(B, G, P, D), as torchvision's "
    "MaxViT does) and scales by the input width: removing heads would break its forward, so its heads (and its "
    "per-head relative-position bias columns, left static) are units of the IR but not prunable"
)


def _chunked_qkv(name: str, m: nn.Module, canon: Mapping[int, str], override: HeadOverride
                 ) -> AttentionLayout | None:
    """An attention module with exactly two Linear children, a fused q/k/v projection (`3 * A` rows, chunked
    into q, k and v in that order) and an output projection reading `A` columns, and its head size recorded
    (`head_dim`): torchvision MaxViT's `RelativePositionalMultiHeadAttention` (`to_qkv`, `merge`). Found from
    the shapes; its forward ties the heads to the input width, so they are not prunable."""
    hd = _int_attr(m, "head_dim")
    linears = [c for c in m.children() if isinstance(c, nn.Linear)]
    if hd is None or len(linears) != 2:
        return None
    qkv, out = linears
    a = out.in_features
    if qkv.out_features != 3 * a:
        return None
    nh, nkv, hd = _heads_from(name, a, hd, override, None)
    if nkv != nh:
        return None
    segs = [Segment(p, 0, off, r) for off, r in ((0, "q"), (a, "k"), (2 * a, "v")) for t in (qkv.weight, qkv.bias)
            if (p := _pname(canon, t))]
    segs += [Segment(p, 1, 0, "o")] if (p := _pname(canon, out.weight)) else []
    return AttentionLayout(name, "chunked_qkv", nh, nkv, hd, tuple(segs), ((_pname(canon, qkv.weight), 1),),
                           _CHUNKED_REASON.format(name=name))


def _interleaved_qkv(name: str, m: nn.Module, canon: Mapping[int, str], override: HeadOverride
                     ) -> AttentionLayout | None:
    """GPT-NeoX's fused `query_key_value`, viewed as `[..., heads, 3 * head_size]`: head `h` owns rows
    `h*3*hd ..`, its q, k and v parts in that order, and output-projection (`dense`) columns `h*hd ..`. The
    forward infers the head count from the rows (`view(..., -1, 3 * head_size)`) and the attention scale and
    rotary embedding depend on `head_size` only, so removing whole heads keeps the function."""
    qkv, dense = getattr(m, "query_key_value", None), getattr(m, "dense", None)
    hd = _int_attr(m, "head_size", "head_dim")
    if not (isinstance(qkv, nn.Linear) and isinstance(dense, nn.Linear)) or hd is None:
        return None
    a = dense.in_features
    if qkv.out_features != 3 * a:
        return None
    nh, nkv, hd = _heads_from(name, a, hd, override, None)
    if nkv != nh:
        return None
    segs = [Segment(p, 0, off, r, stride=3 * hd) for off, r in ((0, "q"), (hd, "k"), (2 * hd, "v"))
            for p in (_pname(canon, qkv.weight), _pname(canon, qkv.bias)) if p is not None]
    p = _pname(canon, dense.weight)
    segs += [Segment(p, 1, 0, "o")] if p is not None else []
    return AttentionLayout(name, "neox", nh, nkv, hd, tuple(segs), ((_pname(canon, qkv.weight), 1),))


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
            canon = canonical_names(model)
        lay = _layout(model, name, m, canon, heads.get(name))
        if lay is None:
            if name in heads:
                raise TraceError(f"heads= names {name!r} ({type(m).__name__}), but wt does not recognize its q/k/v "
                                 "layout (fused qkv, nn.MultiheadAttention, q_proj/k_proj/v_proj, query/key/value, "
                                 "q with kv)")
            continue
        keys = {(s.param, s.axis) for s in lay.segments}
        if keys & taken:  # e.g. an outer wrapper seeing the same projections: the innermost module wins
            continue
        taken |= keys
        out.append(lay)
    return out

