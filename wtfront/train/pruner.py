"""Pruning inside someone else's training loop: the trainer-agnostic core of the Lightning and HF callbacks.

A trainer owns the loop, the optimizer, the loggers and the process group; wt only needs five moments of it:
the start (trace the model, build the `Controller` with a step schedule that ends within the run), the
optimizer step (add the group-lasso gradient, keep removed units at zero), the end of a step (let the
schedule prune, return metrics when the trainer logs), and the end (prune physically). `TrainingPruner`
is those five calls; a callback maps its trainer's hooks onto them and does nothing else.

The group-lasso term enters as a gradient (`lam * d group_lasso / d params`, added to `.grad` just before the
optimizer step) rather than through the user's loss: the trainer's loss is not ours to change, the
gradients are already unscaled and accumulated there, and under DDP every rank holds the same parameters,
so the term's gradient is the same everywhere and needs no all-reduce (`torch.autograd.grad` does not fire
DDP's gradient hooks). Every pruning decision is a function of the parameters, so ranks agree too.

Physical pruning replaces the pruned parameters by smaller ones. The optimizer is kept and re-pointed:
each new parameter takes its old one's place in the param groups, and per-element state (Adam's moments,
momentum buffers) is cut with the same element mask, so training continues as if the removed units had
never been there; learning-rate schedulers, which hold the optimizer, keep working.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn

import wtcore
from wtcore.errors import WtError
from wtcore.ir import Structure
from wtcore.masking import keep_from_removed, param_masks

from ..modules import effective_params
from ..prune.masks import view_zero_units
from ..tracing.entry import trace
from .controller import Controller, ControllerConfig, StepReport
from .tracker import WeightTracker

__all__ = ["PRUNE_AT", "TrainingPruner", "remap_optimizer"]

#: when physical pruning happens: at the end of training, as soon as the target is met, or never (fake only)
PRUNE_AT = ("end", "target", "never")
#: the cost metric each `target_*` keyword controls
TARGETS = {"target_macs": "macs", "target_params": "params", "target_bops": "bops"}
#: the tracker whose ratio reports each metric
RATIO_TRACKERS = {"macs": "active_macs", "params": "active_params", "bops": "structured_bops"}


def _to_device(inputs: Any, device: torch.device) -> Any:
    if isinstance(inputs, torch.Tensor):
        return inputs.to(device)
    if isinstance(inputs, Mapping):
        return {k: _to_device(v, device) for k, v in inputs.items()}
    if isinstance(inputs, (list, tuple)):
        return type(inputs)(_to_device(v, device) for v in inputs)
    return inputs


def remap_optimizer(optimizer: torch.optim.Optimizer, old: Mapping[str, nn.Parameter], model: nn.Module,
                    masks: Mapping[str, torch.Tensor]) -> int:
    """Point `optimizer` at `model`'s parameters after physical pruning, cutting per-element state.

    `old`: the parameters by name before pruning; `masks`: their element keep-masks (`param_masks`). A state
    tensor shaped like its old parameter becomes `state[mask]` in the new shape (the pruned parameter is the
    same sub-tensor, in order); other state (step counts) is kept. Returns how many parameters were replaced.
    """
    replaced = 0
    for name, p_old in old.items():
        p_new = model.get_parameter(name)
        if p_new is p_old:
            continue
        found = False
        for group in optimizer.param_groups:
            for i, p in enumerate(group["params"]):
                if p is p_old:
                    group["params"][i] = p_new
                    found = True
        if not found:
            continue
        replaced += 1
        state = optimizer.state.pop(p_old, None)
        if not state:
            continue
        mask = masks.get(name)
        new_state: dict[str, Any] = {}
        for k, v in state.items():
            if isinstance(v, torch.Tensor) and v.shape == p_old.shape and v.dim() > 0:
                if mask is None or int(mask.sum()) != p_new.numel():
                    raise WtError(f"optimizer state {k!r} of {name!r} ({tuple(v.shape)}) cannot be cut to the pruned "
                                  f"shape {tuple(p_new.shape)}: the element mask does not match")
                v = v[mask.to(v.device)].reshape(p_new.shape).clone()
            new_state[k] = v
        optimizer.state[p_new] = new_state
    return replaced


class TrainingPruner:
    """Group lasso, gradual pruning to a cost target and physical pruning, driven by a trainer's hooks.

    Args:
        example_inputs: what the model's forward takes (a tensor, a tuple, a mapping of keyword arguments);
            moved to the model's device for tracing.
        target_macs / target_params / target_bops: exactly one: the final cost as a fraction of the dense
            model's (0.6 = 60% of the MACs).
        group_lasso: the weight of the group-lasso term (0: none, the default; e.g. 1e-4 to pull whole units
            to zero before and while they are pruned).
        schedule: "cubic", "linear" or "geometric"; `start` / `end`: where the pruning steps run, as
            fractions of the run's optimizer steps (the last pruning step is at `end`, so the rest is
            fine-tuning); `prunes`: about how many pruning steps.
        prune_at: "end" (physically at the end of training), "target" (as soon as the target is met; the
            optimizer is re-pointed and training goes on with the smaller model) or "never" (fake-pruned only).
        trackers: `create_tracker` kinds logged besides the controlled cost's ratio.
        prefix: the metric keys' prefix.
        submodule: the attribute path of the module to prune inside the trainer's model (e.g. "model" for a
            LightningModule that holds its network in `self.model`); default the model itself.
        trace_options: passed to `wtfront.trace` (ignore=, root_types=, ...).
        **controller: `ControllerConfig` options: importance, scope, max_fraction, round_to, groups, seed,
            weight_bits, act_bits.
    """

    def __init__(self, example_inputs: Any, *, target_macs: float | None = None, target_params: float | None = None,
                 target_bops: float | None = None, group_lasso: float = 0.0, schedule: str = "cubic",
                 start: float = 0.2, end: float = 0.7, prunes: int = 8, prune_at: str = "end",
                 trackers: Sequence[str] = (), prefix: str = "wt/", submodule: str | None = None,
                 trace_options: Mapping[str, Any] | None = None, **controller: Any) -> None:
        given = {k: v for k, v in (("target_macs", target_macs), ("target_params", target_params),
                                   ("target_bops", target_bops)) if v is not None}
        if len(given) != 1:
            raise WtError(f"give exactly one of target_macs=, target_params=, target_bops= (got {sorted(given)}); "
                          "e.g. target_macs=0.6 keeps 60% of the dense model's MACs")
        (key, target), = given.items()
        if prune_at not in PRUNE_AT:
            raise WtError(f"prune_at must be one of {PRUNE_AT}, got {prune_at!r}")
        if not 0.0 <= start <= end <= 1.0:
            raise WtError(f"start and end are fractions of the run with 0 <= start <= end <= 1, got {start}, {end}")
        if isinstance(group_lasso, bool) or not isinstance(group_lasso, (int, float)) or group_lasso < 0:
            raise WtError(f"group_lasso is the weight of the group-lasso term (>= 0), got {group_lasso!r}")
        if not isinstance(prunes, int) or prunes < 1:
            raise WtError(f"prunes is the number of pruning steps (>= 1), got {prunes!r}")
        self.example_inputs = example_inputs
        self.metric = TARGETS[key]
        self.target = float(target)
        self.lam = float(group_lasso)
        self.kind, self.start, self.end, self.prunes = schedule, start, end, prunes
        self.prune_at = prune_at
        self.trackers = tuple(trackers)
        self.prefix = prefix
        self.submodule = submodule
        self.trace_options = dict(trace_options or {})
        self.controller_options = controller
        ControllerConfig.make(self.target, kind=schedule, metric=self.metric, **controller)  # fail early
        self.model: nn.Module | None = None
        self.structure: Structure | None = None
        self.controller: Controller | None = None
        self.tracker: WeightTracker | None = None
        self.total_steps = 0
        self.last_report: StepReport | None = None
        self._hooks: list[Any] = []
        self._reg: wtcore.Program | None = None
        self._inputs: Any = None

    # ------------------------------------------------------------------------------------------ setup
    @property
    def physically_pruned(self) -> bool:
        """The zeroed units were removed from the model."""
        return self.controller is not None and self.controller.done and self.controller.fake is None

    def setup(self, model: nn.Module, total_steps: int) -> TrainingPruner:
        """Trace `model` (or its `submodule`) and schedule the pruning steps within `total_steps` optimizer steps."""
        if self.submodule:
            try:
                model = model.get_submodule(self.submodule)
            except AttributeError as e:
                raise WtError(f"submodule={self.submodule!r}: the model has no such submodule ({e})") from None
        if not isinstance(total_steps, int) or total_steps < 1:
            raise WtError(f"the run has {total_steps!r} optimizer steps; set the trainer's max_epochs or max_steps")
        dist = torch.distributed
        if self.prune_at == "target" and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            raise WtError("prune_at='target' under DDP is not supported: DDP's gradient buckets hold the old "
                          "parameters; use prune_at='end' (the default)")
        self.model, self.total_steps = model, total_steps
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        self._inputs = _to_device(self.example_inputs, device)
        was_training = model.training
        model.eval()
        try:
            self.structure = trace(model, self._inputs, **self.trace_options)
        finally:
            model.train(was_training)
        last = max(total_steps - 1, 0)
        start, end = round(self.start * last), round(self.end * last)
        every = max(1, (end - start) // self.prunes)
        config = ControllerConfig.make(self.target, kind=self.kind, start=start, end=end, every=every, by="step",
                                       metric=self.metric, **self.controller_options)
        self.controller = Controller(config).bind(model, self.structure)
        self._compile()
        return self

    def _compile(self) -> None:
        assert self.model is not None and self.structure is not None
        self.tracker = WeightTracker(self.model, self._inputs, structure=self.structure)
        kinds = list(dict.fromkeys([RATIO_TRACKERS[self.metric], *self.trackers]))
        self.tracker.create_tracker(kinds, per_group=False)
        self._reg = wtcore.compile(self.structure, ["group_lasso"])

    def attach(self, optimizers: Iterable[torch.optim.Optimizer]) -> None:
        """Keep removed units at zero after every step of these optimizers (unwrapped torch optimizers)."""
        ctrl = self._ctrl()
        for opt in optimizers:
            self._hooks.append(ctrl.attach(opt))

    def _ctrl(self) -> Controller:
        if self.controller is None:
            raise WtError("the pruner is not set up: setup(model, total_steps) runs at the start of training")
        return self.controller

    # ------------------------------------------------------------------------------------------ steps
    def add_group_lasso_grad(self) -> float | None:
        """Add `group_lasso * d(group lasso)/d(params)` to the parameters' `.grad` (call after backward, before
        the optimizer step, once per step); returns the group lasso's value (None when the weight is 0)."""
        if self._reg is None or self.lam == 0.0 or self.physically_pruned:
            return None
        assert self.model is not None and self.structure is not None
        leaves = [p for p in self.model.parameters() if p.requires_grad]
        with torch.enable_grad():
            value = self._reg(effective_params(self.model, self.structure))["group_lasso"]
            grads = torch.autograd.grad(self.lam * value, leaves, allow_unused=True)
        for p, g in zip(leaves, grads):
            if g is None:
                continue
            if p.grad is None:
                p.grad = g.detach().clone()
            else:
                p.grad.add_(g.to(p.grad.dtype))
        return float(value.detach())

    def step(self, t: int, optimizers: Iterable[torch.optim.Optimizer] = ()) -> StepReport | None:
        """After optimizer step `t` (0-based count of completed steps minus one is fine: times repeat harmlessly):
        prune when the schedule says so; with prune_at="target", prune physically once the target is met."""
        ctrl = self._ctrl()
        if ctrl.fake is None:  # already physically pruned
            return None
        report = ctrl.step(t)
        if report.pruned:
            self.last_report = report
        if report.physical_prune_due and self.prune_at == "target":
            self.prune(optimizers)
        return report

    def finish(self, optimizers: Iterable[torch.optim.Optimizer] = ()) -> Structure | None:
        """At the end of training: finish the schedule if the run stopped early, and prune physically unless
        prune_at="never". Returns the pruned structure (None when nothing was pruned physically)."""
        ctrl = self._ctrl()
        if ctrl.fake is None:
            return None
        if not ctrl.done:
            self.last_report = ctrl.step(max(ctrl.schedule.end, (ctrl.history[-1]["t"] + 1) if ctrl.history else 0))
        if self.prune_at == "never":
            return None
        return self.prune(optimizers)

    def prune(self, optimizers: Iterable[torch.optim.Optimizer] = ()) -> Structure:
        """Remove the zeroed units physically and re-point `optimizers` (state cut to the kept elements)."""
        ctrl = self._ctrl()
        assert self.model is not None and self.structure is not None
        structure, model = self.structure, self.model
        removed = {g: (us[1:] if len(us) >= structure.group_map[g].size else us)
                   for g, us in view_zero_units(model, structure).items() if structure.group_map[g].prunable}
        removed = {g: us for g, us in removed.items() if us}
        masks = param_masks(structure, keep_from_removed(structure, removed))
        old = {p.name: model.get_parameter(p.name) for p in structure.params}
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self.structure = ctrl.prune(self._inputs, trace_kwargs=self.trace_options)
        for opt in optimizers:
            remap_optimizer(opt, old, model, masks)
        self._compile()
        return self.structure

    # ------------------------------------------------------------------------------------------ metrics
    def metrics(self) -> dict[str, float]:
        """The trackers' values (the controlled cost's ratio among them), the scheduled ratio and the group
        lasso of the current parameters, under `prefix` (Python floats)."""
        if self.tracker is None or self.controller is None:
            return {}
        out = {f"{self.prefix}{k}": v for k, v in self.tracker.track().items()}
        ctrl = self.controller
        hist = ctrl.history
        out[f"{self.prefix}target"] = ctrl.config.target if ctrl.done else hist[-1]["target"] if hist else 1.0
        assert self._reg is not None and self.model is not None and self.structure is not None
        with torch.no_grad():
            value = self._reg(effective_params(self.model, self.structure))["group_lasso"]
        out[f"{self.prefix}group_lasso"] = float(value)
        return out

