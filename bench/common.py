"""Timing helpers shared by the benchmarks: medians over interleaved repetitions, in one process."""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch


def interleaved_medians(fns: dict[str, Callable[[], object]], reps: int = 15, warmup: int = 3) -> dict[str, float]:
    """Run every function once per round (so drift hits all alike) and return each one's median seconds."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def once(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_main(doc: str, bench_model: Callable[[str, int, bool], object], header: str = "") -> None:
    """The shared command line of the benchmarks: models, repetitions, with or without torch.compile."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["resnet50", "vit_b_16"])
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--no-compile", action="store_true")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; times are medians of {args.reps} "
          f"interleaved repetitions; {time.strftime('%Y-%m-%d')}{header}")
    for m in args.models:
        bench_model(m, args.reps, not args.no_compile)
