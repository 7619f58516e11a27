"""MACs: baseline MACs of every costed op of the example forward pass, and its cost axes.

fvcore's `FlopCountAnalysis` is the counter (its convention: 1 "flop" = 1 MAC = one multiply-add, bias and
element-wise work not counted). We give it our own handles so that

* every counted node is recorded separately: each handle returns a Counter with a key unique to the node,
  so fvcore's per-module aggregation tells us the node's module scope (the deepest module holding the key);
* the weight a conv/linear/matmul multiplies with is resolved to the model parameter it reads (a traced
  `prim::Param` input, through transposes, `nn.utils.prune` masks and parametrizations), so an op's cost
  axes are exactly the sliced axes of its weight: out/in features of a linear, out/in channels of a conv,
  the single channel axis of a depthwise conv (Torch-Pruning prunes its in- and out-channels together),
  the full in-channel axis of a grouped conv;
* what fvcore misses is counted: `scaled_dot_product_attention` (and its flash/efficient variants),
  `nn.MultiheadAttention`'s fast path (`_native_multi_head_attention`), `baddbmm`; the attention score
  (QKᵀ) and context (A·V) matmuls become two ops.

For a weight op, MACs = (uses of each weight element) x numel(weight) in fvcore's convention, so
active MACs = MACs x prod over the weight's sliced axes of (active positions / positions): what fvcore
counts on the physically pruned model. Counting adds exactly one forward pass (fvcore's jit trace).
"""


from __future__ import annotations

import math
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn as nn

from wtcore.errors import TraceError
from wtcore.ir import AxisPart, CostAxis, CostOp, Param, Structure

from ..modules import canonical_names
from ..tracing.inputs import iter_tensors, split_inputs
from .aten import MAC_OPS, RECURRENT_OPS, WEIGHT_READERS, is_pointwise, known_kinds

__all__ = ["OpRecord", "add_costs", "cost_ops", "count_ops", "op_macs"]


# ------------------------------------------------------------------------------------------ records
@dataclass
class OpRecord:
    """One counted node of the traced forward pass."""

    kind: str  # conv | linear | matmul | attn_qk | attn_av | einsum
    macs: int
    weight: torch.Tensor | None = None  # the parameter the op multiplies with, if any
    weight_operand: int = 1  # matmul: which operand the weight is (0: W @ x, 1: x @ W)
    transposed: bool = False
    groups: int = 1
    static_axes: tuple[tuple[str, int], ...] = ()
    scope: str = ""
    key: str = ""


def _shape(v: Any) -> list[int] | None:
    return v.type().sizes() if v.isCompleteTensor() else None


def _prod(xs: Sequence[int]) -> int:
    return math.prod(int(x) for x in xs)


class _Resolver:
    """Maps a traced value back to the model parameter it reads.

    `torch.jit._get_trace_graph` feeds the flattened inputs and then `_unique_state_dict(module)` as graph
    inputs (`prim::Param` outputs), in that order, so a `prim::Param` value's offset indexes that list.
    """

    PASS = frozenset({
        "aten::t", "aten::transpose", "aten::permute", "aten::contiguous", "aten::to", "aten::type_as",
        "aten::detach", "aten::view", "aten::reshape", "aten::mul", "aten::_weight_norm", "aten::clone",
        "aten::numpy_T", "aten::mT", "aten::expand", "aten::unsqueeze", "aten::squeeze",
    })

    def __init__(self, module: nn.Module, params: Mapping[int, str]) -> None:
        self.state = list(torch.jit._unique_state_dict(module, keep_vars=True).values())
        self.params = params  # id(tensor) -> canonical name, parameters only

    def __call__(self, v: Any, depth: int = 0) -> torch.Tensor | None:
        want = _shape(v)
        t = self._find(v, depth)
        if t is None or want is None or t.numel() != _prod(want):
            return None
        return t

    def _find(self, v: Any, depth: int) -> torch.Tensor | None:
        n = v.node()
        if n.kind() == "prim::Param":
            i = v.offset() - (n.outputsSize() - len(self.state))
            if 0 <= i < len(self.state) and id(self.state[i]) in self.params:
                return self.state[i]
            return None
        if depth >= 6:
            return None
        if "fake_quant" in n.kind():  # torch.ao fake quantization of a weight: the weight is input 0
            return self._find(n.inputsAt(0), depth + 1)
        if n.kind() not in self.PASS:
            return None
        found = [t for t in (self._find(i, depth + 1) for i in n.inputs()) if t is not None]
        return found[0] if len(found) == 1 else None


