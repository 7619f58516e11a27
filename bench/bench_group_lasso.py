"""Group lasso forward and forward+backward against the floor of DESIGN.md, and build time against Torch-Pruning.

    python bench/bench_group_lasso.py [--models resnet50 vit_b_16] [--reps 15] [--no-compile]

Floor: `sum(p.pow(2).sum() for p in params)`; forward under no_grad, forward+backward with
torch.autograd.grad. Printed numbers are ratios (program time / floor time), medians over interleaved
repetitions in one process. When the torch-weighttracker package is installed (`pip install -e ".[bench]"`),
its group lasso (forward, forward+backward) and its build (`WeightTracker(model, example_inputs)`) run on
the same model in the same process; a naive per-module loop is always included for scale.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bench_main, interleaved_medians, interleaved_times, once

import wtcore
from wtfront import load_model, trace


def naive_group_lasso(structure: wtcore.Structure, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-slice Python loop (what one writes by hand): index_select each slice's rows per group."""
    total = params[structure.params[0].name].new_zeros(())
    for g in structure.groups:
        if not g.prunable:
            continue
        acc = None
        for s in g.slices:
            w = params[s.param]
            if s.groups > 1:
                continue  # the naive loop skips grouped slices, as hand-written versions usually do
            sq = w.square().sum([d for d in range(w.dim()) if d != s.axis]) if w.dim() > 1 else w.square()
            idx = s.index_tensor()
            keep = idx >= 0
            part = torch.zeros(g.size, dtype=sq.dtype).index_add(0, idx[keep], sq[keep])
            acc = part if acc is None else acc + part
        if acc is not None:
            total = total + acc.sqrt().sum()
    return total


