"""Group lasso variants (plain, sqrt-size, MAC/BOP-weighted, reweighted) against float64 loops on random
structures, per-unit MAC costs against a slow per-op loop and against active MACs of zeroed units on a real
model, and the regularizers in a training step through the tracker."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st

import wtcore
from wtcore.masking import param_masks
from wtcore.testing import (
    params_for,
    reference_element_sums,
    reference_unit_cost,
    reference_unit_values,
    structures_with_ops,
)
from wtfront import WeightTracker, trace


# ----------------------------------------------------------------------------------------- references
def reference_lasso(structure, params, weighted, reweighted, eps, groups="prunable", cost=None):
    """(value, per-unit gradient factor f_u) with d/dw = sum over the element's distinct units of f_u * w."""
    ref = reference_unit_values(structure, params)
    regularized = [g.prunable or groups == "all" for g in structure.groups for _ in range(g.size)]
    if weighted in ("macs", "bops"):
        mean = np.mean([c for c, r in zip(cost, regularized) if r])
    value, factor = 0.0, np.zeros(structure.num_units)
    for u in range(structure.num_units):
        if not regularized[u]:
            continue
        norm = math.sqrt(ref["sumsq"][u])
        w = {True: math.sqrt(ref["count"][u]), False: 1.0}.get(weighted) if weighted in (True, False) \
            else cost[u] / mean
        if reweighted:
            den = norm + eps
            value += w * (norm / den if den > 0 else 0.0)
            factor[u] = w / (norm * den) if norm > 0 else 0.0
        else:
            value += w * norm
            factor[u] = w / norm if norm > 0 else 0.0
    return value, factor


def expand_factor(structure, params, factor):
    """Per element, sum of factor over its distinct units, times w."""
    return {n: c * params[n].numpy() for n, c in reference_element_sums(structure, factor).items()}


# ----------------------------------------------------------------------------------------- properties
@settings(max_examples=40, deadline=None)
@given(structures_with_ops())
def test_unit_macs_and_bops_match_per_op_loop(structure):
    bits = tuple(range(2, 2 + len(structure.ops)))
    out = wtcore.compile(structure, ["unit_macs", wtcore.Spec("unit_bops", weight_bits=bits, act_bits=4)])(
        params_for(structure))
    np.testing.assert_allclose(out["unit_macs"].numpy(), reference_unit_cost(structure), rtol=1e-9, atol=1e-6)
    np.testing.assert_allclose(out["unit_bops"].numpy(), reference_unit_cost(structure, [b * 4 for b in bits]),
                               rtol=1e-9, atol=1e-4)


@settings(max_examples=60, deadline=None)
@given(structures_with_ops(), st.integers(0, 2**31 - 1), st.sampled_from([True, False, "macs", "bops"]),
       st.booleans(), st.sampled_from([0.0, 0.1]), st.sampled_from(["prunable", "all"]))
def test_group_lasso_variants_value_and_gradient(structure, seed, weighted, reweighted, eps, groups):
    params = params_for(structure, seed=seed)
    cost = reference_unit_cost(structure) if weighted in ("macs", "bops") else None
    regularized = [g.prunable or groups == "all" for g in structure.groups for _ in range(g.size)]
    spec = wtcore.Spec("group_lasso", weighted=weighted, reweighted=reweighted, eps=eps, groups=groups)
    if cost is not None and not np.mean([c for c, r in zip(cost, regularized) if r]) > 0:
        with pytest.raises(wtcore.SpecError, match=r"no .* cost"):
            wtcore.compile(structure, [spec])
        return
    prog = wtcore.compile(structure, [spec])
    want, factor = reference_lasso(structure, params, weighted, reweighted, eps, groups, cost)
    assert math.isclose(float(prog(params)["group_lasso"]), want, rel_tol=1e-9, abs_tol=1e-9)
    grads = torch.func.grad(lambda p: prog(p)["group_lasso"])(params)
    for name, g in expand_factor(structure, params, factor).items():
        assert torch.isfinite(grads[name]).all()
        np.testing.assert_allclose(grads[name].numpy(), g, rtol=1e-7, atol=1e-9, err_msg=name)


@settings(max_examples=20, deadline=None)
@given(structures_with_ops(), st.integers(0, 2**31 - 1))
def test_named_variants_equal_group_lasso_options(structure, seed):
    params = params_for(structure, seed=seed, zero_fraction=0.0)
    cost = reference_unit_cost(structure)
    if not cost[[g.prunable for g in structure.groups for _ in range(g.size)]].mean() > 0:
        return
    out = wtcore.compile(structure, [
        "mac_group_lasso", "bop_group_lasso", "reweighted_group_lasso",
        wtcore.Spec("group_lasso", key="m", weighted="macs"),
        wtcore.Spec("group_lasso", key="r", weighted=False, reweighted=True)])(params)
    assert torch.equal(out["mac_group_lasso"], out["m"]) and torch.equal(out["reweighted_group_lasso"], out["r"])
    torch.testing.assert_close(out["bop_group_lasso"], out["m"])  # equal bit widths: BOPs are MACs x 1024
    live = sum(1 for g in structure.groups if g.prunable for _ in range(g.size))
    assert float(out["r"]) <= live + 1e-9


