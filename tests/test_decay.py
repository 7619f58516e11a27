"""Gradient-side channel decay: coefficient expansion against a per-element reference on random structures,
the decay on a real torchvision model against a slow per-module/per-unit loop, and DistributedDataParallel
with two gloo processes against a single-process run on the concatenated batch."""

from __future__ import annotations

import math
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st

import wtcore
from wtcore.specs.regularizers import decay_coefficients, decay_plan
from wtcore.testing import reference_element_sums, reference_unit_values, structures
from wtfront import ChannelDecay, WeightTracker, trace


# ----------------------------------------------------------------------------------------- references
def reference_coefficients(structure: wtcore.Structure, gamma: np.ndarray) -> dict[str, np.ndarray]:
    """Per element, the sum of gamma over the distinct units its slices give it (loops over slices)."""
    return reference_element_sums(structure, gamma)


def per_module_sumsq(model: torch.nn.Module, structure: wtcore.Structure) -> np.ndarray:
    """Per-unit sum of squares, one module slice at a time (models without overlapping or grouped slices)."""
    params = dict(model.named_parameters())
    out = np.zeros(structure.num_units)
    for g in structure.groups:
        off = structure.offsets[g.name]
        for sl in g.slices:
            assert sl.groups == 1
            w = params[sl.param].detach().to(torch.float64)
            dims = [d for d in range(w.dim()) if d != sl.axis]
            per_entry = (w.square().sum(dims) if dims else w.square()).numpy()
            for i, u in enumerate(sl.index_list()):
                if u >= 0:
                    out[off + u] += per_entry[i]
    return out


def slow_depgraph_decay(model: torch.nn.Module, structure: wtcore.Structure, reg: float, alpha: float
                        ) -> dict[str, torch.Tensor]:
    """Torch-Pruning's `regularize()` written out: per group, gamma from the units' L2 norms (Python loop over
    units), then for every slice `grad += reg * gamma[index] * w` along its axis (biases left out)."""
    params = dict(model.named_parameters())
    norms = np.sqrt(per_module_sumsq(model, structure))
    grads = {n: p.grad.detach().to(torch.float64).clone() for n, p in params.items()}
    for g in structure.groups:
        if not g.prunable:
            continue
        off = structure.offsets[g.name]
        s = norms[off: off + g.size]
        hi, lo = float(s.max()), float(s.min())
        gamma = [alpha ** ((hi - v) / (hi - lo)) if hi > lo else 1.0 for v in s]
        gamma_t = torch.tensor([*gamma, 0.0], dtype=torch.float64)
        for sl in g.slices:  # one dependency at a time, vectorized over its entries, as Torch-Pruning does
            assert sl.groups == 1
            if sl.param.endswith("bias"):
                continue
            w = params[sl.param].detach().to(torch.float64)
            idx = torch.tensor([u if u >= 0 else g.size for u in sl.index_list()])
            view = [1] * w.dim()
            view[sl.axis] = -1
            grads[sl.param] += reg * gamma_t[idx].view(view) * w
    return grads


# ----------------------------------------------------------------------------------------- properties
@settings(max_examples=40, deadline=None)
@given(structures(), st.integers(0, 2**31 - 1))
def test_coefficients_match_per_element_reference(structure, seed):
    gen = torch.Generator().manual_seed(seed)
    gamma = torch.rand(structure.num_units, generator=gen, dtype=torch.float64) * 3
    got = decay_coefficients(decay_plan(structure, bias=True, prunable_only=False), gamma)
    ref = reference_coefficients(structure, gamma.numpy())
    assert set(got) == set(ref)
    for name, want in ref.items():
        np.testing.assert_allclose(got[name].expand(want.shape).numpy(), want, rtol=1e-12, atol=1e-12, err_msg=name)
    # default: only prunable groups decay, i.e. the same as gamma zeroed on the other units
    prunable = torch.cat([torch.full((g.size,), g.prunable) for g in structure.groups])
    ref0 = reference_coefficients(structure, torch.where(prunable, gamma, 0.0).numpy())
    for name, c in decay_coefficients(decay_plan(structure, bias=True), gamma).items():
        np.testing.assert_allclose(c.expand(ref0[name].shape).numpy(), ref0[name], rtol=1e-12, atol=1e-12)


