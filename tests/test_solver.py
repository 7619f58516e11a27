"""`solve_keep`: the keep-mask that reaches a cost target, checked against brute force over the mask specs."""

from __future__ import annotations

import copy
import fnmatch
import math
import warnings
from dataclasses import replace

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import wtcore
from wtcore.errors import StructureError
from wtcore.ir import AxisPart, CostAxis, CostOp, Structure, runs_from_list
from wtcore.realizable import unit_ties
from wtcore.solver import TargetError, metric_ratio, solve, solve_keep
from wtcore.specs.masks import isomorphism_key
from wtcore.testing import params_for, structures, zero_units

SPEC = {"macs": ("active_macs", "ratio"), "params": ("active_params", "ratio"), "bops": ("structured_bops", None)}


# ----------------------------------------------------------------------------------------------- brute force
def _ratio_program(s: Structure, metric: str) -> wtcore.Program:
    name = SPEC[metric][0]
    return wtcore.compile(s, [wtcore.Spec(name, weight_bits=8, act_bits=4) if metric == "bops" else name])


def _ratio(prog: wtcore.Program, metric: str, params: dict) -> float:
    out = prog(params)
    if metric == "bops":
        return float(out["structured_bops/total"] / out["structured_bops/baseline"])
    name, key = SPEC[metric]
    return float(out[f"{name}/{key}"])


def _live_per_domain(s: Structure, params: dict, scope: str, groups: tuple[str, ...] | None,
                     lossy: bool = False) -> list[int]:
    """Live units of the eligible groups of each domain (local: group; isomorphic: class)."""
    out = wtcore.compile(s, ["unit_active", "params_per_unit"])(params)
    live = out["unit_active"] & (out["params_per_unit"] > 0)
    dom: dict = {}
    for g in s.groups:
        if not g.prunable or (groups is not None and not any(fnmatch.fnmatchcase(g.name, p) for p in groups)):
            continue
        if g.lossy and not lossy:
            continue
        k = g.name if scope == "local" else isomorphism_key(s, g.name)
        o = s.offsets[g.name]
        dom[k] = dom.get(k, 0) + int(live[o: o + g.size].sum())
    return [n for n in dom.values() if n > 0]


def _amounts(s: Structure, params: dict, scope: str, groups: tuple[str, ...] | None, lossy: bool = False) -> list:
    """Every distinct state of the mask spec, as amounts: counts for global; for local/isomorphic, fractions
    strictly between consecutive points where some domain's `round(f x live)` changes."""
    if scope == "global":
        eligible = [g for g in s.groups if g.prunable and (lossy or not g.lossy)
                    and (groups is None or any(fnmatch.fnmatchcase(g.name, p) for p in groups))]
        return list(range(sum(g.size for g in eligible) + 1))
    pts = sorted({(2 * j + 1) / (2 * n) for n in _live_per_domain(s, params, scope, groups, lossy) for j in range(n)})
    return [0.0] + [(a + b) / 2 for a, b in zip(pts, [*pts[1:], 1.0 + pts[-1]])] if pts else [0.0]


def brute_force(s: Structure, params: dict, scores: torch.Tensor, *, target: float, metric: str, scope: str,
                max_fraction: float, round_to: int, groups: tuple[str, ...] | None = None,
                lossy: bool = False) -> torch.Tensor | None:
    """Scan the mask spec's states from the smallest up; the first whose cost meets the target (None: none).
    The spec's masks are the realizable ones (whole grouped-conv ties, lossy groups untouched), so this is a
    brute force over keep-masks physical pruning carries out."""
    prog = _ratio_program(s, metric)
    for amount in _amounts(s, params, scope, groups, lossy):
        amount = min(amount, 1.0) if isinstance(amount, float) else amount
        keep = wtcore.compile(s, [wtcore.Spec("importance", scores=scores, amount=amount, scope=scope, groups=groups,
                                              max_fraction=max_fraction, round_to=round_to,
                                              lossy=lossy)])(params)["importance"]
        zeroed = zero_units(s, params, (~keep).nonzero().flatten().tolist())
        if _ratio(prog, metric, zeroed) <= target:
            return keep
    return None


