"""The program language: a straight-line list of equations over named values (in the spirit of a jaxpr).

Specs emit equations through a `Builder`. The builder hash-conses: emitting the same primitive on the
same arguments twice returns the same `Var`, so a reduction requested by several specs is computed once.
Every primitive is a line of Python over torch ops (its `template`), so the code generator, the constant
folder and `print(program)` share one definition, and the generated code runs under autograd,
`torch.func.vmap`, `torch.func.grad` and `torch.compile`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import SpecError
from .native import nonzero_stats

__all__ = ["PRIMITIVES", "Builder", "Eqn", "Primitive", "Var", "runtime_namespace"]


@dataclass(frozen=True, eq=False)
class Var:
    """A value of a program. A builder creates each id once, so identity is equality: the built-in identity hash
    and comparison run in C (the compiler passes hash every Var many times)."""

    id: int

    def __repr__(self) -> str:
        return f"v{self.id}"


@dataclass(frozen=True)
class Eqn:
    out: Var
    prim: str
    args: tuple[Any, ...]
    #: the Vars among `args` (nested tuples included), in order: found once here, read by every compiler pass
    vars: tuple[Var, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "vars", tuple(_arg_vars(self.args)))

    def __str__(self) -> str:
        return f"{self.out!r} = {self.prim}({', '.join(_fmt_arg(a) for a in self.args)})"


def _arg_vars(args: Any) -> list[Var]:
    out: list[Var] = []
    for a in args:
        if isinstance(a, Var):
            out.append(a)
        elif isinstance(a, tuple):
            out.extend(_arg_vars(a))
    return out


def _fmt_arg(a: Any) -> str:
    if isinstance(a, Var):
        return repr(a)
    if isinstance(a, (tuple, list)):
        return "(" + ", ".join(_fmt_arg(x) for x in a) + ("," if len(a) == 1 else "") + ")"
    return repr(a)


@dataclass(frozen=True)
class Primitive:
    """`template` formats a Python expression from the argument sources; `n_var_args` is informative."""

    name: str
    template: Callable[..., str]
    doc: str = ""


def _f(fmt: str) -> Callable[..., str]:
    return lambda *a: fmt.format(*a)


def _list(xs: Sequence[str]) -> str:
    return "[" + ", ".join(xs) + "]"


PRIMITIVES: dict[str, Primitive] = {
    # inputs
    "param": Primitive("param", lambda name: f"P[{name}]", "a parameter tensor (index into the call's parameter list)"),
    "const": Primitive("const", lambda k: f"C[{k}]", "a tensor computed at compile time"),
    # dtype
    "acc": Primitive("acc", _f("wt_acc({})"), "upcast half/bfloat16 to float32 for accumulation; keep fp32/fp64"),
    "to_float": Primitive("to_float", _f("{}.to(torch.float32)"), "cast to float32"),
    "to_long": Primitive("to_long", _f("{}.to(torch.int64)"), "cast to int64"),
    "to_int32": Primitive("to_int32", _f("{}.to(torch.int32)"), "cast to int32"),
    "cast_like": Primitive("cast_like", _f("{}.to({}.dtype)"), "cast the first argument to the second's dtype"),
    # elementwise
    "square": Primitive("square", _f("{}.square()")),
    "abs": Primitive("abs", _f("{}.abs()")),
    "sqrt": Primitive("sqrt", _f("{}.sqrt()")),
    "safe_sqrt": Primitive("safe_sqrt", _f("wt_safe_sqrt({})"), "sqrt with gradient 0 (not inf/nan) at 0"),
    "neg": Primitive("neg", _f("(-{})")),
    "add": Primitive("add", _f("({} + {})")),
    "sub": Primitive("sub", _f("({} - {})")),
    "mul": Primitive("mul", _f("({} * {})")),
    "div": Primitive("div", _f("({} / {})")),
    "maximum": Primitive("maximum", _f("{}.clamp(min={})")),
    "gt": Primitive("gt", _f("({} > {})")),
    "ge": Primitive("ge", _f("({} >= {})")),
    "lt": Primitive("lt", _f("({} < {})")),
    "le": Primitive("le", _f("({} <= {})")),
    "eq": Primitive("eq", _f("({} == {})")),
    "ne": Primitive("ne", _f("({} != {})")),
    "logical_and": Primitive("logical_and", _f("({} & {})")),
    "logical_or": Primitive("logical_or", _f("({} | {})")),
    "logical_not": Primitive("logical_not", _f("(~{})")),
    "where": Primitive("where", _f("torch.where({}, {}, {})")),
    # shape and reductions
    "sum": Primitive("sum", lambda x, dims: f"{x}.sum()" if dims == "None" else f"{x}.sum({dims})"),
    "reshape": Primitive("reshape", _f("{}.reshape({})")),
    "transpose": Primitive("transpose", _f("{}.transpose({}, {})")),
    "cat": Primitive("cat", lambda *xs: f"torch.cat({_list(xs)})"),
    "stack": Primitive("stack", lambda *xs: f"torch.stack({_list(xs)}, 1)", "stack vectors as columns"),
    "column": Primitive("column", _f("{}[:, {}]")),
    "take": Primitive("take", _f("{}.index_select(0, {})"), "gather entries of a vector by a constant index"),
    "head": Primitive("head", _f("{}[:{}]"), "the first n rows"),
    "scatter_add": Primitive(
        "scatter_add",
        _f("{1}.new_zeros(({2},) + tuple({1}.shape[1:])).index_add(0, {0}, {1})"),
        "one out-of-place index_add into a zero buffer of `size` rows",
    ),
    "sumsq_rows_cols": Primitive(
        "sumsq_rows_cols", _f("wt_sumsq_rows_cols({})"),
        "(row sums, column sums) of x**2 for a 2-D x, with a one-temporary backward",
    ),
    "item": Primitive("item", _f("{}[{}]"), "one element of a tuple-valued primitive"),
    "sumsq_pairs": Primitive(
        "sumsq_pairs", lambda *a: f"wt_sumsq_pairs([{', '.join(a[:-1])}], {a[-1]})",
        "concatenated row and column sums of squares of many weights, `(out, in, kernel, rows first)` each",
    ),
    "segment_sum_sorted": Primitive(
        "segment_sum_sorted", _f("wt_segment_sum_sorted({}, {})"), "sums of contiguous segments ending at `ends`"
    ),
}

# Cost and sparsity primitives (wtcore/specs/costs.py, sparsity.py): float-only counting, no bool tensors.
PRIMITIVES.update({
    "sign": Primitive("sign", _f("{}.sign()"), "-1, 0 or 1 (sign of |w| is an exact 0/1 nonzero indicator)"),
    "clamp": Primitive("clamp", _f("{}.clamp({}, {})"), "clamp between two scalars"),
    "dot": Primitive("dot", _f("torch.dot({}.reshape(-1), {}.reshape(-1))"), "sum of products in one read (BLAS)"),
    "stack0": Primitive("stack0", lambda *xs: f"torch.stack({_list(xs)})", "stack 0-d values into a vector"),
})

# The packed nonzero indicator (wtcore/nonzero.py): one byte per element, counted with integer reductions.
PRIMITIVES.update({
    "nonzero_bytes": Primitive(
        "nonzero_bytes", _f("wt_nonzero_bytes({}, {})"), "uint8 1 where |x| > tolerance, else 0 (one byte per element)"
    ),
    "nonzero_stats": Primitive(
        "nonzero_stats", lambda p, tol, m, keep, o, c: f"wt_nonzero_stats([{p}], {tol}, {m}, {keep})",
        "(w, tolerance, m, keep, rows, inputs): (int64 [3, rows]: per row the nonzeros and the m-blocks along "
        "axis 1 with exactly / at most `keep` nonzeros; uint8 [inputs]: input activity) of a 2+-dim weight",
    ),
    "nonzero_stats_batch": Primitive(
        "nonzero_stats_batch", lambda ws, tol, m, keep: f"wt_nonzero_stats(list({ws}), {tol}, {m}, {keep})",
        "`nonzero_stats` of many weights in one call, concatenated (rows along dim 1, then inputs)",
    ),
    "stats_part": Primitive(
        "stats_part", lambda st, r, o, c, n: f"({st}[0][:, {r}:{r} + {o}], {st}[1][{c}:{c} + {n}])",
        "(batch, row offset, rows, input offset, inputs): one weight's `nonzero_stats` in a batch",
    ),
    "isum": Primitive(
        "isum",
        lambda x, dims, dtype: f"{x}.sum({'' if dims == 'None' else dims + ', '}dtype=torch.{dtype.strip(chr(39))})",
        "exact integer sum over `dims` accumulated in `dtype` (e.g. 'int32')",
    ),
    "acc_like": Primitive(
        "acc_like", _f("wt_acc_like({}, {})"), "cast to the accumulation dtype of the second argument"
    ),
})

# Mask primitives (wtcore/specs/masks.py): fixed-size sorts, dense max reductions and block reshapes.
PRIMITIVES.update({
    "amax": Primitive("amax", lambda x, dims: f"{x}.amax({dims})", "max over `dims` (dense per-unit max-abs)"),
    "argsort": Primitive(
        "argsort", _f("torch.argsort({}, dim={}, stable=True)"), "stable ascending argsort (constant length)"
    ),
    "round": Primitive("round", _f("torch.round({})"), "round half to even, like Python's round"),
    "ceil": Primitive("ceil", _f("torch.ceil({})")),
    "to_float64": Primitive("to_float64", _f("{}.to(torch.float64)"), "cast to float64 (exact counts)"),
    "minimum": Primitive("minimum", _f("{}.clamp(max={})"), "elementwise min with a scalar or a tensor"),
    "permute": Primitive("permute", _f("{}.permute({})")),
    "pad_inf": Primitive(
        "pad_inf", _f("torch.nn.functional.pad({}, {}, value=float('inf'))"), "pad trailing dims with +inf"
    ),
    "narrow": Primitive("narrow", _f("{}.narrow({}, {}, {})")),
    "expand": Primitive("expand", _f("{}.expand({})")),
})


def wt_acc(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def wt_acc_like(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`x` in the dtype `wt_acc(like)` would have, without materializing `wt_acc(like)`."""
    return x.to(like.dtype if like.dtype in (torch.float32, torch.float64) else torch.float32)


