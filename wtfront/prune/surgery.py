"""Physical pruning cut from the IR itself, for the groups Torch-Pruning cannot prune: attention heads (and
head dimensions), layers of Hugging Face's `Conv1D` and fused gate/up layers. Every slice keeps the entries of
kept units."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
import torch.nn as nn

from wtcore.errors import WtError
from wtcore.ir import Structure

from ..modules import is_hf_conv1d, owner
from ..tracing.fused import is_gate_up_group
from ..tracing.units import HEAD_KINDS

__all__ = ["ir_surgery_groups", "remove_units"]


def ir_surgery_groups(model: nn.Module, structure: Structure, names: Iterable[str]) -> set[str]:
    """Groups among `names` that physical pruning cuts from the IR instead of through Torch-Pruning: head
    groups, groups with a `Conv1D` parameter (Torch-Pruning cannot prune those layers) and a gated MLP's
    features over a fused gate/up layer (Torch-Pruning ignores fused layers)."""
    conv_params: set[str] = set()
    for n, m in model.named_modules():
        if is_hf_conv1d(m):
            prefix = f"{n}." if n else ""
            conv_params.update(f"{prefix}{a}" for a in ("weight", "bias"))
    out = set()
    for gname in names:
        g = structure.group_map[gname]
        if g.kind in HEAD_KINDS or any(s.param in conv_params for s in g.slices) or is_gate_up_group(g, structure):
            out.add(gname)
    return out


@torch.no_grad()
def remove_units(model: nn.Module, structure: Structure, removed: Mapping[str, Iterable[int]]) -> None:
    """Physically remove units of head groups from the IR: every slice keeps the entries whose unit is kept
    (or -1), by `index_select`; each parameter is replaced by a new Parameter (same dtype, device and
    `requires_grad`) under every name it is reachable by. Module metadata is synced separately, except the
    head size of modules that lost head dims (`head_dim`/`attention_head_size`), which the shapes alone cannot
    tell from a change in head count; their attention scale is left at its original value."""
    cuts: dict[str, dict[int, torch.Tensor]] = {}
    for gname, us in removed.items():
        g = structure.group_map[gname]
        gone = torch.zeros(g.size + 1, dtype=torch.bool)
        gone[torch.as_tensor(sorted({int(u) for u in us}), dtype=torch.long)] = True
        for s in g.slices:
            if s.groups != 1:
                raise WtError(f"group {gname!r}: grouped slice of {s.param!r} cannot be cut from the IR")
            idx = s.index_tensor()
            drop = gone[torch.where(idx >= 0, idx, torch.full_like(idx, g.size))]
            prev = cuts.setdefault(s.param, {}).get(s.axis)
            cuts[s.param][s.axis] = drop if prev is None else prev | drop
        if g.kind == "head_dim":
            root = model.get_submodule(g.root) if g.root else model
            for attr in ("head_dim", "attention_head_size"):
                if isinstance(getattr(root, attr, None), int):
                    setattr(root, attr, g.size - int(gone[:-1].sum()))
    aliases = {p.name: (p.name, *p.aliases) for p in structure.params}
    for pname, axes in cuts.items():
        p = model.get_parameter(pname)
        t = p.detach()
        for axis, drop in axes.items():
            t = t.index_select(axis, (~drop).nonzero().flatten().to(t.device))
        new = nn.Parameter(t.clone(), requires_grad=p.requires_grad)
        for name in aliases.get(pname, (pname,)):
            mod, attr = owner(model, name)
            mod._parameters[attr] = new
