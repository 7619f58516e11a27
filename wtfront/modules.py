"""nn.Module helpers that every part of wtfront shares: the module owning a parameter name, Hugging Face's
`Conv1D`, canonical parameter names, and the effective value of a parameter under torch's reparametrizations.

`trace` names a parameter by the tensor the model stores: `conv.weight_orig` under `torch.nn.utils.prune`,
`conv.parametrizations.weight.original` under `torch.nn.utils.parametrize`. The effective weight is
`weight_orig * weight_mask` or the parametrization's output; `effective_params` returns those under the
structure's canonical names, so a program measures what the forward pass uses (and its gradient flows
back to the stored tensors).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from wtcore.errors import WtError
from wtcore.ir import Slice, Structure, UnitGroup

__all__ = [
    "canonical_names",
    "effective_getter",
    "effective_getters",
    "effective_params",
    "in_parametrization",
    "is_hf_conv1d",
    "owner",
    "reparametrized_params",
    "slice_modules",
]

_PARAMETRIZED = ".parametrizations."


def owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """(module, attribute) of a qualified parameter or buffer name: `"layer1.0.conv1.weight"` ->
    (`model.layer1[0].conv1`, `"weight"`)."""
    path, _, leaf = name.rpartition(".")
    return (model.get_submodule(path) if path else model), leaf


def slice_modules(model: nn.Module, structure: Structure, g: UnitGroup) -> Iterator[tuple[Slice, str, nn.Module]]:
    """(slice, module name, module) for each slice of `g` whose owning module the model still has."""
    for s in g.slices:
        name = structure.param_map[s.param].module
        try:
            yield s, name, (model.get_submodule(name) if name else model)
        except AttributeError:
            continue


def canonical_names(model: nn.Module) -> dict[int, str]:
    """id(tensor) -> its canonical name: the first of `named_parameters(remove_duplicate=False)`, so a tied
    weight has one name (the one `trace` gives it)."""
    out: dict[int, str] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        out.setdefault(id(p), n)
    return out


def is_hf_conv1d(m: object) -> bool:
    """Hugging Face's `transformers.pytorch_utils.Conv1D`, recognized without importing transformers: a linear
    layer computing `x @ weight + bias` with `weight` of shape [in, out] and `nf` out features."""
    if type(m).__name__ != "Conv1D":
        return False
    w = getattr(m, "weight", None)
    return (isinstance(m, nn.Module) and isinstance(getattr(m, "nf", None), int)
            and isinstance(w, torch.Tensor) and w.dim() == 2 and w.shape[1] == m.nf)


def in_parametrization(name: str) -> bool:
    """A name under `torch.nn.utils.parametrize` (`conv.parametrizations.weight.original`, ...)."""
    return _PARAMETRIZED in f".{name}"


def effective_getter(model: nn.Module, name: str) -> Callable[[], torch.Tensor]:
    """A function returning the tensor the forward pass uses for the stored parameter `name` (a canonical or
    plain name): the modules are looked up once, the value is read at every call, so a tracker can call it
    every step. Raises AttributeError for a name the model does not have."""
    if in_parametrization(name) and name.endswith(".original"):
        owner_path, _, rest = f".{name}".rpartition(_PARAMETRIZED)
        module = model.get_submodule(owner_path[1:]) if owner_path[1:] else model
        leaf = rest.split(".")[0]
        if parametrize.is_parametrized(module, leaf):
            return lambda: getattr(module, leaf)  # recomputed on access, differentiable w.r.t. the original
    module, leaf = owner(model, name)
    if leaf.endswith("_orig"):
        mask = leaf.removesuffix("_orig") + "_mask"
        if module._buffers.get(mask) is not None:
            return lambda: module._parameters[leaf] * module._buffers[mask]
    p = model.get_parameter(name)
    return lambda: p


def effective_params(model: nn.Module, structure: Structure | None = None) -> dict[str, torch.Tensor]:
    """Effective weights keyed by the structure's canonical parameter names (all of `structure.params`), or by
    `named_parameters()` names when no structure is given. Plain parameters are returned as they are."""
    names = [p.name for p in structure.params] if structure is not None else [n for n, _ in model.named_parameters()]
    return {n: get() for n, get in effective_getters(model, names).items()}


def effective_getters(model: nn.Module, names: list[str]) -> dict[str, Callable[[], torch.Tensor]]:
    """`effective_getter` of every name; a name the model lacks raises a `WtError` that says to trace again."""
    out: dict[str, Callable[[], torch.Tensor]] = {}
    for n in names:
        try:
            out[n] = effective_getter(model, n)
        except AttributeError:
            raise WtError(
                f"parameter {n!r} of the structure is not in the model; was the model changed (pruned, "
                "reparametrized) after tracing? trace it again"
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
