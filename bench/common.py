"""The shared command line of the benchmarks; the timing core (`interleaved_medians`, `once`) lives in
`wtfront.cli.benchmark` (also behind `wt bench`) and is re-exported here."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from wtfront.cli.benchmark import interleaved_medians, interleaved_times, once

__all__ = ["bench_main", "interleaved_medians", "interleaved_times", "once"]


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