@settings(max_examples=30, deadline=None)
@given(structures(), st.integers(0, 2**31 - 1))
def test_decay_gamma_matches_group_formula(structure, seed):
    from wtcore.testing import params_for

    params = params_for(structure, seed=seed)
    got = wtcore.compile(structure, [wtcore.Spec("decay_gamma", alpha=8.0)])(params)["decay_gamma"].numpy()
    norms = np.sqrt(reference_unit_values(structure, params)["sumsq"])
    for g in structure.groups:
        off = structure.offsets[g.name]
        s = norms[off: off + g.size]
        hi, lo = s.max(), s.min()
        for k, v in enumerate(s):
            want = 0.0 if not g.prunable else (8.0 ** ((hi - v) / (hi - lo)) if hi > lo else 1.0)
            assert math.isclose(got[off + k], want, rel_tol=1e-9, abs_tol=1e-12)


# ----------------------------------------------------------------------------------------- real model
@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(4, 3, 32, 32)
    return model, trace(model, x[:1]), x


def _backward(model: torch.nn.Module, x: torch.Tensor) -> None:
    model.zero_grad()
    F.cross_entropy(model(x), torch.arange(x.shape[0]) % 10).backward()


def test_depgraph_decay_equals_slow_loop_on_resnet18(resnet):
    model, structure, x = resnet
    _backward(model, x)
    want = slow_depgraph_decay(model, structure, reg=1e-2, alpha=16.0)
    ChannelDecay(model, structure, reg=1e-2, rule="depgraph", alpha=16.0).step()
    for n, p in model.named_parameters():
        np.testing.assert_allclose(p.grad.double().numpy(), want[n].numpy(), rtol=1e-5, atol=1e-7, err_msg=n)


@pytest.mark.slow
def test_depgraph_decay_equals_torch_pruning_regularize(resnet):
    """Parity with Torch-Pruning's sparse training: `GroupNormPruner.regularize(model, alpha=16, bias=False)`
    with a group importance that sums |w|^2 over every dependency (biases included), i.e. the unit L2 norm."""
    import torch_pruning as tp

    model, structure, x = resnet
    imp = tp.importance.GroupMagnitudeImportance(p=2, group_reduction="sum", normalizer=None, bias=True)
    pruner = tp.pruner.GroupNormPruner(model, x[:1], importance=imp, reg=1e-2, ignored_layers=[model.fc])
    _backward(model, x)
    pruner.regularize(model, alpha=16, bias=False)
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    _backward(model, x)
    ChannelDecay(model, structure, reg=1e-2, rule="depgraph", alpha=16.0).step()
    for n, p in model.named_parameters():  # gamma = 16 ** x amplifies float32 rounding of x: scale-relative atol
        torch.testing.assert_close(p.grad, want[n], rtol=1e-4, atol=1e-4 * float(want[n].abs().max()), msg=n)


def test_growing_rule_grows_for_weak_units_and_resumes(resnet):
    model, structure, x = resnet
    decay = ChannelDecay(model, structure, reg=1e-3, rule="growing", delta_reg=1e-3)
    c0 = decay.coefficients.clone()
    decay.update_reg()
    decay.update_reg()
    sumsq = per_module_sumsq(model, structure)
    g = next(g for g in structure.groups if g.prunable)
    off = structure.offsets[g.name]
    s = sumsq[off: off + g.size]
    want = 1e-3 + 2 * 1e-3 * (s.max() - s) / (s.max() - s.min() + 1e-8)
    np.testing.assert_allclose(decay.coefficients[off: off + g.size].numpy(), want, rtol=1e-5)
    assert float(c0[off: off + g.size].max()) == 1e-3
    # the decay adds exactly coefficient * w per element (a uniform-like check on one conv's out channels)
    _backward(model, x)
    before = model.conv1.weight.grad.clone()
    bn_before = model.bn1.weight.grad.clone()
    decay.step()
    ratio = decay.coefficients[off: off + g.size].to(torch.float32)
    assert g.slices[0].param == "conv1.weight"
    torch.testing.assert_close(model.conv1.weight.grad, before + ratio.view(-1, 1, 1, 1) * model.conv1.weight)
    torch.testing.assert_close(model.bn1.weight.grad, bn_before + ratio * model.bn1.weight)
    fresh = ChannelDecay(model, structure, reg=1e-3, rule="growing")
    fresh.load_state_dict(decay.state_dict())
    assert torch.equal(fresh.coefficients, decay.coefficients)


