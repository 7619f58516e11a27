"""Interop with PyTorch's own reparametrizations: read the weights a model really computes with, and hand wt
masks to `torch.nn.utils.prune`.

`trace` names a parameter by the tensor the model stores: `conv.weight_orig` under `torch.nn.utils.prune`,
`conv.parametrizations.weight.original` under `torch.nn.utils.parametrize`. The effective weight is
`weight_orig * weight_mask` or the parametrization's output; `effective_params` returns those under the
structure's canonical names, so a program measures what the forward pass uses (and its gradient flows
back to the stored tensors).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn as nn
from torch.nn.utils import parametrize
from torch.nn.utils import prune as torch_prune

from wtcore.errors import WtError
from wtcore.ir import Structure
from wtcore.masking import param_masks

__all__ = ["effective_params", "export_torch_prune", "reparametrized_params"]

_PARAMETRIZED = ".parametrizations."


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, leaf = name.rpartition(".")
    return (model.get_submodule(path) if path else model), leaf


def effective(model: nn.Module, name: str) -> torch.Tensor:
    """The tensor the forward pass uses for the stored parameter `name` (a canonical or plain name)."""
    if _PARAMETRIZED in f".{name}" and name.endswith(".original"):
        owner_path, _, rest = f".{name}".rpartition(_PARAMETRIZED)
        owner = model.get_submodule(owner_path[1:]) if owner_path[1:] else model
        leaf = rest.split(".")[0]
        if parametrize.is_parametrized(owner, leaf):
            return getattr(owner, leaf)  # recomputed on access, differentiable w.r.t. the original
    owner, leaf = _owner(model, name)
    if leaf.endswith("_orig"):
        mask = owner._buffers.get(leaf[: -len("_orig")] + "_mask")
        if mask is not None:
            return owner._parameters[leaf] * mask
    return model.get_parameter(name)


def effective_params(model: nn.Module, structure: Structure | None = None) -> dict[str, torch.Tensor]:
    """Effective weights keyed by the structure's canonical parameter names (all of `structure.params`), or by
    `named_parameters()` names when no structure is given. Plain parameters are returned as they are."""
    names = [p.name for p in structure.params] if structure is not None else [n for n, _ in model.named_parameters()]
    out: dict[str, torch.Tensor] = {}
    for n in names:
        try:
            out[n] = effective(model, n)
        except AttributeError:
            raise WtError(
                f"parameter {n!r} of the structure is not in the model; was the model changed (pruned, "
                "reparametrized) after tracing? re-trace it"
            ) from None
    return out


def reparametrized_params(model: nn.Module) -> list[str]:
    """Names of parameters stored under a torch reparametrization (nn.utils.prune or parametrize)."""
    out = []
    for mname, m in model.named_modules():
        for pname in m._parameters:
            if pname.endswith("_orig") and f"{pname[:-5]}_mask" in m._buffers:
                out.append(f"{mname}.{pname}" if mname else pname)
        if parametrize.is_parametrized(m):
            for k, plist in m.parametrizations.items():
                pre = f"{mname}.parametrizations.{k}" if mname else f"parametrizations.{k}"
                out.extend(f"{pre}.{n}" for n in plist._parameters)
    return out


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
            if _PARAMETRIZED in f".{alias}":
                raise WtError(
                    f"{alias!r} is a parametrization's original; torch.nn.utils.prune cannot prune it. Remove the "
                    "parametrization first (parametrize.remove_parametrizations(..., leave_parametrized=True))"
                )
            owner, leaf = _owner(model, alias)
            attr = leaf[: -len("_orig")] if leaf.endswith("_orig") else leaf
            target = getattr(owner, leaf)
            torch_prune.custom_from_mask(owner, attr, m.to(device=target.device))
            done.append(f"{alias.rpartition('.')[0]}.{attr}".lstrip("."))
    return done
