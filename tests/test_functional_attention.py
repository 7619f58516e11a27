"""Attention whose fused qkv weight is read functionally (torchvision Swin's `shifted_window_attention`, timm
BEiT's `F.linear(x, self.qkv.weight, qkv_bias)`): the heads are discovered as units of the IR (q/k/v rows,
the output projection's columns, BEiT's q/v biases and the per-head relative-position table columns). Swin's
are not prunable (its forward derives the head size from the input width), BEiT's are (wt replaces its forward
once heads are removed): fake == physical, saved and loaded. The qkv input columns join the residual width
they read, which is not prunable, whatever units are selected. End to end in tests/test_zoo.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from wtcore.ir import runs_to_list
from wtfront import apply_masks, load_pruned, prune_units, save_pruned, trace
from wtfront.tracing.inputs import called_modules


def beit() -> tuple[nn.Module, torch.Tensor]:
    import timm

    model = timm.create_model("beit_base_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=4)
    return model.eval(), torch.randn(1, 3, 32, 32)


def swin() -> tuple[nn.Module, torch.Tensor]:
    from torchvision.models.swin_transformer import SwinTransformer

    model = SwinTransformer(
        patch_size=[4, 4], embed_dim=16, depths=[1, 1], num_heads=[2, 4], window_size=[2, 2], num_classes=10
    )
    return model.eval(), torch.randn(1, 3, 32, 32)


def _slices(s, gname: str) -> dict[tuple[str, int], list[int]]:
    return {(sl.param, sl.axis): runs_to_list(sl.index) for sl in s.group_map[gname].slices}


def _head_of_rows(width: int, heads: int) -> list[int]:
    """qkv rows [q; k; v], each `width` rows of `heads` consecutive heads (the reshape to [.., 3, heads, -1])."""
    return [(r % width) // (width // heads) for r in range(3 * width)]


@pytest.mark.parametrize(
    ("build", "attn", "norm"),
    [(beit, "blocks.1.attn", "blocks.1.norm1"), (swin, "features.3.0.attn", "features.3.0.norm1")],
    ids=["beit", "swin"],
)
def test_heads_and_residual_width_of_functional_qkv(build, attn: str, norm: str) -> None:
    torch.manual_seed(0)
    model, x = build()
    m = model.get_submodule(attn)
    width, heads = m.proj.in_features, m.num_heads
    s = trace(model, x, costs=False)

    head = s.group_map[f"{attn}.heads"]
    assert head.size == heads and head.prunable  # wt replaces both forwards once heads are removed
    got = _slices(s, head.name)
    assert got[(f"{attn}.qkv.weight", 0)] == _head_of_rows(width, heads)
    assert got[(f"{attn}.proj.weight", 1)] == [c // (width // heads) for c in range(width)]
    assert got[(f"{attn}.relative_position_bias_table", 1)] == list(range(heads))
    if hasattr(m, "q_bias"):  # BEiT: the q and v biases, concatenated with a zero k bias by the forward
        for b in ("q_bias", "v_bias"):
            assert got[(f"{attn}.{b}", 0)] == [c // (width // heads) for c in range(width)]
    else:
        assert got[(f"{attn}.qkv.bias", 0)] == _head_of_rows(width, heads)

    # the qkv input columns are the width norm1 writes, channel for channel; so are the proj output rows
    where = {(sl.param, sl.axis): (g, runs_to_list(sl.index)) for g in s.groups for sl in g.slices}
    residual, channels = where[(f"{norm}.weight", 0)]
    assert where[(f"{attn}.qkv.weight", 1)] == (residual, channels)
    assert where[(f"{attn}.proj.weight", 0)] == (residual, channels)
    assert not residual.prunable and "reads its qkv weight outside the qkv module" in residual.reason
    assert f"{attn}.qkv.weight" not in s.uncoupled


@pytest.mark.parametrize("build", [beit, swin], ids=["beit", "swin"])
def test_functional_qkv_widths_stay_unprunable_with_hidden_units(build) -> None:
    """Selecting every unit kind does not make a width Torch-Pruning cannot cut prunable."""
    model, x = build()
    s = trace(model, x, costs=False, units=("head", "mlp_feature", "hidden"))
    qkv = {f"{n}.weight" for n, mod in model.named_modules() if n.endswith("attn.qkv")}
    for g in s.groups:
        if any(sl.param in qkv and sl.axis == 1 for sl in g.slices):
            assert not g.prunable, g.name
    assert [g.name for g in s.groups if g.prunable]  # the MLP features stay prunable


class _Functional(nn.Module):
    """A fused-qkv attention without a recorded head size that reads its qkv and proj weights functionally, or
    (`called=True`) calls its modules, so Torch-Pruning sees them."""

    def __init__(self, dim: int = 16, num_heads: int = 2, called: bool = False) -> None:
        super().__init__()
        self.num_heads, self.called = num_heads, called
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x) if self.called else F.linear(x, self.qkv.weight, self.qkv.bias)
        q, k, v = qkv.reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        y = (torch.softmax(q @ k.transpose(-2, -1), dim=-1) @ v).transpose(1, 2).reshape(b, n, c)
        return self.proj(y) if self.called else F.linear(y, self.proj.weight, self.proj.bias)


def test_called_qkv_is_left_to_torch_pruning() -> None:
    """The functional layout is kept only where the trace shows the qkv weight is not read through its module."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), _Functional(called=True), nn.Linear(16, 4)).eval()
    s = trace(model, torch.randn(1, 5, 8), costs=False)
    assert "1.heads" not in s.group_map
    assert not any("reads its qkv weight outside" in g.reason for g in s.groups)
    assert {("1.qkv.weight", 0), ("1.qkv.weight", 1)} <= {(sl.param, sl.axis) for g in s.groups for sl in g.slices}
    assert all(g.kind != "head" for g in s.groups)