def test_tracker_channel_decay_and_errors(resnet):
    model, structure, x = resnet
    tracker = WeightTracker(model, x[:1], structure=structure)
    decay = tracker.create_channel_decay(reg=1e-2, rule="uniform", ignore=[model.fc])
    _backward(model, x)
    fc_before, w_before = model.fc.weight.grad.clone(), model.layer1[0].conv1.weight.grad.clone()
    decay.step()
    assert torch.equal(model.fc.weight.grad, fc_before)  # ignored: its in-channels are not decayed
    # uniform: conv in layer1 gets 1e-2 * w from its out-channel unit and 1e-2 * w from its in-channel unit
    torch.testing.assert_close(model.layer1[0].conv1.weight.grad, w_before + 2e-2 * model.layer1[0].conv1.weight)
    bias_before = model.bn1.bias.grad.clone()
    ChannelDecay(model, structure, reg=1e-2, rule="uniform", bias=True).step()
    torch.testing.assert_close(model.bn1.bias.grad, bias_before + 1e-2 * model.bn1.bias)
    with pytest.raises(wtcore.WtError, match="rule"):
        ChannelDecay(model, structure, rule="l1")
    with pytest.raises(wtcore.WtError, match="update_reg"):
        decay.update_reg()
    with pytest.raises(wtcore.WtError, match="another structure"):
        ChannelDecay(model, structure, rule="growing").load_state_dict({"rule": "growing", "fingerprint": "x"})
    small = torchvision.models.resnet18(num_classes=3)
    with pytest.raises(wtcore.WtError, match="trace it again"):
        ChannelDecay(small, structure)


# ----------------------------------------------------------------------------------------- DDP
RULE_STEPS = (("depgraph", 2), ("growing", 2))


def _train(model: torch.nn.Module, structure: wtcore.Structure, x: torch.Tensor, y: torch.Tensor,
           rule: str, steps: int) -> dict[str, torch.Tensor]:
    decay = ChannelDecay(model, structure, reg=5e-2, rule=rule, delta_reg=5e-2)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        decay.step()
        opt.step()
        if rule == "growing":
            decay.update_reg()
    inner = model.module if hasattr(model, "module") else model
    return {k: v.detach().clone() for k, v in inner.state_dict().items()}


def _ddp_worker(rank: int, world: int, port: int, folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        setup = torch.load(Path(folder) / "setup.pt", weights_only=False)
        structure = wtcore.Structure.from_json(setup["structure"])
        half = setup["x"].shape[0] // world
        part = slice(rank * half, (rank + 1) * half)
        out = {}
        for rule, steps in RULE_STEPS:
            model = torchvision.models.resnet18(num_classes=10)
            model.load_state_dict(setup["state"])
            ddp = torch.nn.parallel.DistributedDataParallel(model.eval())
            out[rule] = _train(ddp, structure, setup["x"][part], setup["y"][part], rule, steps)
        torch.save(out, Path(folder) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ddp_two_gloo_ranks_match_each_other_and_single_process(tmp_path, resnet):
    model, structure, _ = resnet
    torch.manual_seed(1)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    torch.save({"structure": structure.to_json(), "state": state, "x": x, "y": y}, tmp_path / "setup.pt")
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2))
    for rule, steps in RULE_STEPS:
        single = torchvision.models.resnet18(num_classes=10)
        single.load_state_dict(state)
        want = _train(single.eval(), structure, x, y, rule, steps)
        moved = 0
        for k, v in want.items():
            assert torch.equal(r0[rule][k], r1[rule][k]), f"{rule}: ranks differ at {k}"
            torch.testing.assert_close(r0[rule][k], v, rtol=1e-4, atol=1e-5, msg=f"{rule}: {k}")
            moved += int(not torch.equal(v, state[k]))
        assert moved > 0


def test_step_after_the_model_changed_shape_raises():
    from toys import Net, X

    model = Net()
    decay = ChannelDecay(model, trace(model, X), rule="uniform")
    model(X).sum().backward()
    decay.step()
    with torch.no_grad():
        model.pw.weight.data = model.pw.weight.data[:4].clone()
    with pytest.raises(wtcore.WtError, match="re-traced"):
        decay.step()
