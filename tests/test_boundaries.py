"""Modules Torch-Pruning mis-maps become boundaries: traced with defaults (no `ignore=`), their axes static, the
groups they touch not prunable with the reason, everything else prunable; the coverage line and the warning
list what is outside every group. End to end on BEiT, MLP-Mixer, GPT-NeoX, Hugging Face Swin/ConvNeXt and a
small torchvision Swin (whose walks diverge):
MACs against `torch.utils.flop_counter` (attention matmuls aside) and fake -> physical pruning."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

import wtcore
from wtcore.ir import NO_GROUP_REASON, coverage
from wtfront import apply_masks, load_model, lossy_groups, prune_units, trace
from wtfront.cli.commands import main
from wtfront.tracing.entry import OutsideGroups
from wtfront.tracing.lowering import Lowering
from wtfront.tracing.slicers import RawSlice, UnloweredModule


def beit() -> tuple[nn.Module, Any]:
    import timm

    model = timm.create_model("beit_base_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=2)
    return model, torch.randn(1, 3, 32, 32)


def mixer() -> tuple[nn.Module, Any]:
    from timm.models.mlp_mixer import MlpMixer

    return MlpMixer(img_size=32, patch_size=8, num_blocks=2, embed_dim=64), torch.randn(1, 3, 32, 32)


def torchvision_swin() -> tuple[nn.Module, Any]:
    from torchvision.models.swin_transformer import SwinTransformer

    model = SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=[2, 2],
                            num_classes=10)
    return model, torch.randn(1, 3, 32, 32)


def hf(name: str) -> Callable[[], tuple[nn.Module, Any]]:
    def build() -> tuple[nn.Module, Any]:
        ref = load_model(f"hf:{name}")
        return ref.model, ref.example_inputs

    return build


# model, the boundaries expected (None: not checked)
CASES = {
    "beit": (beit, {f"blocks.{i}.attn.relative_position_bias_table" for i in (0, 1)}),
    "mixer": (mixer, set()),
    "gpt_neox": (hf("GPTNeoXForCausalLM"), set()),
    "hf_swin": (hf("SwinModel"), None),
    "hf_convnext": (hf("ConvNextModel"), set()),
    "torchvision_swin": (torchvision_swin, {"features.1.0.attn.relative_position_bias_table"}),
}


def run_model(model: nn.Module, x: Any) -> torch.Tensor:
    with torch.no_grad():
        y = model(**x) if isinstance(x, dict) else model(x)
    if isinstance(y, torch.Tensor):
        return y
    return y[0] if isinstance(y, tuple) else next(v for v in y.values() if isinstance(v, torch.Tensor))


def non_attention_reference(model: nn.Module, x: Any) -> int:
    """MACs by PyTorch's dispatcher-level counter, without fused attention (which it does not count on CPU)."""
    with FlopCounterMode(display=False) as counter:
        run_model(model.eval(), x)
    counts = counter.get_flop_counts()["Global"]
    return sum(v for k, v in counts.items() if "scaled_dot_product" not in str(k)) // 2


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_mis_mapped_modules_become_boundaries_end_to_end(case: str) -> None:
    torch.manual_seed(0)
    build, expected = CASES[case]
    model, x = build()
    model.eval()
    s = trace(model, x)
    bounds = dict(s.boundaries)
    if expected is not None:
        assert set(bounds) == expected
    assert all("Torch-Pruning mis-maps it" in r for r in bounds.values())
    # a boundary's parameters are in no group, listed with its reason; the groups it touched are not prunable
    cov = coverage(s)
    for p, why in cov.outside:
        owner = next((b for b in bounds if p == b or p.startswith(f"{b}.")), None)
        assert why == (bounds[owner] if owner else NO_GROUP_REASON)
    tp_groups = [g for g in s.groups if g.kind in ("channel", "feature")]  # wt's head groups may claim them
    for b in bounds:
        assert not any(sl.param == b or sl.param.startswith(f"{b}.") for g in tp_groups for sl in g.slices)
    assert any(g.prunable for g in s.groups)
    assert str(s).splitlines()[-2 if s.uncoupled else -1].startswith("Coverage: ")

    # MACs: every op but fused attention as PyTorch's counter counts it
    attn = sum(o.macs for o in s.ops if o.kind in ("attn_qk", "attn_av"))
    assert sum(o.macs for o in s.ops) - attn == non_attention_reference(model, x)

    # 30% of every prunable group whose removal equals zeroing: fake -> physical equal, parameters lost
    lossy = lossy_groups(model, s, x)
    keep = torch.ones(s.num_units, dtype=torch.bool)
    for g in s.groups:
        if g.prunable and g.name not in lossy and g.size > 1:  # a group's last unit is never removed
            keep[s.offsets[g.name]: s.offsets[g.name] + max(1, int(0.3 * g.size))] = False
    assert not keep.all()
    before = sum(p.numel() for p in model.parameters())
    apply_masks(model, s, keep)
    fake = run_model(model, x)
    prune_units(model, s, x, keep)
    physical = run_model(model, x)
    assert sum(p.numel() for p in model.parameters()) < before
    assert physical.shape == fake.shape
    np.testing.assert_allclose(physical.numpy(), fake.numpy(), rtol=1e-5, atol=1e-5 * float(fake.abs().max()) + 1e-7)


