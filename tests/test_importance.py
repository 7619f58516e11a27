"""Importance specs against float64 loops on random structures, and on ResNet-18 with real gradients against
per-module hand computations; importance scores feeding the `importance` keep-mask."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st

import wtcore
from wtcore.specs.importance import taylor_inputs
from wtcore.testing import (
    element_unit_maps,
    params_for,
    reference_unit_cost,
    reference_unit_values,
    structures,
    structures_with_ops,
)
from wtfront import trace


def reference_linf(structure, params) -> np.ndarray:
    out = np.zeros(structure.num_units)
    for name, maps in element_unit_maps(structure).items():
        a = params[name].abs().to(torch.float64).numpy()
        for m in maps:
            for u in np.unique(m[m >= 0]):
                out[u] = max(out[u], a[m == u].max())
    return out


# ----------------------------------------------------------------------------------------- properties
@settings(max_examples=40, deadline=None)
@given(structures(), st.integers(0, 2**31 - 1))
def test_magnitude_and_taylor_match_reference(structure, seed):
    params = params_for(structure, seed=seed)
    grads = params_for(structure, seed=seed + 1, zero_fraction=0.0)
    ref = reference_unit_values(structure, params)
    out = wtcore.compile(structure, ["magnitude_importance", wtcore.Spec("magnitude_importance", key="l1", n=1),
                                     wtcore.Spec("magnitude_importance", key="linf", n="inf")])(params)
    np.testing.assert_allclose(out["magnitude_importance"].numpy(), np.sqrt(ref["sumsq"]), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(out["l1"].numpy(), ref["abssum"], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(out["linf"].numpy(), reference_linf(structure, params), rtol=1e-9, atol=1e-12)
    taylor = wtcore.compile(structure, ["taylor_importance"])(taylor_inputs(params, grads))["taylor_importance"]
    want = np.zeros(structure.num_units)
    for name, maps in element_unit_maps(structure).items():  # sum over distinct units of |w * g|
        wg = (params[name] * grads[name]).abs().numpy()
        for i, m in enumerate(maps):
            fresh = m >= 0
            for prev in maps[:i]:
                fresh = fresh & (m != prev)
            np.add.at(want, m[fresh], wg[fresh])
    np.testing.assert_allclose(taylor.numpy(), want, rtol=1e-9, atol=1e-12)


def with_batchnorm(structure: wtcore.Structure, flags: list[bool]) -> wtcore.Structure:
    """The structure with parameters renamed `m{i}.weight` and the flagged 1-D ones made BatchNorm weights."""
    ren = {p.name: p.name.rsplit(".", 1)[0] + ".weight" for p in structure.params}
    params = tuple(replace(p, name=ren[p.name], module_type="BatchNorm2d" if len(p.shape) == 1 and f else "Toy")
                   for p, f in zip(structure.params, flags))
    groups = tuple(replace(g, slices=tuple(replace(s, param=ren[s.param]) for s in g.slices)) for g in structure.groups)
    return wtcore.Structure(params, groups)


@settings(max_examples=40, deadline=None)
@given(structures(), st.integers(0, 2**31 - 1), st.data())
def test_bn_scale_matches_reference(structure, seed, data):
    flags = data.draw(st.lists(st.booleans(), min_size=len(structure.params), max_size=len(structure.params)))
    bn = with_batchnorm(structure, flags)
    params = {k.rsplit(".", 1)[0] + ".weight": v for k, v in params_for(structure, seed=seed).items()}
    got = wtcore.compile(bn, ["bn_scale_importance"])(params)["bn_scale_importance"].numpy()
    want = np.full(bn.num_units, np.inf)
    for g in bn.groups:
        off = bn.offsets[g.name]
        for s in g.slices:
            if bn.param_map[s.param].module_type != "BatchNorm2d":
                continue
            for i, u in enumerate(s.index_list()):
                if u >= 0:
                    prev = 0.0 if math.isinf(want[off + u]) else want[off + u]
                    want[off + u] = prev + abs(float(params[s.param][i]))
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)


def reference_mac_aware(structure, imp, mac, mode, alpha, beta, normalize):
    prun = np.array([g.prunable for g in structure.groups for _ in range(g.size)])
    pool = mac[prun] if prun.any() else mac
    max_mac, min_mac = pool[pool > 0].max(), pool[pool > 0].min()
    out = np.zeros(structure.num_units)
    for g in structure.groups:
        off = structure.offsets[g.name]
        for u in range(off, off + g.size):
            if mode == "multiplicative":
                out[u] = imp[u] * (min_mac / max(mac[u], min_mac)) ** (1.0 / beta)
                continue
            top = imp[off: off + g.size].max() if normalize == "group" else imp[prun if prun.any() else ~prun].max()
            scaled = imp[u] / top if 0 < top < math.inf else imp[u]
            out[u] = alpha * scaled + (1 - alpha) * max(0.0, 1.0 - mac[u] / max_mac)
    return out


@settings(max_examples=50, deadline=None)
@given(structures_with_ops(), st.integers(0, 2**31 - 1), st.sampled_from(["additive", "multiplicative"]),
       st.sampled_from([0.0, 0.3, 1.0]), st.sampled_from([0.5, 1.0, 2.0]), st.sampled_from(["group", "global"]))
def test_mac_aware_matches_reference(structure, seed, mode, alpha, beta, normalize):
    params = params_for(structure, seed=seed)
    mac = reference_unit_cost(structure)
    prun = np.array([g.prunable for g in structure.groups for _ in range(g.size)])
    spec = wtcore.Spec("mac_aware_importance", mode=mode, alpha=alpha, beta=beta, normalize=normalize)
    pool = mac[prun] if prun.any() else mac
    if not (pool > 0).any():
        with pytest.raises(wtcore.SpecError, match="no unit"):
            wtcore.compile(structure, [spec])
        return
    got = wtcore.compile(structure, [spec])(params)["mac_aware_importance"].numpy()
    imp = np.sqrt(reference_unit_values(structure, params)["sumsq"])
    want = reference_mac_aware(structure, imp, mac, mode, alpha, beta, normalize)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)


@settings(max_examples=30, deadline=None)
@given(structures(), st.integers(0, 2**31 - 1), st.sampled_from([0.0, 1e-8, 0.5]))
def test_standardized_importance_matches_reference(structure, seed, eps):
    params = params_for(structure, seed=seed)
    got = wtcore.compile(structure, [wtcore.Spec("standardized_importance", base="unit_sumsq", eps=eps)])(params)
    s = reference_unit_values(structure, params)["sumsq"]
    for g in structure.groups:
        off = structure.offsets[g.name]
        v = s[off: off + g.size]
        span = v.max() - v.min() + eps
        want = (v.max() - v) / span if g.prunable and span > 0 else np.zeros(g.size)
        np.testing.assert_allclose(got["standardized_importance"][off: off + g.size].numpy(), want, rtol=1e-9,
                                   atol=1e-12)


# ----------------------------------------------------------------------------------------- real model
@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(4, 3, 32, 32)
    structure = trace(model, x[:1])
    model.zero_grad()
    F.cross_entropy(model(x), torch.tensor([1, 2, 3, 4])).backward()
    return model, structure


def per_module_sum(model, structure, value) -> np.ndarray:
    """Per unit, sum over every coupled module slice of `value(name, param)` reduced to the slice's axis."""
    out = np.zeros(structure.num_units)
    params = dict(model.named_parameters())
    for g in structure.groups:
        off = structure.offsets[g.name]
        for sl in g.slices:
            assert sl.groups == 1
            v = value(sl.param, params[sl.param]).to(torch.float64)
            dims = [d for d in range(v.dim()) if d != sl.axis]
            per_entry = (v.sum(dims) if dims else v).numpy()
            for i, u in enumerate(sl.index_list()):
                if u >= 0:
                    out[off + u] += per_entry[i]
    return out


