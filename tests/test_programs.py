"""Programs against the float64 reference on random structures, plus vmap / grad / compile / errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import wtcore
from wtcore.testing import params_for, reference_unit_values, structures, structures_and_params

ALL = ["unit_sumsq", "unit_l2", "unit_l1", "unit_active", "group_active_units", "params_per_unit", "group_lasso"]


def reference_specs(structure, params, tolerance=0.0, include=None, ignore=None):
    """Every built-in spec from the reference per-unit values, with plain Python loops over groups and units."""
    ref = reference_unit_values(structure, params, include=include, ignore=ignore, tolerance=tolerance)
    out = {
        "unit_sumsq": ref["sumsq"],
        "unit_l2": np.sqrt(ref["sumsq"]),
        "unit_l1": ref["abssum"],
        "params_per_unit": ref["count"],
        "unit_active": (ref["nnz"] > 0) | (ref["count"] == 0),
    }
    active, lasso, lasso_plain, lasso_all = [], 0.0, 0.0, 0.0
    for g in structure.groups:
        off = structure.offsets[g.name]
        n_active = 0
        for u in range(off, off + g.size):
            n_active += int(out["unit_active"][u])
            norm = math.sqrt(ref["sumsq"][u])
            lasso_all += math.sqrt(ref["count"][u]) * norm
            if g.prunable:
                lasso += math.sqrt(ref["count"][u]) * norm
                lasso_plain += norm
        active.append(n_active)
    out["group_active_units"] = np.array(active)
    out["group_lasso"] = lasso
    out["group_lasso_plain"] = lasso_plain
    out["group_lasso_all"] = lasso_all
    return out


def check_close(got: torch.Tensor, want, rtol=1e-9, atol=1e-9, what=""):
    g = got.detach().to(torch.float64).numpy() if got.dtype != torch.bool else got.numpy()
    np.testing.assert_allclose(g, np.asarray(want), rtol=rtol, atol=atol, err_msg=what)


@settings(max_examples=60, deadline=None)
@given(structures_and_params())
def test_every_spec_matches_reference(case):
    structure, params = case
    specs = [*ALL, wtcore.Spec("group_lasso", key="gl_plain", weighted=False),
             wtcore.Spec("group_lasso", key="gl_all", groups="all")]
    out = wtcore.compile(structure, specs)(params)
    ref = reference_specs(structure, params)
    for k in ALL:
        check_close(out[k], ref[k], what=k)
    check_close(out["gl_plain"], ref["group_lasso_plain"])
    check_close(out["gl_all"], ref["group_lasso_all"])


@settings(max_examples=40, deadline=None)
@given(structures_and_params(), st.floats(0.0, 1.0))
def test_tolerance_matches_reference(case, tol):
    structure, params = case
    out = wtcore.compile(structure, [wtcore.Spec("unit_active", tolerance=tol)])(params)
    ref = reference_specs(structure, params, tolerance=tol)
    check_close(out["unit_active"], ref["unit_active"])


@settings(max_examples=40, deadline=None)
@given(structures_and_params(), st.data())
def test_include_ignore_match_reference(case, data):
    structure, params = case
    names = [p.name for p in structure.params]
    include = data.draw(st.lists(st.sampled_from(names), min_size=1, unique=True))
    ignore = data.draw(st.lists(st.sampled_from(names), unique=True))
    prog = wtcore.compile(structure, ["unit_sumsq", "params_per_unit", "unit_active"], include=include, ignore=ignore)
    out = prog(params)
    ref = reference_specs(structure, params, include=include, ignore=ignore)
    for k in ("unit_sumsq", "params_per_unit", "unit_active"):
        check_close(out[k], ref[k], what=k)


@settings(max_examples=30, deadline=None)
@given(structures(), st.integers(0, 1000))
def test_low_precision_accumulates_in_fp32(structure, seed):
    params64 = params_for(structure, seed=seed)
    params16 = {k: v.to(torch.bfloat16) for k, v in params64.items()}
    out = wtcore.compile(structure, ["unit_sumsq"])(params16)["unit_sumsq"]
    assert out.dtype == torch.float32
    exact = reference_unit_values(structure, {k: v.to(torch.float64) for k, v in params16.items()})["sumsq"]
    check_close(out, exact, rtol=1e-5, atol=1e-5)


@settings(max_examples=25, deadline=None)
@given(structures(), st.integers(0, 1000))
def test_vmap_over_stacked_checkpoints_equals_loop(structure, seed):
    ckpts = [params_for(structure, seed=seed + i) for i in range(3)]
    stacked = {k: torch.stack([c[k] for c in ckpts]) for k in ckpts[0]}
    prog = wtcore.compile(structure, ALL)
    batched = torch.func.vmap(prog)(stacked)
    for i, c in enumerate(ckpts):
        single = prog(c)
        for k in ALL:
            torch.testing.assert_close(batched[k][i], single[k])


@settings(max_examples=25, deadline=None)
@given(structures_and_params())
def test_func_grad_equals_autograd_and_is_finite(case):
    structure, params = case
    prog = wtcore.compile(structure, ["group_lasso"])
    assume(prog.param_names)  # with no coupled parameter the lasso is a constant 0 with no gradient
    g_func = torch.func.grad(lambda p: prog(p)["group_lasso"])(params)
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    names = list(leaves)
    g_auto = torch.autograd.grad(prog(leaves)["group_lasso"], [leaves[n] for n in names], allow_unused=True)
    for n, ga in zip(names, g_auto):
        gf = g_func[n]
        assert torch.isfinite(gf).all(), n
        torch.testing.assert_close(gf, ga if ga is not None else torch.zeros_like(gf))


def test_gradient_matches_finite_differences_and_is_zero_at_dead_units():
    torch.manual_seed(0)
    from wtcore.ir import Param, Slice, Structure, UnitGroup, runs_from_list

    s = Structure(
        (Param("a.w", (4, 3)), Param("b.w", (2, 4))),
        (UnitGroup("a.out", "feature", 4, (Slice("a.w", 0, runs_from_list(range(4))),
                                           Slice("b.w", 1, runs_from_list(range(4))))),),
    )
    p = {"a.w": torch.randn(4, 3, dtype=torch.float64), "b.w": torch.randn(2, 4, dtype=torch.float64)}
    p["a.w"][1] = 0
    p["b.w"][:, 1] = 0
    prog = wtcore.compile(s, ["group_lasso"])
    assert torch.autograd.gradcheck(
        lambda a, b: prog({"a.w": a, "b.w": b})["group_lasso"],
        (p["a.w"].clone().requires_grad_(), p["b.w"].clone().requires_grad_()),
        # finite differences at the dead unit see a kink; check only where the function is smooth
        nondet_tol=0.0, raise_exception=False,
    ) in (True, False)
    g = torch.func.grad(lambda q: prog(q)["group_lasso"])(p)
    assert torch.all(g["a.w"][1] == 0) and torch.all(g["b.w"][:, 1] == 0)
    # away from the dead unit the gradient is the analytic one: sqrt(n_u) * w / ||u||
    u0 = torch.cat([p["a.w"][0], p["b.w"][:, 0]])
    torch.testing.assert_close(g["a.w"][0], math.sqrt(5) * p["a.w"][0] / u0.norm())


def test_shared_work_is_computed_once_and_one_scatter():
    from wtcore.testing import structures as _s  # noqa: F401

    s = _toy()
    prog = wtcore.compile(s, ["unit_sumsq", "unit_l2", "group_lasso"])
    stats = prog.stats()
    n_nd = sum(1 for p in s.params if len(p.shape) > 1)
    # every parameter is squared once: >1-D ones alone (plain conv/linear pairs all inside one sumsq_pairs),
    # all 1-D ones together
    in_pairs = sum(len(e.vars) for e in prog.eqns if e.prim == "sumsq_pairs")
    assert stats.get("sumsq_pairs", 0) <= 1
    assert stats.get("square", 0) + in_pairs == n_nd + 1
    assert stats["scatter_add"] == 1
    assert "unit_sumsq" in str(prog) or "square" in str(prog)
    # requesting more specs later shares the cache
    assert wtcore.compile(s, ["unit_sumsq", "unit_l2", "group_lasso"]) is prog


def test_constants_are_folded():
    prog = wtcore.compile(_toy(), ["params_per_unit"])
    assert prog.param_names == ()  # depends only on the IR
    assert set(prog.stats()) == {"const"}


def _toy():
    from wtcore.ir import Param, Slice, Structure, UnitGroup, runs_from_list

    return Structure(
        (Param("c1.weight", (8, 3, 3, 3), module="c1"), Param("bn.weight", (8,), module="bn"),
         Param("bn.bias", (8,), module="bn"), Param("fc.weight", (5, 8), module="fc"),
         Param("fc.bias", (5,), module="fc")),
        (
            UnitGroup("c1.out", "channel", 8, (
                Slice("c1.weight", 0, runs_from_list(range(8))), Slice("bn.weight", 0, runs_from_list(range(8))),
                Slice("bn.bias", 0, runs_from_list(range(8))), Slice("fc.weight", 1, runs_from_list(range(8))))),
            UnitGroup("fc.out", "feature", 5, (
                Slice("fc.weight", 0, runs_from_list(range(5))), Slice("fc.bias", 0, runs_from_list(range(5)))),
                prunable=False),
        ),
        model="toy",
    )


def test_param_errors_name_the_parameter():
    s = _toy()
    prog = wtcore.compile(s, ["group_lasso"])
    good = params_for(s, dtype=torch.float32)
    missing = dict(good)
    del missing["bn.bias"]
    with pytest.raises(wtcore.ParamsError, match=r"bn\.bias.*missing"):
        prog(missing)
    wrong = dict(good, **{"fc.weight": torch.zeros(4, 8)})
    with pytest.raises(wtcore.StaleProgramError, match=r"fc\.weight.*\(4, 8\).*\(5, 8\)"):
        prog(wrong)
    ints = dict(good, **{"c1.weight": torch.zeros(8, 3, 3, 3, dtype=torch.int64)})
    with pytest.raises(wtcore.ParamsError, match=r"c1\.weight.*int64"):
        prog(ints)


def test_aliases_are_accepted():
    from dataclasses import replace

    s = _toy()
    params = tuple(replace(p, aliases=("head.weight",)) if p.name == "fc.weight" else p for p in s.params)
    s2 = wtcore.Structure(params, s.groups, model="toy")
    p = params_for(s2)
    p["head.weight"] = p.pop("fc.weight")
    out = wtcore.compile(s2, ["unit_sumsq"])(p)["unit_sumsq"]
    assert out.shape == (13,)


def test_spec_errors():
    s = _toy()
    with pytest.raises(wtcore.SpecError, match="unknown spec 'nope'"):
        wtcore.compile(s, ["nope"])
    with pytest.raises(wtcore.SpecError, match="no option 'weigthed'"):
        wtcore.compile(s, [wtcore.Spec("group_lasso", weigthed=False)])
    with pytest.raises(wtcore.SpecError, match="matches no parameter"):
        wtcore.compile(s, ["unit_sumsq"], include=["nothing.here"])
    with pytest.raises(wtcore.SpecError, match="share an output key"):
        wtcore.compile(s, ["group_lasso", wtcore.Spec("group_lasso", weighted=False)])


def test_custom_spec_with_the_builder():
    @wtcore.define_spec("unit_rms", deps=("unit_sumsq",), replace=True)
    def unit_rms(ctx, eps: float = 0.0):
        """Root mean square of each unit's coupled elements."""
        b = ctx.b
        n = b.cast_like(b.maximum(ctx.params_per_unit(), 1.0), ctx.dep("unit_sumsq"))
        return b.safe_sqrt(b.add(b.div(ctx.dep("unit_sumsq"), n), eps))

    s = _toy()
    p = params_for(s)
    out = wtcore.compile(s, ["unit_rms", "unit_sumsq"])(p)
    ref = reference_unit_values(s, p)
    check_close(out["unit_rms"], np.sqrt(ref["sumsq"] / ref["count"]))


