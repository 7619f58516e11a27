"""Ops classified by ATen identity in the cost model: bilinear upsampling costs nothing (it is not a linear
layer), segmentation models count exactly what `torch.utils.flop_counter` counts, multiply-add ops without a
handle are errors and unknown ops reading a weight are reported by name."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torch.utils.flop_counter import FlopCounterMode

from wtcore.errors import TraceError
from wtfront.costs.aten import MAC_OPS, WEIGHT_READERS, is_pointwise
from wtfront.costs.macs import count_ops
from wtfront.tracing.entry import trace


def reference_macs(model: nn.Module, x: torch.Tensor) -> int:
    """MACs by PyTorch's dispatcher-level counter (2 FLOPs per multiply-add; it counts convs, matmuls and
    attention only, as fvcore's convention does)."""
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.eval()(x)
    return counter.get_total_flops() // 2


class Upsampler(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.b(F.relu(self.a(x)))
        return F.interpolate(y, scale_factor=2, mode="bilinear", align_corners=False)


class Cdist(nn.Module):
    """Reads its weight through `aten::cdist`, an op the cost model has no handle for."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(6, 4)
        self.centers = nn.Parameter(torch.randn(5, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cdist(self.proj(x), self.centers)


class Bilinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bi = nn.Bilinear(4, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bi(x, x)


def test_identity_tables_are_disjoint_and_by_tag():
    assert not MAC_OPS & WEIGHT_READERS
    assert "aten::upsample_bilinear2d" not in MAC_OPS and "aten::bilinear" in MAC_OPS
    assert is_pointwise("aten::add") and is_pointwise("aten::gelu") and not is_pointwise("aten::upsample_bilinear2d")


def test_bilinear_upsampling_is_not_a_linear_layer():
    model, x = Upsampler(), torch.randn(1, 3, 16, 16)
    s = trace(model, x)
    assert {o.name for o in s.ops} == {"a", "b"}
    assert sum(o.macs for o in s.ops) == reference_macs(model, x)


@pytest.mark.slow
@pytest.mark.parametrize(
    "build, size",
    [
        (
            lambda: torchvision.models.segmentation.lraspp_mobilenet_v3_large(
                weights=None, weights_backbone=None, num_classes=3
            ),
            64,
        ),
        (lambda: torchvision.models.segmentation.fcn_resnet50(weights=None, weights_backbone=None, num_classes=3), 32),
    ],
    ids=["lraspp_mobilenet_v3_large", "fcn_resnet50"],
)
def test_segmentation_models_count_what_flop_counter_counts(build, size):
    model, x = build(), torch.randn(1, 3, size, size)
    s = trace(model, x)
    assert sum(o.macs for o in s.ops) == reference_macs(model, x)


def test_unknown_op_reading_a_weight_is_reported_by_name():
    model, x = Cdist(), torch.randn(2, 6)
    with pytest.warns(UserWarning, match=r"does not count.*aten::cdist \(reads 'centers'\)"):
        records = count_ops(model, x)
    assert [r.kind for r in records] == ["linear"]


def test_multiply_add_op_without_a_handle_is_an_error():
    with pytest.raises(TraceError, match=r"runs \['aten::bilinear'\], whose MACs wt cannot count"):
        count_ops(Bilinear(), torch.randn(2, 4))
