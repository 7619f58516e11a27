"""Gradient-side channel decay: Torch-Pruning's sparse-training `regularize()` on the IR.

After `loss.backward()`, `decay.step()` adds `reg * gamma_u * w` to the `.grad` of every element of every
coupled slice of unit `u` (an element of several units gets the sum of their coefficients; an element that
two slices give the same unit gets it once). That is the gradient of `reg / 2 * sum_u gamma_u * ||u||^2`, a
per-unit weight decay that pushes less important units harder:

- `rule="depgraph"` (`GroupNormPruner.regularize`, the sparse-training mode of Torch-Pruning's README):
  `gamma_u = alpha ** ((max - s_u) / (max - min))` within each group, `s` the unit L2 norm recomputed at
  every step, so a group's strongest unit decays at `reg` and its weakest at `alpha * reg`;
- `rule="growing"` (`GrowingRegPruner`, Wang et al. 2021): `reg * gamma` starts at `reg` for every unit and
  each `update_reg()` adds `delta_reg * (max - ||u||^2) / (max - min + 1e-8)` within each group;
- `rule="uniform"`: `gamma = 1` (plain weight decay restricted to prunable units).

Differences from Torch-Pruning, on purpose: every coupled slice is decayed (conv/linear out- and in-channels,
normalization weights, and any other parameter the IR couples to the unit, e.g. LayerNorm or embeddings;
exclude them with `ignore=`); the importance `s` is the unit norm over all its coupled elements (Torch-Pruning
averages per-layer norms of weights only: the same order within a plain conv group); a group whose units
are all equal gets gamma 1 instead of NaN; and `GrowingRegPruner` never decays BatchNorm weights because it
adds to an indexed copy of the gradient, which wt does not reproduce.

Works under `DistributedDataParallel`: call `step()` after `backward()` returns (gradients are all-reduced by
then); every rank computes gamma from the same parameters and adds the same term, so ranks stay identical.
The per-step work is one importance program (one fused pass over the parameters) and, per parameter, one
gather of gamma per slice and one `addcmul_` into the gradient: index tensors are built once.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn as nn

import wtcore
from wtcore.errors import WtError
from wtcore.ir import Structure
from wtcore.specs.regularizers import ParamDecay, decay_coefficients, decay_plan, plan_to

from ..modules import effective_params

__all__ = ["RULES", "ChannelDecay"]

RULES = ("depgraph", "growing", "uniform")


def _unwrap(model: nn.Module) -> nn.Module:
    """The module under DistributedDataParallel / DataParallel (same parameter objects)."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def _add_decay(p: torch.Tensor, d: ParamDecay, ext: torch.Tensor) -> None:
    """`p.grad += coefficient * p`, the coefficient being the sum of one broadcast gamma view per slice.
    When that sum would be as large as the weight (a 1x1 conv or a linear with two sliced axes), each view
    is applied by its own `addcmul_` instead of materializing it; otherwise the small sum is built once."""
    views = [ext.index_select(0, idx).reshape(view) for idx, view in d.terms]
    grad = p.grad
    if d.overlap is not None:
        grad.addcmul_(p, decay_coefficients([d], ext[:-1])[d.name].to(grad.dtype))
        return
    size = math.prod(torch.broadcast_shapes(*(v.shape for v in views)))
    if len(views) > 1 and 2 * size <= p.numel():
        views = [sum(views[1:], views[0])]
    for v in views:
        grad.addcmul_(p, v.to(grad.dtype))


