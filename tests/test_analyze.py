"""`wtfront.cli.analyze` and `wt analyze`: metrics of many checkpoints with one vmapped program, CSV/JSON, plots.

Checkpoints are made from real models (torchvision ResNet-18, a timm ViT) by zeroing a growing fraction of
every prunable group's units (`apply_masks`), plus a physically pruned copy saved with `save_pruned`. The
metrics are checked against the same program evaluated checkpoint by checkpoint without vmap, against the
masks they were made with, and the physically pruned copy against its fake-pruned twin.
"""

from __future__ import annotations

import copy
import csv
import json
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import torch
import torchvision

import wtcore
from wtfront import AnalysisError, analyze, apply_masks, prune_zero_units, save_pruned, trace
from wtfront.cli import main
from wtfront.cli.analyze import (
    METRICS,
    find_checkpoints,
    histogram_edges,
    metric_specs,
    plot_trends,
    plot_unit_norms,
    read_checkpoint,
    write_csv,
    write_json,
)

X = torch.randn(1, 3, 64, 64)
FRACTIONS = {"epoch_1": 0.0, "epoch_2": 0.1, "epoch_5": 0.3, "epoch_10": 0.5}


def keep_mask(structure: wtcore.Structure, fraction: float, seed: int) -> torch.Tensor:
    """Remove `fraction` of the units of every prunable group (random units, at least one kept)."""
    g_ = torch.Generator().manual_seed(seed)
    parts = []
    for g in structure.groups:
        keep = torch.ones(g.size, dtype=torch.bool)
        if g.prunable:
            n = min(int(fraction * g.size), g.size - 1)
            keep[torch.randperm(g.size, generator=g_)[:n]] = False
        parts.append(keep)
    return torch.cat(parts)


def make_checkpoints(model: torch.nn.Module, structure: wtcore.Structure, folder: Path) -> dict[str, torch.Tensor]:
    """One state_dict per entry of FRACTIONS (weights also drift a little per epoch); returns the keep-masks."""
    folder.mkdir()
    keeps = {}
    for i, (name, frac) in enumerate(FRACTIONS.items()):
        m = copy.deepcopy(model)
        with torch.no_grad():
            for p in m.parameters():
                p.mul_(1.0 + 0.05 * i)
        keeps[name] = keep_mask(structure, frac, seed=i)
        if frac:
            apply_masks(m, structure, keeps[name])
        torch.save(m.state_dict(), folder / f"{name}.pt")
    return keeps


def direct(structure: wtcore.Structure, model: torch.nn.Module, path: Path) -> dict[str, torch.Tensor]:
    """The reference: the same specs, one checkpoint at a time, no vmap, on a model that loaded it."""
    m = copy.deepcopy(model)
    m.load_state_dict(torch.load(path, weights_only=True))
    with torch.no_grad():
        return wtcore.compile(structure, metric_specs())(dict(m.named_parameters()))


@pytest.fixture(scope="module")
def resnet(tmp_path_factory: pytest.TempPathFactory):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    structure = trace(model, X)
    root = tmp_path_factory.mktemp("analyze")
    keeps = make_checkpoints(model, structure, root / "ckpts")
    # the last epoch, physically pruned and saved with save_pruned: same metrics as its fake-pruned twin
    pruned = copy.deepcopy(model)
    pruned.load_state_dict(torch.load(root / "ckpts" / "epoch_10.pt", weights_only=True))
    prune_zero_units(pruned, structure, X)
    save_pruned(pruned, root / "ckpts" / "final_pruned.pt")
    analysis = analyze(structure, [root / "ckpts"], chunk=3, build=lambda: torchvision.models.resnet18(weights=None),
                       example_inputs=X, model_keys=set(model.state_dict()))
    return model, structure, root, keeps, analysis


@pytest.fixture(scope="module")
def refs(resnet) -> dict[str, dict[str, torch.Tensor]]:
    model, structure, _, _, analysis = resnet
    return {c.name: direct(structure, model, Path(c.path)) for c in analysis.checkpoints[:4]}


def test_checkpoints_in_natural_order(resnet) -> None:
    _, _, root, _, analysis = resnet
    names = [c.name for c in analysis.checkpoints]
    assert names == ["epoch_1", "epoch_2", "epoch_5", "epoch_10", "final_pruned"]
    assert [p.stem for p in find_checkpoints([root / "ckpts"])] == names


