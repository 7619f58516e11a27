"""The trainer integrations: real `lightning.Trainer.fit` and `transformers.Trainer.train` runs on CPU take a small
CNN to <= 0.62 of its MACs at target_macs=0.6 (counted independently with torch.utils.flop_counter on the
physically pruned model) and log the MACs metric through the trainer's own logger; the trainer-agnostic core
re-points the optimizer with its state cut to the kept elements."""

from __future__ import annotations

import csv
import glob
import os
from collections.abc import Callable, Iterator

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from wtcore.errors import WtError
from wtcore.masking import keep_from_removed, param_masks
from wtfront import view_zero_units
from wtfront.train.pruner import TrainingPruner, remap_optimizer


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.c2, self.b2 = nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.b1(self.c1(x)))
        x = torch.relu(self.b2(self.c2(x)))
        return self.fc(x.mean((2, 3)))


def lightning_cnn(L, optimizer: Callable[[Iterator[nn.Parameter]], torch.optim.Optimizer]) -> type:
    """A LightningModule class training `SmallCNN` with cross-entropy (lightning is passed in: only the tests
    that use it import it)."""

    class CNNModule(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = SmallCNN()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], idx: int) -> torch.Tensor:
            return nn.functional.cross_entropy(self(batch[0]), batch[1])

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return optimizer(self.parameters())

    return CNNModule


def flops(model: nn.Module, x: torch.Tensor) -> int:
    """torch's own count of the forward's FLOPs (convolutions, matmuls): independent of wt's cost model."""
    model.eval()
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model(x)
    return fc.get_total_flops()


