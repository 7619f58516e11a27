"""Pruning quality at equal MACs: wt's default policy against Torch-Pruning's default and random units.

Real data that ships with scikit-learn (the 8x8 digits, upsampled to 16x16; 1347 train / 450 test images) and
three small models trained from scratch: a CNN (widths 16-64), a ResNet-18-shaped net (BasicBlocks [2, 2, 2, 2], widths
16-128) and a ViT (timm, 4 blocks, 4 heads, width 64). Each trained model is pruned to 50% and 30% of its MACs:

- wt: `solve` with the defaults (`wtcore.policy`: per-group mean-normalized L2 ranked globally, at most 90% of a
  group removed), over the groups `wt prune` prunes by default (not the LayerNorm'ed ViT width), then
  `prune_units`;
- Torch-Pruning: `MetaPruner` + `MagnitudeImportance(p=2)` with its defaults (the same fraction of every layer;
  the ViT with its documented recipe: `num_heads`, `prune_num_heads=True`; the embedding width is pruned too),
  the classifier ignored, `pruning_ratio` bisected to the largest MACs at or below the target;
- random: wt's solver with random scores (same policy).

MACs are counted by `torch.utils.flop_counter` (FLOPs / 2) on the pruned model. Accuracy on the test split,
one-shot and after a short fine-tune (same epochs and optimizer for all). "min width" is the smallest fraction
of its original width that any pruned layer keeps.

    python bench/bench_prune_quality.py            # a few minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import copy
import time
import warnings
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch_pruning as tp
from torch.utils.flop_counter import FlopCounterMode
from torchvision.models.resnet import BasicBlock

from wtcore.solver import solve
from wtfront import lossy_groups, prune_units, trace
from wtfront.tracing.units import HEAD_KINDS


# ------------------------------------------------------------------------------------------------ data
def digits(size: int = 16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = (x - x.mean()) / x.std()
    y = torch.tensor(d.target)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=450, random_state=0, stratify=y)
    return xtr, ytr, xte, yte


# ------------------------------------------------------------------------------------------------ models
class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()

        def block(i: int, o: int) -> list[nn.Module]:
            return [nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU()]

        self.features = nn.Sequential(*block(1, 16), *block(16, 32), nn.MaxPool2d(2), *block(32, 64),
                                      nn.MaxPool2d(2), *block(64, 64), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


class ResNet18Shaped(nn.Module):
    """ResNet-18's layout (stem, four stages of two BasicBlocks, strides 1-2-2-2) at widths 16-32-64-128."""

    def __init__(self, widths: tuple[int, ...] = (16, 32, 64, 128)) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, widths[0], 3, padding=1, bias=False), nn.BatchNorm2d(widths[0]),
                                  nn.ReLU())
        layers, c = [], widths[0]
        for i, w in enumerate(widths):
            stride = 1 if i == 0 else 2
            down = None if stride == 1 and c == w else nn.Sequential(nn.Conv2d(c, w, 1, stride, bias=False),
                                                                     nn.BatchNorm2d(w))
            layers.append(nn.Sequential(BasicBlock(c, w, stride, down), BasicBlock(w, w)))
            c = w
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(c, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.layers(self.stem(x)).mean((2, 3)))


def small_vit() -> nn.Module:
    import timm

    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=4, in_chans=1,
                             embed_dim=64, depth=4, num_heads=4, mlp_ratio=2.0, num_classes=10)


MODELS: dict[str, tuple[Callable[[], nn.Module], int]] = {  # name -> (builder, training epochs)
    "cnn": (SmallCNN, 8),
    "resnet18-shaped": (ResNet18Shaped, 8),
    "vit": (small_vit, 30),
}


