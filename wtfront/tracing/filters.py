"""Module selection for tracing: which modules are ignored, which module types root a unit group."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable

import torch.nn as nn

from wtcore.errors import TraceError

__all__ = ["DEFAULT_ROOT_TYPES", "IgnoreSpec", "resolve_ignored"]

#: Module types whose output channels/features root a unit group. Conv and Linear cover CNNs and MLPs;
#: MultiheadAttention, LayerNorm and Embedding root the hidden dimension of models that start with one
#: of them (text transformers) so that no coupled dimension is left without a group.
DEFAULT_ROOT_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.conv._ConvNd,  # Conv1d/2d/3d and ConvTranspose1d/2d/3d
    nn.Linear,
    nn.MultiheadAttention,
    nn.LayerNorm,
    nn.Embedding,
)

IgnoreSpec = nn.Module | type | str


def resolve_ignored(model: nn.Module, ignore: Iterable[IgnoreSpec] | IgnoreSpec) -> list[nn.Module]:
    """Expand `ignore` (module instances, module classes, qualified-name globs) to modules of `model`.

    Every submodule of an ignored module is ignored too (as in Torch-Pruning's MetaPruner), so that
    ignoring a block ignores all of its layers. The order follows `model.named_modules()`.
    """
    if isinstance(ignore, (nn.Module, str, type)):
        ignore = [ignore]
    instances: list[nn.Module] = []
    types: list[type] = []
    globs: list[str] = []
    for item in ignore:
        if isinstance(item, nn.Module):
            instances.append(item)
        elif isinstance(item, type) and issubclass(item, nn.Module):
            types.append(item)
        elif isinstance(item, str):
            globs.append(item)
        else:
            raise TraceError(
                f"cannot ignore {item!r} ({type(item).__name__}): pass module instances, nn.Module classes "
                "or qualified-name globs such as 'head' or 'blocks.*.attn'"
            )
    named = list(model.named_modules())
    known = {id(m) for _, m in named}
    for m in instances:
        if id(m) not in known:
            raise TraceError(f"ignored module {type(m).__name__} is not a submodule of the traced model")
    chosen_ids = {id(m) for m in instances}
    matched: set[str] = set()
    for name, m in named:
        hits = [g for g in globs if fnmatch.fnmatchcase(name, g)]
        matched.update(hits)
        if hits or isinstance(m, tuple(types)):
            chosen_ids.add(id(m))
    unmatched = [g for g in globs if g not in matched]
    if unmatched:
        raise TraceError(
            f"ignore pattern(s) {unmatched} match no module of the model (qualified module names, fnmatch syntax)"
        )
    out: dict[int, nn.Module] = {}
    for _, m in named:
        if id(m) in chosen_ids:
            for sub in m.modules():
                out.setdefault(id(sub), sub)
    order = {id(m): i for i, (_, m) in enumerate(named)}
    return sorted(out.values(), key=lambda m: order.get(id(m), len(order)))
