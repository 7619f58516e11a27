"""End to end on a real dataset, on a CPU in well under a minute: prune a small CNN to half its MACs.

scikit-learn's digits (1,797 8x8 images, bundled with the package: no download) and a four-layer CNN go
through the whole loop:

1. dense training;
2. a group-lasso phase: the loss gets `lam * group_lasso`, a compiled wt program of the parameters, which
   pushes whole coupled units (a conv's filter with its BatchNorm entries and the next conv's input slice)
   towards zero;
3. gradual pruning to 50% of the baseline MACs (1 MAC = one multiply-add): a `Controller` with a cubic
   schedule solves, at the end of each pruning epoch, which units to zero so that the active MACs meet that
   epoch's target, and keeps them zero while training goes on (fake pruning);
4. physical pruning (`Controller.prune`: Torch-Pruning removes the zeroed units, wt checks the output did not
   change), then a new optimizer (the parameters are new objects);
5. fine-tuning, `save_pruned`, and `load_pruned` into a freshly constructed model.

Every epoch prints the phase, the test accuracy, the active MACs (fraction of the dense model) and the
group-lasso value; `--plot` writes them as a PNG. Run: `python examples/digits_pruning.py --plot digits.png`.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import wtcore
from wtfront import Controller, ControllerConfig, effective_params, load_pruned, save_pruned, trace


class DigitsCNN(nn.Module):
    """Three conv blocks (BatchNorm, ReLU; a max-pool after the second) and a linear classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(32)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(64)
        self.conv3 = nn.Conv2d(64, 64, 3, padding=1)
        self.bn3 = nn.BatchNorm2d(64)
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = nn.functional.max_pool2d(torch.relu(self.bn2(self.conv2(x))), 2)
        x = torch.relu(self.bn3(self.conv3(x)))
        return self.fc(x.mean((2, 3)))