def _rel_bias_beit() -> tuple[nn.Module, torch.Tensor]:
    import timm

    model = timm.create_model("beit_base_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=4)
    with torch.no_grad():  # O(1) biases and tables, so every head's units show in the output
        for n, p in model.named_parameters():
            if p.dim() == 1 or "relative_position" in n:
                p.normal_()
    return model.eval(), torch.randn(2, 3, 32, 32)


@pytest.mark.parametrize("fused", [True, False], ids=["sdpa", "explicit"])
def test_beit_heads_prune_physically_like_zeroing(fused: bool, tmp_path) -> None:
    torch.manual_seed(0)
    model, x = _rel_bias_beit()
    for b in model.blocks:
        b.attn.fused_attn = fused
    s = trace(model, x, costs=False)
    keep = torch.ones(s.num_units, dtype=torch.bool)
    for gname, drop in (("blocks.0.attn.heads", [1]), ("blocks.1.attn.heads", [0, 3])):
        keep[[s.offsets[gname] + u for u in drop]] = False
    apply_masks(model, s, keep)
    with torch.no_grad():
        fake = model(x)
    prune_units(model, s, x, keep)
    with torch.no_grad():
        physical = model(x)
    a0, a1 = model.blocks[0].attn, model.blocks[1].attn
    assert (a0.num_heads, a1.num_heads) == (3, 2)
    assert a1.qkv.weight.shape == (3 * 2 * 16, 64) and a1.proj.weight.shape == (64, 32)
    assert a1.q_bias.shape == a1.k_bias.shape == a1.v_bias.shape == (32,)
    assert a1.relative_position_bias_table.shape[1] == 2
    torch.testing.assert_close(physical, fake, rtol=1e-5, atol=1e-5 * float(fake.abs().max()))

    save_pruned(model, tmp_path / "beit.pt")
    torch.manual_seed(0)
    fresh = load_pruned(_rel_bias_beit()[0], tmp_path / "beit.pt")
    for b in fresh.blocks:
        b.attn.fused_attn = fused
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), physical, rtol=1e-5, atol=1e-5 * float(fake.abs().max()))


def test_beit_heads_with_a_shared_relative_position_bias_are_not_prunable() -> None:
    """One bias table for all blocks (`use_shared_rel_pos_bias`) ties every block's heads: not prunable."""
    import timm

    model = timm.create_model(
        "beit_base_patch16_224",
        img_size=32,
        patch_size=8,
        depth=2,
        embed_dim=64,
        num_heads=4,
        use_rel_pos_bias=False,
        use_shared_rel_pos_bias=True,
    ).eval()
    s = trace(model, torch.randn(1, 3, 32, 32), costs=False)
    for i in (0, 1):
        g = s.group_map[f"blocks.{i}.attn.heads"]
        assert not g.prunable and "takes tensors besides its input" in g.reason