def _conv(r: _Resolver, inputs: list, outputs: list) -> list[OpRecord]:
    x, w = inputs[:2]
    transposed = bool(inputs[6].toIValue())
    groups = int(inputs[8].toIValue())
    xs, ws, os_ = _shape(x), _shape(w), _shape(outputs[0])
    macs = xs[0] * _prod(ws) * _prod((xs if transposed else os_)[2:])  # fvcore.conv_flop_count
    return [OpRecord("conv", macs, r(w), transposed=transposed, groups=groups)]


def _linear(r: _Resolver, inputs: list, outputs: list) -> list[OpRecord]:
    xs, ws = _shape(inputs[0]), _shape(inputs[1])
    return [OpRecord("linear", _prod(xs) * ws[0], r(inputs[1]))]


def _addmm(r: _Resolver, inputs: list, outputs: list) -> list[OpRecord]:
    """`bias + x @ W`: W is a transposed [out, in] Linear weight, or read as is ([in, out]: Hugging Face's
    Conv1D, flagged `transposed` so its cost axes are out = axis 1, in = axis 0)."""
    a, b = _shape(inputs[1]), _shape(inputs[2])
    as_is = inputs[2].node().kind() == "prim::Param"
    return [OpRecord("linear", a[0] * a[1] * b[1], r(inputs[2]), transposed=as_is)]


def _matmul(r: _Resolver, inputs: list, outputs: list) -> list[OpRecord]:
    a, b = _shape(inputs[0]), _shape(inputs[1])
    if len(b) == 1:  # matrix-vector
        macs = _prod(a)
    elif len(a) == 1:
        macs = _prod(b)
    else:
        batch = torch.broadcast_shapes(tuple(a[:-2]), tuple(b[:-2]))
        macs = _prod(batch) * a[-2] * a[-1] * b[-1]
    for operand in (1, 0):
        w = r(inputs[operand])
        if w is not None and w.dim() == 2:
            return [OpRecord("matmul", macs, w, weight_operand=operand)]
    return [OpRecord("matmul", macs)]


def _baddbmm(r: _Resolver, inputs: list, outputs: list) -> list[OpRecord]:
    """baddbmm / addmv: `input + batch1 @ batch2` (the addition is not counted)."""
    return _matmul(r, inputs[1:3], outputs)


def _einsum(r: _Resolver, inputs: list, outputs: list) -> list[OpRecord]:
    from fvcore.nn.jit_handles import einsum_flop_jit

    return [OpRecord("einsum", int(einsum_flop_jit(inputs, outputs)))]


def _attention(q: list[int], k: list[int], v: list[int]) -> list[OpRecord]:
    """QKᵀ and A·V of one attention call, from q [..., L, E], k [..., S, E], v [..., S, Ev]."""
    batch, length, e = _prod(q[:-2]), q[-2], q[-1]
    s, ev = k[-2], v[-1]
    heads = (("heads", q[-3]),) if len(q) >= 3 else ()
    return [
        OpRecord("attn_qk", batch * length * s * e, static_axes=(*heads, ("head_dim", e))),
        OpRecord("attn_av", batch * length * s * ev, static_axes=(*heads, ("head_dim", ev))),
    ]


def _sdpa(r: _Resolver, inputs: list, outputs: list) -> list[OpRecord]:
    return _attention(_shape(inputs[0]), _shape(inputs[1]), _shape(inputs[2]))


