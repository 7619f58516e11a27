"""Bit widths per costed op, for BOPs: given (an int, a mapping from op or module names and globs, a function)
or read from `torch.ao.quantization` fake-quant modules and observers."""

from __future__ import annotations

import fnmatch
import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn as nn

from wtcore.errors import WtError
from wtcore.ir import Structure

from ..tracing.inputs import split_inputs

__all__ = ["BitsSpec", "fake_quant_bits", "resolve_bits"]

#: Bit widths as `resolve_bits` takes them.
BitsSpec = int | Mapping[str, int] | Callable[[str, nn.Module | None], int] | str | None


def _check_bits(value: Any, op: str, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) <= 0:
        raise WtError(f"{what} of op {op!r} must be a positive integer, got {value!r}")
    return int(value)


def _fq_bits(m: nn.Module) -> int | None:
    """Bits of a torch.ao FakeQuantize/observer: ceil(log2(quant_max - quant_min + 1)), or its float dtype's."""
    enabled = getattr(m, "fake_quant_enabled", None)
    if isinstance(enabled, torch.Tensor) and enabled.numel() and int(enabled.flatten()[0]) == 0:
        return None
    qmin, qmax = getattr(m, "quant_min", None), getattr(m, "quant_max", None)
    if isinstance(qmin, int) and isinstance(qmax, int) and qmax > qmin:
        return max(1, math.ceil(math.log2(qmax - qmin + 1)))
    dtype = getattr(m, "dtype", None)
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return torch.finfo(dtype).bits
    return None


def _is_fq(m: nn.Module) -> bool:
    from torch.ao.quantization import FakeQuantizeBase
    from torch.ao.quantization.observer import ObserverBase

    return isinstance(m, (FakeQuantizeBase, ObserverBase))


def fake_quant_bits(
    structure: Structure, model: nn.Module, example_inputs: Any | None = None
) -> tuple[dict[str, int], dict[str, int]]:
    """(weight bits, activation bits) per op name read from `torch.ao.quantization` fake-quant modules and
    observers; ops without one are left out.

    Weight bits: the op module's `weight_fake_quant` (QAT modules), or a fake-quant among the parametrizations
    of its weight. Activation bits: the fake-quant whose output is the op module's input, directly or through
    parameter-free leaf modules (ReLU, Dropout, pooling), found by one forward pass with hooks (needs
    `example_inputs`). Inputs reached through functional ops (`x.mean()`), and attention matmuls, which read no
    module input, are left out.
    """
    fqs = [m for m in model.modules() if _is_fq(m)]
    if not fqs:
        return {}, {}
    w_bits: dict[str, int] = {}
    for op in structure.ops:
        if not op.param:
            continue
        mod = _get(model, op.module)
        cands = [getattr(mod, "weight_fake_quant", None)]
        plist = getattr(getattr(mod, "parametrizations", None), "weight", None)
        if plist is not None:
            cands += list(plist)
        for c in cands:
            if isinstance(c, nn.Module) and _is_fq(c) and (b := _fq_bits(c)) is not None:
                w_bits[op.name] = b
                break
    a_bits: dict[str, int] = {}
    if example_inputs is None:
        return w_bits, a_bits
    produced: dict[int, tuple[torch.Tensor, int]] = {}
    by_module: dict[str, list[str]] = {}
    for op in structure.ops:
        if op.param:
            by_module.setdefault(op.module, []).append(op.name)
    handles = []

    def fq_hook(m: nn.Module, args: Any, out: Any) -> None:
        b = _fq_bits(m)
        if isinstance(out, torch.Tensor) and b is not None:
            produced[id(out)] = (out, b)

    def carry_hook(m: nn.Module, args: Any, out: Any) -> None:
        """A parameter-free leaf module (ReLU, Dropout, pooling) keeps its input's bit width."""
        x = args[0] if args else None
        hit = produced.get(id(x)) if isinstance(x, torch.Tensor) else None
        if hit is not None and hit[0] is x and isinstance(out, torch.Tensor):
            produced.setdefault(id(out), (out, hit[1]))

    def pre_hook(names: list[str]) -> Callable:
        def hook(m: nn.Module, args: Any) -> None:
            x = args[0] if args else None
            hit = produced.get(id(x)) if isinstance(x, torch.Tensor) else None
            if hit is not None and hit[0] is x:
                for n in names:
                    a_bits.setdefault(n, hit[1])

        return hook

    try:
        for m in fqs:
            handles.append(m.register_forward_hook(fq_hook))
        for m in model.modules():
            if not _is_fq(m) and not list(m.children()) and not list(m.parameters(recurse=False)):
                handles.append(m.register_forward_hook(carry_hook))
        for mod_name, names in by_module.items():
            handles.append(_get(model, mod_name).register_forward_pre_hook(pre_hook(names)))
        tensors, build = split_inputs(example_inputs)
        args, kwargs = build(tensors)
        training = [(m, m.training) for m in model.modules()]
        try:
            model.eval()
            with torch.no_grad():
                model(*args, **kwargs)
        finally:
            for m, flag in training:
                m.training = flag
    finally:
        for h in handles:
            h.remove()
    return w_bits, a_bits


def _get(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name) if name else model


def resolve_bits(
    structure: Structure,
    model: nn.Module | None,
    spec: BitsSpec,
    *,
    what: str = "weight bits",
    fake_quant: Mapping[str, int] | None = None,
    default: int = 32,
) -> tuple[int, ...]:
    """Bit width of every op of `structure` (in `structure.ops` order) as plain integers.

    `spec`: an int for every op; a mapping from op names, module names or globs to bits (first matching key
    wins, unmatched ops get `default`; a key matching no op is an error); a function `(op_name, module) -> int`
    (module None for an op without one); "fake_quant" (read from fake-quant modules, see `fake_quant_bits`;
    pass them as `fake_quant`); or None: "fake_quant" where present, `default` elsewhere.
    Raises `WtError` naming the op for anything but a positive integer.
    """
    ops = structure.ops
    if spec is None or spec == "fake_quant":
        fq = fake_quant or {}
        return tuple(_check_bits(fq.get(o.name, default), o.name, what) for o in ops)
    if isinstance(spec, str):
        raise WtError(f"{what} must be an int, a mapping, a function or 'fake_quant', got the string {spec!r}")
    if isinstance(spec, numbers.Number):  # validated per op, so a bad value names the op
        return tuple(_check_bits(spec, o.name, what) for o in ops)
    if isinstance(spec, Mapping):
        used: set[str] = set()
        out = []
        for o in ops:
            v: Any = default
            for k, bits in spec.items():
                if any(fnmatch.fnmatchcase(n, k) or n == k for n in (o.name, o.module) if n):
                    v = bits
                    used.add(k)
                    break
            out.append(_check_bits(v, o.name, what))
        unused = [k for k in spec if k not in used]
        if unused:
            raise WtError(f"{what}: key(s) {unused} match no costed op; op names look like {[o.name for o in ops[:3]]}")
        return tuple(out)
    if callable(spec):
        out = []
        for o in ops:
            mod = _get(model, o.module) if model is not None and (o.module or o.param) else None
            out.append(_check_bits(spec(o.name, mod), o.name, what))
        return tuple(out)
    raise WtError(f"{what} must be an int, a mapping, a function or 'fake_quant', got {type(spec).__name__}")
