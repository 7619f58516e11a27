"""Logging helpers: `track(constants=False)` drops exactly the keys that cannot change (checked by changing every
parameter and seeing which keys move), and `unit_norm_histograms` gives the per-unit norms computed by hand."""

from __future__ import annotations

import copy

import pytest
import torch
from toys import Net, X

from wtcore.errors import WtError
from wtfront import WeightTracker, apply_masks
from wtfront.train.tracker import unit_norm_histograms

KINDS = ["active_macs", "structured_bops", "unstructured_sparsity", "group_pruning_summary", "unit_l2_histogram"]


def test_constant_keys_left_out_after_the_first_call() -> None:
    torch.manual_seed(0)
    model = Net().eval()
    tracker = WeightTracker(model, X)
    tracker.create_tracker(KINDS)
    first = tracker.track(constants=False)
    assert first == tracker.track()  # the first call has every key
    second = tracker.track(constants=False)
    dropped = set(first) - set(second)
    # independent check: zero half the units and scale the weights; the keys that stay put are the constants
    keep = torch.rand(tracker.structure.num_units) > 0.5
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
    apply_masks(model, tracker.structure, keep)
    after = tracker.track()
    assert dropped and all(after[k] == first[k] for k in dropped)
    moved = {k for k in first if after[k] != first[k]}
    assert not (moved & dropped)
    assert {"active_macs/baseline", "structured_bops/baseline"} <= dropped
    assert "active_macs/ratio" in second and "active_macs/ratio" in moved
    tracker.create_tracker("active_params")  # new trackers: the constants are sent once more
    assert "active_params/baseline" in tracker.track(constants=False)
    assert "active_params/baseline" not in tracker.track(constants=False)


def test_unit_norm_histograms_match_masked_out_mass() -> None:
    """A unit's squared norm is the squared mass its mask zeroes (with its coupled slices), computed by masking."""
    torch.manual_seed(0)
    model = Net().eval()
    tracker = WeightTracker(model, X)
    structure = tracker.structure
    h = unit_norm_histograms(model, structure)
    total = sum(float(p.detach().double().pow(2).sum()) for p in model.parameters())
    offset = 0
    for g in structure.groups:
        if g.name == "stem.out":
            break
        offset += g.size
    for u in range(structure.group_map["stem.out"].size):
        m = copy.deepcopy(model)
        keep = torch.ones(structure.num_units, dtype=torch.bool)
        keep[offset + u] = False
        apply_masks(m, structure, keep)
        left = sum(float(p.detach().double().pow(2).sum()) for p in m.parameters())
        assert float(h["unit_norms/stem.out"][u]) ** 2 == pytest.approx(total - left, rel=1e-6)
    n = sum(g.size for g in structure.groups if g.prunable)
    assert h["unit_norms/all"].shape == (n,)
    normalized = unit_norm_histograms(model, structure, normalized=True, groups=["stem.*"])
    assert set(normalized) == {"unit_norms/all", "unit_norms/stem.out"}
    assert torch.all(normalized["unit_norms/stem.out"] < h["unit_norms/stem.out"])
    with pytest.raises(WtError, match="no prunable unit group"):
        unit_norm_histograms(model, structure, groups=["nothing*"])
