"""wt's array-based group enumeration yields exactly Torch-Pruning's groups (items, order, index maps)."""

from __future__ import annotations

import pytest
import torch
import torch_pruning as tp
import torchvision
from torch import nn

from wtfront.tracing.groups import all_groups

ROOTS = (nn.Conv2d, nn.Linear, nn.MultiheadAttention, nn.LayerNorm, nn.Embedding)


class SplitConcat(nn.Module):
    """chunk / split / cat / flatten: every index mapping TP has for channels."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(4, 6, 1)
        self.c = nn.Conv2d(4, 6, 1)
        self.d = nn.Conv2d(12, 5, 1)
        self.head = nn.Linear(5 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.a(x)
        left, right = torch.chunk(x, 2, dim=1)
        y = torch.cat([self.b(left), self.c(right)], dim=1)
        y = self.d(torch.relu(y))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(y, 4), 1))


def _as_maps(groups: list) -> list[dict]:
    return [
        {(id(it.dep.target), it.dep.handler): {int(i): (None if r is None else int(r)) for i, r in
                                                 zip(it.idxs, it.root_idxs)} for it in g}
        for g in groups
    ]


def _keys(groups: list) -> list[list]:
    return [[(id(it.dep.target), it.dep.handler) for it in g] for g in groups]


@pytest.mark.parametrize(
    "make",
    [
        lambda: (SplitConcat(), torch.randn(1, 3, 8, 8)),
        lambda: (torchvision.models.resnet18(), torch.randn(1, 3, 64, 64)),
        lambda: (torchvision.models.densenet121(), torch.randn(1, 3, 64, 64)),
        lambda: (torchvision.models.mobilenet_v3_small(), torch.randn(1, 3, 64, 64)),
    ],
    ids=["split-concat-flatten", "resnet18", "densenet121", "mobilenet_v3_small"],
)
def test_same_groups_as_torch_pruning(make) -> None:
    model, x = make()
    dg = tp.DependencyGraph().build_dependency(model.eval(), example_inputs=x)
    ref = [g.items for g in dg.get_all_groups(root_module_types=ROOTS)]
    ours = list(all_groups(dg, [], ROOTS))
    assert _keys(ours) == _keys(ref)
    assert _as_maps(ours) == _as_maps(ref)


def test_ignored_layers_match_torch_pruning() -> None:
    model, x = torchvision.models.resnet18(), torch.randn(1, 3, 64, 64)
    dg = tp.DependencyGraph().build_dependency(model.eval(), example_inputs=x)
    ignored = [model.layer1[0].conv1, model.fc]
    ref = [g.items for g in dg.get_all_groups(ignored_layers=ignored, root_module_types=ROOTS)]
    ours = list(all_groups(dg, ignored, ROOTS))
    assert _keys(ours) == _keys(ref) and _as_maps(ours) == _as_maps(ref)
