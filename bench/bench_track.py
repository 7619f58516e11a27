"""All-metrics `track()` (structured BOPs + unstructured sparsity + 2:4 + pruning summary) against the floor.

    python bench/bench_track.py [--models resnet50 vit_b_16] [--reps 15] [--no-compile]

Floor (DESIGN.md): `sum(p.pow(2).sum() for p in params)` under no_grad. Printed numbers are ratios
(time / floor time), medians over interleaved repetitions in one process:

* `program`: the fused program alone (eager; and compiled with backend="inductor", as `Program.flat`, the
  packed form `track()` runs: timing the dict-returning graph too would alternate two compiled graphs, which
  cost the second one ~2 ms per call on ResNet-50 in this loop and never happens in a training loop);
* `track()`: the whole call a training loop makes (effective parameters, the program, one host sync and
  the flat dict of floats), eager and compiled.

Build time: wt trace with the cost model (one extra forward pass, fvcore) against Torch-Pruning's
`build_dependency` alone. When the torch-weighttracker package is installed (`pip install -e ".[bench]"`),
the same work runs through it on the same model in the same process: its `track()` with the same four
metrics (structured BOPs, unstructured sparsity, NVIDIA 2:4, group pruning summary) and with structured
BOPs alone, and its build (`WeightTracker(model, example_inputs)`).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bench_main, interleaved_medians, once

import wtcore
from wtfront import WeightTracker, load_model, trace

KINDS = ["structured_bops", "unstructured_sparsity", "nm_sparsity", "group_pruning_summary"]
TWT_KINDS = ["structured_bops", "unstructured_sparsity", "nvidia_2_4_sparsity", "group_pruning_summary"]


def bench_model(name: str, reps: int, compiled: bool) -> dict[str, float]:
    ref = load_model(f"torchvision:{name}")
    model, x = ref.model, ref.example_inputs
    plist = [p for p in model.parameters()]

    import torch_pruning as tp

    structure = trace(model, x)  # warm-up (imports, first-call costs)
    t_tp = min(once(lambda: tp.DependencyGraph().build_dependency(model, example_inputs=x)) for _ in range(3))
    t_nocost = min(once(lambda: trace(model, x, costs=False)) for _ in range(3))
    t_trace = min(once(lambda: trace(model, x)) for _ in range(3))

    tracker = WeightTracker(model, x, structure=structure)
    tracker.create_tracker(KINDS)
    wtcore.clear_cache()
    t_compile = once(tracker.program)
    prog = tracker.program()
    params = tracker.params()

    def floor_fwd() -> torch.Tensor:
        with torch.no_grad():
            return sum(p.pow(2).sum() for p in plist)

    def program_eager() -> object:
        with torch.no_grad():
            return prog(params)

    fns = {"floor fwd": floor_fwd, "program eager": program_eager, "track() eager": tracker.track}
    if compiled:
        ctracker = WeightTracker(model, x, structure=structure, backend="inductor")
        ctracker.create_tracker(KINDS)
        cprog = ctracker.program()
        t0 = time.perf_counter()
        ctracker.track()
        t_inductor = time.perf_counter() - t0

        def program_compiled() -> object:  # the packed program track() runs: one compiled graph, not two
            with torch.no_grad():
                return cprog.flat(params)

        fns |= {"program compiled": program_compiled, "track() compiled": ctracker.track}
    med = interleaved_medians(fns, reps=reps)
    # torch-weighttracker in its own interleaved set, against its own floor: its large allocations, freed
    # between calls, otherwise change the allocator state the floor and wt's programs run in (the floor
    # then varied 7-14 ms between runs of this script)
    wtt, t_wtt = _weighttracker(model, x)
    other = interleaved_medians({"floor fwd": floor_fwd} | wtt, reps=max(5, reps // 2)) if wtt else {}

    n = sum(p.numel() for p in plist)
    metrics = tracker.track()
    print(f"\n== {name}: {len(plist)} parameters, {n / 1e6:.1f}M elements, {len(structure.ops)} cost ops, "
          f"{structure.num_units} units; track() returns {len(metrics)} keys")
    print(f"build: wt trace {t_trace:.2f}s (without costs {t_nocost:.2f}s, so the cost model adds "
          f"{t_trace - t_nocost:.2f}s); Torch-Pruning build_dependency {t_tp:.2f}s; compile {t_compile:.2f}s"
          + (f"; first compiled call (inductor) {t_inductor:.1f}s" if compiled else "")
          + (f"; torch-weighttracker build {t_wtt:.2f}s" if t_wtt is not None else ""))
    print(f"floor fwd {med['floor fwd'] * 1e3:.2f} ms")
    ratios = {}
    for group in (med, other):
        for k, v in group.items():
            if k == "floor fwd":
                continue
            ratios[k] = v / group["floor fwd"]
            print(f"  {k:44s} {v * 1e3:8.2f} ms   {ratios[k]:5.2f}x floor"
                  + (f" (its own interleaved set, floor {group['floor fwd'] * 1e3:.2f} ms)" if group is other else ""))
    return ratios


def _weighttracker(model: torch.nn.Module, x: torch.Tensor) -> tuple[dict[str, Callable[[], object]], float | None]:
    """torch-weighttracker's `track()` on the same work, when it is installed: all four metrics, and
    structured BOPs alone; and its build time (dependency graph and MAC count)."""
    try:
        from torch_weighttracker import WeightTracker as TWT
    except ImportError:
        print("(torch-weighttracker not installed: pip install -e '.[bench]' to compare)")
        return {}, None
    try:
        t0 = time.perf_counter()
        full = TWT(model, example_inputs=x)
        t_build = time.perf_counter() - t0
        full.create_tracker(TWT_KINDS, wandb_format=True)
        bops = TWT(model, example_inputs=x)
        bops.create_tracker("structured_bops", log_total_bops=True, wandb_format=True)
    except Exception as e:
        print(f"(torch-weighttracker failed on this model: {type(e).__name__}: {e})")
        return {}, None

    def run(t: Any) -> Callable[[], object]:
        def go() -> object:
            with torch.no_grad():
                return t.track()

        return go

    return {"torch-weighttracker track() (same 4 metrics)": run(full),
            "torch-weighttracker structured_bops track()": run(bops)}, t_build


if __name__ == "__main__":
    bench_main(__doc__, bench_model, f"; tracked: {', '.join(KINDS)}")
