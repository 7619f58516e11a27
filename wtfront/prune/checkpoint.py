"""Pruned checkpoints: a plain state_dict plus a small manifest, loadable with `torch.load(weights_only=True)`.

A physically pruned model cannot be rebuilt by its constructor, and a plain state_dict does not fit the
unpruned model it constructs. `save_pruned` stores, next to the state_dict, a manifest of every module's
parameter and buffer shapes and its integer (and integer-tuple) attributes — `out_channels`, `groups`,
`num_features`, `normalized_shape`, `num_heads`, ... — all plain lists, ints and strings. `load_pruned`
takes a freshly constructed, unpruned model of the same class, gives every tensor whose shape differs a
new (empty) tensor of the saved shape — keeping weight ties: aliases of one Parameter get one new
Parameter — sets the attributes that differ, runs the metadata hooks (`wtfront.prune.metadata`)
and loads the state_dict strictly. This covers any module type Torch-Pruning can prune, without a per-type
rule. If anything fails the fresh model is restored and a `CheckpointError` says why.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn as nn

from wtcore.errors import WtError

from ..files import FileError, atomic_write, verify_archive
from ..modules import reparametrized_params
from .metadata import sync_metadata
from .snapshot import Snapshot

__all__ = ["FORMAT", "CheckpointError", "load_pruned", "manifest", "register_manifest_attrs", "save_pruned"]

FORMAT = "wt.pruned/1"
_EXTRA_ATTRS: list[tuple[type, tuple[str, ...]]] = []


class CheckpointError(WtError):
    """A pruned checkpoint could not be written or loaded (the fresh model is left as it was)."""


def register_manifest_attrs(module_type: type, *names: str) -> None:
    """Also record these attributes (e.g. a float `scale` derived from `head_dim`) for modules of this type;
    ints and tuples of ints are recorded for every module anyway."""
    _EXTRA_ATTRS.append((module_type, names))


def _plain_attrs(m: nn.Module) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in vars(m).items():
        if k.startswith("_") or k == "training":
            continue
        if type(v) is int:  # exactly int: subclasses (enums) would need an unpickling allowlist
            out[k] = v
        elif isinstance(v, (tuple, list)) and v and all(type(x) is int for x in v):
            out[k] = list(v)
    for t, names in _EXTRA_ATTRS:
        if isinstance(m, t):
            for k in names:
                v = getattr(m, k, None)
                if type(v) in (int, float, str):
                    out[k] = v
    return out


def manifest(model: nn.Module) -> dict[str, Any]:
    """The architecture description `save_pruned` writes: per module, direct parameter and buffer shapes and
    plain attributes (JSON-like values only, so `torch.load(weights_only=True)` accepts it)."""
    modules: dict[str, Any] = {}
    for name, m in model.named_modules():
        entry: dict[str, Any] = {}
        params = {k: list(p.shape) for k, p in m._parameters.items() if p is not None}
        buffers = {k: list(b.shape) for k, b in m._buffers.items() if b is not None}
        attrs = _plain_attrs(m)
        if params:
            entry["params"] = params
        if buffers:
            entry["buffers"] = buffers
        if attrs:
            entry["attrs"] = attrs
        if entry:
            entry["type"] = f"{type(m).__module__}.{type(m).__qualname__}"
            modules[name] = entry
    return {
        "format": FORMAT,
        "model": f"{type(model).__module__}.{type(model).__qualname__}",
        "torch": str(torch.__version__),
        "modules": modules,
    }


def save_pruned(model: nn.Module, path: str | os.PathLike[str]) -> None:
    """Write `{"format", "manifest", "state_dict"}` with `torch.save`; read it back with `load_pruned` (or with
    `torch.load(path, weights_only=True)["state_dict"]` for the weights alone). The write is atomic
    (`wtfront.files.atomic_write`): a failure or an interrupt leaves a previous file at `path` intact."""
    reparam = reparametrized_params(model)
    if reparam:
        raise CheckpointError(
            f"parameters {reparam[:3]} are re-parametrized (torch.nn.utils.prune or parametrize): their state_dict "
            "keys do not exist in a freshly constructed model. Make them plain first (torch.nn.utils.prune.remove / "
            "parametrize.remove_parametrizations(..., leave_parametrized=True)), or fake-prune with wt instead"
        )
    ckpt = {"format": FORMAT, "manifest": manifest(model), "state_dict": model.state_dict()}
    try:
        with atomic_write(path) as f:
            torch.save(ckpt, f)
    except OSError as e:
        raise CheckpointError(f"cannot write {os.fspath(path)!r}: {e}; any previous file there is intact") from e


def load_pruned(model: nn.Module, path: str | os.PathLike[str], map_location: Any = None) -> nn.Module:
    """Restore a pruned checkpoint into `model`, a freshly constructed unpruned model of the same class, in
    place (also returned): reshape what the manifest says, sync metadata, `load_state_dict(strict=True)`.
    The archive's CRC-32s are checked first: a corrupted file is refused, not loaded as wrong weights."""
    try:
        verify_archive(path, "pruned checkpoint")
    except FileError as e:
        raise CheckpointError(str(e)) from None
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot read {os.fspath(path)!r} as a wt pruned checkpoint: {e}") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{os.fspath(path)!r} is not a wt pruned checkpoint (format {FORMAT!r} expected)")
    if not isinstance(ckpt.get("manifest"), dict) or not isinstance(ckpt.get("state_dict"), dict):
        missing = [k for k in ("manifest", "state_dict") if not isinstance(ckpt.get(k), dict)]
        raise CheckpointError(f"{os.fspath(path)!r} has no {' or '.join(repr(k) for k in missing)} entry; it was not "
                              "written by save_pruned (or was edited); re-save the pruned model with save_pruned")
    man, state = ckpt["manifest"], ckpt["state_dict"]
    want = f"{type(model).__module__}.{type(model).__qualname__}"
    if man.get("model") != want:
        raise CheckpointError(f"the checkpoint is of a {man.get('model')}, not a {want}; construct that class")
    snapshot = Snapshot(model)
    try:
        _reshape(model, man["modules"])
        sync_metadata(model)
        model.load_state_dict(state, strict=True)
    except Exception as e:
        snapshot.restore()
        raise CheckpointError(f"loading the pruned checkpoint failed: {type(e).__name__}: {e}; the model was "
                              "left as constructed") from e
    return model