class ChannelDecay:
    """Adds `reg * gamma_u * w` to the gradients of unit `u`'s coupled elements; call `step()` after backward.

    Args:
        model: the traced model (or a DistributedDataParallel wrapping it).
        structure: its `Structure` (`wtfront.trace(model, x)`).
        reg: the base coefficient (Torch-Pruning's `reg`; its README suggests trying 5e-2, 5e-3 and 5e-4).
        rule: "depgraph", "growing" or "uniform" (see the module docstring).
        alpha: depgraph's largest gamma (Torch-Pruning's `regularize(alpha=2**4)`).
        delta_reg: growing's increment per `update_reg()`.
        bias: also decay biases (Torch-Pruning: `regularize(bias=False)` by default).
        include / ignore: parameter or module names / fnmatch globs, as for programs.
    """

    def __init__(self, model: nn.Module, structure: Structure, reg: float = 1e-4, rule: str = "depgraph",
                 alpha: float = 16.0, delta_reg: float = 1e-5, bias: bool = False,
                 include: Iterable[str] | None = None, ignore: Iterable[str] | None = None) -> None:
        if rule not in RULES:
            raise WtError(f"ChannelDecay: rule must be one of {RULES}, got {rule!r}")
        for what, v in (("reg", reg), ("delta_reg", delta_reg)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
                raise WtError(f"ChannelDecay: {what} must be a number >= 0, got {v!r}")
        if rule == "depgraph" and not (isinstance(alpha, (int, float)) and alpha >= 1):
            raise WtError(f"ChannelDecay: alpha must be >= 1 (the weakest unit's gamma), got {alpha!r}")
        self.model = _unwrap(model)
        self.structure = structure
        self.reg, self.rule, self.alpha, self.delta_reg = float(reg), rule, float(alpha), float(delta_reg)
        inc = tuple(include) if include is not None else None
        ign = tuple(ignore or ())
        self._plan = decay_plan(structure, inc, ign, bias=bias)
        if not self._plan:
            raise WtError("ChannelDecay: no parameter of a prunable group is selected (check include/ignore)")
        self._on: dict[torch.device, list[ParamDecay]] = {}
        self._params = self._stored_params()
        if rule == "depgraph":
            self._gamma_program = wtcore.compile(structure, wtcore.Spec("decay_gamma", alpha=self.alpha),
                                                 include=inc, ignore=ign)
        if rule == "growing":
            self._std_program = wtcore.compile(
                structure, wtcore.Spec("standardized_importance", base="unit_sumsq", eps=1e-8), include=inc,
                ignore=ign)
        prunable = torch.cat([torch.full((g.size,), g.prunable, dtype=torch.bool) for g in structure.groups])
        #: growing rule: reg * gamma per unit (the state `update_reg()` grows)
        self.coefficients = prunable.to(torch.float64) * self.reg

    def _stored_params(self) -> dict[str, nn.Parameter]:
        out = {}
        for d in self._plan:
            try:
                out[d.name] = self.model.get_parameter(d.name)
            except AttributeError:
                raise WtError(f"ChannelDecay: parameter {d.name!r} of the structure is not in the model; was it "
                              "changed (physically pruned, reparametrized) after tracing? trace it again") from None
            if tuple(out[d.name].shape) != d.shape:
                raise WtError(f"ChannelDecay: parameter {d.name!r} has shape {tuple(out[d.name].shape)}, the "
                              f"structure says {d.shape}; the model was pruned: trace it again")
        return out

    # ------------------------------------------------------------------------------ per step
    @torch.no_grad()
    def unit_coefficients(self) -> torch.Tensor:
        """`reg * gamma` per unit, float64 `[num_units]`, for the current parameters."""
        if self.rule == "depgraph":
            return self._gamma_program(effective_params(self.model, self.structure))["decay_gamma"] * self.reg
        return self.coefficients

    @torch.no_grad()
    def step(self) -> None:
        """Add the decay to the gradients (parameters without a gradient are skipped, as in Torch-Pruning)."""
        coef = self.unit_coefficients()
        device = next(iter(self._params.values())).device
        plan = self._on.get(device)
        if plan is None:
            plan = self._on[device] = plan_to(self._plan, device)
        dtype = torch.float64 if any(p.dtype == torch.float64 for p in self._params.values()) else torch.float32
        ext = torch.cat([coef.to(device, dtype), torch.zeros(1, device=device, dtype=dtype)])
        for d in plan:
            p = self._params[d.name]
            if p.shape != d.shape:
                raise WtError(f"ChannelDecay: parameter {d.name!r} has shape {tuple(p.shape)}, the structure says "
                              f"{d.shape}; after physical pruning, build a new decay on the re-traced structure")
            if p.grad is not None:
                _add_decay(p, d, ext)

    __call__ = step

    @torch.no_grad()
    def update_reg(self) -> None:
        """Growing rule: raise every unit's coefficient by `delta_reg` times its standardized weakness."""
        if self.rule != "growing":
            raise WtError(f"ChannelDecay.update_reg() is for rule='growing'; this decay uses rule={self.rule!r}")
        std = self._std_program(effective_params(self.model, self.structure))["standardized_importance"]
        self.coefficients = self.coefficients + self.delta_reg * std.cpu()

    # ------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs (the growing coefficients; the other rules are stateless)."""
        return {"rule": self.rule, "reg": self.reg, "coefficients": self.coefficients.clone(),
                "fingerprint": self.structure.fingerprint}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("fingerprint") != self.structure.fingerprint or state.get("rule") != self.rule:
            raise WtError("ChannelDecay.load_state_dict: the state belongs to another structure or rule; build the "
                          "decay for the structure it was saved with")
        self.coefficients = torch.as_tensor(state["coefficients"], dtype=torch.float64).clone()
