"""Nonzero counts (`wtcore.nonzero`, `wtcore.native`): the C kernel against its torch implementation and
per-element references, and programs that count with it against independent counts.

Every program counts 2+-dim weights through `nonzero_stats`: the native kernel on plain CPU tensors, torch
ops under vmap/grad, off the CPU, or where the kernel cannot be built. Both must give the same numbers, for
every float dtype, tolerance (at 0, NaN counts as nonzero; above, it does not), block size and kernel shape.
The slow tests compile real models with inductor (where the kernel runs as an opaque operator).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import wtcore
from wtcore import native
from wtcore.ir import AxisPart, CostAxis, CostOp, Param, Slice, Structure, UnitGroup, runs_from_list
from wtcore.testing import params_for, structures_with_ops

TRACKED = ["structured_bops", "unstructured_sparsity", "nm_sparsity", "group_pruning_summary"]


def specs_at(tolerance: float) -> list[wtcore.Spec]:
    """The tracker's four kinds, plus N:M blocks that are not 2:4 (1:3, 4:8), at one tolerance."""
    t = {"tolerance": tolerance}
    return [*(wtcore.Spec(k, **t, key=f"{k}@{tolerance}") for k in TRACKED),
            wtcore.Spec("nm_sparsity", n=1, m=3, **t, key=f"nm13@{tolerance}"),
            wtcore.Spec("nm_sparsity", n=4, m=8, **t, key=f"nm48@{tolerance}")]


