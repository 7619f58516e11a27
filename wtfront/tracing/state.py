"""The process and model state while Torch-Pruning records a forward pass, restored however tracing ends."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch
import torch.nn as nn

__all__ = ["gc_paused", "tracing_state"]


@contextmanager
def gc_paused() -> Iterator[None]:
    """No cyclic garbage collection while tracing. TP's graph (nodes, dependencies, op modules: ~3,200 objects
    on ResNet-50) is alive, and cyclic, during the whole trace, so every collection the trace's allocations
    trigger (8 young ones per ResNet-50 trace) walks it and promotes it to the oldest generation, where it
    stays as garbage until a full collection walks the whole heap: one every ~10 traces, 0.25 s there with
    the torch/torchvision heap (~400k objects). Paused, it is never promoted, and `release_graph` frees it."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@contextmanager
def tracing_state(model: nn.Module) -> Iterator[None]:
    """Eval mode, autograd on and every floating parameter requiring grad (TP follows grad_fn edges, so a
    frozen layer would vanish from the graph); restore flags and drop TP's hooks even if tracing is
    interrupted mid-forward."""
    modules = list(model.modules())
    training = [(m, m.training) for m in modules]
    frozen = [p for p in model.parameters() if not p.requires_grad and (p.is_floating_point() or p.is_complex())]
    hooks_before = [set(m._forward_hooks) for m in modules]
    inference_off = torch.inference_mode(False) if torch.is_inference_mode_enabled() else nullcontext()
    try:
        with inference_off, torch.enable_grad():
            for p in frozen:
                p.requires_grad_(True)
            model.eval()
            yield
    finally:
        for m, before in zip(modules, hooks_before):
            if not m._forward_hooks:
                continue  # nothing left to remove (TP removes its hooks when its forward ends)
            for k in [k for k in m._forward_hooks if k not in before]:
                if "_record_grad_fn" in getattr(m._forward_hooks[k], "__qualname__", ""):
                    del m._forward_hooks[k]
        for p in frozen:
            p.requires_grad_(False)
        for m, flag in training:
            if m.training != flag:  # nn.Module.__setattr__ is slow: only where eval() changed it
                m.training = flag

