"""Model references used by the command line and examples, and the example inputs that go with them.

A reference names a model the way a user would type it:

- `torchvision:NAME` and `timm:NAME`: the library's constructor, random weights (nothing is downloaded);
- `hf:ARCH`: a transformers class (`hf:LlamaForCausalLM`, `hf:ViTForImageClassification`) built from a *small*
  config (2 layers, hidden size 64, ...) so that it traces in a second; `config=` overrides any key;
- `hf:/local/dir`: a transformers model directory with a `config.json` (its weights too, when present);
- `module.path:callable`: the user's own model, `callable()` returning an `nn.Module`.

`config=` (the command line's `--config key=value`) overrides keys of a transformers config, or is passed as
keyword arguments to the other constructors (`num_classes=10`, timm's `img_size=64`).

Example inputs follow the model: images `[1, 3, H, W]` from the model's own config, token ids `[1, 16]` for
language models (transformers models whose main input is `input_ids`, and other models whose first layer is an
`nn.Embedding`); `input_shape` overrides (for a language model a shape of one or two numbers is the token
length, e.g. `(32,)` → `input_ids` of shape `[1, 32]`).
"""

from __future__ import annotations

import ast
import importlib
import inspect
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from wtcore.errors import WtError

__all__ = ["HF_SMALL_CONFIG", "ModelRef", "load_model", "parse_config_overrides", "parse_input_shape"]

#: Keys of a transformers config set by `hf:ARCH` (when the config has them), so a model builds and traces fast.
HF_SMALL_CONFIG: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "n_inner": 128,
    "d_ff": 128,
    "num_hidden_layers": 2,
    "num_decoder_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 256,
    "max_position_embeddings": 128,
    "image_size": 32,
    "patch_size": 8,
    # hierarchical vision models (Swin, ConvNeXt): two stages; a key whose type differs from the config's
    # (Swin's per-stage `num_heads` list vs the int above) is skipped, so the per-stage keys apply instead
    "depths": [1, 1],
    "hidden_sizes": [16, 32],
    "embed_dim": 16,
    "num_heads": [2, 2],
    "window_size": 2,
}
_TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id", "sep_token_id")
_DEFAULT_TOKENS = 16


@dataclass(frozen=True)
class ModelRef:
    """A built model (eval mode), an example input for it (a tensor, or a dict of keyword tensors for
    transformers models) and the reference it was built from."""

    model: nn.Module
    example_inputs: Any
    name: str


def parse_input_shape(text: str) -> tuple[int, ...]:
    """`"1,3,224,224"` (or `"1x3x224x224"`) → `(1, 3, 224, 224)`; `"32"` → `(32,)` (a token length)."""
    try:
        shape = tuple(int(x) for x in text.replace("x", ",").split(",") if x.strip())
    except ValueError:
        raise WtError(f"--input must be a comma-separated shape such as 1,3,224,224, got {text!r}") from None
    if not shape or any(d <= 0 for d in shape):
        raise WtError(f"--input must be a shape of positive integers, got {text!r}")
    return shape


