"""Layers whose input is computed from no parameter: their input channels get a group of their own, not
prunable, so the axis is accounted for instead of silently in no group.

EdgeNeXt's `PositionalEncodingFourier` computes a 64-channel Fourier encoding from the feature map's size alone
and projects it with a 1x1 conv: Torch-Pruning's graph has nothing upstream of that conv, so no walk reaches its
input channels. A layer reading a model input tensor itself (an RGB stem) keeps its input axis out of every
group, as before; one reading a parameter-free function of it (`x.flatten(1)` before an MLP) gets the group.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn as nn

from wtcore.ir import Slice, UnitGroup, runs_from_list

from .inputs import iter_tensors

__all__ = ["CONSTANT_INPUT_REASON", "constant_input_groups", "recording_constant_inputs"]

CONSTANT_INPUT_REASON = (
    "its input is computed from no parameter (a constant such as a positional encoding, or the model's input): "
    "no layer upstream can be pruned with these channels"
)


@contextmanager
def recording_constant_inputs(model: nn.Module, example_inputs: Any, found: set[nn.Module]) -> Iterator[None]:
    """While active, every Conv/Linear called on a tensor outside autograd's graph (no grad_fn, not requiring
    grad) that is not itself one of `example_inputs` is added to `found`. Parameters must require grad (as during
    Torch-Pruning's trace), so anything computed from them has a grad_fn."""
    model_inputs = {id(t) for t in iter_tensors(example_inputs)}

    def hook(m: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0] if args else None
        if isinstance(x, torch.Tensor) and x.grad_fn is None and not x.requires_grad and id(x) not in model_inputs:
            found.add(m)

    handles = [
        m.register_forward_pre_hook(hook)
        for m in model.modules()
        if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def constant_input_groups(
    modules: set[nn.Module], names: Mapping[int, str], canonical: Mapping[int, str], groups: list[UnitGroup]
) -> list[UnitGroup]:
    """One group per layer of `modules` whose input-channel axis no group holds: every channel a unit, not
    prunable (`CONSTANT_INPUT_REASON`). Grouped convs and transposed convs are left alone."""
    held = {(s.param, s.axis) for g in groups for s in g.slices}
    out = []
    for m in modules:
        name, w = names.get(id(m)), canonical.get(id(getattr(m, "weight", None)))
        if name is None or w is None:
            continue
        if isinstance(m, nn.modules.conv._ConvNd) and (m.groups != 1 or m.transposed):
            continue
        n = int(m.weight.shape[1])
        if (w, 1) in held or n < 2:
            continue
        kind = "channel" if isinstance(m, nn.modules.conv._ConvNd) else "feature"
        out.append(
            UnitGroup(
                f"{name}.in",
                kind,
                n,
                (Slice(w, 1, runs_from_list(list(range(n)))),),
                prunable=False,
                root=name,
                reason=CONSTANT_INPUT_REASON,
            )
        )
    return out
