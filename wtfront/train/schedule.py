"""Sparsity schedules: how much of a cost has been removed at time `t` (an epoch or an optimizer step).

A schedule runs from `initial` sparsity at `start` to `final` sparsity at `end`, pruning every `every` time
units (Zhu & Gupta 2017, "To prune, or not to prune", with `n = (end - start) / every` pruning steps):

- `cubic`: s(t) = final + (initial - final) * (1 - (t - start) / (end - start))**3, clamped to the range of
  the two — the formula of `torch.ao.pruning.CubicSL.sparsity_compute_fn` (fast at first, gentle at the end,
  when fewer units are left to absorb the loss);
- `linear`: s(t) = initial + (final - initial) * (t - start) / (end - start);
- `geometric`: the fraction kept falls by the same factor at every step,
  1 - s(t) = (1 - initial) * ((1 - final) / (1 - initial)) ** ((t - start) / (end - start)).

Sparsity here is the removed fraction of the controlled cost (MACs, BOPs or parameters): the controller
asks for a cost of `1 - s(t)` times the baseline. Before `start` the sparsity is `initial` (0 with
`initially_zero=True`, like CubicSL), after `end` it is `final`. Pruning happens at `start`,
`start + every`, ... and always at `end` (`steps()`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from wtcore.errors import WtError

__all__ = ["KINDS", "UNITS", "Schedule", "ScheduleError"]

#: Schedule shapes.
KINDS = ("cubic", "linear", "geometric")
#: What `t` counts.
UNITS = ("epoch", "step")


class ScheduleError(WtError):
    """An invalid schedule (kind, times or sparsities)."""


def _check_int(value: Any, what: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ScheduleError(f"schedule: {what} must be an int >= {low}, got {value!r}")
    return value


def _check_fraction(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise ScheduleError(f"schedule: {what} must be a sparsity in [0, 1], got {value!r}")
    return float(value)


@dataclass(frozen=True)
class Schedule:
    """Sparsity `s(t)` from `initial` at `start` to `final` at `end`, stepping every `every` `by`s."""

    final: float
    start: int = 0
    end: int = 0
    every: int = 1
    kind: str = "cubic"
    initial: float = 0.0
    by: str = "epoch"
    initially_zero: bool = False

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ScheduleError(f"schedule: kind must be one of {KINDS}, got {self.kind!r}")
        if self.by not in UNITS:
            raise ScheduleError(f"schedule: by must be one of {UNITS}, got {self.by!r}")
        _check_int(self.start, "start", 0)
        _check_int(self.end, "end", self.start)
        _check_int(self.every, "every", 1)
        object.__setattr__(self, "final", _check_fraction(self.final, "final"))
        object.__setattr__(self, "initial", _check_fraction(self.initial, "initial"))
        if self.initial > self.final:
            raise ScheduleError(f"schedule: initial sparsity {self.initial} exceeds final {self.final}; "
                                "sparsity only grows")
        if self.kind == "geometric" and self.final == 1.0 and self.initial < 1.0:
            raise ScheduleError("schedule: a geometric schedule cannot reach sparsity 1 (nothing kept); use final < 1")
        if not isinstance(self.initially_zero, bool):
            raise ScheduleError(f"schedule: initially_zero must be a bool, got {self.initially_zero!r}")

    # ------------------------------------------------------------------------------------------ values
    def progress(self, t: float) -> float:
        """(t - start) / (end - start), clamped to [0, 1] (1 from `start` on when start == end)."""
        if t < self.start:
            return 0.0
        if self.end == self.start or t >= self.end:
            return 1.0
        return (t - self.start) / (self.end - self.start)

    def sparsity(self, t: float) -> float:
        """The scheduled sparsity at time `t`."""
        if t < self.start:
            return 0.0 if self.initially_zero else self.initial
        p = self.progress(t)
        s0, sf = self.initial, self.final
        if p >= 1.0 or p <= 0.0:  # the endpoints exactly
            return sf if p >= 1.0 else s0
        if self.kind == "cubic":
            s = sf + (s0 - sf) * (1.0 - p) ** 3
        elif self.kind == "linear":
            s = s0 + (sf - s0) * p
        else:
            s = 1.0 - (1.0 - s0) * ((1.0 - sf) / (1.0 - s0)) ** p if s0 < 1.0 else 1.0
        return min(max(s, s0), sf)

    def keep(self, t: float) -> float:
        """The fraction of the cost kept at time `t`: 1 - sparsity(t)."""
        return 1.0 - self.sparsity(t)

    def is_step(self, t: int) -> bool:
        """Whether `t` is a pruning step: start, start + every, ..., and end."""
        return self.start <= t <= self.end and ((t - self.start) % self.every == 0 or t == self.end)

    def steps(self) -> list[int]:
        """Every pruning step, in order."""
        out = list(range(self.start, self.end + 1, self.every))
        return out if out[-1] == self.end else [*out, self.end]

    def next_step(self, t: int) -> int | None:
        """The first pruning step >= t (None after `end`)."""
        if t > self.end:
            return None
        if t <= self.start:
            return self.start
        k = math.ceil((t - self.start) / self.every)
        return min(self.start + k * self.every, self.end)

    # ------------------------------------------------------------------------------------------ units
    def in_steps(self, steps_per_epoch: int, every: int | None = None) -> Schedule:
        """This epoch schedule as a step schedule (epoch `e` = step `e * steps_per_epoch`) pruning every
        `every` steps (default: once per epoch as before; `every=1` prunes a little after every step)."""
        if self.by == "step":
            return self
        n = _check_int(steps_per_epoch, "steps_per_epoch", 1)
        return Schedule(self.final, self.start * n, self.end * n, self.every * n if every is None else every,
                        self.kind, self.initial, "step", self.initially_zero)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Schedule:
        allowed = set(cls.__dataclass_fields__)
        bad = sorted(set(d) - allowed)
        if bad:
            raise ScheduleError(f"schedule: unknown key(s) {bad}; allowed: {sorted(allowed)}")
        if "final" not in d:
            raise ScheduleError("schedule: 'final' (the final sparsity) is required")
        return cls(**d)
