"""The default pruning policy (`wtcore.policy`): normalized scores, a cap per group, a warning below the floor,
and `wt prune` with defaults giving usable models (counted independently with torch.utils.flop_counter)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision
from torch.utils.flop_counter import FlopCounterMode

import wtcore
from wtcore.policy import DEFAULT_MAX_FRACTION, NarrowGroupWarning, narrow_groups, normalize_scores
from wtcore.solver import solve
from wtfront import load_pruned, trace
from wtfront.cli import main


def flops(model: nn.Module, x: torch.Tensor) -> int:
    """torch's own count of the forward pass (2 FLOPs per multiply-add)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops()


class TwoScales(nn.Module):
    """Two hidden layers whose units differ 100x in scale: raw norms would prune the small one away."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.out = nn.Linear(4, 32), nn.Linear(32, 32), nn.Linear(32, 4)
        with torch.no_grad():  # every slice of a b.out unit is small: b's rows and bias, out's columns
            for p in (self.b.weight, self.b.bias, self.out.weight):
                p.mul_(0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.b(torch.relu(self.a(x)))))


def test_normalize_scores_divides_by_the_group_mean_of_counted_finite_units() -> None:
    s = np.array([1.0, 3.0, np.inf, 10.0, 30.0, 0.0, 0.0])
    gid = np.array([0, 0, 0, 1, 1, 2, 2])
    counted = np.array([True, True, True, True, False, True, True])
    got = normalize_scores(s, gid, counted, "mean")
    np.testing.assert_allclose(got, [0.5, 1.5, np.inf, 1.0, 3.0, 0.0, 0.0])  # group 2: mean 0, raw scores
    assert normalize_scores(s, gid, counted, None) is s


def test_default_policy_keeps_every_group_usable_where_raw_ranking_empties_one() -> None:
    torch.manual_seed(0)
    model = TwoScales().eval()
    s = trace(model, torch.randn(2, 4))
    params = {k: v.detach() for k, v in model.named_parameters()}
    with pytest.warns(NarrowGroupWarning, match="b.out"):  # raw L2: the small-scale layer goes first
        raw = solve(s, params, target=0.2, metric="params", normalize=None, max_fraction=1.0)
    assert ("b.out", 2, 32) in narrow_groups(s, raw.keep.numpy())
    with warnings.catch_warnings():
        warnings.simplefilter("error", NarrowGroupWarning)
        sol = solve(s, params, target=0.2, metric="params")  # defaults: mean-normalized, capped
    kept = {g.name: int(sol.keep[s.offsets[g.name]: s.offsets[g.name] + g.size].sum()) for g in s.groups}
    assert sol.ratio <= 0.2 and min(kept["a.out"], kept["b.out"]) >= round((1 - DEFAULT_MAX_FRACTION) * 32)
    assert min(kept["a.out"], kept["b.out"]) >= 8  # both lose part, neither is emptied
    # the mask specs rank the same way by default: the solver's global amount gives the same keep-mask
    spec = wtcore.Spec("importance", scores=wtcore.compile(s, ["unit_l2"])(params)["unit_l2"].double(),
                       amount=sol.selected, scope="global")
    torch.testing.assert_close(wtcore.compile(s, [spec])(params)["importance"], sol.keep)


def test_structured_mask_warns_when_applied_like_the_solver() -> None:
    """A structured mask is a program output; applying it gives the solver's `NarrowGroupWarning`."""
    from wtfront import apply_masks

    torch.manual_seed(0)
    model = TwoScales().eval()
    s = trace(model, torch.randn(2, 4))
    params = {k: v.detach() for k, v in model.named_parameters()}
    raw = wtcore.Spec("ln_structured", amount=0.5, scope="global", normalize=None, max_fraction=1.0)
    keep = wtcore.compile(s, [raw])(params)[raw.key]
    assert "b.out" in [g for g, _, _ in narrow_groups(s, keep.numpy())]  # raw L2 empties the small-scale layer
    with pytest.warns(NarrowGroupWarning, match="b.out"):
        apply_masks(TwoScales(), s, keep)
    with warnings.catch_warnings():
        warnings.simplefilter("error", NarrowGroupWarning)
        apply_masks(TwoScales(), s, keep, warn=False)
        default = wtcore.Spec("ln_structured", amount=0.5, scope="global")  # normalized, capped: no warning
        apply_masks(TwoScales(), s, wtcore.compile(s, [default])(params)[default.key])


def _prune_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str], *argv: str) -> wtcore.Structure:
    code = main(["prune", *argv, "--target-macs", "0.5", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "wt: warning" not in err
    return wtcore.Structure.from_json((tmp_path / "structure.json").read_text())


def _check_groups(saved: wtcore.Structure) -> None:
    for g in saved.groups:
        if g.prunable:
            assert g.size >= 0.1 * g.baseline_size, (g.name, g.size, g.baseline_size)


@pytest.mark.slow
def test_wt_prune_defaults_mobilenet_v3_large(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    x = torch.randn(1, 3, 64, 64)
    saved = _prune_cli(tmp_path, capsys, "torchvision:mobilenet_v3_large", "--input", "1,3,64,64")
    _check_groups(saved)
    dense = flops(torchvision.models.mobilenet_v3_large(weights=None).eval(), x)
    pruned = load_pruned(torchvision.models.mobilenet_v3_large(weights=None), tmp_path / "pruned.pt").eval()
    assert flops(pruned, x) <= 0.52 * dense


@pytest.mark.slow
def test_wt_prune_defaults_vit_tiny_removes_heads(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import timm

    x = torch.randn(1, 3, 64, 64)
    saved = _prune_cli(tmp_path, capsys, "timm:vit_tiny_patch16_224", "--config", "img_size=64", "--input",
                       "1,3,64,64")
    _check_groups(saved)
    heads = [g for g in saved.groups if g.kind == "head"]
    assert heads and sum(g.size for g in heads) < sum(g.baseline_size for g in heads)  # heads compete with MLPs
    dense = flops(timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64).eval(), x)
    fresh = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64)
    pruned = load_pruned(fresh, tmp_path / "pruned.pt").eval()
    assert flops(pruned, x) <= 0.52 * dense