def _native_mha(r: _Resolver, inputs: list, outputs: list) -> list[OpRecord]:
    """`nn.MultiheadAttention`'s fast path: in-projection, QKᵀ, A·V and out-projection in one node."""
    q, k, _v = (_shape(x) for x in inputs[:3])
    e, heads = int(inputs[3].toIValue()), int(inputs[4].toIValue())
    qkv_w, proj_w = inputs[5], inputs[7]
    batch = _prod(q[:-2])
    length, s = q[-2], k[-2]
    hd = e // heads
    attn = _attention([batch, heads, length, hd], [batch, heads, s, hd], [batch, heads, s, hd])
    return [
        OpRecord("linear", batch * (length + 2 * s) * e * e, r(qkv_w)),
        *attn,
        OpRecord("linear", batch * length * e * e, r(proj_w)),
    ]


_HANDLERS: dict[str, Callable[[_Resolver, list, list], list[OpRecord]]] = {
    "aten::_convolution": _conv,
    "aten::linear": _linear,
    "aten::addmm": _addmm,
    "aten::matmul": _matmul,
    "aten::mm": _matmul,
    "aten::mv": _matmul,
    "aten::addmv": _baddbmm,
    "aten::bmm": _matmul,
    "aten::baddbmm": _baddbmm,
    "aten::einsum": _einsum,
    "aten::scaled_dot_product_attention": _sdpa,
    "aten::_scaled_dot_product_flash_attention": _sdpa,
    "aten::_scaled_dot_product_efficient_attention": _sdpa,
    "aten::_scaled_dot_product_flash_attention_for_cpu": _sdpa,
    "aten::_native_multi_head_attention": _native_mha,
}


class _Probe:
    """Watches the ops no handle counts, by ATen identity (`wtfront.costs.aten`): multiply-add ops are missing
    from the total (an error), other ops reading a weight matrix or kernel are ops wt does not know (reported
    by name); element-wise ops and known weight readers (norms, lookups, views) cost nothing."""

    def __init__(self, resolver: _Resolver, params: Mapping[int, str]) -> None:
        self.resolver = resolver
        self.params = params
        self.unknown: dict[str, list[str]] = {}  # op kind -> the weights it reads

    def handles(self) -> dict[str, Callable[[list, list], Counter]]:
        skip = MAC_OPS | RECURRENT_OPS | WEIGHT_READERS
        watched = [k for k in known_kinds() if k not in _HANDLERS and k not in skip]
        return {k: self._watch(k) for k in watched if not is_pointwise(k)}

    def _watch(self, kind: str) -> Callable[[list, list], Counter]:
        def h(inputs: list, outputs: list) -> Counter:
            for v in inputs:
                w = self.resolver(v) if v.isCompleteTensor() else None
                if w is not None and w.dim() >= 2:
                    names = self.unknown.setdefault(kind, [])
                    if self.params[id(w)] not in names:
                        names.append(self.params[id(w)])
            return Counter()

        return h


# ------------------------------------------------------------------------------------------ counting
class _Flat(nn.Module):
    """Calls the model with its example inputs rebuilt from the tensors jit tracing passes, and returns the
    output tensors as a flat tuple (jit tracing takes tensors only, and fails on `None` outputs)."""

    def __init__(self, model: nn.Module, build: Callable[[tuple[torch.Tensor, ...]], Any]) -> None:
        super().__init__()
        self.model = model
        self._build = build

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        args, kwargs = self._build(tensors)
        out = self.model(*args, **kwargs)
        return tuple(iter_tensors(out))


@contextmanager
def _counting_state(model: nn.Module) -> Iterator[None]:
    """Eval mode (no BatchNorm statistics update, no dropout) and autograd on; restored afterwards."""
    modules = list(model.modules())
    training = [(m, m.training) for m in modules]
    try:
        with torch.inference_mode(False), torch.enable_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.eval()
            yield
    finally:
        for m, flag in training:
            m.training = flag


