"""Numbers that never go stale: a WeightTracker, its regularizers and a Controller after physical pruning report
the pruned model (counted independently) or raise StaleProgramError, never the old numbers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import wtcore
from wtfront import Controller, ControllerConfig, WeightTracker, prune_units

X = torch.randn(1, 3, 16, 16)


class Block(nn.Module):
    def __init__(self, c: int, hidden: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, hidden, 3, padding=1, bias=False), nn.BatchNorm2d(hidden)
        self.conv2, self.bn2 = nn.Conv2d(hidden, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class ResNetLike(nn.Module):
    """Two residual stages: enough coupling (residual adds, BatchNorm) to exercise re-tracing, small enough to
    trace in a fraction of a second."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.layer1, self.layer2 = Block(16, 32), Block(16, 48)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.layer2(self.layer1(self.stem(x))).mean((2, 3)))


def _resnet() -> nn.Module:
    torch.manual_seed(0)
    return ResNetLike().eval()


def _group_lasso_reference(model: nn.Module) -> float:
    """Group lasso by hand: per unit, the L2 norm over every slice coupled to it (conv1 rows, bn1 entries,
    conv2 input columns for a hidden channel; the residual width couples stem, conv2 rows, bn2 and fc columns)."""
    def norms(*slices: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(sum(s.pow(2).flatten(1).sum(1) for s in slices))

    m = model
    total = 0.0
    for b in (m.layer1, m.layer2):
        total += float(norms(b.conv1.weight, b.bn1.weight[:, None], b.bn1.bias[:, None],
                             b.conv2.weight.transpose(0, 1)).sum())
    width = [m.stem.weight, m.stem.bias[:, None], m.fc.weight.t()]
    for b in (m.layer1, m.layer2):
        width += [b.conv1.weight.transpose(0, 1), b.conv2.weight, b.bn2.weight[:, None], b.bn2.bias[:, None]]
    return total + float(norms(*width).sum())


def test_tracker_and_regularizer_follow_physical_pruning() -> None:
    model = _resnet()
    tr = WeightTracker(model, X)
    tr.create_tracker(["active_params", "active_macs"])
    gl = tr.create_regularizer("group_lasso", weighted=False)  # the plain sum of unit norms
    dense = tr.track()
    assert dense["active_params/total"] == sum(p.numel() for p in model.parameters())
    prune_units(model, tr.structure, X, {"layer1.conv1.out": list(range(8)), "layer2.conv1.out": list(range(40))})
    after = tr.track()
    n = sum(p.numel() for p in model.parameters())
    assert n < dense["active_params/total"]
    assert after["active_params/total"] == n and after["active_params/baseline"] == dense["active_params/total"]
    assert after["active_params/ratio"] == pytest.approx(n / dense["active_params/total"])
    assert set(after) == set(dense)  # the same keys
    assert tr.structure.group_map["layer2.conv1.out"].size == 8
    loss = gl()
    with torch.no_grad():
        assert float(loss) == pytest.approx(_group_lasso_reference(model), rel=1e-5)
    loss.backward()  # the gradient reaches the pruned model's parameters
    assert model.layer2.conv1.weight.grad is not None and model.layer2.conv1.weight.grad.shape[0] == 8


def test_refresh_follows_and_a_failed_retrace_raises_stale() -> None:
    model = _resnet()
    tr = WeightTracker(model, X)
    tr.create_tracker("active_params")
    prune_units(model, tr.structure, X, {"layer2.conv1.out": [0, 1, 2]})
    tr.refresh()
    assert tr.structure.group_map["layer2.conv1.out"].size == 45
    tr.example_inputs = torch.randn(1, 5, 16, 16)  # no longer a valid input: the re-trace after pruning fails
    prune_units(model, tr.structure, X, {"layer2.conv1.out": [0]})
    with pytest.raises(wtcore.StaleProgramError, match="build a new WeightTracker"):
        tr.track()


def test_controller_prune_rebinds_what_it_follows_and_refuses_an_outside_prune() -> None:
    model = _resnet()
    tr = WeightTracker(model, X)
    tr.create_tracker("active_macs")
    ctrl = Controller(ControllerConfig.make(0.6, start=0, end=0)).bind(model, tr.structure).follow(tr)
    assert ctrl.step(0).physical_prune_due
    new = ctrl.prune(X)
    assert tr.structure is new and tr.track()["active_macs/ratio"] <= 0.6
    other = _resnet()
    c2 = Controller(ControllerConfig.make(0.5, start=0, end=2)).bind(other, WeightTracker(other, X).structure)
    prune_units(other, c2.structure, X, {"layer1.conv1.out": [0]})
    with pytest.raises(wtcore.StaleProgramError, match=r"outside Controller\.prune"):
        c2.step(0)