def uncompiled(prog: wtcore.Program, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A compiled program's generated function run eagerly (its formulation, no inductor)."""
    return dict(zip(prog.output_keys, prog.fn(prog.gather(params), prog.consts_on(torch.device("cpu")))))


def assert_same(compiled: dict[str, torch.Tensor], eager: dict[str, torch.Tensor]) -> None:
    assert compiled.keys() == eager.keys()
    for k in eager:
        assert torch.equal(compiled[k].to(eager[k].dtype), eager[k]), (k, compiled[k], eager[k])


def sprinkle(params: dict[str, torch.Tensor], seed: int, nan: bool = True) -> dict[str, torch.Tensor]:
    """Random zeros (40%), near-zero entries (|w| <= 0.05, for tolerance > 0) and, if `nan`, a NaN per tensor."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, w in params.items():
        w = w.detach().clone()
        r = torch.rand(w.shape, generator=gen)
        w[r < 0.4] = 0
        w[(r >= 0.4) & (r < 0.5)] = 0.01
        if nan and w.numel() > 1:
            w.view(-1)[int(torch.randint(w.numel(), (1,), generator=gen))] = float("nan")
        out[name] = w
    return out


def ref_nonzeros(w: torch.Tensor, tolerance: float) -> torch.Tensor:
    """Independent indicator: NaN is nonzero at tolerance 0 (like `x.bool()`), and not above a tolerance."""
    return (w != 0) if tolerance == 0 else (w.abs() > tolerance)


def ref_blocks(w: torch.Tensor, tolerance: float, n: int, m: int) -> tuple[int, int]:
    """(strict, eligible) N:M blocks along axis 1, one block per row, kernel position and m inputs."""
    o, c = w.shape[0], w.shape[1]
    k = math.prod(w.shape[2:])
    nz = ref_nonzeros(w, tolerance).reshape(o, c, k)[:, : c // m * m].reshape(o, c // m, m, k).sum(2)
    return int((nz == m - n).sum()), int((nz <= m - n).sum())


# ----------------------------------------------------------------------------- the kernel
def ref_stats(w: torch.Tensor, tolerance: float, m: int, keep: int) -> tuple[list[list[int]], list[int]]:
    """Per-element Python loops over torch's own indicator (`ref_nonzeros`: the comparison in the weight's
    dtype, as eager torch makes it): ([nonzeros, blocks with exactly keep, with at most keep] per row, input
    activity)."""
    o, c = w.shape[0], w.shape[1]
    k = math.prod(w.shape[2:])
    vals = ref_nonzeros(w, tolerance).reshape(o, c, k).int().tolist()
    rows: list[list[int]] = [[], [], []]
    cols = [0] * c
    for r in range(o):
        ind = vals[r]
        sums = [sum(ind[b * m + j][q] for j in range(m)) for b in range(c // m) for q in range(k)]
        rows[0].append(sum(map(sum, ind)))
        rows[1].append(sum(s == keep for s in sums))
        rows[2].append(sum(s <= keep for s in sums))
        cols = [a | int(any(ind[i])) for a, i in zip(cols, range(c))]
    return rows, cols


DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


@settings(max_examples=80, deadline=None)
@given(st.integers(1, 5), st.integers(1, 13), st.sampled_from([(), (1,), (3,), (2, 2), (3, 3)]),
       st.sampled_from(DTYPES), st.sampled_from([0.0, 0.05, 0.1, 1e-30]), st.sampled_from([(4, 2), (4, 0), (4, 4),
                                                                                         (1, 0), (3, 1), (8, 3)]),
       st.floats(0.0, 1.0), st.integers(0, 2**31 - 1), st.booleans())
def test_kernel_equals_torch_and_plain_loops(o: int, c: int, kernel: tuple[int, ...], dtype: torch.dtype,
                                             tolerance: float, mk: tuple[int, int], density: float, seed: int,
                                             strided: bool) -> None:
    """Several weights in one call: zeros, -0.0, entries exactly at and next to the tolerance, NaN, +-inf,
    tails (c % m), full and empty blocks, non-contiguous inputs."""
    m, keep = mk
    gen = torch.Generator().manual_seed(seed)
    ws = []
    for i in range(3):
        shape = (o + i, c, *kernel)
        w = torch.randn(shape, generator=gen, dtype=torch.float64)
        r = torch.rand(shape, generator=gen, dtype=torch.float64)
        w[r >= density] = 0
        w[r < 0.1 * density] = tolerance  # exactly at the tolerance: zero (not above it)
        w = w.to(dtype)
        flat = w.view(-1)
        for j, special in enumerate([-0.0, float("nan"), float("inf"), -float("inf")]):
            if (seed >> j) & 1:
                flat[(seed >> (4 + j)) % flat.numel()] = special
        if strided and len(shape) == 2:
            w = w.t().contiguous().t()
        ws.append(w)
    rows, cols = native.nonzero_stats(ws, tolerance, m, keep)
    rows_t, cols_t = native.nonzero_stats_torch(ws, tolerance, m, keep)
    assert torch.equal(rows, rows_t) and torch.equal(cols, cols_t)
    want_rows: list[list[int]] = [[], [], []]
    want_cols: list[int] = []
    for w in ws:
        r, cl = ref_stats(w, tolerance, m, keep)
        for i in range(3):
            want_rows[i] += r[i]
        want_cols += cl
    assert rows.tolist() == want_rows and cols.tolist() == want_cols


def test_the_kernel_is_built_and_used() -> None:
    """CI builds it (a C++ compiler is there: inductor needs one too); a silent fallback would hide a slow path."""
    assert native.available()
    w = torch.randn(4, 8)
    assert native.plain_cpu(w)
    rows, cols = torch.ops.wt_native.nonzero_stats([w], [1], [0x7FFFFFFF], 4, 2)
    assert rows[0].tolist() == [8] * 4 and cols.tolist() == [1] * 8


def test_long_rows_are_counted() -> None:
    ws = [torch.zeros(2, 70_000), torch.ones(3, 4)]
    ws[0][0, ::3] = 1.0
    rows, cols = native.nonzero_stats(ws, 0.0, 4, 2)
    (r0, c0), (r1, c1) = ref_stats(ws[0], 0.0, 4, 2), ref_stats(ws[1], 0.0, 4, 2)
    assert rows.tolist() == [a + b for a, b in zip(r0, r1)] and cols.tolist() == c0 + c1
    assert rows[0].tolist() == [23_334, 0, 4, 4, 4]


def test_an_infinite_tolerance_counts_nothing() -> None:
    w = torch.tensor([[1.0, float("inf"), -float("inf"), float("nan"), 0.0]])
    rows, cols = native.nonzero_stats([w], float("inf"), 4, 2)
    assert rows.tolist() == [[0], [0], [1]] and cols.tolist() == [0] * 5


def test_tolerance_threshold_agrees_with_torch_at_every_boundary() -> None:
    """The kernel's integer threshold is the first bit pattern torch calls `|x| > tolerance`, per dtype."""
    for dtype in DTYPES:
        for tol in (1e-3, 0.1, 1 / 3, 1.0, 1e-45, 3e38, 1e300):
            lo, hi = native.threshold_bits(dtype, tol)
            itype = native._INT[native._WIDTH[dtype]]
            pats = torch.tensor([lo - 1, lo], dtype=torch.int64).to(itype).view(dtype)
            above = (pats.abs() > tol).tolist()
            assert above == [False, True] or (lo > hi and not any(above)), (dtype, tol, lo)


