"""`bench_track.py`'s program and `track()` ratios as CPU time of ONE thread, for busy machines.

    python bench/bench_track_cpu.py [resnet50 vit_b_16 ...]

With other jobs on the machine, wall-clock floors vary 2x between runs; the CPU time of one thread
(`time.process_time`, `torch.set_num_threads(1)`) hardly moves. Medians of 15 interleaved repetitions;
floor: `sum(p.pow(2).sum() for p in params)` under no_grad; compiled: `backend="inductor"`.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

import torch

from wtfront import WeightTracker, load_model, trace
from wtfront.cli.benchmark import interleaved_medians

KINDS = ["structured_bops", "unstructured_sparsity", "nm_sparsity", "group_pruning_summary"]


def ratios(name: str, reps: int = 15) -> dict[str, float]:
    ref = load_model(f"torchvision:{name}")
    model, x = ref.model, ref.example_inputs
    plist = list(model.parameters())
    s = trace(model, x)
    eager = WeightTracker(model, x, structure=s)
    compiled = WeightTracker(model, x, structure=s, backend="inductor")
    for t in (eager, compiled):
        t.create_tracker(KINDS)
    prog, cprog, params = eager.program(), compiled.program(), eager.params()

    def no_grad(f: Callable[[], object]) -> Callable[[], object]:
        def run() -> object:
            with torch.no_grad():
                return f()
        return run

    fns = {"floor": no_grad(lambda: sum(p.pow(2).sum() for p in plist)),
           "program eager": no_grad(lambda: prog(params)), "track() eager": eager.track,
           "program compiled": no_grad(lambda: cprog.flat(params)), "track() compiled": compiled.track}
    med = interleaved_medians(fns, reps=reps, warmup=1, clock=time.process_time)  # inductor compiles in warm-up
    print(f"== {name}: floor {med['floor'] * 1e3:.2f} ms CPU; "
          + ", ".join(f"{k} {v / med['floor']:.2f}x" for k, v in med.items() if k != "floor"), flush=True)
    return med


if __name__ == "__main__":
    torch.set_num_threads(1)
    for m in sys.argv[1:] or ["resnet50", "vit_b_16"]:
        ratios(m)
