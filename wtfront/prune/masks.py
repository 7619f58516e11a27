"""Masks on a live model (fake pruning).

`apply_masks` zeroes, in place, every parameter entry coupled to a removed unit — conv filters, biases, norm
affine entries, the next layers' input slices, every branch of a residual add, the right entries of grouped
convolutions — exactly the entries the IR's slices name. `FakePruning.reapply()` (or `attach(optimizer)`, an
optimizer step hook) keeps them zero through training.

Normalization running statistics are left alone on purpose. A BatchNorm channel whose weight and bias are
zero outputs exactly 0 in train and eval mode whatever its running mean and variance, and Torch-Pruning
removes those statistics with the channel, so the fake-pruned and the physically pruned model compute the
same function; keeping the statistics also makes undoing a mask lossless.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn

import wtcore
from wtcore.checks import require_finite
from wtcore.errors import WtError
from wtcore.ir import Structure
from wtcore.masking import as_unit_vector, keep_from_removed, param_masks, removed_by_group
from wtcore.policy import warn_narrow
from wtcore.sharded import placed_like

from ..modules import effective_params

__all__ = ["FakePruning", "apply_masks", "as_keep", "view_zero_units"]


def as_keep(structure: Structure, units: Any) -> torch.Tensor:
    """A `[num_units]` keep-mask from a bool keep tensor or `{group: unit indices to remove}`."""
    if isinstance(units, torch.Tensor):
        if units.dtype != torch.bool:
            raise WtError(f"a unit mask must be a bool keep-mask (True = keep), got dtype {units.dtype}")
        return as_unit_vector(structure, units, torch.bool, what="unit mask")
    if isinstance(units, Mapping):
        return keep_from_removed(structure, units)
    raise WtError(f"units must be a [num_units] bool keep-mask or {{group: indices to remove}}, got {type(units)}")


def _param_name_of(key: str, structure: Structure) -> str | None:
    """A program output key (`"spec/param"`) or a parameter name -> the canonical name (None for `units`)."""
    if key in structure.param_map:
        return key
    tail = key.split("/", 1)[1] if "/" in key else key
    if tail in structure.param_map:
        return tail
    if tail == "units" or key == "units":
        return None
    for p in structure.params:
        if tail in p.aliases:
            return p.name
    raise WtError(f"mask {key!r} names no parameter of the structure")


class FakePruning:
    """Masks applied in place to a live model. Call `reapply()` after every `optimizer.step()` (or `attach`
    the optimizer once) so that removed entries stay exactly zero while the rest trains.

    `keep` is the combined unit keep-mask (all True when only element masks were given); `masks` the
    element keep-mask of every parameter that loses an entry, by canonical name.
    """

    def __init__(self, model: nn.Module, structure: Structure) -> None:
        self.model = model
        self.structure = structure
        self.keep = torch.ones(structure.num_units, dtype=torch.bool)
        self.masks: dict[str, torch.Tensor] = {}  # on the CPU; `_drop` caches ~mask on each parameter's device
        self._drop: dict[str, torch.Tensor] = {}
        self._hooks: list[Any] = []

    def update(self, keep: Any = None, masks: Mapping[str, torch.Tensor] | None = None) -> FakePruning:
        """AND more masks into this one (a unit keep-mask and/or element masks) and zero what they remove."""
        new: dict[str, torch.Tensor] = {}
        if keep is not None:
            k = as_keep(self.structure, keep)
            self.keep = self.keep & k
            new.update(param_masks(self.structure, k))
        for key, m in (masks or {}).items():
            name = _param_name_of(key, self.structure)
            if name is None:
                self.keep = self.keep & as_keep(self.structure, m)
                new_units = param_masks(self.structure, as_keep(self.structure, m))
                for n, mm in new_units.items():
                    new[n] = new[n] & mm if n in new else mm
                continue
            shape = self.structure.param_map[name].shape
            if tuple(m.shape) != shape:
                raise WtError(f"mask for {name!r} has shape {tuple(m.shape)}, the parameter has {shape}")
            mm = m.detach().to("cpu", torch.bool)
            new[name] = new[name] & mm if name in new else mm
        for name, m in new.items():
            self.masks[name] = self.masks[name] & m if name in self.masks else m
            self._drop.pop(name, None)
        self.reapply()
        return self

    def _target(self, name: str) -> torch.Tensor:
        try:
            return self.model.get_parameter(name)
        except AttributeError:
            raise WtError(f"parameter {name!r} is no longer in the model (pruned or re-parametrized?)") from None

    @torch.no_grad()
    def reapply(self) -> None:
        """Zero every masked entry again (in place, on the stored tensors: `weight_orig` under nn.utils.prune)."""
        for name, m in self.masks.items():
            p = self._target(name)
            if tuple(p.shape) != tuple(m.shape):
                raise wtcore.StaleProgramError(
                    f"{name!r} has shape {tuple(p.shape)} but the mask was made for {tuple(m.shape)}: the model "
                    "was physically pruned; masks of the old structure no longer apply"
                )
            drop = self._drop.get(name)
            if drop is None or drop.device != p.device or type(drop) is not type(p):
                drop = self._drop[name] = placed_like((~m).to(p.device), p)  # a DTensor's part stays local
            p.masked_fill_(drop, 0)

    def attach(self, optimizer: torch.optim.Optimizer) -> Any:
        """Re-apply after every `optimizer.step()` (an optimizer step post-hook); returns the hook handle."""
        handle = optimizer.register_step_post_hook(lambda *_args, **_kwargs: self.reapply())
        self._hooks.append(handle)
        return handle

    def detach(self) -> None:
        """Remove the optimizer hooks (the zeros stay; they are simply no longer enforced)."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def removed(self) -> dict[str, list[int]]:
        """Units removed by the unit masks, by group."""
        return removed_by_group(self.structure, self.keep)


def apply_masks(
    model: nn.Module, structure: Structure, keep: Any = None, masks: Mapping[str, torch.Tensor] | None = None,
    *, warn: bool = True,
) -> FakePruning:
    """Fake-prune `model` in place: `keep` is a `[num_units]` bool keep-mask (e.g. the output of an
    `ln_structured` program) or `{group: unit indices to remove}`; `masks` are element keep-masks by
    parameter name (e.g. the outputs of an `l1_unstructured` or `nm` program, keys `"spec/param"` accepted).
    Returns the `FakePruning` handle that re-applies them. A structured mask is a program output, computed
    where nothing may warn, so its `NarrowGroupWarning` (`wtcore.policy`, as `solve_keep` gives) comes here,
    when the unit mask is applied: one warning naming the groups left below 10% of their width
    (`warn=False` silences it)."""
    if keep is None and masks is None:
        raise WtError("apply_masks needs keep= (a unit mask) and/or masks= (element masks)")
    fake = FakePruning(model, structure).update(keep, masks)
    if warn:
        warn_narrow(structure, fake.keep.numpy())
    return fake


def view_zero_units(model: nn.Module, structure: Structure, tolerance: float = 0.0) -> dict[str, list[int]]:
    """Units whose every coupled element has |w| <= tolerance (effective weights), by group; groups without
    such units are left out."""
    prog = wtcore.compile(structure, [wtcore.Spec("unit_active", tolerance=float(tolerance))])
    with torch.no_grad():
        params = effective_params(model, structure)
        require_finite(params, "view_zero_units")  # a NaN unit is neither zero nor active
        active = prog(params)["unit_active"].cpu()
    return removed_by_group(structure, active)

