"""Mask specs against plain-loop float64 references on random structures, against torch.nn.utils.prune and
torch.ao's WeightNormSparsifier on single tensors, and the program-language rules (fixed sizes, one scatter)."""

from __future__ import annotations

import inspect
import math
import re

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import prune

import wtcore
from wtcore.ir import Param, Slice, Structure, UnitGroup, runs_from_list
from wtcore.masking import param_masks, pruned_shapes, validate_amount
from wtcore.specs.masks import isomorphism_key
from wtcore.testing import element_unit_maps, reference_unit_values, structures_and_params, zero_units

# ----------------------------------------------------------------------------------------- references


def ref_linf(structure: Structure, params: dict[str, torch.Tensor]) -> np.ndarray:
    """Max |w| per unit by loops over every element map."""
    out = np.zeros(structure.num_units)
    for name, maps in element_unit_maps(structure).items():
        w = np.abs(params[name].detach().double().numpy())
        for m in maps:
            for u, v in zip(m.reshape(-1), w.reshape(-1)):
                if u >= 0:
                    out[u] = max(out[u], v)
    return out


def ref_scores(structure, params, n) -> np.ndarray:
    vals = reference_unit_values(structure, params)
    if n == 2:
        return np.sqrt(vals["sumsq"])
    if n == 1:
        return vals["abssum"]
    return ref_linf(structure, params)


def count(amount, live: int) -> int:
    return min(amount, live) if isinstance(amount, int) else round(amount * live)


def ref_structured(structure, params, score, amount, scope="local", groups=None, max_fraction=1.0, round_to=1,
                   normalize=None, only=None) -> np.ndarray:
    """The documented semantics, greedily: per group, already-zero units first, then live units by score;
    a ranking domain (group / all / isomorphic class) takes its lowest live candidates (within each group's
    cap) in (score, unit index) order; round_to rounds what a group keeps up."""
    import fnmatch

    vals = reference_unit_values(structure, params)
    tie = ref_ties(structure)
    floor: dict[str, int] = {}  # a grouped conv keeps two output channels per conv group
    for g in structure.groups:
        for sl in g.slices:
            conv = [x for h in structure.groups for x in h.slices if x.param == sl.param and x.groups > 1
                    and structure.param_map[x.param].shape[x.group_axis] != x.groups]
            if conv and sl.groups == 1 and sl.axis == conv[0].group_axis:
                floor[g.name] = max(floor.get(g.name, 1), 2 * conv[0].groups)
    members: dict[int, list[int]] = {}
    for u, t in enumerate(tie):
        members.setdefault(t, []).append(u)
    score = [float(np.mean([score[m] for m in members[tie[u]]])) if len(members[tie[u]]) > 1 else score[u]
             for u in range(structure.num_units)]
    keep = np.ones(structure.num_units, dtype=bool)
    info = {}
    for g in structure.groups:
        off = structure.offsets[g.name]
        eligible = g.prunable and (groups is None or any(fnmatch.fnmatchcase(g.name, p) for p in groups)) and (
            only is None or g.name in only)
        units = list(range(off, off + g.size))
        cls = {u: 2 if vals["count"][u] == 0 else (0 if vals["nnz"][u] == 0 else 1) for u in units}
        order = sorted(units, key=lambda u: (cls[u], score[u], tie[u], u))
        dead = [u for u in units if cls[u] == 0]
        live = [u for u in order if cls[u] == 1]
        cap = max(0, min(math.floor(max_fraction * g.size + 1e-9), g.size - floor.get(g.name, 1)))
        info[g.name] = dict(eligible=eligible, dead=dead, live=live, order=order, cap=cap, size=g.size)
    new = {n: 0 for n in info}
    if scope == "local":
        for n, d in info.items():
            if d["eligible"]:
                new[n] = max(0, min(count(amount, len(d["live"])), d["cap"] - len(d["dead"])))
    else:
        domains: dict = {}
        for g in structure.groups:
            d = info[g.name]
            if d["eligible"]:
                key = 0 if scope == "global" else isomorphism_key(structure, g.name)
                domains.setdefault(key, []).append(g.name)
        for names in domains.values():
            cands, total_live = [], 0
            for n in names:
                d = info[n]
                total_live += len(d["live"])
                room = max(0, d["cap"] - len(d["dead"]))
                s = score
                if normalize == "mean" and d["live"]:
                    mean = sum(score[u] for u in d["live"]) / len(d["live"])
                    if mean > 0:
                        s = {u: score[u] / mean for u in d["live"]}
                cands += [(s[u], tie[u], u, n) for u in d["live"][:room]]
            k = count(amount, total_live)
            for *_, n in sorted(cands)[:k]:
                new[n] += 1
    for n, d in info.items():
        if not d["eligible"]:
            continue
        avail = d["size"] - len(d["dead"])
        if round_to > 1:
            left = avail - new[n]
            up = math.ceil(left / round_to) * round_to
            new[n] = avail - min(up, avail)
        for u in d["dead"] + d["live"][: new[n]]:
            keep[u] = False
    for ms in members.values():  # a tie goes only as a whole
        if keep[ms].any():
            keep[ms] = True
    return keep