def load_digits_split(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Train/test tensors (80/20, a fixed shuffle): images [N, 1, 8, 8] in [0, 1], labels [N]."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    n = int(0.8 * len(y))
    return x[:n], y[:n], x[n:], y[n:]


@dataclass
class Run:
    """What happened, epoch by epoch, and the final numbers."""

    epochs: list[dict[str, Any]] = field(default_factory=list)
    dense_acc: float = 0.0
    final_acc: float = 0.0
    macs_ratio: float = 1.0
    reload_identical: bool = False
    checkpoint: str = ""
    model: nn.Module | None = None


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def main(plot: str | None = None, out_dir: str | None = None, seed: int = 0, verbose: bool = True,
         dense_epochs: int = 12, lasso_epochs: int = 4, prune_epochs: int = 4, finetune_epochs: int = 8,
         target: float = 0.5, lam: float = 2e-4) -> Run:
    torch.manual_seed(seed)
    xtr, ytr, xte, yte = load_digits_split(seed)
    model = DigitsCNN()
    example = xtr[:2]
    structure = trace(model.eval(), example)
    reg = wtcore.compile(structure, ["group_lasso", "active_macs"])  # one program: the loss term and the MACs
    # gradual pruning: the schedule starts (sparsity 0) at the last group-lasso epoch, so each of the pruning
    # epochs removes a part, the last one down to `target` of the baseline MACs
    first = dense_epochs + lasso_epochs
    ctrl = Controller(ControllerConfig.make(target, kind="cubic", start=first - 1, end=first + prune_epochs - 1,
                                            metric="macs", importance="unit_l2", scope="global",
                                            max_fraction=0.8)).bind(model, structure)

    def new_optimizer(lr: float = 3e-3) -> torch.optim.Optimizer:
        return torch.optim.Adam(model.parameters(), lr=lr)

    opt = new_optimizer()
    ctrl.attach(opt)  # removed units stay zero after every optimizer step
    run = Run()
    total = dense_epochs + lasso_epochs + prune_epochs + finetune_epochs
    gen = torch.Generator().manual_seed(seed + 1)
    for epoch in range(total):
        phase = ("dense" if epoch < dense_epochs else "lasso" if epoch < first
                 else "prune" if epoch < first + prune_epochs else "finetune")
        use_lasso = phase in ("lasso", "prune")
        if epoch == dense_epochs:  # gentler steps once the regularizer pulls units down
            for g in opt.param_groups:
                g["lr"] = 1e-3
        model.train()
        for idx in torch.randperm(len(ytr), generator=gen).split(64):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(xtr[idx]), ytr[idx])
            if use_lasso:
                loss = loss + lam * reg(effective_params(model, structure))["group_lasso"]
            loss.backward()
            opt.step()
        note = ""
        if phase == "prune":
            report = ctrl.step(epoch)
            if report.pruned:  # the target can be met before the schedule ends; later steps do nothing
                note = f"  pruned to {report.ratio:.3f} of the MACs (target {report.target:.3f})"
            if report.physical_prune_due:  # the final target is met: remove the units, rebuild the optimizer
                structure = ctrl.prune(example)
                reg = wtcore.compile(structure, ["group_lasso", "active_macs"])
                opt = new_optimizer(1e-3)
                note += "; physically pruned, optimizer rebuilt"
        with torch.no_grad():
            out = reg(effective_params(model, structure))
        acc = accuracy(model, xte, yte)
        row = {"epoch": epoch, "phase": phase, "acc": acc, "macs": float(out["active_macs/ratio"]),
               "group_lasso": float(out["group_lasso"])}
        run.epochs.append(row)
        if verbose:
            print(f"epoch {epoch:2d} {phase:8s} acc {acc:.4f}  active MACs {row['macs']:.3f} of dense  "
                  f"group lasso {row['group_lasso']:9.2f}{note}", flush=True)
        if epoch == dense_epochs - 1:
            run.dense_acc = acc
    if not ctrl.done:
        raise RuntimeError("the controller did not reach its target; lengthen the pruning phase")
    run.model = model
    run.final_acc = run.epochs[-1]["acc"]
    run.macs_ratio = run.epochs[-1]["macs"]

    folder = out_dir or tempfile.mkdtemp()
    run.checkpoint = os.path.join(folder, "digits_pruned.pt")
    save_pruned(model, run.checkpoint)
    fresh = load_pruned(DigitsCNN(), run.checkpoint).eval()
    model.eval()
    with torch.no_grad():
        run.reload_identical = torch.equal(fresh(xte), model(xte))
    if verbose:
        print(f"dense accuracy {run.dense_acc:.4f} -> pruned {run.final_acc:.4f} at {run.macs_ratio:.3f} of the "
              f"MACs; reloaded model identical: {run.reload_identical}")
    if plot:
        save_plot(run, plot)
    return run


def save_plot(run: Run, path: str) -> None:
    """Accuracy, active MACs and group lasso per epoch, phases shaded (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [r["epoch"] for r in run.epochs]
    fig, axes = plt.subplots(3, 1, figsize=(7, 7), sharex=True)
    series = [("acc", "test accuracy"), ("macs", "active MACs / dense"), ("group_lasso", "group lasso")]
    colors = {"dense": "#ffffff", "lasso": "#e8f0fe", "prune": "#fde8e8", "finetune": "#e8f8e8"}
    for ax, (key, label) in zip(axes, series):
        ax.plot(ep, [r[key] for r in run.epochs], marker="o", ms=3)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        for r in run.epochs:
            ax.axvspan(r["epoch"] - 0.5, r["epoch"] + 0.5, color=colors[r["phase"]], lw=0)
    axes[0].set_title("digits CNN: dense, group lasso, gradual pruning to 50% of the MACs, fine-tuning", fontsize=10)
    axes[1].axhline(0.5, color="k", ls="--", lw=0.8)
    axes[2].set_xlabel("epoch (shaded: blue group lasso, red pruning, green fine-tuning)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--plot", help="write the per-epoch plot to this PNG")
    p.add_argument("--out", help="folder for the pruned checkpoint (default: a temporary one)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    main(plot=a.plot, out_dir=a.out, seed=a.seed)
