"""Gradual pruning to a cost target: a schedule says how far to go at each step, the solver how to get there.

`Controller` fake-prunes a live model step by step until a cost (MACs, BOPs or parameters) is at most
`target` x its baseline. At every pruning step of its `Schedule` it asks for `1 - sparsity(t)` of the
baseline cost, solves the keep-mask that reaches it on *this* structure with `solve_keep` (exactly, from
the cost model: units are taken by importance within the scope rules of the mask specs), and zeroes the
removed units in place (`FakePruning.update`; `attach(optimizer)` keeps them zero). When the final target is
met it stops and says that physical pruning is due and that the optimizer must be rebuilt (its parameters
are replaced); `prune()` does the first.

Its state is small and JSON-able (`state_dict()`/`load_state_dict()`): the time of the last step, the next
pruning step, the removed units by group and a history. Resuming after preemption with the model and
optimizer restored from the same checkpoint gives the same decisions: importance is computed from the
parameters, and `importance="random"` draws from `seed + t`. Steps at a time already handled are no-ops,
so a resumed loop may replay them. `Controller.from_config(path)` reads the options from JSON or TOML.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
import torch.nn as nn

from wtcore.errors import StaleProgramError, WtError
from wtcore.ir import Structure
from wtcore.masking import keep_from_removed, removed_by_group
from wtcore.policy import DEFAULT_NORMALIZE, check_normalize
from wtcore.solver import METRICS, TargetError, metric_ratio, solve

from ..modules import effective_params
from ..prune.masks import FakePruning, apply_masks
from ..prune.physical import prune_zero_units
from .schedule import Schedule, ScheduleError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: JSON configs only
    tomllib = None  # type: ignore[assignment]

__all__ = ["Controller", "ControllerConfig", "ControllerError", "StepReport"]

STATE_FORMAT = "wt.controller/1"


class ControllerError(WtError):
    """A controller used out of order (unbound, resumed on another structure) or misconfigured."""


# ============================================================================================ config
@dataclass(frozen=True)
class ControllerConfig:
    """What to prune to, when, and how to choose units.

    `target`: the final cost as a fraction of the baseline (0.5 = half the MACs). `schedule`: when and how
    fast (its `final` sparsity is `1 - target`). `importance`: a per-unit score spec name (`unit_l2`,
    `unit_l1`, `unit_linf`, ...) or "random"; tensors of scores are passed to `step(scores=...)`. `scope`,
    `normalize`, `max_fraction`, `round_to`, `groups`: as for the structured mask specs, with the defaults of
    `wtcore.policy` (mean-normalized scores ranked globally, at most 90% of any group removed).
    `weight_bits`/`act_bits`: for `metric="bops"`. `lossy`: also prune groups a normalization mixes
    (`UnitGroup.lossy`), which physical pruning then only carries out with `strict=False`.
    """

    target: float
    schedule: Schedule
    metric: str = "macs"
    importance: str = "unit_l2"
    scope: str = "global"
    max_fraction: float | None = None
    round_to: int | None = None
    groups: tuple[str, ...] | None = None
    seed: int = 0
    weight_bits: int = 32
    act_bits: int = 32
    normalize: str | None = DEFAULT_NORMALIZE
    lossy: bool = False

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ControllerError(f"controller: metric must be one of {METRICS}, got {self.metric!r}")
        t = self.target
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 < float(t) <= 1.0:
            raise ControllerError(f"controller: target must be a fraction of the baseline {self.metric} in (0, 1], "
                                  f"got {t!r}")
        if not isinstance(self.schedule, Schedule):
            raise ControllerError(f"controller: schedule must be a wtfront.Schedule, got {self.schedule!r}")
        if abs(self.schedule.final - (1.0 - float(t))) > 1e-12:
            raise ControllerError(f"controller: the schedule's final sparsity {self.schedule.final} is not "
                                  f"1 - target = {1.0 - float(t)}; build it with ControllerConfig.make")
        if not isinstance(self.importance, str):
            raise ControllerError("controller: importance must be a spec name or 'random' (pass score tensors to "
                                  f"step(scores=...)), got {type(self.importance).__name__}")
        if isinstance(self.groups, list):
            object.__setattr__(self, "groups", tuple(self.groups))
        try:
            check_normalize(self.normalize, "controller")
        except WtError as e:
            raise ControllerError(str(e)) from None

    @classmethod
    def make(cls, target: float, *, kind: str = "cubic", start: int = 0, end: int = 0, every: int = 1,
             by: str = "epoch", initial: float = 0.0, initially_zero: bool = False,
             **options: Any) -> ControllerConfig:
        """A config whose schedule runs from sparsity `initial` at `start` to `1 - target` at `end`."""
        if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0.0 < float(target) <= 1.0:
            raise ControllerError(f"controller: target must be a fraction of the baseline cost in (0, 1], "
                                  f"got {target!r}")
        sched = Schedule(1.0 - float(target), start, end, every, kind, initial, by, initially_zero)
        return cls(float(target), sched, **options)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["schedule"] = {k: v for k, v in self.schedule.to_dict().items() if k != "final"}
        d["groups"] = list(self.groups) if self.groups is not None else None
        return {k: v for k, v in d.items() if v is not None or k == "normalize"}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ControllerConfig:
        allowed = set(cls.__dataclass_fields__)
        bad = sorted(set(d) - allowed)
        if bad:
            raise ControllerError(f"controller config: unknown key(s) {bad}; allowed: {sorted(allowed)} "
                                  "(schedule keys go in a [schedule] table)")
        if "target" not in d:
            raise ControllerError("controller config: 'target' (the final cost / baseline, e.g. 0.5) is required")
        sched = d.get("schedule", {})
        if not isinstance(sched, Mapping):
            raise ControllerError(f"controller config: 'schedule' must be a table, got {sched!r}")
        if "final" in sched:
            raise ControllerError("controller config: the schedule's final sparsity is 1 - target; leave 'final' out")
        bad = sorted(set(sched) - set(Schedule.__dataclass_fields__))
        if bad:
            raise ControllerError(f"controller config: unknown schedule key(s) {bad}; allowed: "
                                  f"{sorted(set(Schedule.__dataclass_fields__) - {'final'})}")
        rest = {k: v for k, v in d.items() if k not in ("target", "schedule")}
        try:
            return cls.make(d["target"], **dict(sched), **rest)
        except TypeError as e:
            raise ControllerError(f"controller config: {e}") from None
        except ScheduleError as e:
            raise ControllerError(f"controller config: {e}") from None


def read_config(source: str | os.PathLike[str] | Mapping[str, Any]) -> ControllerConfig:
    """A `ControllerConfig` from a mapping or a `.json` / `.toml` file (keys as in `ControllerConfig`, the
    schedule in a `schedule` table; a `[controller]` table is also accepted)."""
    if isinstance(source, Mapping):
        d: Any = source
    else:
        path = os.fspath(source)
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except OSError as e:
            raise ControllerError(f"cannot read controller config {path!r}: {e}") from None
        if path.endswith(".toml") and tomllib is None:
            raise ControllerError(f"reading {path!r} needs tomllib (Python 3.11+); use a .json config")
        try:
            d = tomllib.loads(raw.decode()) if path.endswith(".toml") else json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            kind = "TOML" if path.endswith(".toml") else "JSON"
            raise ControllerError(f"controller config {path!r} is not valid {kind}: {e}") from None
    if not isinstance(d, Mapping):
        raise ControllerError(f"controller config must be a table/object, got {type(d).__name__}")
    if "controller" in d and isinstance(d["controller"], Mapping):
        d = d["controller"]
    return ControllerConfig.from_dict(d)


# ============================================================================================ reports
@dataclass(frozen=True)
class StepReport:
    """What one `step(t)` did.

    `pruned`: whether this was a pruning step; `target`: the scheduled cost / baseline at `t`; `ratio`: the
    cost / baseline after the step; `removed`: units removed at this step; `total_removed`: units removed so
    far; `done`: the final target is met; `physical_prune_due`: done and not yet pruned physically (call
    `Controller.prune`, then rebuild the optimizer: its parameters are replaced).
    """

    t: int
    pruned: bool
    target: float
    ratio: float | None
    removed: int
    total_removed: int
    done: bool
    physical_prune_due: bool

    @property
    def rebuild_optimizer(self) -> bool:
        """After physical pruning the parameters are new objects: optimizers must be re-created."""
        return self.physical_prune_due

    def __str__(self) -> str:
        r = "-" if self.ratio is None else f"{self.ratio:.4f}"
        msg = f"t={self.t}: target {self.target:.4f}, ratio {r}, removed {self.removed} (total {self.total_removed})"
        if self.physical_prune_due:
            msg += "; final target met: physical pruning is due, then rebuild the optimizer"
        return msg


@dataclass
class _State:
    last_t: int | None = None
    next_due: int | None = None
    done: bool = False
    physically_pruned: bool = False
    structure: str = ""
    removed: dict[str, list[int]] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)


# ============================================================================================ controller
class Controller:
    """Prunes a model gradually to `config.target` of its baseline cost (see the module docstring).

    ```
    ctrl = Controller(ControllerConfig.make(0.5, start=2, end=8)).bind(model, structure)
    ctrl.attach(optimizer)
    for epoch in range(epochs):
        train_one_epoch(...)
        report = ctrl.step(epoch)
        if report.physical_prune_due:
            structure = ctrl.prune(example_inputs); optimizer = make_optimizer(model)
    ```
    """

    def __init__(self, config: ControllerConfig | None = None, **options: Any) -> None:
        if config is None:
            if "target" not in options:
                raise ControllerError("Controller needs a ControllerConfig or target= (and schedule options)")
            config = ControllerConfig.make(**options)
        elif options:
            raise ControllerError(f"Controller: pass a config or options, not both (got {sorted(options)})")
        self.config = config
        self.schedule = config.schedule
        self._state = _State(next_due=config.schedule.start)
        self.model: nn.Module | None = None
        self.structure: Structure | None = None
        self.fake: FakePruning | None = None
        self._followers: list[Any] = []

    @classmethod
    def from_config(cls, source: str | os.PathLike[str] | Mapping[str, Any]) -> Controller:
        """A controller from a JSON or TOML file (or a mapping): see `read_config`."""
        return cls(read_config(source))

    # ------------------------------------------------------------------------------------------ binding
    def bind(self, model: nn.Module, structure: Structure) -> Controller:
        """Work on `model` (traced as `structure`); re-applies the units a restored state removed."""
        st = self._state
        if st.structure and st.structure != structure.fingerprint and not st.physically_pruned:
            raise ControllerError(
                f"the controller state was made on structure {st.structure}, not {structure.fingerprint}: "
                "bind the model traced the same way (before physical pruning)"
            )
        self.model, self.structure = model, structure
        if st.physically_pruned:  # nothing left to enforce: the removed units are gone from the model
            self.fake = None
            return self
        st.structure = structure.fingerprint
        keep = keep_from_removed(structure, st.removed) if st.removed else None
        self.fake = FakePruning(model, structure) if keep is None else apply_masks(model, structure, keep, warn=False)
        return self

    def follow(self, *trackers: Any) -> Controller:
        """`WeightTracker`s (or their `Regularizer`s) that `prune()` rebinds to the pruned structure, so their
        numbers and losses are those of the pruned model."""
        for t in trackers:
            t = getattr(t, "owner", t)
            if not callable(getattr(t, "rebind", None)):
                raise ControllerError(f"controller.follow: {type(t).__name__} has no rebind(structure); pass "
                                      "WeightTrackers or their regularizers")
            if t not in self._followers:
                self._followers.append(t)
        return self

    def attach(self, optimizer: torch.optim.Optimizer) -> Any:
        """Keep removed units at zero after every `optimizer.step()` (returns the hook handle)."""
        return self._fake().attach(optimizer)

    def _fake(self) -> FakePruning:
        if self._state.physically_pruned:
            raise ControllerError("the model was physically pruned: the controller has nothing left to do")
        if self.fake is None or self.model is None or self.structure is None:
            raise ControllerError("the controller is not bound to a model: call bind(model, structure) first")
        return self.fake

    # ------------------------------------------------------------------------------------------ stepping
    @property
    def done(self) -> bool:
        """The final target is met."""
        return self._state.done

    @property
    def physical_prune_due(self) -> bool:
        return self._state.done and not self._state.physically_pruned

    def target_at(self, t: int) -> float:
        """The scheduled cost / baseline at time `t`."""
        return self.schedule.keep(t)

    def step(self, t: int, scores: torch.Tensor | None = None) -> StepReport:
        """Advance to time `t` (an epoch or a step index, as the schedule counts) and prune if a pruning step
        is due (`t` at or past the next one). `scores`: per-unit importance for this step instead of the
        configured spec (e.g. Taylor scores from gradients). Times already handled are no-ops."""
        if isinstance(t, bool) or not isinstance(t, int) or t < 0:
            raise ControllerError(f"controller.step: t must be a non-negative int, got {t!r}")
        st = self._state
        total = sum(len(v) for v in st.removed.values())
        if st.physically_pruned:  # finished: later calls (the rest of fine-tuning) do nothing
            st.last_t = max(t, st.last_t or 0)
            return StepReport(t, False, self.target_at(t), None, 0, total, True, False)
        fake = self._fake()
        due = (not st.done and st.next_due is not None and t >= st.next_due
               and (st.last_t is None or t > st.last_t))
        if not due:
            if st.last_t is None or t > st.last_t:
                st.last_t = t
            return StepReport(t, False, self.target_at(t), None, 0, total, st.done, self.physical_prune_due)
        assert self.structure is not None and self.model is not None
        self._check_shapes()
        cfg = self.config
        # at the end, exactly the configured target (1 - (1 - target) may differ from it in the last bit)
        target = cfg.target if t >= self.schedule.end else max(self.target_at(t), cfg.target)
        params = {k: v.detach() for k, v in effective_params(self.model, self.structure).items()}
        importance: Any = scores if scores is not None else cfg.importance
        try:
            sol = solve(self.structure, params, target=target, metric=cfg.metric, importance=importance,
                        scope=cfg.scope, max_fraction=cfg.max_fraction, round_to=cfg.round_to, seed=cfg.seed + t,
                        groups=cfg.groups, weight_bits=cfg.weight_bits, act_bits=cfg.act_bits,
                        normalize=cfg.normalize, lossy=cfg.lossy)
        except TargetError as e:
            raise TargetError(f"controller step t={t} (target {target:.4f}): {e}") from None
        before = int((~fake.keep).sum())
        fake.update(sol.keep)
        ratio = metric_ratio(self.structure, effective_params(self.model, self.structure), cfg.metric,
                             cfg.weight_bits, cfg.act_bits)
        st.removed = {g: list(map(int, u)) for g, u in removed_by_group(self.structure, fake.keep).items()}
        new_total = sum(len(v) for v in st.removed.values())
        st.last_t = t
        st.next_due = self.schedule.next_step(t + 1)
        st.done = ratio <= cfg.target or st.next_due is None
        if st.next_due is None and ratio > cfg.target:  # the last step could not get there: never silent
            raise TargetError(f"controller: after the last pruning step (t={t}) the {cfg.metric} ratio is {ratio:.4f}"
                              f" > target {cfg.target}")
        st.history.append({"t": t, "target": target, "ratio": ratio, "removed": new_total - before})
        return StepReport(t, True, target, ratio, int((~fake.keep).sum()) - before, new_total, st.done,
                          self.physical_prune_due)

    def prune(self, example_inputs: Any, **options: Any) -> Structure:
        """Physically remove the zeroed units (`prune_zero_units`), once the target is met. Returns the new
        structure (baselines carried over). Rebuild the optimizer afterwards: the parameters are new objects."""
        fake = self._fake()
        if not self._state.done:
            raise ControllerError("controller.prune: the final target is not met yet; keep stepping")
        assert self.model is not None and self.structure is not None
        new = prune_zero_units(self.model, self.structure, example_inputs, **options)  # restores the model on failure
        fake.detach()  # only now: after a failure, training goes on with the masks enforced
        self._state.physically_pruned = True
        self.structure, self.fake = new, None
        for t in self._followers:
            t.rebind(new)
        return new

    def _check_shapes(self) -> None:
        """Refuse to decide on a model that was physically pruned behind the controller's back."""
        assert self.model is not None and self.structure is not None
        try:
            got = {k: tuple(v.shape) for k, v in effective_params(self.model, self.structure).items()}
        except WtError:
            got = {}
        bad = [p.name for p in self.structure.params if got.get(p.name) != tuple(p.shape)]
        if bad:
            raise StaleProgramError(
                f"controller: the model no longer has the shapes of the structure it was bound to ({bad[:3]}; "
                "physically pruned outside Controller.prune()?): build a new Controller and bind it to the "
                "re-traced model"
            )

    @property
    def history(self) -> list[dict[str, Any]]:
        """One entry per pruning step: t, target, ratio, removed."""
        return [dict(h) for h in self._state.history]

    # ------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The controller's state and config, JSON-able (`json.dumps` works)."""
        return {"format": STATE_FORMAT, "config": self.config.to_dict(), **asdict(self._state)}

    def load_state_dict(self, state: Mapping[str, Any]) -> Controller:
        """Restore a `state_dict()` (call before `bind`). The config must be the one the state was made with."""
        if not isinstance(state, Mapping) or state.get("format") != STATE_FORMAT:
            raise ControllerError(f"not a controller state (format {STATE_FORMAT!r} expected)")
        if state.get("config") != self.config.to_dict():
            raise ControllerError(f"the state was made with another config: {state.get('config')} != "
                                  f"{self.config.to_dict()}; build the controller from the same config")
        fields = {k: state[k] for k in _State.__dataclass_fields__ if k in state}
        self._state = replace(_State(), **fields)
        self._state.removed = {str(g): [int(u) for u in us] for g, us in self._state.removed.items()}
        self._state.history = [dict(h) for h in self._state.history]
        if self.model is not None and self.structure is not None:
            self.bind(self.model, self.structure)
        return self

