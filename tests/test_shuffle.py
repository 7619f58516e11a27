"""Channel shuffles (ShuffleNetV2): the permutation in the group walk, and units balanced over the chunks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from wtfront import prune_units, trace
from wtfront.tracing.balance import SHUFFLE_REASON, balanced_units

tv = pytest.importorskip("torchvision")


def stage(blocks: int, width: int = 16) -> nn.Module:
    """One ShuffleNetV2 stage (a stride-2 block, then `blocks - 1` blocks that chunk their input) and a head."""
    ir = tv.models.shufflenetv2.InvertedResidual
    layers = [
        nn.Conv2d(3, 8, 3, padding=1),
        ir(8, width, 2),
        *[ir(width, width, 1) for _ in range(blocks - 1)],
        nn.Conv2d(width, 4, 1),
    ]
    return nn.Sequential(*layers)


def randomized(model: nn.Module) -> nn.Module:
    """BN statistics and affines away from the identity, so that every channel shows in the output."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_()
                m.bias.normal_()
    return model.eval()


class Shuffle(nn.Module):
    """`g` convs concatenated, shuffled in `g` groups (`permute` instead of `transpose`), then a conv."""

    def __init__(self, g: int) -> None:
        super().__init__()
        self.branches = nn.ModuleList(nn.Conv2d(3, 3, 1) for _ in range(g))
        self.head = nn.Conv2d(3 * g, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([b(x) for b in self.branches], 1)
        n, c, h, w = y.shape
        g = len(self.branches)
        return self.head(y.reshape(n, g, c // g, h, w).permute(0, 2, 1, 3, 4).reshape(n, c, h, w))


@pytest.mark.parametrize("g", [3, 4])
def test_shuffle_of_g_groups_couples_one_channel_of_each_branch(g: int) -> None:
    """Output channel `k * g + i` is channel k of branch i: unit k is channel k of every branch and the head's
    input columns k * g ... k * g + g - 1; removing it physically is the fake-pruned function."""
    torch.manual_seed(0)
    model = Shuffle(g).eval()
    x = torch.randn(2, 3, 4, 4)
    s = trace(model, x)
    unit = s.group_map["branches.0.out"]
    assert unit.prunable and unit.size == 3 and [gr.name for gr in s.groups] == ["branches.0.out", "head.out"]
    ids = {sl.param: sl.unit_ids().tolist() for sl in unit.slices}
    assert all(ids[f"branches.{i}.weight"] == [0, 1, 2] for i in range(g))
    assert ids["head.weight"] == [k for k in range(3) for _ in range(g)]
    prune_units(model, s, x, {"branches.0.out": [1]}, rtol=1e-5)
    assert [b.out_channels for b in model.branches] == [2] * g and model.head.in_channels == 2 * g


def test_stage_units_are_balanced_and_each_prunes_to_the_fake_pruned_function() -> None:
    """A stage of 3 blocks, 8 channels per branch: the chunks of blocks 2 and 3 must lose as many channels from x1
    as from x2, and removal through a shuffle must take channel k of both halves, so a unit of the trunk is
    4 positions of the first block's concat (one in each of its first two quarters, two in its second half; see
    docs/design-notes.md): 2 units.
    Removing one, physically, computes what zeroing it computes (`prune_units` verifies it)."""
    torch.manual_seed(0)
    model = randomized(stage(3))
    x = torch.randn(2, 3, 8, 8)
    s = trace(model, x)
    trunk = s.group_map["1.branch1.2.out"]
    assert trunk.prunable and trunk.size == 2
    first = {sl.param: sl.unit_ids() for sl in trunk.slices}
    assert sorted(np.bincount(first["1.branch1.2.weight"]).tolist()) == [4, 4]
    assert all(g.prunable for g in s.groups if g.name != "4.out")
    new = prune_units(model, s, x, {trunk.name: [1]}, rtol=1e-5)
    assert new.group_map[trunk.name].size == 1
    assert model[1].branch1[2].out_channels == model[1].branch2[5].out_channels == 4
    assert model[2].branch2[0].in_channels == model[3].branch2[0].in_channels == 4
    assert model[4].in_channels == 8


def test_deep_stage_is_not_prunable_with_the_reason() -> None:
    """With 5 blocks, a balanced unit needs 2**4 positions of the first concat's 8: no removal keeps every chunk
    even, so the trunk is one group that is not prunable, and every other group is."""
    s = trace(randomized(stage(5)), torch.randn(1, 3, 8, 8))
    trunk = s.group_map["1.branch1.2.out"]
    assert not trunk.prunable and trunk.reason == SHUFFLE_REASON and trunk.size == 1
    assert all(g.prunable for g in s.groups if g.name not in {trunk.name, "6.out"})
    assert not s.uncoupled


@st.composite
def balanced_vectors(draw: st.DrawFn) -> np.ndarray:
    """Integer vectors (atoms x coordinates) whose columns sum to zero, as the atoms of a traced model's group."""
    n = draw(st.integers(1, 24))
    k = draw(st.integers(0, 4))
    vec = np.array(
        draw(st.lists(st.lists(st.integers(-4, 4), min_size=k, max_size=k), min_size=n, max_size=n)), dtype=np.int64
    ).reshape(n, k)
    if k:
        vec[-1] -= vec.sum(0)
    return vec


@settings(max_examples=200, deadline=None)
@given(balanced_vectors())
def test_balanced_units_partition_the_atoms_into_zero_sum_units(vec: np.ndarray) -> None:
    unit = balanced_units(vec)
    assert unit.shape == (vec.shape[0],) and unit.min() == 0
    assert set(unit.tolist()) == set(range(int(unit.max()) + 1))  # numbered densely
    for u in range(int(unit.max()) + 1):
        assert not vec[unit == u].sum(0).any()
    if not vec.any():
        assert unit.tolist() == list(range(vec.shape[0]))  # nothing to balance: one unit per atom


@pytest.mark.slow
def test_shufflenet_trunk_units_prune_physically_twice() -> None:
    """torchvision's ShuffleNetV2 x0.5 at 32x32: a unit of each prunable trunk (stages 2 and 4) removed physically
    computes the fake-pruned function within 1e-5, the re-traced structure has one unit fewer in each, and pruning
    the pruned model again works the same way; stage 3's trunk is the group that is not prunable."""
    torch.manual_seed(0)
    model = randomized(tv.models.shufflenet_v2_x0_5())
    x = torch.randn(2, 3, 32, 32)
    s = trace(model, x)
    trunks = {g.name: g.size for g in s.groups if ".0.branch1.2." in f"{g.name}."}
    assert trunks == {"stage2.0.branch1.2.out": 3, "stage3.0.branch1.2.out": 1, "stage4.0.branch1.2.out": 12}
    assert s.group_map["stage3.0.branch1.2.out"].reason == SHUFFLE_REASON
    assert [g.name for g in s.groups if not g.prunable] == ["stage3.0.branch1.2.out", "fc.out"]
    for _ in range(2):
        s = prune_units(model, s, x, {"stage2.0.branch1.2.out": [0], "stage4.0.branch1.2.out": [1, 4]}, rtol=1e-5)
    assert s.group_map["stage2.0.branch1.2.out"].size == 1 and s.group_map["stage4.0.branch1.2.out"].size == 8
    assert model.stage2[0].branch1[2].out_channels == 8 and model.stage4[0].branch1[2].out_channels == 64
    assert model.stage3[0].branch1[0].in_channels == 16 and model.conv5[0].in_channels == 128