def data(n: int = 128, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


X1 = torch.randn(1, 1, 8, 8)


def test_pruner_cuts_optimizer_state_to_the_kept_elements() -> None:
    torch.manual_seed(0)
    model = SmallCNN()
    x, y = data(64)
    pruner = TrainingPruner(x[:2], target_macs=0.5, group_lasso=1e-3, start=0.0, end=0.0, prune_at="target")
    pruner.setup(model, total_steps=4)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    pruner.attach([opt])
    for _ in range(2):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        assert pruner.add_group_lasso_grad() is not None
        opt.step()
    assert pruner.controller is not None
    pruner.controller.step(0)  # fake-prune to the target, as step() would, but keep control of the physical part
    structure = pruner.structure
    removed = {g: us for g, us in view_zero_units(model, structure).items() if structure.group_map[g].prunable}
    masks = param_masks(structure, keep_from_removed(structure, removed))
    before = {n: {k: v.clone() for k, v in opt.state[model.get_parameter(n)].items()} for n in masks}
    pruner.prune([opt])
    assert pruner.physically_pruned
    for name, mask in masks.items():
        p = model.get_parameter(name)
        assert any(p is q for g in opt.param_groups for q in g["params"])
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(opt.state[p][key], before[name][key][mask].reshape(p.shape))
    assert len(opt.state) == sum(1 for g in opt.param_groups for _ in g["params"])
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()  # training goes on with the smaller parameters
    assert flops(model, X1) <= 0.5 * flops(SmallCNN(), X1) * 1.01


def test_remap_optimizer_refuses_state_it_cannot_cut() -> None:
    a = nn.Linear(4, 4)
    opt = torch.optim.Adam(a.parameters())
    a(torch.randn(2, 4)).sum().backward()
    opt.step()
    old = dict(a.named_parameters())
    a.weight = nn.Parameter(torch.zeros(2, 4))
    with pytest.raises(WtError, match="cannot be cut"):
        remap_optimizer(opt, old, a, {})


def test_pruner_arguments_are_checked() -> None:
    with pytest.raises(WtError, match="exactly one of target_macs"):
        TrainingPruner(X1)
    with pytest.raises(WtError, match="exactly one of target_macs"):
        TrainingPruner(X1, target_macs=0.5, target_params=0.5)
    with pytest.raises(WtError, match="prune_at"):
        TrainingPruner(X1, target_macs=0.5, prune_at="later")
    with pytest.raises(WtError, match="set the trainer's max_epochs or max_steps"):
        TrainingPruner(X1, target_macs=0.5).setup(SmallCNN(), 0)


@pytest.mark.slow
def test_lightning_fit_prunes_to_the_target_and_logs_macs(tmp_path: str) -> None:
    L = pytest.importorskip("lightning")
    from lightning.pytorch.loggers import CSVLogger

    from wtfront.integrations.lightning import WtLightningCallback

    Module = lightning_cnn(L, lambda ps: torch.optim.Adam(ps, lr=1e-2))

    torch.manual_seed(0)
    x, y = data()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    module = Module()
    dense = flops(SmallCNN(), X1)
    cb = WtLightningCallback(example_inputs=x[:2], target_macs=0.6, group_lasso=1e-3)
    trainer = L.Trainer(max_epochs=3, callbacks=[cb], logger=CSVLogger(str(tmp_path)), log_every_n_steps=4,
                        accelerator="cpu", enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False)
    trainer.fit(module, loader)
    assert cb.pruner.physically_pruned
    assert flops(module.net, X1) <= 0.62 * dense
    rows = list(csv.DictReader(open(glob.glob(os.path.join(str(tmp_path), "**", "metrics.csv"), recursive=True)[0])))
    ratios = [float(r["wt/active_macs/ratio"]) for r in rows if r.get("wt/active_macs/ratio")]
    assert ratios[0] == 1.0 and ratios[-1] <= 0.6
    steps = [int(r["step"]) for r in rows if r.get("wt/active_macs/ratio")]
    assert steps[:2] == [3, 7]  # every log_every_n_steps, under the step index Lightning uses


@pytest.mark.slow
def test_hf_trainer_prunes_to_the_target_and_logs_macs_to_tensorboard(tmp_path: str) -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from transformers import Trainer, TrainingArguments

    from wtfront.integrations.hf_trainer import WtTrainerCallback

    class HFModel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = SmallCNN()

        def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
            logits = self.net(pixel_values)
            out = {"logits": logits}
            if labels is not None:
                out["loss"] = nn.functional.cross_entropy(logits, labels)
            return out

    x, y = data()
    dataset = [{"pixel_values": x[i], "labels": y[i]} for i in range(len(y))]
    torch.manual_seed(0)
    model = HFModel()
    dense = flops(SmallCNN(), X1)
    args = TrainingArguments(output_dir=str(tmp_path), num_train_epochs=3, per_device_train_batch_size=16,
                             learning_rate=1e-2, logging_steps=4, report_to=["tensorboard"], save_strategy="no",
                             use_cpu=True, disable_tqdm=True)
    cb = WtTrainerCallback(example_inputs={"pixel_values": x[:2]}, target_macs=0.6, group_lasso=1e-3)
    trainer = Trainer(model=model, args=args, train_dataset=dataset)
    cb.add_to(trainer)
    trainer.train()
    assert cb.pruner.physically_pruned
    assert flops(model.net, X1) <= 0.62 * dense
    logged = [h["wt/active_macs/ratio"] for h in trainer.state.log_history if "wt/active_macs/ratio" in h]
    assert logged[0] == 1.0 and logged[-1] <= 0.6
    events = glob.glob(os.path.join(str(tmp_path), "**", "events.out.tfevents*"), recursive=True)
    acc = EventAccumulator(events[0])
    acc.Reload()
    tb = [e.value for e in acc.Scalars("train/wt/active_macs/ratio")]
    assert tb[0] == 1.0 and tb[-1] <= 0.6


@pytest.mark.slow
def test_lightning_resume_makes_the_same_decisions(tmp_path) -> None:
    L = pytest.importorskip("lightning")
    from lightning.pytorch.callbacks import ModelCheckpoint

    from wtfront.integrations.lightning import WtLightningCallback

    Module = lightning_cnn(L, lambda ps: torch.optim.SGD(ps, lr=0.05))

    x, y = data(64)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)  # 4 steps/epoch

    def run(max_epochs: int, ckpt_path: str | None = None, module: L.LightningModule | None = None, save: bool = False):
        torch.manual_seed(0)
        module = module or Module()
        cb = WtLightningCallback(example_inputs=x[:2], target_macs=0.6, start=0.0, end=0.9, prunes=4)
        callbacks: list = [cb]
        if save:
            callbacks.append(ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1))
        trainer = L.Trainer(max_epochs=max_epochs, callbacks=callbacks, logger=False, accelerator="cpu",
                            enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=save)
        trainer.fit(module, loader, ckpt_path=ckpt_path)
        return cb, module

    full, _ = run(3, save=True)
    # a run stopped after epoch 1, resumed from its checkpoint with the same max_epochs
    resumed, module = run(3, ckpt_path=str(tmp_path / "epoch=0-step=4.ckpt"))
    assert resumed.pruner.controller.history == full.pruner.controller.history
    assert full.pruner.physically_pruned and resumed.pruner.physically_pruned
    assert flops(module.net, X1) <= 0.6 * flops(SmallCNN(), X1) * 1.01
