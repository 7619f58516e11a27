"""Channel decay step time: wt's `ChannelDecay.step()` (rule "depgraph": the gamma program plus one gather and
one `addcmul_` per parameter) against Torch-Pruning's `GroupNormPruner.regularize()` (a Python loop over groups
and their dependencies) and against the floor, plain weight decay `p.grad.add_(p, alpha=reg)` on every
parameter. Ratios are to the floor, medians of interleaved repetitions in one process, CPU.

    python bench/bench_decay.py --models resnet50 vit_b_16
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bench_main, interleaved_medians

from wtfront import ChannelDecay, trace


def bench_model(name: str, reps: int, compile_: bool) -> None:
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None).eval()
    x = torch.randn(1, 3, 224, 224)
    structure = trace(model, x)
    model(x).sum().backward()
    params = [p for p in model.parameters() if p.grad is not None]
    decay = ChannelDecay(model, structure, reg=1e-4, rule="depgraph")

    def floor() -> None:
        with torch.no_grad():
            for p in params:
                p.grad.add_(p, alpha=1e-4)

    fns = {"floor": floor, "wt": decay.step}
    try:
        import torch_pruning as tp

        if name.startswith("resnet"):
            imp = tp.importance.GroupMagnitudeImportance(p=2, group_reduction="sum", normalizer=None, bias=True)
            pruner = tp.pruner.GroupNormPruner(model, x, importance=imp, reg=1e-4, ignored_layers=[model.fc])
            fns["torch_pruning"] = lambda: pruner.regularize(model, alpha=16, bias=False)
    except ImportError:  # pragma: no cover
        pass
    t = interleaved_medians(fns, reps=reps)
    parts = [f"{k} {t[k] * 1e3:.1f} ms ({t[k] / t['floor']:.2f}x)" for k in fns]
    print(f"{name}: {structure.num_units} units; " + ", ".join(parts))


if __name__ == "__main__":
    bench_main(__doc__, bench_model)
