"""Couplings Torch-Pruning's walk gets wrong or leaves out, on small modules shaped like the zoo's: a channel reached
by two root channels (GhostNet), chunk splits (EdgeNeXt), a separate q and fused kv attention (PVT-v2), and a
layer reading a parameter-free, input-free tensor (EdgeNeXt's positional encoding)."""

from __future__ import annotations

import torch
from torch import nn

import wtcore
from wtcore.masking import keep_from_removed
from wtfront import apply_masks, prune_units, trace
from wtfront.tracing.constant import CONSTANT_INPUT_REASON
from wtfront.tracing.splits import SPLIT_REASON


class Ghost(nn.Module):
    """timm's GhostModule: `cat([primary(x), cheap(primary(x))])[:, :out]`, the cheap conv depthwise."""

    def __init__(self, cin: int, out: int) -> None:
        super().__init__()
        self.out = out
        init = (out + 1) // 2
        self.primary = nn.Sequential(nn.Conv2d(cin, init, 1, bias=False), nn.BatchNorm2d(init), nn.ReLU())
        self.cheap = nn.Sequential(
            nn.Conv2d(init, init, 3, padding=1, groups=init, bias=False), nn.BatchNorm2d(init), nn.ReLU()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.primary(x)
        return torch.cat([x1, self.cheap(x1)], dim=1)[:, : self.out]


class GhostNet(nn.Module):
    def __init__(self, out: int) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.ghost = Ghost(8, out)
        self.head = nn.Conv2d(out, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.ghost(self.stem(x)))


def _randomize_norms(model: nn.Module) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.normal_()
                m.bias.normal_()
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)


def test_ghost_primary_and_cheap_channel_are_one_unit_and_prune_to_the_same_function() -> None:
    torch.manual_seed(0)
    model, x = GhostNet(12).eval(), torch.randn(1, 3, 8, 8)
    _randomize_norms(model)
    s = trace(model, x)
    g = s.group_map["ghost.primary.0.out"]
    assert g.prunable and g.size == 6
    head_in = next(sl for sl in g.slices if sl.param == "head.weight")
    # primary channel i is concat channel i, the cheap conv's channel i (depthwise, from primary i) channel 6 + i
    assert head_in.axis == 1 and head_in.index_list() == [*range(6), *range(6)]
    keep = keep_from_removed(s, {g.name: [1, 5]})
    apply_masks(model, s, keep)
    with torch.no_grad():
        y_fake = model(x)
    prune_units(model, s, x, keep)
    with torch.no_grad():
        y_phys = model(x)
    assert (model.ghost.primary[0].out_channels, model.head.in_channels) == (4, 8)
    torch.testing.assert_close(y_phys, y_fake, rtol=1e-5, atol=1e-5)


def test_ghost_slice_that_drops_the_tail_leaves_the_group_whole() -> None:
    """With an odd width the slice drops the last cheap channel; its end is fixed in code, so removing units would
    make it keep a channel it dropped before."""
    s = trace(GhostNet(11).eval(), torch.randn(1, 3, 8, 8))
    g = s.group_map["ghost.primary.0.out"]
    assert g.size == 6 and not g.prunable and SPLIT_REASON in g.reason


class SplitConv(nn.Module):
    """EdgeNeXt's split convs: `chunk` the channels, a depthwise conv on the first part, `cat` them back."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.down = nn.Conv2d(3, c, 2, stride=2)
        self.conv = nn.Conv2d(c // 2, c // 2, 3, padding=1, groups=c // 2)
        self.head = nn.Conv2d(c, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.down(x)
        a, b = x.chunk(2, dim=1)
        return self.head(x + torch.cat([self.conv(a), b], 1))


def test_chunk_parts_follow_the_forward_and_their_group_is_not_prunable() -> None:
    torch.manual_seed(0)
    s = trace(SplitConv(8), torch.randn(1, 3, 8, 8))
    g = s.group_map["down.out"]
    assert g.size == 8 and not g.prunable and SPLIT_REASON in g.reason
    index = {(sl.param, sl.axis): sl.index_list() for sl in g.slices}
    assert index["conv.weight", 0] == [0, 1, 2, 3]  # the first part is channels 0-3 of the width
    assert index["head.weight", 1] == list(range(8))
    assert not s.uncoupled


class PVTAttention(nn.Module):
    """Spatial-reduction attention (timm's PVT-v2): a `q` Linear, a fused `kv` Linear after an `sr` conv and norm,
    and a forward that reshapes the heads' output to the input width."""

    def __init__(self, dim: int = 16, num_heads: int = 2) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.sr = nn.Conv2d(dim, dim, 2, stride=2)
        self.norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        b, n, c = x.shape
        q = self.q(x).reshape(b, n, self.num_heads, -1).permute(0, 2, 1, 3)
        r = self.norm(self.sr(x.permute(0, 2, 1).reshape(b, c, *hw)).reshape(b, c, -1).permute(0, 2, 1))
        k, v = self.kv(r).reshape(b, -1, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        y = nn.functional.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(b, n, c))


class PVTBlock(nn.Module):
    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, dim, 2, stride=2)
        self.attn = PVTAttention(dim)
        self.fc1, self.fc2 = nn.Linear(dim, 32), nn.Linear(32, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        hw = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)
        x = x + self.attn(x, hw)
        return x + self.fc2(torch.relu(self.fc1(x)))


def test_separate_q_and_fused_kv_attention_has_head_units_that_stay_whole() -> None:
    torch.manual_seed(0)
    model, x = PVTBlock(), torch.randn(1, 3, 8, 8)
    s = trace(model, x, units=("head", "mlp_feature", "hidden"))
    heads = s.group_map["attn.heads"]
    assert heads.kind == "head" and heads.size == 2 and not heads.prunable and "reshapes" in heads.reason
    index = {(sl.param, sl.axis): sl.index_list() for sl in heads.slices}
    assert index["attn.kv.weight", 0] == [0] * 8 + [1] * 8 + [0] * 8 + [1] * 8  # k rows, then v rows
    assert index["attn.proj.weight", 1] == [0] * 8 + [1] * 8
    hidden = next(g for g in s.groups if g.kind == "hidden")
    assert not hidden.prunable and "input width" in hidden.reason  # even with units=(..., "hidden")
    assert s.group_map["fc1.out"].prunable and s.group_map["attn.sr.out"].prunable
    wtcore.compile(s, ["group_lasso"])(dict(model.named_parameters()))


class PositionalProjection(nn.Module):
    """EdgeNeXt's `PositionalEncodingFourier`: a 1x1 conv over an encoding computed from the feature map's size."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1)
        self.proj = nn.Conv2d(6, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        h, w = x.shape[-2:]
        grid = torch.arange(h * w, dtype=x.dtype).reshape(1, 1, h, w) / (h * w)
        pos = torch.cat([torch.sin(grid * k) for k in range(1, 7)], 1)
        return x + self.proj(pos)


def test_a_layer_reading_a_parameter_free_tensor_has_its_input_channels_in_a_group() -> None:
    s = trace(PositionalProjection(), torch.randn(1, 3, 4, 4))
    g = s.group_map["proj.in"]
    assert g.size == 6 and not g.prunable and g.reason == CONSTANT_INPUT_REASON
    assert [(sl.param, sl.axis) for sl in g.slices] == [("proj.weight", 1)]
    assert "stem.in" not in s.group_map  # the RGB input: no unit axis, as before