def bench_model(name: str, reps: int, compiled: bool) -> None:
    ref = load_model(f"torchvision:{name}")
    model, x = ref.model, ref.example_inputs
    params = dict(model.named_parameters())
    plist = list(params.values())

    # ---- build time: Torch-Pruning's graph alone vs wt's trace + compile, interleaved (drift hits all alike)
    import torch_pruning as tp

    compile_s: list[float] = []

    def build(costs: bool) -> Callable[[], None]:
        def run() -> None:
            s = trace(model, x, costs=costs)
            wtcore.clear_cache()  # a real compile every time, not a cache hit
            t0 = time.perf_counter()
            wtcore.compile(s, ["group_lasso"])
            if not costs:
                compile_s.append(time.perf_counter() - t0)
        return run

    def tp_build() -> None:
        tp.DependencyGraph().build_dependency(model, example_inputs=x)

    # the cost model's build in its own set: fvcore's jit trace allocates heavily, and interleaved with the
    # two it would change the allocator state Torch-Pruning's build runs in right after it
    # the ratio is the median of each round's wt/TP ratio: the two runs of a round are adjacent in time, so
    # the machine's drift (the example forward pass, ~85% of both, varies +-15% between rounds here) cancels
    rounds = interleaved_times({"tp": tp_build, "wt": build(costs=False)}, reps=max(21, reps), warmup=1)
    with_costs = interleaved_medians({"tp": tp_build, "wt+costs": build(costs=True)}, reps=3, warmup=1)
    t_tp, t_build = statistics.median(rounds["tp"]), statistics.median(rounds["wt"])
    build_ratio = statistics.median(w / t for w, t in zip(rounds["wt"], rounds["tp"]))
    t_costs = with_costs["wt+costs"] / with_costs["tp"] * t_tp
    t_compile = statistics.median(compile_s)
    structure = trace(model, x, costs=False)
    prog = wtcore.compile(structure, ["group_lasso"])

    def floor_fwd() -> torch.Tensor:
        with torch.no_grad():
            return sum(p.pow(2).sum() for p in plist)

    def read_floor() -> torch.Tensor:
        with torch.no_grad():
            return sum(p.sum() for p in plist)

    def floor_bwd() -> tuple[torch.Tensor, ...]:
        return torch.autograd.grad(sum(p.pow(2).sum() for p in plist), plist)

    def wt_fwd() -> torch.Tensor:
        with torch.no_grad():
            return prog(params)["group_lasso"]

    def wt_bwd() -> tuple[torch.Tensor, ...]:
        return torch.autograd.grad(prog(params)["group_lasso"], plist, allow_unused=True)

    def naive_fwd() -> torch.Tensor:
        with torch.no_grad():
            return naive_group_lasso(structure, params)

    fns = {"floor fwd": floor_fwd, "read floor": read_floor, "floor fwd+bwd": floor_bwd,
           "wt fwd": wt_fwd, "wt fwd+bwd": wt_bwd, "naive loop fwd": naive_fwd}
    if compiled:
        cprog = wtcore.compile(structure, ["group_lasso"], backend="inductor")

        def wtc_fwd() -> torch.Tensor:
            with torch.no_grad():
                return cprog(params)["group_lasso"]

        def wtc_bwd() -> tuple[torch.Tensor, ...]:
            return torch.autograd.grad(cprog(params)["group_lasso"], plist, allow_unused=True)

        fns |= {"wt compiled fwd": wtc_fwd, "wt compiled fwd+bwd": wtc_bwd}
    wtt, t_wtt = _weighttracker(model, x, plist)
    fns |= wtt
    med = interleaved_medians(fns, reps=reps)

    n = sum(p.numel() for p in plist)
    print(f"\n== {name}: {len(plist)} parameters, {n / 1e6:.1f}M elements, {structure.num_units} units "
          f"in {len(structure.groups)} groups")
    print(f"build (medians, interleaved): wt trace + compile {t_build:.3f}s (compile {t_compile:.3f}s); "
          f"Torch-Pruning build_dependency {t_tp:.3f}s; ratio {build_ratio:.2f}x (median of per-round ratios; "
          f"ratio of medians {t_build / t_tp:.2f}x)")
    print(f"build with the cost model (one more forward pass): {t_costs:.3f}s; ratio {t_costs / t_tp:.2f}x")
    if t_wtt is not None:
        print(f"torch-weighttracker build (graph, groups, MACs) {t_wtt:.3f}s; ratio {t_wtt / t_tp:.2f}x")
    print(f"floor fwd {med['floor fwd'] * 1e3:.2f} ms, floor fwd+bwd {med['floor fwd+bwd'] * 1e3:.2f} ms, "
          f"read floor {med['read floor'] * 1e3:.2f} ms")
    for k, v in med.items():
        if k.startswith("floor") or k == "read floor":
            continue
        base = med["floor fwd+bwd"] if "bwd" in k else med["floor fwd"]
        print(f"  {k:28s} {v * 1e3:8.2f} ms   {v / base:5.2f}x floor")


def _weighttracker(model: torch.nn.Module, x: torch.Tensor, plist: list[torch.Tensor]
                   ) -> tuple[dict[str, Callable[[], object]], float | None]:
    """torch-weighttracker's group lasso (forward, forward+backward) and build time, when it is installed."""
    try:
        from torch_weighttracker import WeightTracker
    except ImportError:
        print("(torch-weighttracker not installed: pip install -e '.[bench]' to compare)")
        return {}, None
    try:
        t_build = min(once(lambda: WeightTracker(model, example_inputs=x)) for _ in range(2))
        reg = WeightTracker(model, example_inputs=x).create_regularizer("group_lasso")
    except Exception as e:
        print(f"(torch-weighttracker failed on this model: {type(e).__name__}: {e})")
        return {}, None

    def fwd() -> torch.Tensor:
        with torch.no_grad():
            return reg()

    def bwd() -> tuple[torch.Tensor, ...]:
        return torch.autograd.grad(reg(), plist, allow_unused=True)

    return {"torch-weighttracker fwd": fwd, "torch-weighttracker fwd+bwd": bwd}, t_build


if __name__ == "__main__":
    bench_main(__doc__, bench_model)