def count_ops(model: nn.Module, example_inputs: Any) -> list[OpRecord]:
    """Every costed node of one forward pass on `example_inputs`, in execution order, with its module scope
    (qualified module name) and, for weight ops, the parameter it multiplies with. Zero-MAC nodes are dropped.

    Raises `TraceError` if the jit trace fails or a node with multiply-adds has no handle.
    """
    with warnings.catch_warnings():  # fvcore's import scripts a function (torch.jit.script is deprecated)
        warnings.simplefilter("ignore")
        from fvcore.nn import FlopCountAnalysis

    tensors, build = split_inputs(example_inputs)
    wrapper = _Flat(model, build)
    params = {id(p): n for n, p in model.named_parameters()}
    records: list[OpRecord] = []
    resolver = _Resolver(wrapper, params)
    probe = _Probe(resolver, params)

    def handle(fn: Callable[[_Resolver, list, list], list[OpRecord]]) -> Callable[[list, list], Counter]:
        def h(inputs: list, outputs: list) -> Counter:
            out: Counter = Counter()
            for rec in fn(resolver, inputs, outputs):
                if rec.macs <= 0:
                    continue
                rec.key = f"{rec.kind}#{len(records)}"
                records.append(rec)
                out[rec.key] = int(rec.macs)
            return out

        return h

    with _counting_state(model):
        try:
            fca = FlopCountAnalysis(wrapper, tensors)
            fca.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
            fca.clear_op_handles()
            fca.set_op_handle(**probe.handles(), **{k: handle(f) for k, f in _HANDLERS.items()})
            by_module = fca.by_module_and_operator()
            unsupported = fca.unsupported_ops()
        except Exception as e:
            raise TraceError(
                f"counting MACs of {type(model).__name__} failed (fvcore's jit trace): {type(e).__name__}: {e}; "
                "pass costs=False to trace without cost ops"
            ) from e
    missing = sorted(k for k in unsupported if k in MAC_OPS)
    if missing:
        raise TraceError(
            f"the forward pass of {type(model).__name__} runs {missing}, whose MACs wt cannot count; "
            "for nn.MultiheadAttention/TransformerEncoderLayer fast paths, make the parameters require grad "
            "while tracing, or pass costs=False"
        )
    custom = sorted(k for k in unsupported if k.startswith("prim::PythonOp") or k in RECURRENT_OPS)
    if probe.unknown or custom:
        listed = [f"{k} (reads {', '.join(repr(n) for n in names[:3])})" for k, names in sorted(probe.unknown.items())]
        warnings.warn(
            f"the forward pass of {type(model).__name__} runs ops whose MACs wt does not count (0 MACs): "
            f"{', '.join(listed + custom)}; if they multiply-add, the cost model misses their MACs",
            stacklevel=2,
        )
    # the scope of a node is the deepest module whose counter holds its key (fvcore adds it to all ancestors)
    scope: dict[str, str] = {}
    for name, counter in by_module.items():
        for key in counter:
            if key not in scope or len(name) > len(scope[key]):
                scope[key] = name
    for rec in records:
        s = scope.get(rec.key, "")
        rec.scope = s[len("model."):] if s.startswith("model.") else ("" if s == "model" else s)
    return records


# ------------------------------------------------------------------------------------------ cost ops
_WEIGHT_SUFFIXES = (".parametrizations.weight.original", ".weight_orig", ".weight")


def _weight_op_name(pname: str) -> tuple[str, str]:
    """(op name, owning module) of a weight op from its parameter's canonical name: a module's `weight`
    (also through nn.utils.prune / parametrize) names the op after the module; any other parameter after
    itself without a `_weight` suffix (`attn.in_proj_weight` -> `attn.in_proj`)."""
    for suf in _WEIGHT_SUFFIXES:
        if pname.endswith(suf):
            mod = pname[: -len(suf)]
            return mod, mod
        if pname == suf[1:]:
            return "", ""
    mod = pname.rpartition(".")[0]
    return pname.removesuffix("_orig").removesuffix("_weight"), mod


def _is_depthwise(rec: OpRecord, w: torch.Tensor) -> bool:
    """Torch-Pruning's definition: groups == out_channels > 1."""
    return not rec.transposed and rec.groups > 1 and rec.groups == w.shape[0]


def _axis(structure: Structure, slices: Mapping[tuple[str, int], list], pname: str, axis: int, name: str,
          size: int) -> CostAxis:
    parts = tuple(AxisPart(g, s.index) for g, s in slices.get((pname, axis), ()))
    if parts:
        size = sum(r.length for r in parts[0].index)
    return CostAxis(name, size, parts=parts)