# ----------------------------------------------------------------------------------------------- random costs
@st.composite
def structures_with_costs(draw: st.DrawFn) -> Structure:
    """Random structures (wtcore.testing) with random cost ops: static, coarse (group x scale) and exact
    (per-position units, some positions static) axes."""
    s = draw(structures(max_params=3, max_groups=3, max_dim=4))
    ops = []
    for i in range(draw(st.integers(1, 3))):
        axes = []
        for k in range(draw(st.integers(1, 3))):
            g = s.groups[draw(st.integers(0, len(s.groups) - 1))]
            kind = draw(st.sampled_from(["static", "coarse", "exact"]))
            if kind == "static":
                axes.append(CostAxis(f"a{k}", draw(st.integers(1, 4))))
            elif kind == "coarse":
                scale = draw(st.integers(1, 2))
                axes.append(CostAxis(f"a{k}", g.size * scale, g.name, scale))
            else:
                n = draw(st.integers(1, 6))
                idx = draw(st.lists(st.integers(-1, g.size - 1), min_size=n, max_size=n))
                axes.append(CostAxis(f"a{k}", n, parts=(AxisPart(g.name, runs_from_list(idx)),)))
        ops.append(CostOp(f"op{i}", f"m{i}", "linear", draw(st.integers(1, 10**6)), tuple(axes)))
    return replace(s, ops=tuple(ops))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(structures_with_costs(), st.integers(0, 2**31 - 1), st.sampled_from([0.0, 0.3]),
       st.sampled_from(["global", "local", "isomorphic"]), st.sampled_from(["macs", "params", "bops"]),
       st.floats(0.0, 1.0), st.sampled_from([1.0, 0.6]), st.sampled_from([1, 2, 3]),
       st.sampled_from([None, None, ("g0",), ("g1", "g2")]), st.sampled_from([None, "g0", "g1"]), st.booleans())
