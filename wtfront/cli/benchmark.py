"""The floor-ratio benchmark on any model (a program's time against reading every weight once), and the timing
helpers that `bench/` shares.

The floor is `sum(p.pow(2).sum() for p in params)` on the same parameters: forward under `no_grad`, and
forward+backward with `torch.autograd.grad`. A program's time divided by the floor's, both medians over
interleaved repetitions in one process, says how close it is to reading every parameter once; ratios are
comparable across machines, absolute times are not.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

import wtcore
from wtcore.errors import WtError
from wtcore.ir import Structure

__all__ = ["FloorRatios", "floor_ratios", "interleaved_medians", "interleaved_times", "once"]


def interleaved_times(fns: dict[str, Callable[[], object]], reps: int = 15, warmup: int = 3,
                      clock: Callable[[], float] = time.perf_counter) -> dict[str, list[float]]:
    """Run every function once per round (so drift hits all alike); every round's seconds, per function.
    `clock=time.process_time` measures CPU time instead (steadier on a busy machine, with one thread)."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            t0 = clock()
            f()
            times[k].append(clock() - t0)
    return times


def interleaved_medians(fns: dict[str, Callable[[], object]], reps: int = 15, warmup: int = 3,
                        clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Each function's median seconds over `interleaved_times` rounds."""
    return {k: statistics.median(v) for k, v in interleaved_times(fns, reps, warmup, clock).items()}


def once(fn: Callable[[], object]) -> float:
    """Seconds one call takes."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


@dataclass(frozen=True)
class FloorRatios:
    """Median seconds of each timed function (`seconds`) and the program/floor ratios."""

    seconds: dict[str, float]
    reps: int
    threads: int

    @property
    def fwd(self) -> float:
        return self.seconds["wt fwd"] / self.seconds["floor fwd"]

    @property
    def fwd_bwd(self) -> float | None:
        """None when the backward was not timed (`grad=False`, or a program without a gradient)."""
        if "wt fwd+bwd" not in self.seconds:
            return None
        return self.seconds["wt fwd+bwd"] / self.seconds["floor fwd+bwd"]


def floor_ratios(structure: Structure, params: Mapping[str, torch.Tensor], *, spec: str | wtcore.Spec = "group_lasso",
                 reps: int = 15, warmup: int = 3, grad: bool = True) -> FloorRatios:
    """Time the compiled `spec` program (default: group lasso; every output) forward and, when `grad` and the
    program has a gradient, forward+backward (of the sum of its differentiable outputs) against the floor,
    interleaved, on `params` (e.g. `dict(model.named_parameters())`)."""
    if reps < 1 or warmup < 0:
        raise WtError(f"floor_ratios needs reps >= 1 and warmup >= 0 (a median of no timings is undefined), got "
                      f"reps={reps}, warmup={warmup}")
    program = wtcore.compile(structure, [spec])
    tensors = program.gather(params)
    plist = [t if t.requires_grad else t.detach().requires_grad_(True) for t in tensors]
    bound = dict(zip(program.param_names, plist))

    def floor_fwd() -> torch.Tensor:
        with torch.no_grad():
            return sum(p.pow(2).sum() for p in plist)

    def floor_bwd() -> tuple[torch.Tensor, ...]:
        return torch.autograd.grad(sum(p.pow(2).sum() for p in plist), plist)

    def wt_fwd() -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return program(bound)

    def differentiable(out: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        return [v.sum() for v in out.values() if v.requires_grad]

    def wt_bwd() -> tuple[torch.Tensor, ...]:
        return torch.autograd.grad(sum(differentiable(program(bound))), plist, allow_unused=True)

    fns = {"floor fwd": floor_fwd, "wt fwd": wt_fwd}
    if grad and differentiable(program(bound)):
        fns.update({"floor fwd+bwd": floor_bwd, "wt fwd+bwd": wt_bwd})
    return FloorRatios(interleaved_medians(fns, reps=reps, warmup=warmup), reps, torch.get_num_threads())
