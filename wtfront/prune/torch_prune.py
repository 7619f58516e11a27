"""wt masks handed to `torch.nn.utils.prune`, for code that already prunes with torch's own masks."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn as nn
from torch.nn.utils import prune as torch_prune

from wtcore.errors import WtError
from wtcore.ir import Structure
from wtcore.masking import param_masks

from ..modules import in_parametrization, owner

__all__ = ["export_torch_prune"]


def export_torch_prune(
    model: nn.Module, structure: Structure, keep: torch.Tensor | None = None,
    masks: Mapping[str, torch.Tensor] | None = None,
) -> list[str]:
    """Install wt masks as `torch.nn.utils.prune.custom_from_mask` on the model: from a unit keep-mask (every
    coupled slice) and/or element masks by canonical parameter name. Every alias of a tied weight gets the
    mask. Only parameters that lose an element get one (an all-ones mask only doubles the state). A mask on
    top of an existing torch mask composes (torch's PruningContainer multiplies them). Returns the
    `module.attr` names pruned."""
    if keep is None and masks is None:
        raise WtError("export_torch_prune needs keep= (a unit keep-mask) or masks= (element masks by parameter)")
    combined: dict[str, torch.Tensor] = dict(param_masks(structure, keep)) if keep is not None else {}
    for name, m in (masks or {}).items():
        if name not in structure.param_map:
            raise WtError(f"mask for unknown parameter {name!r}")
        m = m.to(torch.bool).cpu()
        combined[name] = combined[name] & m if name in combined else m
    done = []
    for name, m in combined.items():
        if bool(m.all()):
            continue
        for alias in (name, *structure.param_map[name].aliases):
            if in_parametrization(alias):
                raise WtError(
                    f"{alias!r} is a parametrization's original; torch.nn.utils.prune cannot prune it. Remove the "
                    "parametrization first (parametrize.remove_parametrizations(..., leave_parametrized=True))"
                )
            module, leaf = owner(model, alias)
            attr = leaf[: -len("_orig")] if leaf.endswith("_orig") else leaf
            target = getattr(module, leaf)
            torch_prune.custom_from_mask(module, attr, m.to(device=target.device))
            done.append(f"{alias.rpartition('.')[0]}.{attr}".lstrip("."))
    return done