def test_solved_keep_equals_brute_force(s, seed, zero_fraction, scope, metric, target, max_fraction, round_to,
                                        groups, lossy_group, lossy):
    """Random structures (grouped-conv slices tie units) and costs, a group marked lossy or not: the solver's
    keep-mask is the first state of the importance mask spec (with the same rules) that meets the target."""
    s = replace(s, groups=tuple(replace(g, lossy="a LayerNorm" if g.name == lossy_group else "") for g in s.groups))
    params = params_for(s, seed=seed, zero_fraction=zero_fraction)
    gen = torch.Generator().manual_seed(seed)  # few distinct values: ties between units are common
    scores = torch.randint(0, max(2, s.num_units // 2), (s.num_units,), generator=gen).to(torch.float64)
    try:
        _ratio_program(s, metric)
    except (StructureError, ValueError):  # a position coupled to two groups; grouped slices (active_params)
        assume(False)
    opts = dict(target=target, metric=metric, importance=scores, scope=scope, max_fraction=max_fraction,
                round_to=round_to, weight_bits=8, act_bits=4, groups=groups, lossy=lossy)
    try:
        want = brute_force(s, params, scores, target=target, metric=metric, scope=scope,
                           max_fraction=max_fraction, round_to=round_to, groups=groups, lossy=lossy)
    except wtcore.SpecError:  # `groups` selects no prunable group, or only lossy ones: the solver refuses too
        with pytest.raises(wtcore.SpecError, match=r"groups=|lossy=True"):
            solve(s, params, **opts)
        return
    if want is None:
        with pytest.raises(TargetError, match="out of reach"):
            solve(s, params, **opts)
        return
    sol = solve(s, params, **opts)
    assert torch.equal(sol.keep, want)
    zeroed = zero_units(s, params, (~sol.keep).nonzero().flatten().tolist())
    assert sol.ratio == _ratio(_ratio_program(s, metric), metric, zeroed)
    assert sol.before == _ratio(_ratio_program(s, metric), metric, params)
    assert sol.best <= sol.ratio <= target or sol.before <= target
    if scope == "global":  # the importance spec with the solution's count gives the same mask
        same = wtcore.compile(s, [wtcore.Spec("importance", scores=scores, amount=sol.selected, scope=scope,
                                              groups=groups, max_fraction=max_fraction, round_to=round_to,
                                              lossy=lossy)])(params)["importance"]
        assert torch.equal(same, sol.keep)


# ----------------------------------------------------------------------------------------------- real models
def _toy() -> tuple[torch.nn.Module, torch.Tensor]:
    from toys import Net, X

    torch.manual_seed(0)
    return Net().eval(), X


@pytest.mark.parametrize(("scope", "metric"), [("global", "macs"), ("local", "params"), ("isomorphic", "macs")])
def test_toy_model_brute_force(scope, metric):
    """On a model with a grouped conv, the solver's keep-mask is the first state of the mask spec (whose masks
    physical pruning carries out) that meets the target, and Torch-Pruning removes exactly it."""
    from wtfront import apply_masks, effective_params, prune_units, trace

    model, x = _toy()
    s = trace(model, x)
    params = {k: v.detach() for k, v in effective_params(model, s).items()}
    scores = wtcore.compile(s, ["unit_l2"])(params)["unit_l2"]
    ties = unit_ties(s)
    assert not torch.equal(ties, torch.arange(s.num_units))  # the grouped conv `gc` ties its channels
    for target in (0.9, 0.7, 0.5):
        want = brute_force(s, params, scores, target=target, metric=metric, scope=scope, max_fraction=0.8,
                           round_to=1)
        got = solve_keep(s, params, target=target, metric=metric, scope=scope, max_fraction=0.8)
        assert want is not None and torch.equal(got, want), (scope, metric, target)
        assert torch.equal(got, got[ties])  # whole ties
    pruned = copy.deepcopy(model)
    apply_masks(pruned, s, got)
    y = pruned(x)
    new = prune_units(pruned, s, x, got)
    assert new.num_units == int(got.sum())
    torch.testing.assert_close(pruned(x), y, rtol=1e-5, atol=1e-6)


def test_zero_unit_tied_to_live_ones_stays_and_the_costs_know():
    """A unit zeroed alone (e.g. by training) in a grouped conv's tie: physical pruning keeps it, so the cost
    specs count it, and the solver removes it with its tie; both prune physically to what they predict."""
    from wtfront import apply_masks, effective_params, prune_units, prune_zero_units, trace

    model, x = _toy()
    s0 = trace(model, x)
    with torch.no_grad():  # unit 0 of gc's output; 3, 6 and 9 (the same position in the other conv groups) live
        model.gc.weight[0].zero_()
        model.gc.bias[0].zero_()
        model.fuse.weight[:, 0].zero_()
    params = {k: v.detach() for k, v in effective_params(model, s0).items()}
    assert not bool(wtcore.compile(s0, ["unit_active"])(params)["unit_active"][s0.offsets["gc.out"]])
    assert metric_ratio(s0, params, "macs") == 1.0  # nothing physical pruning would remove
    zero = copy.deepcopy(model)
    assert prune_zero_units(zero, s0, x).group_map["gc.out"].size == 12
    sol = solve(s0, params, target=0.7, metric="macs", max_fraction=0.8)
    pruned = copy.deepcopy(model)
    apply_masks(pruned, s0, sol.keep)
    y = pruned(x)
    new = prune_units(pruned, s0, x, sol.keep)
    torch.testing.assert_close(pruned(x), y, rtol=1e-5, atol=1e-6)
    assert sum(o.macs for o in new.ops) / sum(o.baseline_macs for o in new.ops) == pytest.approx(sol.ratio, abs=1e-12)


def test_normalized_widths_keep_their_units_unless_lossy():
    """A group a LayerNorm normalizes is left alone (its zeroed units would still count in the statistics),
    unless `lossy=True`; a groups= that selects only it is refused with the way out."""
    from toys import NormedNet

    from wtfront import trace

    torch.manual_seed(0)
    net = NormedNet()
    s = trace(net, torch.randn(2, 4))
    params = {k: v.detach() for k, v in net.named_parameters()}
    off = s.offsets["inp.out"]
    keep = solve_keep(s, params, target=0.6, metric="params", max_fraction=0.8)
    assert bool(keep[off: off + 8].all()) and not bool(keep.all())
    lossy = solve_keep(s, params, target=0.6, metric="params", max_fraction=0.8, lossy=True)
    assert not bool(lossy[off: off + 8].all())
    with pytest.raises(wtcore.SpecError, match=r"normalization.*inp\.out.*lossy=True"):
        solve_keep(s, params, target=0.6, metric="params", groups="inp.out")
    with pytest.raises(TargetError, match="lossy=False"):  # fc1 alone cannot get there
        solve_keep(s, params, target=0.2, metric="params", max_fraction=1.0)


def _zoo_model(name: str) -> torch.nn.Module:
    if name.startswith("timm:"):
        timm = pytest.importorskip("timm")
        return timm.create_model(name[5:], num_classes=10)
    torchvision = pytest.importorskip("torchvision")
    return torchvision.models.get_model(name, num_classes=10)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["regnet_y_400mf", "timm:convnext_atto"])
def test_half_the_macs_prunes_physically_as_solved(name):
    """Grouped convs (RegNet) and LayerNorm widths (ConvNeXt): the solved keep-mask at half the MACs is carried
    out by Torch-Pruning without refusal, computes what the fake-pruned model does, and torch's flop counter
    agrees the pruned model meets the target."""
    from torch.utils.flop_counter import FlopCounterMode

    from wtfront import apply_masks, effective_params, prune_units, trace

    def flops(m: torch.nn.Module) -> int:
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            m(x)
        return fc.get_total_flops()

    torch.manual_seed(0)
    model, x = _zoo_model(name).eval(), torch.randn(2, 3, 32, 32)
    s = trace(model, x)
    params = {k: v.detach() for k, v in effective_params(model, s).items()}
    keep = solve_keep(s, params, target=0.5, metric="macs")
    ties, lossy = unit_ties(s), [g for g in s.groups if g.lossy]
    assert not torch.equal(ties, torch.arange(s.num_units)) or lossy  # the model has what the rules are about
    assert torch.equal(keep, keep[ties])
    assert all(bool(keep[s.offsets[g.name]: s.offsets[g.name] + g.size].all()) for g in lossy)
    fake = copy.deepcopy(model)
    apply_masks(fake, s, keep)
    with torch.no_grad():
        y = fake(x)
    pruned = copy.deepcopy(model)
    prune_units(pruned, s, x, keep)
    with torch.no_grad():
        z = pruned(x)
    assert float((z - y).abs().max()) <= 1e-5 * float(y.abs().max())
    assert flops(pruned) <= (0.5 + 1e-3) * flops(model)


@pytest.mark.slow
def test_resnet18_target_met_on_physically_pruned_copy_fvcore():
    """The solved MAC ratio is what fvcore counts on the copy Torch-Pruning shrank; the solution is minimal:
    one removal level less misses the target."""
    torchvision = pytest.importorskip("torchvision")
    from fvcore.nn import FlopCountAnalysis

    from wtfront import apply_masks, effective_params, prune_zero_units, trace

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(1, 3, 64, 64)
    s = trace(model, x)
    params = {k: v.detach() for k, v in effective_params(model, s).items()}
    sol = solve(s, params, target=0.5, metric="macs", scope="global", max_fraction=0.9, round_to=4)
    assert sol.ratio <= 0.5 and sol.removed > 0

    # minimal: the same ranking with one unit fewer (the importance spec at amount - 1, then round_to) misses it
    scores = wtcore.compile(s, ["unit_l2"])(params)["unit_l2"]
    prog = _ratio_program(s, "macs")
    for k, meets in ((sol.selected, True), (sol.selected - 1, False)):
        keep = wtcore.compile(s, [wtcore.Spec("importance", scores=scores, amount=k, scope="global",
                                              max_fraction=0.9, round_to=4)])(params)["importance"]
        r = _ratio(prog, "macs", zero_units(s, params, (~keep).nonzero().flatten().tolist()))
        assert (r <= 0.5) == meets
        if meets:
            assert torch.equal(keep, sol.keep)

    pruned = copy.deepcopy(model)
    apply_masks(pruned, s, sol.keep)
    assert metric_ratio(s, effective_params(pruned, s), "macs") == sol.ratio
    prune_zero_units(pruned, s, x)

    def fv(m: torch.nn.Module) -> dict[str, int]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fca = FlopCountAnalysis(m, x).unsupported_ops_warnings(False).uncalled_modules_warnings(False)
            return dict(fca.by_module())

    dense, small = fv(model), fv(pruned)
    ops = [o.module for o in s.ops]
    assert sum(dense[m] for m in ops) == sum(o.baseline_macs for o in s.ops)
    assert sum(small[m] for m in ops) / sum(dense[m] for m in ops) == pytest.approx(sol.ratio, rel=1e-12)
    for g in s.groups:  # round_to: every pruned group keeps a multiple of 4 (or all its units)
        kept = int(sol.keep[s.offsets[g.name]: s.offsets[g.name] + g.size].sum())
        assert kept == g.size or kept % 4 == 0


def test_importance_options_and_errors():
    model, x = _toy()
    from wtfront import trace

    s = trace(model, x)
    params = {k: v.detach() for k, v in model.named_parameters()}
    a = solve_keep(s, params, target=0.6, importance="random", seed=3)
    assert torch.equal(a, solve_keep(s, params, target=0.6, importance="random", seed=3))
    assert not torch.equal(a, solve_keep(s, params, target=0.6, importance="random", seed=4))
    l1 = solve_keep(s, params, target=0.6, importance=wtcore.Spec("unit_l1"))
    scores = wtcore.compile(s, ["unit_l1"])(params)["unit_l1"]
    assert torch.equal(l1, solve_keep(s, params, target=0.6, importance=scores))
    assert solve_keep(s, params, target=1.0).all()  # nothing to do
    only = solve_keep(s, params, target=0.8, groups="stem*")
    removed = {g.name for g in s.groups if not only[s.offsets[g.name]: s.offsets[g.name] + g.size].all()}
    assert removed and all(n.startswith("stem") for n in removed)
    with pytest.raises(TargetError, match="out of reach"):
        solve_keep(s, params, target=0.01, max_fraction=0.5)
    with pytest.raises(TargetError, match="target must be"):
        solve_keep(s, params, target=1.5)
    with pytest.raises(wtcore.SpecError, match="metric"):
        solve_keep(s, params, target=0.5, metric="flops")
    with pytest.raises(wtcore.SpecError, match="shape"):
        solve_keep(s, params, target=0.5, importance=torch.ones(3))
    with pytest.raises(wtcore.SpecError, match="NaN"):
        solve_keep(s, params, target=0.5, importance=torch.full((s.num_units,), math.nan))
    with pytest.raises(wtcore.SpecError, match="several outputs"):
        solve_keep(s, params, target=0.5, importance="active_macs")


def test_side_effect_units_are_solved_with_the_cost_program():
    """Two groups share every element of one unit (g1's unit 2 is m0.w[2], also g0's unit 0): removing g0's
    unit 0 zeroes it too. The solver sees that the unit has no element of its own and follows the program."""
    from wtcore.ir import Param, Run, Slice, UnitGroup

    params_ir = (Param("m0.w", (3,), module="m0", module_type="Toy"), Param("m1.w", (1, 1, 1, 1), module="m1",
                                                                             module_type="Toy"))
    g0 = UnitGroup("g0", "channel", 2, (Slice("m0.w", 0, (Run(2, 0), Run(1, 0))),))
    g1 = UnitGroup("g1", "channel", 3, (Slice("m0.w", 0, (Run(3, 0),)), Slice("m1.w", 0, (Run(1, 0),))))
    ops = (CostOp("op1", "m1", "linear", 8, (CostAxis("a0", 3, parts=(AxisPart("g0", (Run(2, 0, 1, 2), Run(1, 1))),)),
                                             CostAxis("a2", 3, "g1"))),)
    s = Structure(params_ir, (g0, g1), ops)
    params = {"m0.w": torch.tensor([0.5, -0.3, 0.2], dtype=torch.float64),
              "m1.w": torch.ones(1, 1, 1, 1, dtype=torch.float64)}
    scores = torch.tensor([0.0, 1.0, 5.0, 5.0, 5.0], dtype=torch.float64)
    # only g0 may lose units; g1 is prunable, so its unit zeroed as a side effect is gone after physical pruning
    sol = solve(s, params, target=0.5, importance=scores, scope="local", groups="g0")
    want = brute_force(s, params, scores, target=0.5, metric="macs", scope="local", max_fraction=1.0, round_to=1,
                       groups=("g0",))
    assert torch.equal(sol.keep, want) and sol.keep.tolist() == [False, True, True, True, True]
    zeroed = zero_units(s, params, [0])
    # 8 MACs x 1/3 (g0 axis) x 2/3 (g1 lost unit 2 too) = 1.8 -> 2; without the side effect it would be 3
    assert sol.ratio == _ratio(_ratio_program(s, "macs"), "macs", zeroed) == 2 / 8


@pytest.mark.parametrize("scope", ["global", "local"])
def test_chunked_prefix_scan_gives_the_same_answer(monkeypatch, scope):
    """The prefix costs are evaluated in chunks of bounded memory; tiny chunks change nothing."""
    import wtcore.solver as solver_module
    from wtfront import trace

    model, x = _toy()
    s = trace(model, x)
    params = {k: v.detach() for k, v in model.named_parameters()}
    whole = [solve(s, params, target=t, scope=scope, round_to=2) for t in (0.8, 0.6, 0.4)]
    monkeypatch.setattr(solver_module, "_CHUNK_ENTRIES", 5)  # a few prefix rows per chunk
    for t, ref in zip((0.8, 0.6, 0.4), whole):
        got = solve(s, params, target=t, scope=scope, round_to=2)
        assert torch.equal(got.keep, ref.keep) and got.ratio == ref.ratio and got.best == ref.best