def test_unwrapped_parameter_boundary_keeps_its_modules_prunable() -> None:
    """BEiT's relative-position table is the boundary, not its attention: the heads and MLPs stay prunable,
    and the residual width Torch-Pruning coupled the table to is not prunable but keeps every block's norms
    (nothing of it is dropped). The table's columns are per head: they join the attention's head group, so no
    parameter is outside every group."""
    model, x = beit()
    with warnings.catch_warnings():
        warnings.simplefilter("error", OutsideGroups)
        s = trace(model, x, costs=False)
    assert [g.name for g in s.groups if g.prunable] == [f"blocks.{i}.{g}" for i in (0, 1)
                                                        for g in ("attn.heads", "mlp.fc1.out")]
    assert "blocks.0.attn.relative_position_bias_table" in dict(s.boundaries)
    assert "blocks.0.attn.relative_position_bias_table" in s.group_map["blocks.0.attn.heads"].params
    residual = s.group_map["patch_embed.proj.out"]
    assert "'blocks.0.attn.relative_position_bias_table'" in residual.reason
    assert {f"blocks.{i}.norm{j}.weight" for i in (0, 1) for j in (1, 2)} <= {sl.param for sl in residual.slices}
    assert wtcore.Structure.from_json(s.to_json()) == s  # boundaries survive the JSON round trip


def test_clash_names_the_parameter_and_becomes_a_boundary_of_its_module() -> None:
    lin = nn.Linear(4, 3)
    accs: dict = {}
    first = RawSlice(lin, "weight", lin.weight, 0, 3, np.arange(3), np.arange(3))
    Lowering.merge(accs, "fc.weight", first, "stem")
    clash = RawSlice(lin, "weight", lin.weight, 0, 3, np.arange(3), np.array([1, 0, 2]))
    with pytest.raises(UnloweredModule, match=r"entry 0 of 'fc.weight' axis 0 is coupled to two different units"):
        Lowering.merge(accs, "fc.weight", clash, "stem")


def test_hf_vision_encoders_build_and_run() -> None:
    for name in ("SwinModel", "ConvNextModel"):
        ref = load_model(f"hf:{name}")
        assert run_model(ref.model, ref.example_inputs).shape[0] == 1


def test_inspect_prints_the_coverage_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", "hf:SwinModel", "--rows", "2"]) == 0
    out = capsys.readouterr().out
    assert "Coverage: " in out and "0 in no group (0 params)" in out  # its bias tables are in its head groups
    assert main(["inspect", "hf:SwinModel", "--rows", "2", "--ignore", "embeddings.norm"]) == 0
    out = capsys.readouterr().out
    assert "outside every group: 'embeddings.patch_embeddings.projection.weight'" in out
    assert "Torch-Pruning couples none of its axes" in out


def test_coverage_counts_by_hand() -> None:
    """Linear(3, 8) -> ReLU -> Linear(8, 2): the hidden features are prunable (0.weight, 0.bias, 2.weight's
    columns), the logits not (2.weight's rows, 2.bias)."""
    net = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2))
    cov = coverage(trace(net, torch.randn(2, 3), costs=False))
    assert cov.elements == (3 * 8 + 8 + 8 * 2, 2, 0)
    assert cov.params == (3, 1, 0)
    assert cov.axes == (3, 2)
    assert cov.not_prunable == (("2.out", "feeds the model output"),) and cov.outside == ()
    assert cov.line().startswith("Coverage: 96.0% of elements in prunable groups (48 elements, 3 params, 3 axes)")
