"""Compiled programs (`backend=...`) count nonzeros with their own formulation (`wtcore.nonzero`: opaque
byte/word indicator ops, 2:4 counts from int32 words, row reductions); it must give eager's numbers exactly.

Fast tests run that formulation without inductor (the program's generated function called directly: the
opaque ops run their ATen kernels) over random structures; the slow ones compile real models with inductor.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import wtcore
from wtcore.ir import AxisPart, CostAxis, CostOp, Param, Slice, Structure, UnitGroup, runs_from_list
from wtcore.lang import wt_nonzero_bytes_cols, wt_nonzero_words, wt_word_count
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


# ----------------------------------------------------------------------------- the word primitives
@settings(max_examples=60, deadline=None)
@given(st.integers(1, 9), st.integers(1, 12), st.integers(0, 2**31 - 1), st.floats(0.0, 1.0))
def test_word_counts_and_column_activity_match_a_direct_count(rows: int, words: int, seed: int, density: float) -> None:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, 4 * words, generator=gen)
    w[torch.rand(w.shape, generator=gen) >= density] = 0
    packed, cols = wt_nonzero_words(w, 0.0)
    assert packed.shape == (rows, words) and packed.dtype == torch.int32
    ind = (w != 0).to(torch.int32)
    assert torch.equal(wt_word_count(packed), ind.reshape(rows, words, 4).sum(-1, dtype=torch.int32))
    assert torch.equal(cols.to(torch.int32), ind.amax(0))
    w4 = w.reshape(rows, words, 2, 2)  # [o, c, kh, kw]: activity per index of axis 1
    e, cols4 = wt_nonzero_bytes_cols(w4, 0.0)
    assert torch.equal(e.bool(), w4 != 0)
    assert torch.equal(cols4.bool(), (w4 != 0).any(3).any(2).any(0))


def test_nonzero_words_of_a_non_contiguous_weight() -> None:
    """A transposed weight's indicator is made contiguous before it is read as words."""
    w = torch.randn(12, 8)
    w[w < 0] = 0
    wt = w.t()  # [8, 12], not contiguous
    packed, _ = wt_nonzero_words(wt, 0.0)
    assert torch.equal(wt_word_count(packed), (wt != 0).reshape(8, 3, 4).sum(-1, dtype=torch.int32))


# ----------------------------------------------------------------------------- the formulation, random structures
@settings(max_examples=25, deadline=None)
@given(structures_with_ops(max_dim=9), st.integers(0, 2**31 - 1), st.sampled_from([0.0, 0.05]), st.booleans())
def test_compiled_formulation_equals_eager_on_random_structures(s: wtcore.Structure, seed: int, tolerance: float,
                                                                 nan: bool) -> None:
    """Every parameter with 2+ dims is counted (unstructured and N:M, explicitly selected), and unit activity
    covers every slice kind the strategy makes (grouped, partial, repeated, self-overlapping)."""
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


@pytest.fixture(params=[21, 5], ids=["packed", "narrow_fields"])
def field_bits(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[int]:
    """The packed row counts' field width; 5 bits leaves rows of 32+ entries to the unpacked row sums."""
    import wtcore.nonzero

    monkeypatch.setattr(wtcore.nonzero, "FIELD", request.param)
    wtcore.clear_cache()
    yield request.param
    wtcore.clear_cache()


# the fixture holds for every example of a test (that is the point): its health check does not apply
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.integers(1, 6), st.sampled_from([1, 3, 4, 5, 8, 10, 12, 16]), st.sampled_from([(), (1, 1), (3, 1), (2, 2)]),
       st.sampled_from([0.0, 0.3, 0.7, 1.0]), st.sampled_from([0.0, 0.05]), st.integers(0, 2**31 - 1))
def test_compiled_formulation_equals_eager_on_one_weight(field_bits: int, o: int, c: int, kernel: tuple[int, ...],
                                                         density: float, tolerance: float, seed: int) -> None:
    """Words layout (linear/1x1 with 4 | inputs), byte layout (kernels, tails), full and empty blocks, NaN;
    rows counted packed and (narrow fields) unpacked."""
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
    from wtfront.trace import trace

    torch.manual_seed(0)
    model = getattr(tv.models, name)(weights=None).eval()
    s = trace(model, torch.randn(1, 3, 64, 64))
    p = sprinkle(dict(model.named_parameters()), seed=1)
    # whole input channels / output rows zero (activity), on a words-layout (1x1) and a 3x3 weight
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