def wt_nonzero_bytes(x: torch.Tensor, tolerance: float) -> torch.Tensor:
    """1 where |x| > tolerance else 0, as uint8. At tolerance 0 it is a cast to bool (x != 0; NaN counts as
    nonzero), which torch runs ~5x faster than the comparison `x != 0` on CPU; the bool->uint8 view is free."""
    hit = x.bool() if tolerance == 0.0 else x.abs() > tolerance
    return hit.view(torch.uint8)


@torch.library.custom_op("wt::nonzero_bytes", mutates_args=())
def _nonzero_bytes_op(x: torch.Tensor, tolerance: float) -> torch.Tensor:
    """`wt_nonzero_bytes` as an operator torch.compile does not look into: inductor's code for bool and
    uint8 *outputs* is ~20x slower than ATen's cast on CPU (a [512, 512, 3, 3] `w != 0`: 0.8 ms eager, 6.5 ms
    compiled), while it reads uint8 inputs fast. Compiled programs only: in eager a custom op costs ~35 us of
    Python per call."""
    return wt_nonzero_bytes(x, tolerance)


@_nonzero_bytes_op.register_fake
def _(x: torch.Tensor, tolerance: float) -> torch.Tensor:
    return torch.empty(x.shape, dtype=torch.uint8, device=x.device)


