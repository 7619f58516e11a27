"""The primitives of the program language: each one is a single Python function over torch ops.

That function is the whole definition. Its positional parameters are the primitive's *operands* (values of
the program, or Python number literals; `*xs` for a variable number), its keyword-only parameters are
*static parameters* fixed at compile time (shapes, dims, tolerances), and its docstring is the primitive's
documentation. Everything else follows from it:

- the code generator writes a call of it (`v7 = sum(v6, dims=(1,))`), so generated code, the constant
  folder and the reference interpreter (`wtcore.interpret`) run the very same function;
- shapes and dtypes of a program's values come from running it on `meta` tensors;
- it runs under autograd, `torch.func.vmap`/`grad` and `torch.compile` because it is plain torch code.

The table is `PRIMITIVES`; `docs/programs.md` lists it. Specs never add primitives: a calculation that
torch ops can express is a composition of these, written in the spec.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from . import native

__all__ = ["PRIMITIVES", "Primitive"]

Tensor = torch.Tensor
Operand = Tensor | float | int | bool


@dataclass(frozen=True)
class Primitive:
    """A primitive: its implementation and what its signature says about it."""

    name: str
    impl: Callable[..., Any]
    #: number of operands, or None for a variable number (`*xs`)
    arity: int | None
    #: static parameter names, all keyword-only
    params: frozenset[str]
    #: static parameters that must be given (no default)
    required: frozenset[str]
    #: the defaults of the others
    defaults: dict[str, Any]
    doc: str


PRIMITIVES: dict[str, Primitive] = {}


def _primitive(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Register `fn` as the primitive named like it (a trailing `_` dropped: `sum_` is `sum`)."""
    name = fn.__name__.rstrip("_")
    sig = inspect.signature(fn)
    kinds = [p.kind for p in sig.parameters.values()]
    variadic = inspect.Parameter.VAR_POSITIONAL in kinds
    arity = None if variadic else sum(k == inspect.Parameter.POSITIONAL_OR_KEYWORD for k in kinds)
    kw = [p for p in sig.parameters.values() if p.kind == inspect.Parameter.KEYWORD_ONLY]
    PRIMITIVES[name] = Primitive(
        name, fn, arity, frozenset(p.name for p in kw),
        frozenset(p.name for p in kw if p.default is inspect.Parameter.empty),
        {p.name: p.default for p in kw if p.default is not inspect.Parameter.empty}, inspect.getdoc(fn) or "",
    )
    return fn


_ACC = (torch.float32, torch.float64)
_DTYPES = {"float32": torch.float32, "float64": torch.float64, "int64": torch.int64, "int32": torch.int32,
           "bool": torch.bool, "uint8": torch.uint8}


# ------------------------------------------------------------------------------------- dtype
@_primitive
def acc(x: Tensor) -> Tensor:
    """`x` in its accumulation dtype: float16/bfloat16 upcast to float32, float32/float64 kept."""
    return x if x.dtype in _ACC else x.float()


@_primitive
def acc_like(x: Tensor, like: Tensor) -> Tensor:
    """`x` cast to the accumulation dtype of `like` (without materializing `acc(like)`)."""
    return x.to(like.dtype if like.dtype in _ACC else torch.float32)


@_primitive
def cast(x: Tensor, *, dtype: str) -> Tensor:
    """`x` cast to `dtype` ("float32", "float64", "int64", "int32", "bool", "uint8")."""
    return x.to(_DTYPES[dtype])


@_primitive
def cast_like(x: Tensor, like: Tensor) -> Tensor:
    """`x` cast to the dtype of `like`."""
    return x.to(like.dtype)


# ------------------------------------------------------------------------------------- elementwise
@_primitive
def square(x: Tensor) -> Tensor:
    """`x ** 2`."""
    return x.square()


@_primitive
def abs_(x: Tensor) -> Tensor:
    """`|x|`."""
    return x.abs()


@_primitive
def sqrt(x: Tensor) -> Tensor:
    """Square root."""
    return x.sqrt()


@_primitive
def safe_sqrt(x: Tensor) -> Tensor:
    """Square root whose gradient is 0 (not inf/NaN) where `x` is 0: a unit norm stays differentiable at a
    pruned unit. Anything else goes through `sqrt`, so a NaN (a NaN weight) stays NaN: a norm never reads 0
    because a weight is NaN."""
    zero = x == 0
    return torch.where(zero, torch.zeros_like(x), torch.where(zero, torch.ones_like(x), x).sqrt())


@_primitive
def neg(x: Tensor) -> Tensor:
    """`-x`."""
    return -x


@_primitive
def add(x: Operand, y: Operand) -> Tensor:
    """`x + y`."""
    return x + y


@_primitive
def sub(x: Operand, y: Operand) -> Tensor:
    """`x - y`."""
    return x - y