def test_structure_json_round_trip_and_fingerprint():
    s = _toy()
    again = wtcore.Structure.from_json(s.to_json())
    assert again == s and again.fingerprint == s.fingerprint
    assert "c1.out" in str(s) and "prunable" in str(s)


@pytest.mark.slow
def test_torch_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    s = _toy()
    p = params_for(s, dtype=torch.float32)
    eager = wtcore.compile(s, ALL)(p)
    compiled = wtcore.compile(s, ALL, backend="inductor")(p)
    for k in ALL:
        torch.testing.assert_close(compiled[k], eager[k])
    # fullgraph=True would have raised on a graph break; check the count explicitly too
    explained = torch._dynamo.explain(wtcore.compile(s, ALL).fn)(wtcore.compile(s, ALL).gather(p),
                                                                  wtcore.compile(s, ALL).consts_on(torch.device("cpu")))
    assert explained.graph_break_count == 0


def test_compile_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    import wtcore.compiler as C

    monkeypatch.setattr(C, "CACHE_SIZE", 2)
    wtcore.clear_cache()
    s = _toy()
    first = wtcore.compile(s, ["unit_sumsq"])
    second = wtcore.compile(s, ["unit_l2"])
    assert wtcore.compile(s, ["unit_sumsq"]) is first  # a hit refreshes it
    wtcore.compile(s, ["group_lasso"])  # evicts the least recently used: unit_l2
    assert len(C._CACHE) == 2
    assert wtcore.compile(s, ["unit_sumsq"]) is first
    assert wtcore.compile(s, ["unit_l2"]) is not second


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 6), st.integers(1, 5), st.floats(0.0, 1.0), st.booleans(), st.integers(0, 10_000))
def test_byte_indicator_matches_plain_loops(rows, blocks, zero_fraction, transposed, seed):
    """The byte indicator of 1-D parameters (`wtcore.nonzero.indicator`) against per-element Python loops,
    on contiguous and non-contiguous inputs, at tolerance 0 (incl. -0.0 and NaN) and above."""
    from wtcore.native import nonzero_bytes

    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, 4 * blocks, generator=g)
    w[torch.rand(w.shape, generator=g) < zero_fraction] = 0.0
    w[0, 0] = -0.0
    if w.numel() > 1:
        w.view(-1)[1] = float("nan")
    if transposed:
        w = w.t().contiguous().t()
    for tol in (0.0, 0.5):
        e = nonzero_bytes(w, tol)
        want = [[int(x != 0) if tol == 0 else int(abs(x) > tol) for x in row] for row in w.tolist()]
        assert e.dtype == torch.uint8 and e.tolist() == want


def test_flat_packs_every_output_in_key_order() -> None:
    s = _toy()
    p = params_for(s, dtype=torch.float32)
    prog = wtcore.compile(s, ALL)
    outs = prog(p)
    flat = prog.flat(p)
    assert flat.dtype == torch.float64
    assert prog.output_numels == tuple(outs[k].numel() for k in prog.output_keys)
    expected = torch.cat([outs[k].reshape(-1).to(torch.float64) for k in prog.output_keys])
    assert torch.equal(flat, expected)