def test_taylor_on_resnet18_equals_hand_computation_with_real_grads(resnet):
    model, structure = resnet
    params = {k: v.detach() for k, v in model.named_parameters()}
    grads = {k: v.grad for k, v in model.named_parameters()}
    got = wtcore.compile(structure, ["taylor_importance"])(taylor_inputs(params, grads))["taylor_importance"]
    want = per_module_sum(model, structure, lambda n, p: (p.detach() * p.grad).abs())
    np.testing.assert_allclose(got.double().numpy(), want, rtol=1e-4, atol=1e-9)
    assert (got > 0).float().mean() > 0.5  # channels that ReLU silences on this batch have no gradient


def test_bn_scale_and_magnitude_on_resnet18(resnet):
    model, structure = resnet
    params = {k: v.detach() for k, v in model.named_parameters()}
    out = wtcore.compile(structure, ["bn_scale_importance", "magnitude_importance"])(params)
    bn_names = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    want = per_module_sum(model, structure, lambda n, p: p.detach().abs() if n in bn_names else torch.zeros_like(p))
    has_bn = np.array([any(s.param in bn_names for s in g.slices) for g in structure.groups for _ in range(g.size)])
    got = out["bn_scale_importance"].double().numpy()
    np.testing.assert_allclose(got[has_bn], want[has_bn], rtol=1e-6)
    assert np.isinf(got[~has_bn]).all() and has_bn.sum() == structure.num_units - 10  # the logits have no BN
    want_l2 = np.sqrt(per_module_sum(model, structure, lambda n, p: p.detach().square()))
    np.testing.assert_allclose(out["magnitude_importance"].double().numpy(), want_l2, rtol=1e-5)


def test_mac_aware_scores_drive_the_importance_mask(resnet):
    model, structure = resnet
    params = {k: v.detach() for k, v in model.named_parameters()}
    out = wtcore.compile(structure, [
        "unit_macs", "magnitude_importance",
        wtcore.Spec("mac_aware_importance", key="add", alpha=0.5),
        wtcore.Spec("mac_aware_importance", key="mul", mode="multiplicative", beta=1.0)])(params)
    imp, mac = out["magnitude_importance"].double(), out["unit_macs"]
    prun = torch.cat([torch.full((g.size,), g.prunable) for g in structure.groups])
    # multiplicative with beta=1: imp * min_mac / mac exactly
    min_mac = mac[prun & (mac > 0)].min()
    torch.testing.assert_close(out["mul"], imp * min_mac / mac.clamp(min=min_mac))
    # the stem (conv1 at full resolution) costs more per channel than layer4, so its units rank lower; the
    # keep-mask removes the lowest scores globally, except that a group always keeps one unit
    raw = wtcore.Spec("importance", scores=out["add"], amount=0.2, scope="global", normalize=None, max_fraction=1.0)
    keep = wtcore.compile(structure, raw)(params)["importance"]
    removed = ~keep & prun
    assert int(removed.sum()) == round(0.2 * int(prun.sum()))
    gid = torch.cat([torch.full((g.size,), i) for i, g in enumerate(structure.groups)])
    last = torch.tensor([int(removed[gid == i].sum()) == g.size - 1 for i, g in enumerate(structure.groups)])[gid]
    assert float(out["add"][removed].max()) <= float(out["add"][keep & prun & ~last].min())
    stem, deep = structure.offsets["conv1.out"], structure.offsets["layer4.1.conv1.out"]
    assert float(mac[stem]) > float(mac[deep]) and bool(removed[stem: stem + 64].sum() > 60)
