"""`wt analyze` on the outputs of real training runs: a Lightning run with group lasso (its `.ckpt` files, the
network under the LightningModule's `net.` prefix) whose collapsed units it must find with default flags, and a
Hugging Face `Trainer` output folder (`checkpoint-N/model.safetensors` next to optimizer, scheduler and RNG
files). The collapse is checked against the run itself: the units it reports collapsed are the ones whose
weights group lasso drove two decades below the rest, and the MACs left are those of the model with exactly
those units physically removed (counted by torch.utils.flop_counter)."""

from __future__ import annotations

import copy
import csv
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import wtcore
from wtfront import analyze, prune_units, trace
from wtfront.cli import main
from wtfront.cli.analyze import find_checkpoints
from wtfront.cli.collapse import collapsed_keep

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "digits_pruning.py"


def _example():
    spec = importlib.util.spec_from_file_location("digits_pruning", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny CNN: threads only contend
    yield
    torch.set_num_threads(n)


def flops(model: nn.Module, x: torch.Tensor) -> int:
    model.eval()
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model(x)
    return fc.get_total_flops()


@pytest.mark.slow
def test_lightning_group_lasso_run_collapse_found_with_default_flags(tmp_path: Path, one_thread,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    L = pytest.importorskip("lightning")
    from lightning.pytorch.callbacks import ModelCheckpoint

    from wtfront.integrations.lightning import WtLightningCallback

    ex = _example()
    xtr, ytr, _, _ = ex.load_digits_split(0)

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = ex.DigitsCNN()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], idx: int) -> torch.Tensor:
            return nn.functional.cross_entropy(self(batch[0]), batch[1])

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.Adam(self.parameters(), lr=1e-2)

    torch.manual_seed(0)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xtr, ytr), batch_size=64, shuffle=True)
    module = Module()
    # group lasso only: a target of the whole model prunes nothing
    cb = WtLightningCallback(example_inputs=xtr[:2], target_macs=1.0, group_lasso=1e-3, prune_at="never")
    ckpt = ModelCheckpoint(dirpath=tmp_path / "run" / "checkpoints", save_top_k=-1, every_n_epochs=1)
    trainer = L.Trainer(max_epochs=10, callbacks=[cb, ckpt], logger=False, accelerator="cpu",
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, loader)

    model = ex.DigitsCNN().eval()
    structure = trace(model, xtr[:2])
    files = find_checkpoints([tmp_path / "run"])
    assert [f.suffix for f in files] == [".ckpt"] * 10
    analysis = analyze(structure, [tmp_path / "run"])
    assert [(c.epoch, c.step) for c in analysis.checkpoints] == [(e, 23 * (e + 1)) for e in range(10)]
    gap = analysis.gap
    assert gap is not None and gap.separation >= 1.0
    last = analysis.checkpoints[-1]
    collapsed = int(last.scalars["collapsed_units"])
    assert 20 <= collapsed < last.scalars["units"] - 20
    assert analysis.checkpoints[0].scalars["collapsed_units"] == 0  # the dense start has not collapsed
    counts = analysis.column("collapsed_units")
    assert counts[-1] >= counts[len(counts) // 2] > 0
    # the collapsed units are far below the rest, and pruning exactly them leaves the reported MACs
    norms = last.normalized
    below, above = norms[norms <= gap.threshold], norms[norms > gap.threshold]
    assert float(below.max()) * 3 < float(above.min()) or float(below.log10().mean()) + 1 < float(above.log10().mean())
    prunable = torch.cat([torch.full((g.size,), g.prunable) for g in structure.groups])
    keep = collapsed_keep(structure, prunable, norms, gap.threshold)
    pruned = copy.deepcopy(module.net).eval()
    prune_units(pruned, structure, xtr[:2], keep, verify=False)
    x1 = xtr[:1]
    assert flops(pruned, x1) / flops(model, x1) == pytest.approx(last.scalars["macs_ratio_pruned"], rel=0.02)

    out = tmp_path / "report"
    assert main(["analyze", "examples.digits_pruning:DigitsCNN", "--input", "2,1,8,8", str(tmp_path / "run"),
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "suggested threshold" in printed and "ready to prune" in printed
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == list(range(10))
    assert float(rows[-1]["collapsed_units"]) == collapsed
    for png in ("unit_norms.png", "trends.png", "unit_norms_heatmap.png"):
        assert (out / png).stat().st_size > 10_000


@pytest.mark.slow
def test_hf_trainer_folder(tmp_path: Path, one_thread, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("transformers")
    from safetensors.torch import load_file
    from transformers import Trainer, TrainingArguments

    ex = _example()
    xtr, ytr, _, _ = ex.load_digits_split(0)
    xtr, ytr = xtr[:256], ytr[:256]

    class HFModel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = ex.DigitsCNN()

        def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
            logits = self.net(pixel_values)
            return {"logits": logits, "loss": nn.functional.cross_entropy(logits, labels)}

    torch.manual_seed(0)
    args = TrainingArguments(output_dir=str(tmp_path / "hf"), num_train_epochs=3, per_device_train_batch_size=64,
                             save_strategy="epoch", report_to=[], use_cpu=True, disable_tqdm=True)
    Trainer(model=HFModel(), args=args, train_dataset=[{"pixel_values": x, "labels": y}
                                                       for x, y in zip(xtr, ytr)]).train()
    folders = sorted(p.name for p in (tmp_path / "hf").iterdir() if p.is_dir())
    assert folders == ["checkpoint-12", "checkpoint-4", "checkpoint-8"]
    assert (tmp_path / "hf" / "checkpoint-4" / "optimizer.pt").is_file()
    (tmp_path / "hf" / "broken.pt").write_text("not a checkpoint")  # skipped with a warning
    structure = trace(ex.DigitsCNN().eval(), xtr[:2])
    with pytest.warns(UserWarning, match=r"skipping .*broken\.pt"):
        analysis = analyze(structure, [tmp_path / "hf"])
    assert [(c.name, c.step, c.epoch) for c in analysis.checkpoints] == [
        ("checkpoint-4", 4, 1), ("checkpoint-8", 8, 2), ("checkpoint-12", 12, 3)]
    assert analysis.skipped == (str(tmp_path / "hf" / "broken.pt"),)
    # the row is the weights of that folder: the same program on a model that loaded them
    sd = load_file(str(tmp_path / "hf" / "checkpoint-12" / "model.safetensors"))
    net = ex.DigitsCNN()
    net.load_state_dict({k.removeprefix("net."): v for k, v in sd.items()})
    with torch.no_grad():
        want = wtcore.compile(structure, ["group_lasso"])(dict(net.named_parameters()))["group_lasso"]
    assert analysis.checkpoints[-1].scalars["group_lasso"] == pytest.approx(float(want), rel=1e-5)
    out = tmp_path / "report"
    assert main(["analyze", "examples.digits_pruning:DigitsCNN", "--input", "2,1,8,8", str(tmp_path / "hf"),
                 "--out", str(out), "--no-plots"]) == 0
    doc = json.loads((out / "metrics.json").read_text())
    assert [c["step"] for c in doc["checkpoints"]] == [4, 8, 12]
    assert doc["skipped"] == [str(tmp_path / "hf" / "broken.pt")]