def test_one_batch_per_block_kind_in_a_program() -> None:
    """Every weight's counts come from one call per (tolerance, m, keep), in eager and compiled programs."""
    s = one_weight((8, 12, 3, 3))
    prog = wtcore.compile(s, [*specs_at(0.0), wtcore.Spec("unit_active")])
    batches = [(e.kwargs["tolerance"], e.kwargs["m"], e.kwargs["keep"]) for e in prog.eqns
               if e.prim == "nonzero_stats"]
    assert sorted(batches) == [(0.0, 3, 2), (0.0, 4, 2), (0.0, 8, 4)]


# ----------------------------------------------------------------------------- the formulation, random structures
# monkeypatch is undone per example (a context), so its function scope does not matter
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(structures_with_ops(max_dim=9), st.integers(0, 2**31 - 1), st.sampled_from([0.0, 0.05]), st.booleans())
def test_counts_equal_without_the_kernel_on_random_structures(monkeypatch: pytest.MonkeyPatch, s: wtcore.Structure,
                                                                seed: int, tolerance: float, nan: bool) -> None:
    """Every parameter with 2+ dims is counted (unstructured and N:M, explicitly selected), and unit activity
    covers every slice kind the strategy makes (grouped, partial, repeated, self-overlapping): the same with
    the kernel, without it, and through the compiled programs' operator (the generated function run eagerly)."""
    p = sprinkle(params_for(s, dtype=torch.float32, seed=seed), seed, nan)
    mats = tuple(q.name for q in s.params if len(q.shape) >= 2)
    specs = [wtcore.Spec("group_pruning_summary", tolerance=tolerance),
             wtcore.Spec("structured_bops", tolerance=tolerance),
             wtcore.Spec("unit_active", tolerance=tolerance)]
    if mats:
        specs += [wtcore.Spec("unstructured_sparsity", tolerance=tolerance, params=mats),
                  wtcore.Spec("nm_sparsity", tolerance=tolerance, params=mats),
                  wtcore.Spec("nm_sparsity", n=1, m=3, tolerance=tolerance, params=mats, key="nm13")]
    eager = wtcore.compile(s, specs)(p)
    assert_same(uncompiled(wtcore.compile(s, specs, backend="inductor"), p), eager)
    with monkeypatch.context() as mp:
        mp.setattr(native, "_extension", lambda: None)
        assert_same(wtcore.compile(s, specs)(p), eager)
    if mats:
        zeros = sum(int((~ref_nonzeros(p[n], tolerance)).sum()) for n in mats)
        assert eager["unstructured_sparsity/zeros"].item() == zeros
        strict, elig = np.sum([ref_blocks(p[n], tolerance, 2, 4) for n in mats], axis=0)
        assert eager["nm_sparsity/strict_blocks"].item() == strict
        assert eager["nm_sparsity/eligible_blocks"].item() == elig


def one_weight(shape: tuple[int, ...]) -> Structure:
    """One conv/linear weight whose rows are the units of group `out` and whose inputs are those of `in`."""
    kind = "conv" if len(shape) == 4 else "linear"
    p = Param("w.weight", shape, module="w", module_type="Conv2d" if kind == "conv" else "Linear")
    ident = {a: runs_from_list(range(shape[a])) for a in (0, 1)}
    groups = (UnitGroup("out", "channel", shape[0], (Slice("w.weight", 0, ident[0]),)),
              UnitGroup("in", "channel", shape[1], (Slice("w.weight", 1, ident[1]),)))
    op = CostOp("w", "w", kind, math.prod(shape) * 5, (CostAxis("out", shape[0], parts=(AxisPart("out", ident[0]),)),
                                                       CostAxis("in", shape[1], parts=(AxisPart("in", ident[1]),))),
                param="w.weight")
    return Structure((p,), groups, (op,))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.integers(1, 6), st.sampled_from([1, 3, 4, 5, 8, 10, 12, 16]), st.sampled_from([(), (1, 1), (3, 1), (2, 2)]),
       st.sampled_from([0.0, 0.3, 0.7, 1.0]), st.sampled_from([0.0, 0.05]), st.integers(0, 2**31 - 1))