def test_metrics_match_direct_evaluation(resnet, refs) -> None:
    _, structure, _, keeps, analysis = resnet
    prunable = torch.cat([torch.full((g.size,), g.prunable) for g in structure.groups])
    for c in analysis.checkpoints[:4]:
        ref = refs[c.name]
        assert c.scalars["group_lasso"] == pytest.approx(float(ref["group_lasso"]), rel=1e-5)
        assert c.scalars["macs"] == float(ref["active_macs/total"])
        assert c.scalars["macs_ratio"] == pytest.approx(float(ref["active_macs/ratio"]), rel=1e-12)
        assert c.scalars["bops"] == float(ref["structured_bops/total"])
        assert c.scalars["sparsity"] == pytest.approx(float(ref["unstructured_sparsity/total"]), rel=1e-12)
        assert c.scalars["params"] == float(ref["active_params/total"])
        torch.testing.assert_close(c.unit_l2, ref["unit_l2"][prunable].double(), rtol=1e-5, atol=1e-6)
        # against the masks the checkpoints were made with
        keep = keeps[c.name]
        assert c.scalars["active_units"] == int(keep[prunable].sum())
        assert c.scalars["units"] == int(prunable.sum())
        assert c.scalars["units_below_threshold"] == int((~keep[prunable]).sum())
        assert c.active_units == {g.name: int(k.sum()) for g, k in zip(structure.groups,
                                                                       keep.split([g.size for g in structure.groups]))}
    ratios = [c.scalars["macs_ratio"] for c in analysis.checkpoints[:4]]
    assert ratios[0] == 1.0 and ratios == sorted(ratios, reverse=True) and ratios[-1] < 0.5


def test_pruned_checkpoint_equals_its_fake_pruned_twin(resnet) -> None:
    *_, analysis = resnet
    fake, physical = analysis.checkpoints[3].scalars, analysis.checkpoints[4].scalars
    for key in ("macs", "macs_ratio", "bops", "params", "params_ratio", "active_units", "units",
                "units_below_threshold"):
        assert physical[key] == pytest.approx(fake[key], rel=1e-12), key
    # the surviving units have the same norms (group lasso itself differs: it weights each unit by the square
    # root of its parameter count, which shrinks with the neighbours' removed units)
    kept = analysis.checkpoints[3].unit_l2
    torch.testing.assert_close(analysis.checkpoints[4].unit_l2.sort().values, kept[kept > 0].sort().values,
                               rtol=1e-5, atol=1e-6)


def test_chunk_size_does_not_change_results(resnet) -> None:
    _, structure, root, _, analysis = resnet
    files = [root / "ckpts" / f"{n}.pt" for n in ("epoch_10", "epoch_2")]
    one = analyze(structure, files, chunk=1)
    assert [c.name for c in one.checkpoints] == ["epoch_10", "epoch_2"]
    by_name = {c.name: c for c in analysis.checkpoints}
    for c in one.checkpoints:
        for key in METRICS:
            assert c.scalars[key] == pytest.approx(by_name[c.name].scalars[key], rel=1e-6), key


def test_csv_json_and_plots(resnet, refs, tmp_path: Path) -> None:
    _, structure, _, _, analysis = resnet
    write_csv(analysis, tmp_path / "m.csv")
    write_json(analysis, tmp_path / "m.json")
    rows = list(csv.DictReader(open(tmp_path / "m.csv")))
    doc = json.loads((tmp_path / "m.json").read_text())
    assert [r["checkpoint"] for r in rows] == [c.name for c in analysis.checkpoints]
    for r, j, c in zip(rows, doc["checkpoints"], analysis.checkpoints):
        for key in METRICS:
            assert float(r[key]) == c.scalars[key] == j[key]
        assert j["active_units_per_group"] == c.active_units

    trends = plot_trends(analysis, tmp_path / "trends.png")
    for key in ("macs_ratio", "bops_ratio", "params_ratio", "sparsity"):
        assert trends.y[key] == pytest.approx([float(r[key]) for r in rows])
    units = [float(r["units"]) for r in rows]
    assert trends.y["units_below_threshold"] == pytest.approx(
        [float(r["units_below_threshold"]) / u for r, u in zip(rows, units)])

    hist = plot_unit_norms(analysis, tmp_path / "norms.png", bins=30)
    edges = histogram_edges(analysis, 30).numpy()
    prunable = torch.cat([torch.full((g.size,), g.prunable) for g in structure.groups])
    for c in analysis.checkpoints[:4]:  # the drawn bars are the direct program's unit norms, binned by numpy
        l2 = refs[c.name]["unit_l2"][prunable].double().numpy()
        want, _ = np.histogram(np.clip(l2[l2 > 0], edges[0], edges[-1] * (1 - 1e-12)), bins=edges)
        assert hist.y[c.name] == [int((l2 == 0).sum()), *want.tolist()]  # the zero bar first
        assert hist.y[c.name][0] == c.scalars["units"] - c.scalars["active_units"]
        assert hist.x[c.name][1:] == pytest.approx(edges[:-1].tolist())
        assert hist.x[c.name][0] < edges[0]
        assert sum(hist.y[c.name]) == int(prunable.sum())
    for png in (tmp_path / "trends.png", tmp_path / "norms.png"):
        img = matplotlib.image.imread(png)
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
        assert img.shape[0] > 200 and img.shape[1] > 400 and img[..., :3].std() > 0.05
        assert len(np.unique(img[..., :3].reshape(-1, 3), axis=0)) > 20  # drawn content, not a blank canvas