def _weight_axes(structure: Structure, slices: Mapping, pname: str, rec: OpRecord) -> tuple[str, tuple]:
    shape = structure.param_map[pname].shape
    if rec.kind == "conv":
        if rec.transposed:
            return "conv_transpose", (
                _axis(structure, slices, pname, 0, "in", shape[0]),
                _axis(structure, slices, pname, 1, "out", shape[1] * rec.groups),
            )
        if _is_depthwise(rec, rec.weight):
            return "depthwise_conv", (_axis(structure, slices, pname, 0, "channels", shape[0]),)
        kind = "grouped_conv" if rec.groups > 1 else "conv"
        return kind, (
            _axis(structure, slices, pname, 0, "out", shape[0]),
            _axis(structure, slices, pname, 1, "in", shape[1] * rec.groups),
        )
    if len(shape) != 2:
        return rec.kind, ()
    if (rec.kind == "matmul" and rec.weight_operand == 1) or (rec.kind == "linear" and rec.transposed):
        # x @ W: W is [in, out]
        return rec.kind, (_axis(structure, slices, pname, 1, "out", shape[1]),
                          _axis(structure, slices, pname, 0, "in", shape[0]))
    return rec.kind, (_axis(structure, slices, pname, 0, "out", shape[0]),
                      _axis(structure, slices, pname, 1, "in", shape[1]))


def cost_ops(structure: Structure, model: nn.Module, records: Sequence[OpRecord]) -> tuple[CostOp, ...]:
    """CostOps from counted nodes: one op per weight (its uses summed: a module called twice is one op),
    one per weightless node (attention matmuls: `<scope>:qk`, `<scope>:av`; others `<scope>:<kind>`, with
    `#2`, `#3`, ... for repeats in one scope)."""
    canon = canonical_names(model)
    slices: dict[tuple[str, int], list] = {}
    for g in structure.groups:
        for s in g.slices:
            slices.setdefault((s.param, s.axis), []).append((g.name, s))
    ops: dict[str, CostOp] = {}
    weightless: Counter = Counter()
    for rec in records:
        pname = canon.get(id(rec.weight)) if rec.weight is not None else None
        if pname is not None and pname in structure.param_map:
            name, module = _weight_op_name(pname)
            name = name or rec.scope or type(model).__name__
            kind, axes = _weight_axes(structure, slices, pname, rec)
            prev = ops.get(name)
            if prev is not None:
                if prev.param != pname or prev.kind != kind:
                    raise TraceError(f"two costed ops are both named {name!r} ({prev.kind} of {prev.param!r} and "
                                     f"{kind} of {pname!r})")
                ops[name] = replace(prev, macs=prev.macs + rec.macs, baseline_macs=-1)
                continue
            ops[name] = CostOp(name, module, kind, int(rec.macs), axes, param=pname)
            continue
        suffix = {"attn_qk": "qk", "attn_av": "av"}.get(rec.kind, rec.kind)
        base = f"{rec.scope}:{suffix}" if rec.scope else suffix  # ':' never occurs in module names
        weightless[base] += 1
        name = base if weightless[base] == 1 else f"{base}#{weightless[base]}"
        axes = tuple(CostAxis(n, int(s)) for n, s in rec.static_axes)
        ops[name] = CostOp(name, rec.scope, rec.kind, int(rec.macs), axes)
    return tuple(ops.values())


def add_costs(structure: Structure, model: nn.Module, example_inputs: Any) -> Structure:
    """`structure` with its cost ops: one forward pass of `model` on `example_inputs` (fvcore's jit trace)."""
    return replace(structure, ops=cost_ops(structure, model, count_ops(model, example_inputs)))


def op_macs(model: nn.Module, example_inputs: Any) -> dict[str, int]:
    """Dense MACs per op name of a model as it is now (e.g. physically pruned), named like `add_costs` names
    them. Uses a trivial structure, so it needs no Torch-Pruning trace."""
    params = tuple(Param(n, tuple(p.shape)) for n, p in model.named_parameters())
    s = Structure(params, ())
    return {o.name: o.macs for o in cost_ops(s, model, count_ops(model, example_inputs))}

