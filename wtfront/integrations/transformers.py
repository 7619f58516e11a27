"""Hugging Face transformers: attention metadata, config sync after pruning, and a checked `save_pretrained`.

Attention modules record their head counts (`num_attention_heads`, `num_key_value_groups`, `all_head_size`,
GPT-2's `split_size`, ...) next to weights whose shapes pruning changes; `sync_attention` re-derives them from
the projections. The model's `config` is shared by all layers, so `sync_config` updates
`num_attention_heads`, `num_key_value_heads`, `head_dim`, `intermediate_size` and `hidden_size` only where every
layer agrees. Whether `from_pretrained` can rebuild the pruned shapes from the config is checked by
building the model from its config on the `meta` device (`config_mismatches`); `save_pretrained` refuses,
saying why, when it cannot (uneven heads per layer, or a config that derives the head size from
`hidden_size / num_attention_heads` such as BERT's, GPT-2's and ViT's) — `wtfront.save_pruned`
works for every pruned model.
"""

from __future__ import annotations

import copy
import os
from typing import Any

import torch
import torch.nn as nn

from wtcore.errors import WtError

from ..modules import is_hf_conv1d
from ..tracing.attention import discover_attention, hf_parts

__all__ = ["ConfigMismatch", "config_mismatches", "save_pretrained", "sync_attention", "sync_config", "sync_conv1d"]


class ConfigMismatch(WtError):
    """A pruned Hugging Face model whose shapes its config cannot express."""


def _set(m: Any, attr: str, value: int) -> None:
    cur = getattr(m, attr, None)
    if isinstance(cur, int) and not isinstance(cur, bool) and cur != value:
        setattr(m, attr, value)