@torch.library.custom_op("wt::nonzero_stats", mutates_args=())
def _nonzero_stats_op(ws: list[torch.Tensor], tolerance: float, m: int, keep: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """`wtcore.native.nonzero_stats` as an operator torch.compile calls without looking into it (dynamo cannot
    trace the ctypes call). It has no autograd or vmap rule: counts have no gradient, and eager programs,
    which vmap and grad transform, call `nonzero_stats` directly (torch ops under those transforms)."""
    return nonzero_stats(ws, tolerance, m, keep)


@_nonzero_stats_op.register_fake
def _(ws: list[torch.Tensor], tolerance: float, m: int, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    dev = ws[0].device if ws else None
    return (torch.empty((3, sum(w.shape[0] for w in ws)), dtype=torch.int64, device=dev),
            torch.empty((sum(w.shape[1] for w in ws),), dtype=torch.uint8, device=dev))


def wt_nonzero_stats(ws: list[torch.Tensor], tolerance: float, m: int, keep: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """`nonzero_stats` in eager programs: called directly (no operator dispatch), or through the operator
    when a user's own `torch.compile` traces the program (dynamo cannot look into the ctypes call)."""
    if torch.compiler.is_compiling():
        return _nonzero_stats_op(ws, tolerance, m, keep)
    return nonzero_stats(ws, tolerance, m, keep)


def wt_safe_sqrt(x: torch.Tensor) -> torch.Tensor:
    pos = x > 0
    return torch.where(pos, torch.where(pos, x, torch.ones_like(x)).sqrt(), torch.zeros_like(x))


def wt_segment_sum_sorted(x: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """Sums of the contiguous segments `[ends[k-1], ends[k])` via a cumulative sum (no scatter)."""
    cs = x.cumsum(0).index_select(0, ends - 1)
    return torch.cat([cs[:1], cs[1:] - cs[:-1]])


class WtSumsqRowsCols(torch.autograd.Function):
    """Row and column sums of squares of a 2-D tensor.

    As composed ops, autograd adds the two broadcast gradients into one full-size buffer and square's
    backward makes two more; here the backward is `p * (2 g_rows[:, None] + 2 g_cols[None, :])`: one
    broadcast sum and one product. `generate_vmap_rule` keeps it usable under `torch.func.vmap`/`grad`.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sq = x.square()
        return sq.sum(1), sq.sum(0)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[torch.Tensor], output: Any) -> None:
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx: Any, g_rows: torch.Tensor, g_cols: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return x * ((g_rows * 2).unsqueeze(-1) + (g_cols * 2).unsqueeze(-2))


def wt_sumsq_rows_cols(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`WtSumsqRowsCols` when a gradient is wanted; plain ops otherwise (no autograd.Function overhead)."""
    if x.requires_grad and torch.is_grad_enabled():
        return WtSumsqRowsCols.apply(x)
    sq = x.square()
    return sq.sum(1), sq.sum(0)


def wt_sumsq_pairs(ws: list[torch.Tensor], layouts: tuple[tuple[int, int, int, bool], ...]) -> torch.Tensor:
    """Row and column sums of squares of many conv/linear weights, concatenated weight after weight: per
    weight `(out, in, kernel size, rows first)`, the weight read as `[out, in * kernel]`, its column sums
    added over the kernel. One equation for every such weight of a model instead of six each (a program is
    that much shorter to generate and compile); each weight's two vectors are joined as soon as its squared
    temporary is freed, as the per-weight code did (see `_emit_scatter`)."""
    parts = []
    for w, (o, i, k, rows_first) in zip(ws, layouts):
        rows, cols = wt_sumsq_rows_cols(wt_acc(w).reshape(o, i * k))
        if k > 1:
            cols = cols.reshape(i, k).sum(1)
        parts.append(torch.cat([rows, cols] if rows_first else [cols, rows]))
    return torch.cat(parts)


def runtime_namespace(compiled: bool = False) -> dict[str, Any]:
    """Names the generated code may use; `compiled`: bound for torch.compile (opaque packed indicator)."""
    return {
        "torch": torch,
        "wt_acc": wt_acc,
        "wt_acc_like": wt_acc_like,
        "wt_nonzero_bytes": _nonzero_bytes_op if compiled else wt_nonzero_bytes,
        "wt_nonzero_stats": _nonzero_stats_op if compiled else wt_nonzero_stats,
        "wt_safe_sqrt": wt_safe_sqrt,
        "wt_segment_sum_sorted": wt_segment_sum_sorted,
        "wt_sumsq_rows_cols": wt_sumsq_rows_cols,
        "wt_sumsq_pairs": wt_sumsq_pairs,
    }


class Builder:
    """Emits equations with hash-consing. Specs use it; the compiler lowers and folds what they emit.

    Values are `Var`s; Python numbers may be passed where a primitive takes a scalar.
    """

    def __init__(self) -> None:
        self.eqns: list[Eqn] = []
        self.consts: dict[Var, torch.Tensor] = {}
        self.const_labels: dict[Var, str] = {}
        self._memo: dict[tuple[Any, ...], Var] = {}
        self._const_ids: dict[int, Var] = {}
        self._next = 0

    # -------------------------------------------------------------- plumbing
    def _new(self) -> Var:
        v = Var(self._next)
        self._next += 1
        return v

    def emit(self, prim: str, *args: Any) -> Var:
        if prim not in PRIMITIVES:
            raise SpecError(f"unknown primitive {prim!r}; known: {sorted(PRIMITIVES)}")
        key = (prim, *args)
        hit = self._memo.get(key)
        if hit is not None:
            return hit
        v = self._new()
        self.eqns.append(Eqn(v, prim, tuple(args)))
        self._memo[key] = v
        return v

    def param(self, name: str) -> Var:
        """The parameter with this canonical name."""
        return self.emit("param", name)

    def const(self, value: torch.Tensor | float | int, label: str = "") -> Var:
        """A compile-time tensor (kept on the program, moved to the parameters' device on first use)."""
        t = value if isinstance(value, torch.Tensor) else torch.tensor(value)
        hit = self._const_ids.get(id(t))
        if hit is not None:
            return hit
        v = self._new()
        self.consts[v] = t
        self.const_labels[v] = label
        self._const_ids[id(t)] = v
        self.eqns.append(Eqn(v, "const", (label,)))
        return v

    def unit_reduce(self, kind: str, *options: Any) -> Var:
        """Per-unit reduction over every (filtered) slice: a `[num_units]` vector.

        kinds: "sumsq" (sum of squares), "abssum", "nnz" (count of |w| > tolerance, option 1),
        "active" (> 0 exactly when some element has |w| > tolerance, option 1; not a count: the cheapest
        test, from byte maxima of the packed indicator), "count" (number of parameter elements, constant).
        Lowered by the compiler into dense per-parameter reductions and a single `index_add` shared by all
        kinds in the program.
        """
        return self._lazy("unit_reduce", kind, *options)

    def lookup(self, prim: str, *args: Any) -> Var | None:
        """The value of `prim(*args)` if something emitted it already, else None (emits nothing)."""
        return self._memo.get((prim, *args))

    def _lazy(self, prim: str, *args: Any) -> Var:
        key = (prim, *args)
        hit = self._memo.get(key)
        if hit is not None:
            return hit
        v = self._new()
        self.eqns.append(Eqn(v, prim, tuple(args)))
        self._memo[key] = v
        return v

    # ------------------------------------------------------- convenience ops
    def _bin(self, prim: str, a: Any, b: Any) -> Var:
        return self.emit(prim, a, b)

    def add(self, a: Any, b: Any) -> Var:
        return self._bin("add", a, b)

    def sub(self, a: Any, b: Any) -> Var:
        return self._bin("sub", a, b)

    def mul(self, a: Any, b: Any) -> Var:
        return self._bin("mul", a, b)

    def div(self, a: Any, b: Any) -> Var:
        return self._bin("div", a, b)

    def maximum(self, a: Any, b: Any) -> Var:
        return self._bin("maximum", a, b)

    def gt(self, a: Any, b: Any) -> Var:
        return self._bin("gt", a, b)

    def ge(self, a: Any, b: Any) -> Var:
        return self._bin("ge", a, b)

    def lt(self, a: Any, b: Any) -> Var:
        return self._bin("lt", a, b)

    def eq(self, a: Any, b: Any) -> Var:
        return self._bin("eq", a, b)

    def logical_or(self, a: Any, b: Any) -> Var:
        return self._bin("logical_or", a, b)

    def logical_and(self, a: Any, b: Any) -> Var:
        return self._bin("logical_and", a, b)

    def logical_not(self, a: Var) -> Var:
        return self.emit("logical_not", a)

    def where(self, c: Var, a: Any, b: Any) -> Var:
        return self.emit("where", c, a, b)

    def square(self, x: Var) -> Var:
        return self.emit("square", x)

    def abs(self, x: Var) -> Var:
        return self.emit("abs", x)

    def sqrt(self, x: Var) -> Var:
        return self.emit("sqrt", x)

    def safe_sqrt(self, x: Var) -> Var:
        return self.emit("safe_sqrt", x)

    def sum(self, x: Var, dims: tuple[int, ...] | None = None) -> Var:
        return self.emit("sum", x, dims)

    def to_float(self, x: Var) -> Var:
        return self.emit("to_float", x)

    def to_long(self, x: Var) -> Var:
        return self.emit("to_long", x)

    def cast_like(self, x: Var, like: Var) -> Var:
        return self.emit("cast_like", x, like)

    def take(self, x: Var, index: Var) -> Var:
        return self.emit("take", x, index)

    def segment_sum_sorted(self, x: Var, ends: Var) -> Var:
        return self.emit("segment_sum_sorted", x, ends)
