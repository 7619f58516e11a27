"""Model references used by the command line and examples: `torchvision:NAME`, `timm:NAME`, `module.path:callable`.

Models are always built with random weights (no downloads)."""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch
from torch import nn

from wtcore.errors import WtError

__all__ = ["ModelRef", "load_model", "parse_input_shape"]


@dataclass(frozen=True)
class ModelRef:
    model: nn.Module
    example_inputs: torch.Tensor
    name: str


def parse_input_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(x) for x in text.replace("x", ",").split(",") if x.strip())
    except ValueError:
        raise WtError(f"--input must be a comma-separated shape such as 1,3,224,224, got {text!r}") from None
    if not shape or any(d <= 0 for d in shape):
        raise WtError(f"--input must be a shape of positive integers, got {text!r}")
    return shape


def _default_input(model: nn.Module) -> tuple[int, ...]:
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    size = cfg.get("input_size") if isinstance(cfg, dict) else None
    return (1, *size) if size else (1, 3, 224, 224)


def load_model(ref: str, input_shape: tuple[int, ...] | None = None) -> ModelRef:
    """Build the model a reference names, with random weights, and an example input for it."""
    kind, sep, name = ref.partition(":")
    if not sep or not name:
        raise WtError(
            f"model reference {ref!r} is not understood; use torchvision:NAME, timm:NAME or module.path:callable"
        )
    if kind == "torchvision":
        try:
            import torchvision
        except ImportError:
            raise WtError("torchvision is not installed: pip install torchvision") from None
        try:
            model = torchvision.models.get_model(name, weights=None)
        except (ValueError, KeyError):
            raise WtError(f"torchvision has no model named {name!r}; see torchvision.models.list_models()") from None
    elif kind == "timm":
        try:
            import timm
        except ImportError:
            raise WtError("timm is not installed: pip install timm") from None
        try:
            model = timm.create_model(name, pretrained=False)
        except RuntimeError as e:
            raise WtError(f"timm cannot build {name!r}: {e}") from None
    else:
        try:
            module = importlib.import_module(kind)
        except ImportError as e:
            raise WtError(f"cannot import module {kind!r} for model reference {ref!r}: {e}") from None
        factory = getattr(module, name, None)
        if factory is None or not callable(factory):
            raise WtError(f"module {kind!r} has no callable {name!r}")
        model = factory()
        if not isinstance(model, nn.Module):
            raise WtError(f"{ref} returned a {type(model).__name__}, not an nn.Module")
    model.eval()
    shape = input_shape or _default_input(model)
    return ModelRef(model, torch.randn(shape), ref)