@_primitive
def mul(x: Operand, y: Operand) -> Tensor:
    """`x * y`."""
    return x * y


@_primitive
def div(x: Operand, y: Operand) -> Tensor:
    """`x / y` (true division)."""
    return x / y


@_primitive
def pow_(x: Operand, y: Operand) -> Tensor:
    """`x ** y` (e.g. a number raised to a tensor power)."""
    return x**y


@_primitive
def maximum(x: Tensor, y: Operand) -> Tensor:
    """Elementwise max of `x` and `y` (a number or a tensor)."""
    return x.clamp(min=y)


@_primitive
def minimum(x: Tensor, y: Operand) -> Tensor:
    """Elementwise min of `x` and `y` (a number or a tensor)."""
    return x.clamp(max=y)


@_primitive
def gt(x: Operand, y: Operand) -> Tensor:
    """`x > y`."""
    return x > y


@_primitive
def ge(x: Operand, y: Operand) -> Tensor:
    """`x >= y`."""
    return x >= y


@_primitive
def lt(x: Operand, y: Operand) -> Tensor:
    """`x < y`."""
    return x < y


@_primitive
def eq(x: Operand, y: Operand) -> Tensor:
    """`x == y`."""
    return x == y


@_primitive
def ne(x: Operand, y: Operand) -> Tensor:
    """`x != y`."""
    return x != y


@_primitive
def logical_and(x: Tensor, y: Tensor) -> Tensor:
    """`x & y` of bool tensors."""
    return x & y


@_primitive
def logical_or(x: Tensor, y: Tensor) -> Tensor:
    """`x | y` of bool tensors."""
    return x | y


@_primitive
def logical_not(x: Tensor) -> Tensor:
    """`~x` of a bool tensor."""
    return ~x


@_primitive
def where(cond: Tensor, x: Operand, y: Operand) -> Tensor:
    """`x` where `cond`, else `y`."""
    return torch.where(cond, x, y)


@_primitive
def round_(x: Tensor) -> Tensor:
    """Round half to even, like Python's `round`."""
    return torch.round(x)


@_primitive
def ceil(x: Tensor) -> Tensor:
    """Round up."""
    return torch.ceil(x)


@_primitive
def detach(x: Tensor) -> Tensor:
    """`x` without gradient (a stop-gradient)."""
    return x.detach()


# ------------------------------------------------------------------------------------- reductions
@_primitive
def sum_(x: Tensor, *, dims: tuple[int, ...] | None = None, dtype: str | None = None) -> Tensor:
    """Sum over `dims` (every dim when None), accumulated in `dtype` when given (e.g. exact "int64" counts)."""
    if dtype is None:
        return x.sum() if dims is None else x.sum(dims)
    return x.sum(dtype=_DTYPES[dtype]) if dims is None else x.sum(dims, dtype=_DTYPES[dtype])


@_primitive
def amax(x: Tensor, *, dims: tuple[int, ...]) -> Tensor:
    """Max over `dims`."""
    return x.amax(dims)


@_primitive
def argsort(x: Tensor, *, dim: int) -> Tensor:
    """Stable ascending argsort along `dim` (ties keep index order)."""
    return torch.argsort(x, dim=dim, stable=True)


@_primitive
def segment_sum_sorted(x: Tensor, ends: Tensor) -> Tensor:
    """Sums of the contiguous segments `[ends[k-1], ends[k])` of `x` (a cumulative sum, no scatter)."""
    cs = x.cumsum(0).index_select(0, ends - 1)
    return torch.cat([cs[:1], cs[1:] - cs[:-1]])


@_primitive
def scatter_add(index: Tensor, x: Tensor, *, size: int) -> Tensor:
    """A zero buffer of `size` rows with the rows of `x` added at `index` (one out-of-place `index_add`)."""
    return x.new_zeros((size, *x.shape[1:])).index_add(0, index, x)


# ------------------------------------------------------------------------------------- shapes
@_primitive
def reshape(x: Tensor, *, shape: tuple[int, ...]) -> Tensor:
    """`x` viewed (or copied) as `shape`."""
    return x.reshape(shape)


@_primitive
def permute(x: Tensor, *, dims: tuple[int, ...]) -> Tensor:
    """`x` with its dims reordered."""
    return x.permute(dims)


@_primitive
def narrow(x: Tensor, *, dim: int, start: int, length: int) -> Tensor:
    """`length` entries of `x` along `dim` from `start`."""
    return x.narrow(dim, start, length)


@_primitive
def select(x: Tensor, *, dim: int, index: int) -> Tensor:
    """Entry `index` of `x` along `dim` (that dim dropped)."""
    return x.select(dim, index)


@_primitive
def expand(x: Tensor, *, shape: tuple[int, ...]) -> Tensor:
    """`x` broadcast to `shape` (a view)."""
    return x.expand(shape)