# ------------------------------------------------------------------------------------------------ training
def train(model: nn.Module, xtr: torch.Tensor, ytr: torch.Tensor, epochs: int, lr: float, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * ((len(xtr) + 63) // 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(xtr), generator=g)
        for i in range(0, len(xtr), 64):
            idx = perm[i: i + 64]
            opt.zero_grad()
            F.cross_entropy(model(xtr[idx]), ytr[idx]).backward()
            opt.step()
            sched.step()
    model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return float((model(x).argmax(1) == y).float().mean())


def macs(model: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad(), FlopCounterMode(display=False) as c:
        model(x)
    return c.get_total_flops() / 2


def min_width(dense: nn.Module, pruned: nn.Module) -> float:
    """The smallest kept fraction of any conv's / linear's output width (the classifier's logits aside)."""
    widths = {}
    for (n, a), (_, b) in zip(dense.named_modules(), pruned.named_modules()):
        if isinstance(a, nn.Conv2d):
            widths[n] = b.out_channels / a.out_channels
        elif isinstance(a, nn.Linear) and a.out_features != 10:
            widths[n] = b.out_features / a.out_features
    return min(widths.values())


# ------------------------------------------------------------------------------------------------ pruning
def prune_wt(model: nn.Module, x: torch.Tensor, target: float, importance: str = "unit_l2") -> nn.Module:
    """`wt prune`'s default: the groups it prunes (lossless ones), the default policy, physical pruning."""
    model = copy.deepcopy(model).eval()
    s = trace(model, x)
    params = {k: v.detach() for k, v in model.named_parameters()}
    eligible = [g for g in s.groups if g.prunable]
    lossy = lossy_groups(model, type(s)(s.params, tuple(g for g in eligible if g.kind not in HEAD_KINDS), (),
                                        s.model, s.uncoupled), x)
    names = [g.name for g in eligible if g.name not in lossy]
    keep = solve(s, params, target=target, metric="macs", importance=importance, groups=names, warn=False).keep
    prune_units(model, s, x, keep)
    return model


def prune_tp(model: nn.Module, x: torch.Tensor, ratio: float) -> nn.Module:
    """Torch-Pruning's default: MetaPruner + MagnitudeImportance(p=2), one ratio for every layer."""
    model = copy.deepcopy(model).eval()
    head = model.fc[-1] if isinstance(model, SmallCNN) else (model.fc if isinstance(model, ResNet18Shaped)
                                                             else model.head)
    kw: dict = {}
    ignored = [head]
    if not isinstance(model, (SmallCNN, ResNet18Shaped)):  # timm ViT: the documented recipe
        kw = dict(num_heads={b.attn.qkv: b.attn.num_heads for b in model.blocks}, prune_num_heads=True,
                  prune_head_dims=False)  # the embedding width is pruned too (wt leaves it: LayerNorm'ed)
    pruner = tp.pruner.MetaPruner(model, x, importance=tp.importance.MagnitudeImportance(p=2), pruning_ratio=ratio,
                                  ignored_layers=ignored, **kw)
    pruner.step()
    if kw:
        for b in model.blocks:
            b.attn.num_heads = pruner.num_heads[b.attn.qkv]
            b.attn.head_dim = b.attn.qkv.out_features // (3 * b.attn.num_heads)
    return model


def prune_tp_to(model: nn.Module, x: torch.Tensor, target: float, dense: float) -> tuple[nn.Module, bool]:
    """Bisect Torch-Pruning's ratio to the largest MACs at or below `target` x dense; (model, reached). Where no
    ratio reaches the target, the model at the highest ratio tried, and False."""
    lo, hi, best = 0.0, 0.95, None
    for _ in range(7):
        mid = (lo + hi) / 2
        m = prune_tp(model, x, mid)
        if macs(m, x) <= target * dense:
            best, hi = m, mid
        else:
            lo = mid
    return (best, True) if best is not None else (prune_tp(model, x, 0.95), False)


# ------------------------------------------------------------------------------------------------ main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--targets", nargs="+", type=float, default=[0.5, 0.3])
    ap.add_argument("--finetune", type=int, default=2, help="fine-tune epochs after pruning (default 2)")
    args = ap.parse_args()
    warnings.filterwarnings("ignore", message="Unwrapped parameters detected")  # timm's cls_token, pos_embed
    torch.manual_seed(0)
    xtr, ytr, xte, yte = digits()
    x1 = xte[:1]
    t0 = time.perf_counter()
    print(f"torch {torch.__version__}, torch-pruning {tp.__version__}, {torch.get_num_threads()} threads; sklearn "
          f"digits 16x16, {len(xtr)} train / {len(xte)} test; fine-tune {args.finetune} epochs")
    print("| model | dense acc | MACs target | method | MACs kept | acc one-shot | acc fine-tuned | min width |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.models:
        build, epochs = MODELS[name]
        torch.manual_seed(0)
        model = build()
        lr = 1e-3 if name == "vit" else 3e-3
        train(model, xtr, ytr, epochs, lr)
        dense_acc, dense = accuracy(model, xte, yte), macs(model, x1)
        for target in args.targets:
            for method in ("wt default", "Torch-Pruning default", "random"):
                label = method
                if method == "wt default":
                    pruned = prune_wt(model, x1, target)
                elif method == "random":
                    pruned = prune_wt(model, x1, target, importance="random")
                else:
                    pruned, reached = prune_tp_to(model, x1, target, dense)
                    label += "" if reached else " (target out of reach: ratio 0.95)"
                one = accuracy(pruned, xte, yte)
                train(pruned, xtr, ytr, args.finetune, lr / 3, seed=1)
                tuned = accuracy(pruned, xte, yte)
                print(f"| {name} | {100 * dense_acc:.1f} | {100 * target:.0f}% | {label} | "
                      f"{100 * macs(pruned, x1) / dense:.1f}% | {100 * one:.1f} | {100 * tuned:.1f} | "
                      f"{100 * min_width(model, pruned):.0f}% |", flush=True)
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