def test_program_counts_of_one_weight_equal_direct_counts(monkeypatch: pytest.MonkeyPatch, o: int, c: int,
                                                          kernel: tuple[int, ...], density: float, tolerance: float,
                                                          seed: int) -> None:
    """Linear and conv weights, tails, full and empty blocks, NaN: zero counts, 2:4, 1:3 and 4:8 blocks and
    unit activity against direct counts, with and without the kernel."""
    shape = (o, c, *kernel)
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=gen) + 0.2
    r = torch.rand(shape, generator=gen)
    w[r >= density] = 0
    w[(r < density) & (r > 0.9 * density)] = 0.01  # zero above a tolerance
    if seed % 3 == 0:
        w.view(-1)[seed % w.numel()] = float("nan")
    s, p = one_weight(shape), {"w.weight": w}
    specs = [*specs_at(tolerance), wtcore.Spec("unit_active", tolerance=tolerance)]
    eager = wtcore.compile(s, specs)(p)
    assert_same(uncompiled(wtcore.compile(s, specs, backend="inductor"), p), eager)
    with monkeypatch.context() as mp:
        mp.setattr(native, "_extension", lambda: None)
        assert_same(wtcore.compile(s, specs)(p), eager)
    nz = ref_nonzeros(w, tolerance)
    assert eager[f"unstructured_sparsity@{tolerance}/zeros"].item() == int((~nz).sum())
    for key, (n, m) in (("nm_sparsity", (2, 4)), ("nm13", (1, 3)), ("nm48", (4, 8))):
        strict, elig = ref_blocks(w, tolerance, n, m)
        assert eager[f"{key}@{tolerance}/strict_blocks"].item() == strict
        assert eager[f"{key}@{tolerance}/eligible_blocks"].item() == elig
    rows, cols = nz.reshape(o, c, -1).any(2).any(1), nz.reshape(o, c, -1).any(2).any(0)
    assert torch.equal(eager["unit_active"], torch.cat([rows, cols]).to(eager["unit_active"].dtype))


# ----------------------------------------------------------------------------- inductor on real models
def _model_case(name: str) -> tuple[wtcore.Structure, dict[str, torch.Tensor]]:
    tv = pytest.importorskip("torchvision")
    from wtfront import trace

    torch.manual_seed(0)
    model = getattr(tv.models, name)(weights=None).eval()
    s = trace(model, torch.randn(1, 3, 64, 64))
    p = sprinkle(dict(model.named_parameters()), seed=1)
    # whole input channels / output rows zero (activity), on 1x1 and 3x3 weights
    for w in p.values():
        if w.dim() == 4 and w.shape[1] >= 8:
            w[:, 5] = 0
            w[2] = 0
    return s, p


@pytest.mark.slow
@pytest.mark.parametrize(("name", "tolerances", "extra"), [("resnet18", (0.0, 0.05), True),
                                                         ("mobilenet_v3_small", (0.05,), False)])
def test_inductor_counts_equal_eager_on_real_models(name: str, tolerances: tuple[float, ...], extra: bool) -> None:
    """resnet18: a 3-input first conv (tail entries), 3x3 and 1x1 convs, fc, tolerance 0 and > 0, 2:4, 1:3
    and 4:8; mobilenet_v3_small (the tracker's four kinds above a tolerance, to keep inductor's compile
    short): depthwise convs, SE blocks, linears. NaN entries in every weight."""
    torch._dynamo.reset()
    s, p = _model_case(name)
    specs = [sp for tol in tolerances for sp in specs_at(tol) if extra or sp.name in TRACKED]
    eager = wtcore.compile(s, specs)(p)
    assert_same(wtcore.compile(s, specs, backend="inductor")(p), eager)
    names = [q.name for q in s.params if q.name in {op.param for op in s.ops} and len(q.shape) >= 2]
    for tol in tolerances:
        strict, elig = np.sum([ref_blocks(p[n], tol, 2, 4) for n in names], axis=0)
        assert eager[f"nm_sparsity@{tol}/strict_blocks"].item() == strict
        assert eager[f"nm_sparsity@{tol}/eligible_blocks"].item() == elig
        zeros = sum(int((~ref_nonzeros(p[n], tol)).sum()) for n in names)
        assert eager[f"unstructured_sparsity@{tol}/zeros"].item() == zeros
