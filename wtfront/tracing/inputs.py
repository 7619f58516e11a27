"""Example inputs: how trace, cost counting and pruning call a model on them and read its outputs."""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Mapping
from typing import Any

import torch
import torch.nn as nn

from wtcore.errors import TraceError

__all__ = ["call_model", "called_modules", "check_devices", "forward_outputs", "iter_tensors", "normalize_inputs",
           "run_with_hooks", "split_inputs"]


def normalize_inputs(example_inputs: Any) -> tuple[Any, ...] | dict[str, Any]:
    """A tensor or any other single object becomes the one positional argument, a list/tuple the positional
    arguments, a mapping (e.g. HF BatchEncoding) the keyword arguments."""
    if isinstance(example_inputs, Mapping):
        return dict(example_inputs)
    if isinstance(example_inputs, (list, tuple)):
        return tuple(example_inputs)
    return (example_inputs,)


def forward_outputs(model: nn.Module, inputs: tuple[Any, ...] | dict[str, Any]) -> list[torch.Tensor]:
    """Our own call instead of TP's, which tries `model(*inputs)` and on *any* error retries `model(inputs)`,
    hiding the real error (and swallowing a budget interrupt). Returns the output tensors that autograd
    connects to the model: TP's own flattening fails on `None` entries (e.g. `(logits, None)`), and a
    tensor without grad_fn would become a spurious output node."""
    out = call_model(model, inputs)
    leaves = [t for t in iter_tensors(out) if t.grad_fn is not None]
    if not leaves:
        raise TraceError(
            f"no output of {type(model).__name__} depends on its parameters through autograd "
            "(outputs detached, computed under no_grad inside forward, or not tensors), so nothing can be traced"
        )
    return leaves


def iter_tensors(obj: Any) -> Iterator[torch.Tensor]:
    """Tensors of a nested structure of tuples, lists and mappings (HF ModelOutput is one), in order."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, Mapping):
        for v in obj.values():
            yield from iter_tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from iter_tensors(v)


def called_modules(model: nn.Module, inputs: tuple[Any, ...] | dict[str, Any], names: Collection[str]) -> set[str]:
    """Which of the named modules one forward pass on `inputs` (no grad) calls: a module whose weight the
    forward reads directly (`F.linear(x, self.qkv.weight)`) is never called."""
    called: set[str] = set()
    handles = [m.register_forward_pre_hook(lambda *_, n=n: called.add(n))
               for n, m in model.named_modules() if n in names]
    run_with_hooks(model, inputs, handles, grad=False)
    return called


def call_model(model: nn.Module, inputs: tuple[Any, ...] | dict[str, Any]) -> Any:
    """`model(**inputs)` for a mapping, else `model(*inputs)` (inputs as `normalize_inputs` returns them)."""
    return model(**inputs) if isinstance(inputs, dict) else model(*inputs)


def run_with_hooks(model: nn.Module, inputs: tuple[Any, ...] | dict[str, Any], handles: list[Any], *,
                   grad: bool) -> Any:
    """One forward pass with autograd on or off; the hook `handles` are removed afterwards, whatever happens."""
    try:
        with torch.set_grad_enabled(grad):
            return call_model(model, inputs)
    finally:
        for h in handles:
            h.remove()


def check_devices(model: nn.Module, inputs: Any) -> None:
    """Raise a `TraceError` naming both devices when an input tensor is not on the model's (single) device."""
    devices = {p.device for p in model.parameters()}
    if len(devices) != 1:  # no parameters, or a model split over devices: nothing to compare against
        return
    (dev,) = devices
    for t in iter_tensors(inputs):
        if t.device != dev:
            raise TraceError(
                f"example inputs are on device {t.device} but the model's parameters are on {dev}; "
                f"move the inputs with .to({str(dev)!r}) (or pass check_device=False)"
            )


def split_inputs(example_inputs: Any) -> tuple[tuple[torch.Tensor, ...], Callable]:
    """The top-level tensors of the example inputs, and how to rebuild (args, kwargs) from them."""
    if isinstance(example_inputs, Mapping):
        keys = list(example_inputs)
        vals = [example_inputs[k] for k in keys]
    else:
        keys = None
        vals = list(example_inputs) if isinstance(example_inputs, (list, tuple)) else [example_inputs]
    pos = [i for i, v in enumerate(vals) if isinstance(v, torch.Tensor)]

    def build(tensors: tuple[torch.Tensor, ...]) -> tuple[tuple, dict]:
        full = list(vals)
        for i, t in zip(pos, tensors):
            full[i] = t
        return ((), dict(zip(keys, full))) if keys is not None else (tuple(full), {})

    return tuple(vals[i] for i in pos), build