@_primitive
def pad_inf(x: Tensor, *, pad: tuple[int, ...]) -> Tensor:
    """`x` padded with +inf (`torch.nn.functional.pad` order: last dim first)."""
    return torch.nn.functional.pad(x, pad, value=float("inf"))


@_primitive
def cat(*xs: Tensor) -> Tensor:
    """Concatenation along dim 0."""
    return torch.cat(xs)


@_primitive
def stack(*xs: Tensor, dim: int = 0) -> Tensor:
    """Stack along a new dim `dim`."""
    return torch.stack(xs, dim)


@_primitive
def take(x: Tensor, index: Tensor) -> Tensor:
    """Rows of `x` at `index` (`index_select` along dim 0)."""
    return x.index_select(0, index)


@_primitive
def item(x: Sequence[Tensor], *, index: int) -> Tensor:
    """Element `index` of a tuple-valued primitive's result."""
    return x[index]


# ------------------------------------------------------------------------------------- fused
class _SumsqRowsCols(torch.autograd.Function):
    """Row sums of squares of a 2-D tensor `[o, i * k]` and its column sums added over each group of `k`
    columns (an input channel's kernel positions), with a one-temporary backward.

    As composed ops, autograd adds the two broadcast gradients into one full-size buffer and square's
    backward makes two more; here the backward is `x * (2 g_rows[:, None] + 2 g_cols[None, :])`. Summing
    over the kernel inside the reduction keeps a row-sharded (DTensor) weight's partial column sums
    input-sized. `generate_vmap_rule` keeps it usable under `torch.func.vmap`/`grad`.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, k: int) -> tuple[Tensor, Tensor]:
        return _sumsq_sums(x, k)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor, int], output: Any) -> None:
        ctx.save_for_backward(inputs[0])
        ctx.k = inputs[1]

    @staticmethod
    def backward(ctx: Any, g_rows: Tensor, g_cols: Tensor) -> tuple[Tensor, None]:
        (x,) = ctx.saved_tensors
        g_cols = (g_cols * 2).unsqueeze(-1).expand(*g_cols.shape, ctx.k).flatten(-2)
        return x * ((g_rows * 2).unsqueeze(-1) + g_cols.unsqueeze(-2)), None


def _sumsq_sums(x: Tensor, k: int) -> tuple[Tensor, Tensor]:
    sq = x.square()
    if k == 1:
        return sq.sum(1), sq.sum(0)
    return sq.sum(1), sq.reshape(x.shape[0], -1, k).sum(0).sum(1)  # (the summation order of sum(0) first)


def _sumsq_rows_cols(x: Tensor, k: int) -> tuple[Tensor, Tensor]:
    if x.requires_grad and torch.is_grad_enabled():
        return _SumsqRowsCols.apply(x, k)
    return _sumsq_sums(x, k)


@_primitive
def sumsq_pairs(*ws: Tensor, layouts: tuple[tuple[int, int, int, bool], ...]) -> Tensor:
    """Row and column sums of squares of many conv/linear weights, concatenated weight after weight.

    Per weight `(out, in, kernel size, rows first)`: the weight is read as `[out, in * kernel]`, its column
    sums are added over the kernel, and its two vectors are joined in that order. One equation for every
    such weight of a model (instead of six each) makes programs shorter to generate and compile; each
    weight's squares are freed before the next weight is read."""
    parts = []
    for w, (o, i, k, rows_first) in zip(ws, layouts):
        rows, cols = _sumsq_rows_cols(acc(w).reshape(o, i * k), k)
        parts.append(torch.cat([rows, cols] if rows_first else [cols, rows]))
    return torch.cat(parts)


@_primitive
def nonzero_bytes(x: Tensor, *, tolerance: float) -> Tensor:
    """uint8 1 where `|x| > tolerance` (`x != 0` at tolerance 0: NaN counts as nonzero), else 0."""
    if torch.compiler.is_compiling() and not isinstance(x, DTensor):
        return native.nonzero_bytes_op(x, tolerance)
    return native.nonzero_bytes(x, tolerance)


@_primitive
def nonzero_stats(*ws: Tensor, tolerance: float, m: int, keep: int) -> tuple[Tensor, Tensor]:
    """Nonzero counts of 2+-dim weights `[o, c, *k]`, concatenated weight after weight: (int64 `[3, sum o]`:
    per output row the nonzeros and the `m`-blocks along axis 1 with exactly / at most `keep` nonzeros;
    uint8 `[sum c]`: 1 where an input has a nonzero). Nonzero means `|w| > tolerance` (`w != 0` at 0).
    One native pass over every weight on CPU, torch ops elsewhere (`wtcore.native`)."""
    if torch.compiler.is_compiling() and not any(isinstance(w, DTensor) for w in ws):
        return native.nonzero_stats_op(list(ws), tolerance, m, keep)  # (DTensors: op by op, as in eager)
    return native.nonzero_stats(ws, tolerance, m, keep)