def ref_ties(structure: Structure) -> list[int]:
    """The smallest unit each unit is tied to by a grouped (not depthwise) convolution: in every conv group,
    the same in-group position of its inputs and of its outputs (plain loops and relabelling)."""
    tie = list(range(structure.num_units))

    def join(a: int, b: int) -> None:
        old, new = max(tie[a], tie[b]), min(tie[a], tie[b])
        for u in range(len(tie)):
            if tie[u] == old:
                tie[u] = new

    grouped = {s.param: (s.groups, s.group_axis) for g in structure.groups for s in g.slices
               if s.groups > 1 and structure.param_map[s.param].shape[s.group_axis] != s.groups}
    for g in structure.groups:
        off = structure.offsets[g.name]
        for s in g.slices:
            if s.param not in grouped or (s.groups == 1 and s.axis != grouped[s.param][1]):
                continue
            blocks = grouped[s.param][0]
            ids = s.index_list()
            per = len(ids) // blocks
            for j in range(per):
                col = [ids[k * per + j] + off for k in range(blocks) if ids[k * per + j] >= 0]
                for u in col[1:]:
                    join(col[0], u)
    return tie


def ref_unstructured_keep(w: torch.Tensor, amount, order_key) -> torch.Tensor:
    """Element keep-mask: zeros stay removed, then `amount` of the others in `order_key` order (plain loop)."""
    flat = w.detach().double().reshape(-1).tolist()
    dead = [i for i, v in enumerate(flat) if v == 0]
    live = sorted((i for i, v in enumerate(flat) if v != 0), key=order_key)
    keep = torch.ones(len(flat), dtype=torch.bool)
    for i in dead + live[: count(amount, len(live))]:
        keep[i] = False
    return keep.reshape(w.shape)


def amounts(structure: Structure, scope: str, data) -> int | float:
    if data.draw(st.booleans()):
        return data.draw(st.sampled_from([0.0, 0.25, 0.3, 0.5, 0.75, 1.0]))
    prunable = [g for g in structure.groups if g.prunable]
    smallest = min(g.size for g in prunable) if scope != "global" else sum(g.size for g in prunable)
    return data.draw(st.integers(0, smallest))


def case_options(structure, data) -> dict:
    scope = data.draw(st.sampled_from(["local", "global", "isomorphic"]))
    return dict(
        amount=amounts(structure, scope, data),
        scope=scope,
        max_fraction=data.draw(st.sampled_from([1.0, 0.5, 0.2])),
        round_to=data.draw(st.sampled_from([1, 1, 2, 3])),
        normalize=data.draw(st.sampled_from([None, "mean"])) if scope != "local" else None,
    )


# ----------------------------------------------------------------------------------------- structured
@settings(max_examples=80, deadline=None)
@given(structures_and_params(), st.sampled_from([1, 2, float("inf")]), st.booleans(), st.data())
def test_ln_structured_matches_reference(case, n, per_param, data):
    structure, params = case
    opts = case_options(structure, data)
    prog = wtcore.compile(structure, [wtcore.Spec("ln_structured", n=n, per_param=per_param, **opts)])
    out = prog(params)
    keep = out["ln_structured/units"] if per_param else out["ln_structured"]
    want = ref_structured(structure, params, ref_scores(structure, params, n), **opts)
    assert keep.dtype == torch.bool and keep.tolist() == want.tolist()
    if per_param:  # element masks: every slice of a removed unit, checked against the element maps
        emaps = element_unit_maps(structure)
        for p in structure.params:
            if p.name not in emaps:
                assert f"ln_structured/{p.name}" not in out
                continue
            ref = np.ones(p.shape, dtype=bool)
            for m in emaps[p.name]:
                ref &= np.where(m >= 0, want[np.maximum(m, 0)], True)
            assert out[f"ln_structured/{p.name}"].numpy().tolist() == ref.tolist()
            eager = param_masks(structure, keep).get(p.name)
            assert (eager.numpy() if eager is not None else np.ones(p.shape, bool)).tolist() == ref.tolist()