def parse_config_overrides(items: Sequence[str]) -> dict[str, Any]:
    """`["num_hidden_layers=4", "hidden_act=gelu"]` → `{"num_hidden_layers": 4, "hidden_act": "gelu"}`: values
    are Python literals (numbers, True/False/None, lists) or else plain strings."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise WtError(f"--config takes key=value pairs such as num_hidden_layers=4, got {item!r}")
        try:
            out[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            out[key.strip()] = value.strip()
    return out


def _default_input(model: nn.Module) -> tuple[int, ...]:
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    size = cfg.get("input_size") if isinstance(cfg, dict) else None
    return (1, *size) if size else (1, 3, 224, 224)


def load_model(
    ref: str, input_shape: tuple[int, ...] | None = None, config: Mapping[str, Any] | None = None
) -> ModelRef:
    """Build the model a reference names (random weights, except `hf:/dir` with weights) and an example input.

    `config`: for `hf:` the config keys to override; otherwise keyword arguments of the constructor
    (`torchvision.models.get_model`, `timm.create_model`, or the user's callable), e.g. `num_classes=10`."""
    kind, sep, name = ref.partition(":")
    if not sep or not name:
        raise WtError(
            f"model reference {ref!r} is not understood; use torchvision:NAME, timm:NAME, hf:ARCH, hf:/local/dir "
            "or module.path:callable"
        )
    config = dict(config or {})
    if kind == "hf":
        model = _hf_model(name, config)
        model.eval()
        return ModelRef(model, _hf_inputs(model, input_shape), ref)
    if kind == "torchvision":
        try:
            import torchvision
        except ImportError:
            raise WtError("torchvision is not installed: pip install torchvision") from None
        try:
            model = torchvision.models.get_model(name, weights=None, **config)
        except (ValueError, KeyError):
            raise WtError(f"torchvision has no model named {name!r}; see torchvision.models.list_models()") from None
        except TypeError as e:
            raise WtError(f"torchvision:{name} does not take the --config options {sorted(config)}: {e}") from None
    elif kind == "timm":
        try:
            import timm
        except ImportError:
            raise WtError("timm is not installed: pip install timm") from None
        try:
            model = timm.create_model(name, pretrained=False, **config)
        except (RuntimeError, TypeError) as e:
            raise WtError(f"timm cannot build {name!r} with options {config}: {e}") from None
    else:
        model = _user_model(ref, kind, name, config)
    model.eval()
    return ModelRef(model, _example_input(model, input_shape), ref)


def _example_input(model: nn.Module, shape: tuple[int, ...] | None) -> torch.Tensor:
    """Random images (or any float tensor) of `shape`; token ids when the model starts with an embedding (a
    language model), where a shape of one number is a token length."""
    first = next((m for m in model.modules() if next(m.parameters(recurse=False), None) is not None), None)
    if isinstance(first, nn.Embedding):
        shape = shape or (1, _DEFAULT_TOKENS)
        shape = (1, shape[0]) if len(shape) == 1 else shape
        return torch.randint(0, first.num_embeddings, shape, generator=torch.Generator().manual_seed(0))
    return torch.randn(shape or _default_input(model))


def _user_model(ref: str, module_name: str, attr: str, config: dict[str, Any]) -> nn.Module:
    """`module.path:callable`, importable from the current directory too (as `python -m` would)."""
    added = os.getcwd() not in sys.path
    if added:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise WtError(f"cannot import module {module_name!r} for model reference {ref!r}: {e}") from None
    finally:
        if added:
            sys.path.remove(os.getcwd())
    factory = getattr(module, attr, None)
    if factory is None or not callable(factory):
        raise WtError(f"module {module_name!r} has no callable {attr!r} (model reference {ref!r})")
    try:
        model = factory(**config)
    except TypeError as e:
        raise WtError(f"{ref}: calling {attr}(**{config}) failed: {e}") from None
    if not isinstance(model, nn.Module):
        raise WtError(f"{ref} returned a {type(model).__name__}, not an nn.Module")
    return model


# ------------------------------------------------------------------------------------------ transformers
def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise WtError("transformers is not installed: pip install transformers") from None
    transformers.logging.set_verbosity_error()  # no config warnings on small test configs
    transformers.logging.disable_progress_bar()  # no weight-loading bars in the wt command's output
    return transformers


def _config_kwargs(config_cls: type, wanted: Mapping[str, Any], strict: bool) -> dict[str, Any]:
    """Translate canonical keys (`hidden_size`) to the config's own (`n_embd` for GPT-2) and keep the ones its
    constructor takes; with `strict`, an unknown key is an error (a typo would otherwise be ignored silently).
    Without `strict` (the small defaults), a key is kept only if the constructor takes it (not an attribute the
    config derives, such as Swin's `hidden_size`) with a value of the default's kind (a list or not)."""
    amap = dict(getattr(config_cls, "attribute_map", {}) or {})
    accepted = set(inspect.signature(config_cls.__init__).parameters) - {"self", "kwargs"}
    defaults = config_cls()
    out: dict[str, Any] = {}
    for key, value in wanted.items():
        real = amap.get(key, key)
        if not strict:
            default = getattr(defaults, real, None)
            if real in accepted and (default is None or isinstance(default, (list, tuple)) == isinstance(value, list)):
                out[real] = value
            continue
        if real in accepted or hasattr(defaults, real):
            out[real] = value
        elif strict:
            raise WtError(
                f"--config {key}=...: {config_cls.__name__} has no key {key!r}; keys look like "
                f"{', '.join(sorted(accepted)[:8])}, ..."
            )
    return out


def _fix_token_ids(config: Any) -> None:
    """Special-token ids of a full-size vocabulary (GPT-2's 50256) point outside a small one."""
    vocab = getattr(config, "vocab_size", None)
    for key in _TOKEN_IDS:
        v = getattr(config, key, None)
        if isinstance(vocab, int) and isinstance(v, int) and v >= vocab:
            setattr(config, key, 0)


def _hf_model(name: str, overrides: dict[str, Any]) -> nn.Module:
    transformers = _transformers()
    if os.sep in name or "/" in name or os.path.isdir(name):
        return _hf_local(transformers, name, overrides)
    cls = getattr(transformers, name, None)
    if cls is None or not isinstance(cls, type) or not issubclass(cls, nn.Module):
        raise WtError(
            f"transformers has no model class {name!r}; use a class name such as hf:LlamaForCausalLM or "
            "hf:ViTForImageClassification, or hf:/path/to/a/model/dir"
        )
    config_cls = getattr(cls, "config_class", None)
    if config_cls is None:
        raise WtError(f"transformers class {name!r} has no config_class; use a model class such as BertModel")
    kwargs = _config_kwargs(config_cls, HF_SMALL_CONFIG, strict=False)
    kwargs.update(_config_kwargs(config_cls, overrides, strict=True))
    try:
        config = config_cls(**kwargs)
        _fix_token_ids(config)
        return cls(config)
    except Exception as e:
        raise WtError(f"cannot build hf:{name} from config {kwargs}: {type(e).__name__}: {e}") from None


def _hf_local(transformers: Any, path: str, overrides: dict[str, Any]) -> nn.Module:
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise WtError(f"hf:{path}: no config.json in {path!r}; pass a directory written by save_pretrained")
    config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    for key, value in overrides.items():
        setattr(config, key, value)
    archs = getattr(config, "architectures", None) or []
    cls = getattr(transformers, archs[0], None) if archs else transformers.AutoModel
    if cls is None:
        raise WtError(f"hf:{path}: config.json names architecture {archs[0]!r}, which transformers does not have")
    has_weights = any(f.endswith((".safetensors", ".bin")) for f in os.listdir(path))
    try:
        if has_weights:
            return cls.from_pretrained(path, config=config, local_files_only=True)
        return cls.from_config(config) if cls is transformers.AutoModel else cls(config)
    except Exception as e:
        raise WtError(f"hf:{path}: cannot load the model: {type(e).__name__}: {e}") from None


def _hf_inputs(model: nn.Module, input_shape: tuple[int, ...] | None) -> dict[str, torch.Tensor]:
    """Keyword inputs for a transformers model: token ids for text models, pixel values for vision models."""
    main = getattr(model, "main_input_name", "input_ids")
    config = getattr(model, "config", None)
    if main == "input_ids":
        shape = input_shape or (_DEFAULT_TOKENS,)
        if len(shape) == 1:
            shape = (1, shape[0])
        if len(shape) != 2:
            raise WtError(f"--input for a language model is a token length (e.g. 32) or batch,length; got {shape}")
        vocab = int(getattr(config, "vocab_size", 2) or 2)
        inputs = {"input_ids": torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(0))}
        if getattr(config, "is_encoder_decoder", False):
            inputs["decoder_input_ids"] = inputs["input_ids"].clone()
        return inputs
    if input_shape is None:
        size = getattr(config, "image_size", 224)
        size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
        input_shape = (1, int(getattr(config, "num_channels", 3)), *size)
    return {main: torch.randn(input_shape)}