def test_timm_swin_calls_its_qkv_so_torch_pruning_keeps_it() -> None:
    """timm's WindowAttention has the same modules (qkv, proj, num_heads, no head_dim) but calls its qkv: the
    functional layout is not used, even where Torch-Pruning's walk leaves the qkv weight in no group."""
    timm = pytest.importorskip("timm")
    model = timm.create_model(
        "swin_tiny_patch4_window7_224",
        img_size=32,
        window_size=2,
        embed_dim=16,
        depths=(1, 1),
        num_heads=(1, 2),
        patch_size=4,
    ).eval()
    s = trace(model, torch.randn(1, 3, 32, 32), costs=False)
    assert not any("reads its qkv weight outside" in g.reason for g in s.groups)


def test_called_modules_tells_a_weight_read_functionally() -> None:
    model, x = beit()
    assert called_modules(model, (x,), {"blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.0.mlp.fc1"}) == {
        "blocks.0.attn.proj",
        "blocks.0.mlp.fc1",
    }




def test_width_behind_parameter_free_ops_is_not_prunable() -> None:
    """The attention reads `2 * embed(x)` and its output feeds `out` through a GELU: no module produces its
    input directly, so its qkv columns get a group of their own, and the groups of the embedding's rows and of
    `out`'s columns, which Torch-Pruning would cut without them, are not prunable."""
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed, self.attn, self.out = nn.Linear(8, 16), _Functional(), nn.Linear(16, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(F.gelu(self.attn(2 * self.embed(x))))

    model, x = Net().eval(), torch.randn(1, 5, 8)
    s = trace(model, x, costs=False)
    where = {(sl.param, sl.axis): g for g in s.groups for sl in g.slices}
    assert where[("attn.qkv.weight", 1)].name == "attn.width" and not where[("attn.qkv.weight", 1)].prunable
    embed = where[("embed.weight", 0)]
    assert not embed.prunable and "reads its qkv weight outside" in embed.reason
    assert not where[("out.weight", 1)].prunable
    assert not s.group_map["attn.heads"].prunable


def _swin() -> nn.Module:
    from torchvision.models.swin_transformer import SwinTransformer

    model = SwinTransformer(
        patch_size=[4, 4], embed_dim=16, depths=[2, 1], num_heads=[2, 4], window_size=[3, 3], num_classes=10
    )
    with torch.no_grad():  # O(1) biases and tables, so every head's units show in the output
        for n, p in model.named_parameters():
            if p.dim() == 1 or "relative_position" in n:
                p.normal_()
    return model.eval()


def test_swin_heads_prune_physically_like_zeroing(tmp_path) -> None:
    """Shifted and unshifted windows with padding (40x36 input, window 3): heads removed from three blocks."""
    torch.manual_seed(0)
    model, x = _swin(), torch.randn(2, 3, 40, 36)
    s = trace(model, x, costs=False)
    keep = torch.ones(s.num_units, dtype=torch.bool)
    for gname, drop in (
        ("features.1.0.attn.heads", [0]),
        ("features.1.1.attn.heads", [1]),
        ("features.3.0.attn.heads", [0, 2]),
    ):
        keep[[s.offsets[gname] + u for u in drop]] = False
    apply_masks(model, s, keep)
    with torch.no_grad():
        fake = model(x)
    prune_units(model, s, x, keep)
    with torch.no_grad():
        physical = model(x)
    a = model.get_submodule("features.3.0.attn")
    assert a.num_heads == 2 and a.qkv.weight.shape == (3 * 2 * 8, 32) and a.proj.weight.shape == (32, 16)
    assert a.relative_position_bias_table.shape[1] == 2
    torch.testing.assert_close(physical, fake, rtol=1e-5, atol=1e-5 * float(fake.abs().max()))

    save_pruned(model, tmp_path / "swin.pt")
    fresh = load_pruned(_swin(), tmp_path / "swin.pt")
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), physical, rtol=1e-5, atol=1e-5 * float(fake.abs().max()))