def test_other_checkpoint_formats(resnet, tmp_path: Path) -> None:
    """Whole pickled models (only when trusted), training dicts, DDP prefixes and safetensors give the metrics of
    the state_dict they hold."""
    from safetensors.torch import save_file

    model, structure, root, _, analysis = resnet
    m = copy.deepcopy(model)
    m.load_state_dict(torch.load(root / "ckpts" / "epoch_5.pt", weights_only=True))
    torch.save(m, tmp_path / "whole.pt")
    torch.save({"epoch": 5, "state_dict": m.state_dict()}, tmp_path / "training.ckpt")
    torch.save({f"module.{k}": v for k, v in m.state_dict().items()}, tmp_path / "ddp.pt")
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, tmp_path / "w.safetensors")
    with pytest.raises(AnalysisError, match="--trust-pickle"):
        analyze(structure, [tmp_path / "whole.pt"])
    files = [tmp_path / n for n in ("whole.pt", "training.ckpt", "ddp.pt", "w.safetensors")]
    got = analyze(structure, files, trust_pickle=True, model_keys=set(model.state_dict()))
    assert len(got.checkpoints) == 4
    want = analysis.checkpoints[2].scalars
    for c in got.checkpoints:
        assert c.scalars == pytest.approx(want, rel=1e-6)


def test_wrong_architecture_and_missing_files(resnet, tmp_path: Path) -> None:
    structure = resnet[1]
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), tmp_path / "r34.pt")
    with pytest.raises(AnalysisError, match=r"does not fit ResNet: it has \d+ entries the model does not have"):
        analyze(structure, [tmp_path / "r34.pt"], model_keys=set(torchvision.models.resnet18().state_dict()))
    torch.save({"fc.weight": torch.zeros(3, 3)}, tmp_path / "other.pt")
    with pytest.raises(AnalysisError, match=r"has no parameter 'conv1\.weight'"):
        analyze(structure, [tmp_path / "other.pt"])
    with pytest.raises(AnalysisError, match="does not exist"):
        analyze(structure, [tmp_path / "nope.pt"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(AnalysisError, match="has no checkpoint files"):
        analyze(structure, [tmp_path / "empty"])
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    with pytest.raises(AnalysisError, match="cannot read checkpoint"):
        read_checkpoint(tmp_path / "junk.pt")


def test_cli_analyze_cnn(resnet, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    *_, root, _, analysis = resnet
    out = tmp_path / "report"
    assert main(["analyze", "torchvision:resnet18", "--input", "1,3,64,64", str(root / "ckpts"), "--out", str(out),
                 "--chunk", "2"]) == 0
    printed = capsys.readouterr().out
    assert "final_pruned" in printed and "metrics.csv" in printed
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    for r, c in zip(rows, analysis.checkpoints, strict=True):
        assert r["checkpoint"] == c.name
        for key in METRICS:
            assert float(r[key]) == pytest.approx(c.scalars[key], rel=1e-6), key
    for png in ("unit_norms.png", "trends.png"):
        assert (out / png).stat().st_size > 10_000


@pytest.mark.slow
def test_cli_analyze_vit(tmp_path: Path) -> None:
    import timm

    cfg = {"img_size": 32, "depth": 2}
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **cfg).eval()
    x = torch.randn(1, 3, 32, 32)
    structure = trace(model, x)
    folder = tmp_path / "vit"
    folder.mkdir()
    keeps = []
    for i, frac in enumerate((0.0, 0.25, 0.5)):
        m = copy.deepcopy(model)
        keeps.append(keep_mask(structure, frac, seed=i))
        if frac:
            apply_masks(m, structure, keeps[-1])
        torch.save({"model": m.state_dict(), "epoch": i}, folder / f"ep{i}.pth")
    out = tmp_path / "out"
    assert main(["analyze", "timm:vit_tiny_patch16_224", "--config", "img_size=32", "depth=2", "--input", "1,3,32,32",
                 str(folder), "--out", str(out)]) == 0
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["structure_fingerprint"] == structure.fingerprint
    prunable = torch.cat([torch.full((g.size,), g.prunable) for g in structure.groups])
    program = wtcore.compile(structure, metric_specs())
    for row, keep, i in zip(doc["checkpoints"], keeps, range(3), strict=True):
        sd = torch.load(folder / f"ep{i}.pth", weights_only=True)["model"]
        with torch.no_grad():
            ref = program(sd)
        assert row["macs"] == float(ref["active_macs/total"])
        assert row["group_lasso"] == pytest.approx(float(ref["group_lasso"]), rel=1e-5)
        assert row["active_units"] == int(keep[prunable].sum())
    assert doc["checkpoints"][2]["macs_ratio"] < doc["checkpoints"][1]["macs_ratio"] < 1.0
    assert (out / "unit_norms.png").stat().st_size > 10_000
