"""Active MACs, BOPs and parameters predict what physical pruning gives: zero units of groups that pruning keeps
(not prunable, e.g. a zero-initialized classifier; the last unit of a group) still count."""

from __future__ import annotations

import pytest
import torch
import torchvision

import wtcore
from wtfront import apply_masks, prune_zero_units, trace

SPECS = ["active_macs", "active_params", "structured_bops"]


def _predicted_equals_realized(model: torch.nn.Module, x: torch.Tensor, amount: float) -> wtcore.Structure:
    structure = trace(model, x)
    if amount:
        mask = wtcore.compile(structure, wtcore.Spec("random_structured", amount=amount, scope="local"))
        apply_masks(model, structure, mask(dict(model.named_parameters()))["random_structured"])
    with torch.no_grad():
        out = wtcore.compile(structure, SPECS)(dict(model.named_parameters()))
    new = prune_zero_units(model, structure, x)
    assert float(out["active_macs/total"]) == sum(o.macs for o in new.ops)
    assert float(out["structured_bops/total"]) == 1024 * sum(o.macs for o in new.ops)
    assert float(out["active_params/total"]) == sum(p.numel() for p in model.parameters())
    return structure


def test_zero_initialized_classifier_is_not_counted_as_removed() -> None:
    """torchvision's ViT zero-initializes its head: the logits group is not prunable, so its zero units stay."""
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(32, 16, num_layers=1, num_heads=2, hidden_dim=32, mlp_dim=64).eval()
    assert not model.heads.head.weight.any()
    s = _predicted_equals_realized(model, torch.randn(1, 3, 32, 32), 0.0)
    assert not s.group_map["heads.head.out"].prunable


@pytest.mark.slow
@pytest.mark.parametrize(("name", "amount"), [("vit_b_16", 0.0), ("resnet18", 0.4),
                                              ("mobilenet_v3_small", 0.3)])
def test_zoo_predicted_equals_realized(name: str, amount: float) -> None:
    torch.manual_seed(0)
    kw = {"image_size": 32} if name.startswith("vit") else {}
    model = torchvision.models.get_model(name, weights=None, **kw).eval()
    _predicted_equals_realized(model, torch.randn(1, 3, 32, 32), amount)
