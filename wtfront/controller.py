"""Gradual pruning to a cost target: a schedule says how far to go at each step, the solver how to get there."""

from __future__ import annotations

from .solver import METRICS, Solution, TargetError, solve, solve_keep

__all__ = ["METRICS", "Solution", "TargetError", "solve", "solve_keep"]