def sync_attention(m: nn.Module) -> None:
    """Head counts of a Hugging Face attention module from its projections (the head size is set by the IR
    surgery where head dims were removed; `scaling` keeps its original value)."""
    parts = hf_parts(m)
    if parts is not None:
        q, k, _ = parts
        hd = getattr(m, "head_dim", None) or getattr(m, "attention_head_size", None)
        if not isinstance(hd, int) or hd <= 0 or q.out_features % hd or k.out_features % hd:
            return
        nh, nkv = q.out_features // hd, k.out_features // hd
        for attr in ("num_attention_heads", "num_heads", "n_heads"):  # n_heads: DistilBERT
            _set(m, attr, nh)
        _set(m, "num_key_value_heads", nkv)
        _set(m, "all_head_size", nh * hd)
        if nkv and nh % nkv == 0:
            _set(m, "num_key_value_groups", nh // nkv)
        return
    c_attn = getattr(m, "c_attn", None)
    if is_hf_conv1d(c_attn) and isinstance(getattr(m, "head_dim", None), int):
        inner = c_attn.weight.shape[1] // 3
        _set(m, "split_size", inner)
        _set(m, "num_heads", inner // m.head_dim)


def _uniform(values: list[int]) -> int | None:
    return values[0] if values and all(v == values[0] for v in values) else None


def _mlp_width(m: nn.Module) -> int | None:
    for name in ("up_proj", "fc1"):
        lin = getattr(m, name, None)
        if isinstance(lin, nn.Linear):
            return lin.out_features
    dense = getattr(getattr(m, "intermediate", None), "dense", None)
    if isinstance(dense, nn.Linear):
        return dense.out_features
    c_fc = getattr(m, "c_fc", None)
    if is_hf_conv1d(c_fc):
        return int(c_fc.weight.shape[1])
    return None


def sync_config(model: nn.Module) -> None:
    """Update the config's widths where every layer agrees (the config is shared by all layers).

    The updated config is a copy, set on every module that held the old one: the caller's config object is
    left alone, and a failed physical prune (which restores the modules' attributes) restores it too."""
    old = getattr(model, "config", None)
    if old is None:
        return
    cfg = copy.deepcopy(old)
    _update_config(model, cfg)
    if cfg.to_dict() != old.to_dict():
        for m in model.modules():
            if getattr(m, "config", None) is old:
                m.config = cfg


def _update_config(model: nn.Module, cfg: Any) -> None:
    layouts = [lay for lay in discover_attention(model) if lay.family in ("hf", "gpt2", "neox")]
    heads = _uniform([lay.num_heads for lay in layouts])
    kv = _uniform([lay.num_kv_heads for lay in layouts])
    hd = _uniform([lay.head_dim for lay in layouts])
    if heads is not None:
        changed = heads != getattr(cfg, "num_attention_heads", heads)
        for attr in ("num_attention_heads", "n_head"):
            _set(cfg, attr, heads)
        _set(cfg, "num_key_value_heads", kv)
        # an explicit head size (Llama-style configs read `head_dim`; others derive it from hidden / heads)
        derived = getattr(cfg, "hidden_size", 0) // max(heads, 1)  # what configs without `head_dim` assume
        if hd is not None and (changed or getattr(cfg, "head_dim", None) is not None or hd != derived):
            cfg.head_dim = hd
    widths = [w for _, mod in model.named_modules() if mod is not model
              for w in [_mlp_width(mod)] if w is not None]
    inter = _uniform(widths)
    if inter is not None:
        _set(cfg, "intermediate_size", inter)
        if hasattr(cfg, "n_inner") and cfg.n_inner != inter and (cfg.n_inner is not None or inter != 4 * cfg.n_embd):
            cfg.n_inner = inter  # GPT-2: None means 4 * n_embd
    w = getattr(_input_embeddings(model), "weight", None)
    if isinstance(w, torch.Tensor) and w.dim() == 2:
        for attr in ("hidden_size", "n_embd"):
            _set(cfg, attr, int(w.shape[1]))


def _input_embeddings(model: nn.Module) -> nn.Module | None:
    """The token embedding, or None for models without one: vision encoders (ConvNeXt) inherit a
    `get_input_embeddings` that raises `NotImplementedError`."""
    try:
        return model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    except (NotImplementedError, AttributeError):
        return None


def config_mismatches(model: nn.Module) -> list[str]:
    """Parameters whose shape differs from what `type(model)(model.config)` builds (on the meta device):
    empty when `from_pretrained` can rebuild the pruned model."""
    sync_config(model)
    try:
        with torch.device("meta"):
            ref = type(model)(copy.deepcopy(model.config))
    except Exception as e:
        return [f"the config cannot build the model ({type(e).__name__}: {e})"]
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    out = []
    for k, v in model.state_dict().items():
        if k in want and want[k] != tuple(v.shape):
            out.append(f"{k}: {tuple(v.shape)} but the config builds {want[k]}")
    return out


def save_pretrained(model: nn.Module, save_directory: str | os.PathLike[str], **kwargs: Any) -> None:
    """`model.save_pretrained(save_directory, **kwargs)` after checking that the (synced) config rebuilds every
    pruned shape, so `from_pretrained` reloads it; otherwise raise `ConfigMismatch` saying which and why."""
    bad = config_mismatches(model)
    if bad:
        raise ConfigMismatch(
            f"{type(model).__name__}'s config cannot express its pruned shapes ({len(bad)} mismatches, e.g. "
            f"{bad[:2]}): a Hugging Face config holds one head count, head size and MLP width for all layers, and "
            "some configs derive the head size from hidden_size / num_attention_heads. Save it with "
            "wtfront.save_pruned(model, path) and restore it with wtfront.load_pruned(fresh_model, path)"
        )
    model.save_pretrained(save_directory, **kwargs)


def sync_conv1d(m: nn.Module) -> None:
    """`Conv1D` records its widths (`nx`, `nf`) and reshapes its output with `nf`."""
    m.nx, m.nf = (int(d) for d in m.weight.shape)