# ----------------------------------------------------------------------------------------- real model
@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    return model, trace(model, x[:1]), x


def test_unit_macs_equal_active_macs_drop_of_zeroed_unit_on_resnet18(resnet):
    model, structure, _ = resnet
    params = {k: v.detach() for k, v in model.named_parameters()}
    unit_macs = wtcore.compile(structure, ["unit_macs"])(params)["unit_macs"]
    active = wtcore.compile(structure, ["active_macs"])
    dense = float(active(params)["active_macs/total"])
    gen = torch.Generator().manual_seed(0)
    for u in torch.randperm(structure.num_units, generator=gen)[:8].tolist():
        keep = torch.ones(structure.num_units, dtype=torch.bool)
        keep[u] = False
        masks = param_masks(structure, keep)  # the elements fake pruning would zero
        zeroed = {k: v * masks[k] if k in masks else v for k, v in params.items()}
        drop = dense - float(active(zeroed)["active_macs/total"])
        assert math.isclose(float(unit_macs[u]), drop, rel_tol=1e-9, abs_tol=1.0), u
    assert float(unit_macs.min()) >= 0 and float(unit_macs.max()) > 0


def test_regularizers_in_a_training_step_through_the_tracker(resnet):
    model, structure, x = resnet
    tracker = WeightTracker(model, x[:1], structure=structure)
    regs = {k: tracker.create_regularizer(k, ignore=[model.fc]) for k in
            ("group_lasso", "mac_group_lasso", "bop_group_lasso", "reweighted_group_lasso")}
    model.zero_grad()
    loss = model(x).logsumexp(1).mean() + 1e-3 * sum(reg() for reg in regs.values())
    loss.backward()
    assert torch.isfinite(model.conv1.weight.grad).all()
    assert model.layer4[1].conv2.weight.grad.abs().sum() > 0
    with torch.no_grad():
        values = {k: float(r()) for k, r in regs.items()}
    assert values["reweighted_group_lasso"] == pytest.approx(
        sum(g.size for g in structure.groups if g.prunable), rel=1e-5)  # every unit is live: ~1 each
    # MAC weights average 1 over the regularized units, so lam keeps the scale of the plain group lasso
    params = {k: v.detach() for k, v in tracker.params().items()}
    out = wtcore.compile(structure, ["unit_macs", "unit_l2", wtcore.Spec("group_lasso", weighted="macs")])(params)
    prunable = torch.cat([torch.full((g.size,), g.prunable) for g in structure.groups])
    w = out["unit_macs"][prunable] / out["unit_macs"][prunable].mean()
    assert math.isclose(float(w.mean()), 1.0, rel_tol=1e-9)
    want = float((w * out["unit_l2"][prunable].double()).sum())
    assert math.isclose(float(out["group_lasso"]), want, rel_tol=1e-5)
    with pytest.raises(wtcore.WtError, match="regularizers: group_lasso"):
        tracker.create_regularizer("nope")


def test_errors():
    s = wtcore.Structure((wtcore.Param("a.weight", (3, 2)),), (
        wtcore.UnitGroup("g", "channel", 3, (wtcore.Slice("a.weight", 0, wtcore.runs_from_list([0, 1, 2])),)),))
    for bad, msg in ((dict(weighted="flops"), "weighted"), (dict(weighted=2), "weighted"), (dict(eps=-1.0), "eps"),
                     (dict(weighted="macs"), "no cost ops")):
        with pytest.raises(wtcore.SpecError, match=msg):
            wtcore.compile(s, [wtcore.Spec("group_lasso", **bad)])
    with pytest.raises(wtcore.SpecError, match="rule"):
        wtcore.compile(s, [wtcore.Spec("decay_gamma", rule="growing")])


@settings(max_examples=15, deadline=None)
@given(structures_with_ops(), st.integers(0, 2**31 - 1))
def test_new_specs_under_vmap_and_grad(structure, seed):
    cost = reference_unit_cost(structure)
    prunable = np.array([g.prunable for g in structure.groups for _ in range(g.size)])
    if not (cost[prunable] > 0).any():
        return
    specs = ["mac_group_lasso", "reweighted_group_lasso", "magnitude_importance", "mac_aware_importance",
             wtcore.Spec("mac_aware_importance", key="mul", mode="multiplicative"), "standardized_importance",
             "decay_gamma", "unit_macs"]
    prog = wtcore.compile(structure, specs)
    ckpts = [params_for(structure, seed=seed + i) for i in range(3)]
    stacked = {k: torch.stack([c[k] for c in ckpts]) for k in ckpts[0]}
    batched = torch.func.vmap(prog)(stacked)
    for i, c in enumerate(ckpts):
        for k, v in prog(c).items():
            torch.testing.assert_close(batched[k][i], v, rtol=1e-12, atol=1e-12, msg=k)
    g = torch.func.grad(lambda p: prog(p)["mac_group_lasso"] + prog(p)["reweighted_group_lasso"])(ckpts[0])
    assert all(torch.isfinite(t).all() for t in g.values())