def _reshape(model: nn.Module, modules: dict[str, Any]) -> None:
    new_params: dict[int, nn.Parameter] = {}
    for name, entry in modules.items():
        try:
            m = model.get_submodule(name) if name else model
        except AttributeError:
            raise CheckpointError(f"module {name!r} of the checkpoint is not in the model") from None
        for k, shape in entry.get("params", {}).items():
            p = m._parameters.get(k)
            if p is None:
                raise CheckpointError(f"parameter {name}.{k} of the checkpoint is not in the model")
            if list(p.shape) != shape and id(p) not in new_params:
                new_params[id(p)] = nn.Parameter(torch.empty(shape, dtype=p.dtype, device=p.device),
                                                 requires_grad=p.requires_grad)
        for k, shape in entry.get("buffers", {}).items():
            buf = m._buffers.get(k)
            if buf is None:
                raise CheckpointError(f"buffer {name}.{k} of the checkpoint is not in the model")
            if list(buf.shape) != shape:
                m._buffers[k] = torch.empty(shape, dtype=buf.dtype, device=buf.device)
        for k, v in entry.get("attrs", {}).items():
            cur = getattr(m, k, None)
            v = tuple(v) if isinstance(v, list) and isinstance(cur, tuple) else v
            if cur != v:
                setattr(m, k, v)
    # one new Parameter per old one: every alias of a tied weight gets the same object
    for m in model.modules():
        for k, p in list(m._parameters.items()):
            if p is not None and id(p) in new_params:
                m._parameters[k] = new_params[id(p)]