@settings(max_examples=40, deadline=None)
@given(structures_and_params())
def test_unit_linf_matches_reference(case):
    structure, params = case
    prog = wtcore.compile(structure, ["unit_linf"])
    np.testing.assert_array_equal(prog(params)["unit_linf"].numpy(), ref_linf(structure, params))
    assert "scatter_add" not in prog.stats()  # dense: no scatter at all


@settings(max_examples=50, deadline=None)
@given(structures_and_params(), st.integers(0, 2**31 - 1), st.data())
def test_random_structured_and_importance_match_reference(case, seed, data):
    structure, params = case
    opts = case_options(structure, data)
    out = wtcore.compile(structure, [wtcore.Spec("random_structured", seed=seed, **{k: v for k, v in opts.items()
                                                                                  if k != "normalize"})])(params)
    draws = torch.rand(structure.num_units, generator=torch.Generator().manual_seed(seed)).tolist()
    want = ref_structured(structure, params, draws, **{**opts, "normalize": None})
    assert out["random_structured"].tolist() == want.tolist()
    # importance: a tensor of scores, and pairs for some groups only (the others are not considered)
    scores = torch.randn(structure.num_units, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    got = wtcore.compile(structure, [wtcore.Spec("importance", scores=scores, **opts)])(params)["importance"]
    assert got.tolist() == ref_structured(structure, params, scores.tolist(), **opts).tolist()
    chosen = structure.groups[:: 2]
    pairs = tuple((g.name, tuple(scores[structure.offsets[g.name]: structure.offsets[g.name] + g.size].tolist()))
                  for g in chosen)
    opts = {**opts, "amount": 0.5}  # fewer groups take part: a count could exceed their units
    got = wtcore.compile(structure, [wtcore.Spec("importance", scores=pairs, **opts)])(params)["importance"]
    want = ref_structured(structure, params, scores.tolist(), **opts, only={g.name for g in chosen})
    assert got.tolist() == want.tolist()


@settings(max_examples=40, deadline=None)
@given(structures_and_params(), st.integers(0, 2**31 - 1))
def test_custom_keeps_what_the_user_says_and_what_is_already_removed(case, seed):
    structure, params = case
    user = torch.rand(structure.num_units, generator=torch.Generator().manual_seed(seed)) > 0.3
    tie = torch.tensor(ref_ties(structure))
    if bool((user != user[tie]).any()):  # a tie cut apart cannot be pruned physically: refused up front
        with pytest.raises(wtcore.SpecError, match="grouped convolution ties"):
            wtcore.compile(structure, [wtcore.Spec("custom", keep=user)])
        user = user[tie]
    got = wtcore.compile(structure, [wtcore.Spec("custom", keep=user)])(params)["custom"]
    vals = reference_unit_values(structure, params)
    prunable = np.concatenate([np.full(g.size, g.prunable) for g in structure.groups])
    dead = (vals["count"] > 0) & (vals["nnz"] == 0) & prunable
    assert got.tolist() == (user.numpy() & ~dead).tolist()


@settings(max_examples=60, deadline=None)
@given(structures_and_params(), st.integers(0, 2**31 - 1))
def test_param_masks_zero_exactly_what_zero_units_zeroes(case, seed):
    """The element masks of a unit mask (what fake pruning applies) against the reference `zero_units`."""
    structure, params = case
    keep = torch.rand(structure.num_units, generator=torch.Generator().manual_seed(seed)) > 0.4
    masks = param_masks(structure, keep)
    ref = zero_units(structure, params, (~keep).nonzero().flatten().tolist())
    for name, w in params.items():
        got = w * masks[name] if name in masks else w
        assert torch.equal(got, ref[name]), name
        assert name not in masks or not bool(masks[name].all())  # only parameters that lose an element


# ----------------------------------------------------------------------------------------- unstructured
@settings(max_examples=50, deadline=None)
@given(structures_and_params(), st.data())
def test_unstructured_match_reference(case, data):
    structure, params = case
    chosen = [p for p in structure.params if len(p.shape) >= 2]  # the default: every weight-like tensor
    assume(chosen)
    amount = data.draw(st.one_of(st.sampled_from([0.0, 0.3, 0.5, 1.0]), st.integers(0, 3)))
    seed = data.draw(st.integers(0, 2**31 - 1))
    assume(not isinstance(amount, int) or all(amount <= math.prod(p.shape) for p in chosen))
    out = wtcore.compile(structure, [wtcore.Spec("l1_unstructured", amount=amount),
                                     wtcore.Spec("random_unstructured", amount=amount, seed=seed)])(params)
    gen = torch.Generator().manual_seed(seed)
    assert {k.split("/", 1)[1] for k in out if k.startswith("l1")} == {p.name for p in chosen}
    for p in chosen:
        w = params[p.name]
        mags = w.reshape(-1).abs().tolist()
        want = ref_unstructured_keep(w, amount, lambda i, f=mags: (f[i], i))
        assert out[f"l1_unstructured/{p.name}"].tolist() == want.tolist()
        draws = torch.rand(p.shape, generator=gen).reshape(-1).tolist()
        want = ref_unstructured_keep(w, amount, lambda i, d=draws: (-d[i], i))
        assert out[f"random_unstructured/{p.name}"].tolist() == want.tolist()


def nm_structure(shapes: list[tuple[str, tuple[int, ...]]]) -> Structure:
    params = tuple(Param(f"m{i}.weight", shape, "float32", f"m{i}", t) for i, (t, shape) in enumerate(shapes))
    out_axis = {p.name: (1 if p.module_type.startswith("ConvTranspose") else 0) for p in params}
    groups = tuple(
        UnitGroup(f"m{i}.out", "channel", p.shape[out_axis[p.name]],
                  (Slice(p.name, out_axis[p.name], runs_from_list(list(range(p.shape[out_axis[p.name]])))),))
        for i, p in enumerate(params)
    )
    return Structure(params, groups, model="nm")


def ref_nm(w: torch.Tensor, transposed: bool, n: int, block: tuple[int, int], pad: bool) -> torch.Tensor | None:
    """The 2-D view, blocks from the origin, the n smallest |w| of each (partial blocks: min(n, size))."""
    a = w.detach().abs()
    if w.dim() == 2:
        view = a if not transposed else a.t()
    else:
        perm = (*range(2, w.dim()), 1, 0) if transposed else (*range(2, w.dim()), 0, 1)
        view = a.permute(perm).reshape(-1, a.shape[0 if transposed else 1])
    rows, cols = view.shape
    if (rows % block[0] or cols % block[1]) and not pad:
        return None
    keep = torch.ones(rows, cols, dtype=torch.bool)
    for r0 in range(0, rows, block[0]):
        for c0 in range(0, cols, block[1]):
            cells = [(r, c) for r in range(r0, min(r0 + block[0], rows)) for c in range(c0, min(c0 + block[1], cols))]
            ranked = sorted(range(len(cells)), key=lambda i: (float(view[cells[i]]), i))
            for i in ranked[:n]:
                keep[cells[i]] = False
    if w.dim() == 2:
        return keep if not transposed else keep.t()
    shape = w.shape
    perm = (*range(2, w.dim()), 1, 0) if transposed else (*range(2, w.dim()), 0, 1)
    k = keep.reshape([shape[d] for d in perm])
    return k.permute(tuple(sorted(range(len(perm)), key=lambda i: perm[i])))


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_nm_matches_reference_and_is_exact(data):
    kinds = data.draw(st.lists(st.sampled_from(["Linear", "Conv2d", "ConvTranspose2d"]), min_size=1, max_size=3))
    shapes = []
    for t in kinds:
        dims = [data.draw(st.integers(1, 9)), data.draw(st.integers(1, 12))]
        shapes.append((t, tuple(dims) if t == "Linear" else (*dims, data.draw(st.integers(1, 3)), 2)))
    structure = nm_structure(shapes)
    m = data.draw(st.sampled_from([4, 8, 2]))
    n = data.draw(st.integers(0, m))
    block = data.draw(st.sampled_from([(1, m), (2, m // 2)] if m > 2 else [(1, m)]))
    how = data.draw(st.sampled_from(["skip", "pad"]))
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 1000)))
    params = {p.name: torch.randn(p.shape, generator=gen) for p in structure.params}
    refs = {p.name: ref_nm(params[p.name], p.module_type.startswith("ConvTranspose"), n, block, how == "pad")
            for p in structure.params}
    spec = wtcore.Spec("nm", n=n, m=m, block_shape=block, indivisible=how)
    if all(r is None for r in refs.values()):
        with pytest.raises(wtcore.SpecError, match="whole number of blocks"):
            wtcore.compile(structure, [spec])
        return
    out = wtcore.compile(structure, [spec])(params)
    for name, ref in refs.items():
        if ref is None:
            assert f"nm/{name}" not in out
            continue
        got = out[f"nm/{name}"]
        assert got.shape == params[name].shape and got.tolist() == ref.tolist()


def test_nm_two_four_is_exact_on_linear_and_conv() -> None:
    torch.manual_seed(0)
    s = nm_structure([("Linear", (32, 64)), ("Conv2d", (16, 32, 3, 3))])
    params = {p.name: torch.randn(p.shape) for p in s.params}
    out = wtcore.compile(s, [wtcore.Spec("nm", n=2, m=4)])(params)
    lin = out["nm/m0.weight"].reshape(32, 16, 4)
    assert (lin.sum(-1) == 2).all()  # exactly 2 of every 4 consecutive inputs kept
    conv = out["nm/m1.weight"].permute(2, 3, 0, 1).reshape(-1, 8, 4)  # blocks along input channels
    assert (conv.sum(-1) == 2).all()
    kept = params["m0.weight"].abs().reshape(32, 16, 4)
    smallest_kept = torch.where(lin, kept, torch.inf).amin(-1)
    largest_dropped = torch.where(lin, -torch.inf, kept).amax(-1)
    assert (smallest_kept > largest_dropped).all()  # the kept ones are the largest magnitudes


def test_nm_agrees_with_torch_ao_weight_norm_sparsifier() -> None:
    from torch.ao.pruning import WeightNormSparsifier

    torch.manual_seed(0)
    for block in [(1, 4), (2, 2)]:
        model = nn.Sequential(nn.Linear(16, 6))
        w = model[0].weight.detach().clone()
        sp = WeightNormSparsifier(sparsity_level=1.0, sparse_block_shape=block, zeros_per_block=2)
        sp.prepare(model, config=[{"tensor_fqn": "0.weight"}])
        sp.step()
        ao = model[0].parametrizations.weight[0].mask.bool()
        s = nm_structure([("Linear", (6, 16))])
        mine = wtcore.compile(s, [wtcore.Spec("nm", n=2, m=4, block_shape=block)])({"m0.weight": w})["nm/m0.weight"]
        # ao's tensor-level sparsity may leave one block dense; every block it gives the 2:4 pattern must match
        def to_blocks(t: torch.Tensor, r: int = block[0], c: int = block[1]) -> torch.Tensor:
            return t.reshape(6 // r, r, 16 // c, c).permute(0, 2, 1, 3).reshape(-1, 4)

        patterned = to_blocks(ao).sum(-1) == 2
        assert patterned.sum() >= len(patterned) - 1
        assert torch.equal(to_blocks(mine)[patterned], to_blocks(ao)[patterned])


# ------------------------------------------------------------------------------- vs torch.nn.utils.prune
def single(shape: tuple[int, ...], dim: int = 0, module_type: str = "Conv2d") -> Structure:
    size = shape[dim]
    return Structure(
        (Param("m.weight", shape, "float32", "m", module_type),),
        (UnitGroup("m.out", "channel", size, (Slice("m.weight", dim, runs_from_list(list(range(size)))),)),),
        model="single",
    )


def torch_channel_keep(mask: torch.Tensor, dim: int) -> list[bool]:
    return (mask.sum(tuple(d for d in range(mask.dim()) if d != dim)) > 0).tolist()


@pytest.mark.parametrize("n", [1, 2, float("inf")])
@pytest.mark.parametrize("amount", [0.3, 0.5, 3, 0])
@pytest.mark.parametrize("dim", [0, 1])
def test_ln_structured_same_as_torch(n, amount, dim) -> None:
    torch.manual_seed(1)
    conv = nn.Conv2d(6, 10, 3)
    w = conv.weight.detach().clone()
    keep = wtcore.compile(single(tuple(w.shape), dim), [wtcore.Spec("ln_structured", amount=amount, n=n)])(
        {"m.weight": w})["ln_structured"]
    prune.ln_structured(conv, "weight", amount=amount, n=n, dim=dim)
    assert keep.tolist() == torch_channel_keep(conv.weight_mask, dim)


def test_iterative_pruning_is_relative_to_what_remains_like_torch() -> None:
    """torch's PruningContainer computes a second mask on the remaining entries; wt on the fake-pruned values."""
    torch.manual_seed(2)
    conv = nn.Conv2d(4, 20, 3)
    w = conv.weight.detach().clone()
    s = single(tuple(w.shape))
    for _ in range(3):  # structured: 20 -> 14 -> 10 -> 7 channels
        keep = wtcore.compile(s, [wtcore.Spec("ln_structured", amount=0.3, n=2)])({"m.weight": w})["ln_structured"]
        w = w * keep.view(-1, 1, 1, 1)
        prune.ln_structured(conv, "weight", amount=0.3, n=2, dim=0)
        assert keep.tolist() == torch_channel_keep(conv.weight_mask, 0)
    assert int(keep.sum()) == 7
    lin = nn.Linear(30, 10)
    w = lin.weight.detach().clone()
    s = single(tuple(w.shape), module_type="Linear")
    for amount in (0.4, 50, 0.25):  # unstructured: fractions and counts of what remains
        mask = wtcore.compile(s, [wtcore.Spec("l1_unstructured", amount=amount)])({"m.weight": w})[
            "l1_unstructured/m.weight"]
        w = w * mask
        prune.l1_unstructured(lin, "weight", amount=amount)
        assert torch.equal(mask, lin.weight_mask.bool())


def test_random_masks_same_as_torch_after_manual_seed() -> None:
    conv = nn.Conv2d(5, 12, 3)
    w = conv.weight.detach().clone()
    s = single(tuple(w.shape))
    out = wtcore.compile(s, [wtcore.Spec("random_unstructured", amount=0.4, seed=7),
                             wtcore.Spec("random_structured", amount=5, seed=7)])({"m.weight": w})
    torch.manual_seed(7)
    prune.random_unstructured(conv, "weight", amount=0.4)
    assert torch.equal(out["random_unstructured/m.weight"], conv.weight_mask.bool())
    prune.remove(conv, "weight")
    conv.weight.data = w.clone()
    torch.manual_seed(7)
    prune.random_structured(conv, "weight", amount=5, dim=0)
    assert out["random_structured"].tolist() == torch_channel_keep(conv.weight_mask, 0)
    # seeded: the same mask on every call and every compile
    again = wtcore.compile(s, [wtcore.Spec("random_unstructured", amount=0.4, seed=7)])({"m.weight": w * 2})
    assert torch.equal(again["random_unstructured/m.weight"], out["random_unstructured/m.weight"])


def test_amount_validation_like_torch() -> None:
    for ok in (0, 3, 0.0, 0.5, 1.0, 1):
        assert validate_amount(ok) == ok
    for bad in (-1, 1.5, -0.1, "0.3", None):
        with pytest.raises(wtcore.SpecError):
            validate_amount(bad)
        with pytest.raises((ValueError, TypeError)):  # torch refuses the same values
            prune.L1Unstructured(bad)
    with pytest.raises(wtcore.SpecError):  # the one deliberate difference: torch takes True as 1
        validate_amount(True)
    s = single((10, 3, 1, 1))
    with pytest.raises(wtcore.SpecError, match=r"amount=11 should be smaller than the number of units in group"):
        wtcore.compile(s, [wtcore.Spec("ln_structured", amount=11)])
    with pytest.raises(wtcore.SpecError, match="smaller than the number of elements"):
        wtcore.compile(s, [wtcore.Spec("l1_unstructured", amount=31)])
    with pytest.raises(wtcore.SpecError, match="needs amount"):
        wtcore.compile(s, ["ln_structured"])
    with pytest.raises(wtcore.SpecError, match="n must be 1, 2 or inf"):
        wtcore.compile(s, [wtcore.Spec("ln_structured", amount=1, n=3)])
    with pytest.raises(wtcore.SpecError, match="scope"):
        wtcore.compile(s, [wtcore.Spec("ln_structured", amount=1, scope="layer")])
    with pytest.raises(wtcore.SpecError, match="matches no unit group"):
        wtcore.compile(s, [wtcore.Spec("ln_structured", amount=1, groups="nope*")])
    with pytest.raises(wtcore.SpecError, match="no parameter selected"):
        wtcore.compile(s, [wtcore.Spec("l1_unstructured", amount=1)], ignore=["m"])


def test_a_group_always_keeps_one_unit_and_caps_hold() -> None:
    s = single((8, 2, 1, 1))
    w = torch.randn(8, 2, 1, 1)
    keep = wtcore.compile(s, [wtcore.Spec("ln_structured", amount=1.0)])({"m.weight": w})["ln_structured"]
    assert int(keep.sum()) == 1 and bool(keep[w.flatten(1).norm(dim=1).argmax()])  # torch would remove all 8
    keep = wtcore.compile(s, [wtcore.Spec("ln_structured", amount=1.0, max_fraction=0.5)])({"m.weight": w})
    assert int(keep["ln_structured"].sum()) == 4
    keep = wtcore.compile(s, [wtcore.Spec("ln_structured", amount=0.3, round_to=4)])({"m.weight": w})
    assert int(keep["ln_structured"].sum()) == 8  # 0.3 * 8 -> 2 removed, 6 kept -> rounded up to 8


# ---------------------------------------------------------------------------------------- program rules
FORBIDDEN = ("nonzero", ".item(", "bincount", "segment_reduce", "masked_select", "index_put")


@pytest.mark.parametrize("spec", [
    wtcore.Spec("ln_structured", amount=0.3, n=2, scope="global", round_to=2, normalize="mean", per_param=True),
    wtcore.Spec("ln_structured", amount=0.3, n=float("inf"), scope="isomorphic"),
    wtcore.Spec("ln_structured", amount=2, n=1),
    wtcore.Spec("random_structured", amount=0.5, scope="global"),
    wtcore.Spec("custom", keep=torch.ones(18, dtype=torch.bool), per_param=True),
    wtcore.Spec("l1_unstructured", amount=0.5),
    wtcore.Spec("random_unstructured", amount=0.5),
    wtcore.Spec("nm", n=1, m=2),
], ids=lambda s: s.name)
def test_mask_programs_use_fixed_sizes_and_at_most_one_index_add(spec) -> None:
    s = nm_structure([("Linear", (6, 4)), ("Linear", (6, 4)), ("Conv2d", (6, 2, 1, 1))])
    prog = wtcore.compile(s, [spec, "unit_l2"])
    assert prog.stats().get("scatter_add", 0) <= 1
    # what the program runs is the implementations of its primitives: none has a data-dependent size
    code = "\n".join(inspect.getsource(wtcore.PRIMITIVES[p].impl) for p in prog.stats() if p in wtcore.PRIMITIVES)
    for bad in FORBIDDEN:
        assert bad not in code, bad
    assert not re.search(r"\.\w+_\(", code), "an in-place tensor method"
    params = {p.name: torch.randn(p.shape) for p in s.params}
    a, b = prog(params), prog(params)
    assert all(torch.equal(a[k], b[k]) for k in a)  # deterministic


def test_isomorphic_scope_ranks_identical_groups_together() -> None:
    s = nm_structure([("Linear", (10, 4)), ("Linear", (10, 4)), ("Linear", (6, 4))])
    assert isomorphism_key(s, "m0.out") == isomorphism_key(s, "m1.out") != isomorphism_key(s, "m2.out")
    params = {"m0.weight": torch.randn(10, 4) * 10, "m1.weight": torch.randn(10, 4), "m2.weight": torch.randn(6, 4)}
    keep = wtcore.compile(s, [wtcore.Spec("ln_structured", amount=0.5, scope="isomorphic")])(params)["ln_structured"]
    assert int(keep[20:].sum()) == 3  # its own class: half of 6
    assert int(keep[:10].sum()) + int(keep[10:20].sum()) == 10  # half of the 20 units of the class
    assert int(keep[:10].sum()) > int(keep[10:20].sum())  # the large-norm group loses less


def test_pruned_shapes_follow_every_slice() -> None:
    s = Structure(
        (Param("a.weight", (4, 3)), Param("b.weight", (5, 4)), Param("g.weight", (6, 2, 3, 3))),
        (
            UnitGroup("a.out", "feature", 4, (Slice("a.weight", 0, runs_from_list(range(4))),
                                               Slice("b.weight", 1, runs_from_list(range(4))),
                                               Slice("g.weight", 1, runs_from_list(range(4)), 2, 0))),
        ),
    )
    keep = torch.tensor([True, False, True, False])  # the same position (1) of both conv groups
    assert pruned_shapes(s, keep) == {"a.weight": (2, 3), "b.weight": (5, 2), "g.weight": (6, 1, 3, 3)}
    assert set(param_masks(s, keep)) == {"a.weight", "b.weight", "g.weight"}
    assert param_masks(s, torch.ones(4, dtype=torch.bool)) == {}  # nothing removed: no mask at all


# ------------------------------------------------------------------------------ masks physical pruning can do
class GroupedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.g = nn.Conv2d(8, 8, 3, padding=1, groups=2)  # 4 inputs and 4 outputs per conv group
        self.b = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.g(torch.relu(self.a(x))))).mean((2, 3))


def test_grouped_conv_units_are_tied_and_masks_remove_whole_ties() -> None:
    from wtcore.realizable import min_kept, unit_ties
    from wtfront import apply_masks, prune_zero_units, trace

    torch.manual_seed(0)
    net, x = GroupedNet().eval(), torch.randn(1, 3, 8, 8)
    s = trace(net, x)
    ties = unit_ties(s)
    for gname in ("a.out", "g.out"):  # input / output channel j of conv group 0 goes with j + 4 of group 1
        off = s.offsets[gname]
        assert ties[off: off + 8].tolist() == [off + j for j in (0, 1, 2, 3, 0, 1, 2, 3)]
    assert min_kept(s) == {"g.out": 4}
    keep = wtcore.compile(s, [wtcore.Spec("ln_structured", amount=0.5, groups="a.out")])(
        dict(net.named_parameters()))["ln_structured"]
    off = s.offsets["a.out"]
    assert int((~keep).sum()) == 4 and torch.equal(keep[off: off + 4], keep[off + 4: off + 8])
    apply_masks(net, s, keep)
    y = net(x)
    prune_zero_units(net, s, x)
    assert net.g.in_channels == 4 and net.g.groups == 2
    torch.testing.assert_close(net(x), y, rtol=1e-5, atol=1e-6)
    with pytest.raises(wtcore.SpecError, match="grouped convolution ties"):
        wtcore.compile(s, [wtcore.Spec("custom", keep=(("a.out", (False,) + (True,) * 7),))])


def test_masks_leave_normalized_widths_alone_unless_asked() -> None:
    from toys import NormedNet

    from wtfront import trace

    torch.manual_seed(0)
    net = NormedNet()
    s = trace(net, torch.randn(2, 4))
    assert "LayerNorm 'norm'" in s.group_map["inp.out"].lossy and not s.group_map["fc1.out"].lossy
    assert wtcore.Structure.from_json(s.to_json()) == s
    params = dict(net.named_parameters())
    keep = wtcore.compile(s, [wtcore.Spec("ln_structured", amount=0.5, scope="global")])(params)["ln_structured"]
    off = s.offsets["inp.out"]
    assert bool(keep[off: off + 8].all()) and int((~keep).sum()) == 8  # half of fc1's 16 features
    with pytest.raises(wtcore.SpecError, match=r"normalization.*inp\.out.*lossy=True"):
        wtcore.compile(s, [wtcore.Spec("ln_structured", amount=0.5, groups="inp.out")])
    keep = wtcore.compile(s, [wtcore.Spec("ln_structured", amount=0.5, groups="inp.out", lossy=True)])(params)
    assert int((~keep["ln_structured"][off: off + 8]).sum()) == 4
