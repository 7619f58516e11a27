"""Metrics of many checkpoints of one model: the "which epoch is ready to prune" view.

`analyze` reads checkpoints (plain `state_dict` files, training dicts holding one, `save_pruned` files and,
when trusted, whole models pickled with `torch.save`), stacks their parameters and evaluates *one* compiled
program over all of them with `torch.func.vmap`, `chunk` checkpoints at a time (memory stays at `chunk`
copies of the parameters). Checkpoints of a physically pruned model have other shapes: they are grouped by
architecture, each group gets its own structure (re-traced, with the unpruned model as baseline so ratios
keep their meaning) and its own vmapped program.

Training frameworks' outputs are read as they are: Lightning `.ckpt` files (the state_dict under
`"state_dict"`, the LightningModule's attribute prefix such as `model.` found by matching the model's
parameter names), Hugging Face `Trainer` folders (`checkpoint-N/model.safetensors`; optimizer, scheduler and
RNG files ignored), DDP / `torch.compile` prefixes. Rows are labelled by the step and epoch the checkpoint
records (`global_step`/`epoch`, `trainer_state.json`) and by its file or folder name; files that cannot be
read are skipped with a warning.

Whether units have collapsed is judged from the gap in the distribution of size-normalized unit norms
(`collapse.find_gap`): each checkpoint gets the units below the suggested threshold and the MACs that would be
left if they were pruned.

`write_csv` / `write_json` save the metrics per checkpoint; `plot_unit_norms`, `plot_trends` and
`plot_norm_heatmap` draw PNGs (matplotlib, Agg) and return the data they drew, read back from the matplotlib
artists.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import warnings
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

import wtcore
from wtcore.errors import WtError
from wtcore.ir import Structure

from ..files import FileError, atomic_write, verify_archive
from ..prune.checkpoint import FORMAT as PRUNED_FORMAT
from ..prune.checkpoint import load_pruned
from .collapse import Gap, collapsed_keep, find_gap, macs_ratio_without, unit_sizes

__all__ = [
    "CHECKPOINT_SUFFIXES",
    "METRICS",
    "Analysis",
    "AnalysisError",
    "CheckpointMetrics",
    "PlotData",
    "analyze",
    "find_checkpoints",
    "histogram_edges",
    "metric_specs",
    "plot_norm_heatmap",
    "plot_trends",
    "plot_unit_norms",
    "read_checkpoint",
    "state_dict_of",
    "unit_norm_counts",
    "write_csv",
    "write_json",
]

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".tar", ".safetensors")

#: Scalar metrics per checkpoint, in CSV column order, with what they mean (1 MAC = one multiply-add).
METRICS: dict[str, str] = {
    "group_lasso": "sum over prunable units of sqrt(params per unit) x unit L2 norm (the group_lasso spec)",
    "macs": "active MACs (1 MAC = one multiply-add) of the cost ops",
    "macs_ratio": "active MACs / MACs of the unpruned model",
    "bops": "structured BOPs (active MACs x 32 x 32 bits)",
    "bops_ratio": "structured BOPs / BOPs of the unpruned model",
    "sparsity": "fraction of exactly zero (|w| <= tolerance) weights of conv/linear ops",
    "params": "parameter elements that physical pruning of the inactive units keeps",
    "params_ratio": "params / parameter elements of the unpruned model",
    "active_units": "units of prunable groups with a coupled element |w| > tolerance",
    "units": "units of prunable groups in the unpruned model",
    "units_below_threshold": "units of prunable groups whose L2 norm is <= threshold (ready to prune)",
    "nonfinite_units": "units of prunable groups with a NaN/inf coupled weight (never counted ready to prune)",
    "collapsed_units": "units of prunable groups whose size-normalized norm (L2 / sqrt(elements)) is at or below "
                       "the suggested threshold (the gap in their distribution), or exactly zero",
    "macs_ratio_pruned": "active MACs / MACs of the unpruned model if the collapsed units were pruned",
}
#: files of a training run's folders that hold no model weights (HF Trainer, Lightning, accelerate)
IGNORED_FILES = re.compile(r"^(optimizer|scheduler|scaler|training_args|rng_state.*|random_states.*|"
                           r"optimizer_states.*)\.(pt|pth|bin|safetensors)$")
#: weight files of a Hugging Face `checkpoint-N` folder, by preference
HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin", "pytorch_model.pt")


class AnalysisError(WtError):
    """A checkpoint could not be read or does not fit the model (names the file and what to do)."""


@dataclass(frozen=True)
class CheckpointMetrics:
    """Metrics of one checkpoint: `scalars` (keys of `METRICS`), active units per group, and the L2 norm of
    every unit of a prunable group (float64, in structure order) for the histograms."""

    name: str
    path: str
    scalars: dict[str, float]
    active_units: dict[str, int]
    unit_l2: torch.Tensor = field(repr=False)
    unit_size: torch.Tensor | None = field(default=None, repr=False)  # elements per prunable unit
    step: int | None = None
    epoch: int | None = None

    @property
    def normalized(self) -> torch.Tensor:
        """Unit norms divided by sqrt(elements per unit): the RMS element of each prunable unit."""
        if self.unit_size is None:
            return self.unit_l2
        return self.unit_l2 / self.unit_size.clamp(min=1).sqrt()

    @property
    def label(self) -> str:
        """The name, with the step and epoch when the checkpoint records them."""
        extra = [f"{k} {v}" for k, v in (("epoch", self.epoch), ("step", self.step))
                 if v is not None and f"{k}={v}" not in self.name and f"{k}-{v}" not in self.name]
        return f"{self.name} ({', '.join(extra)})" if extra else self.name


@dataclass(frozen=True)
class Analysis:
    model: str
    structure: Structure
    tolerance: float
    threshold: float
    checkpoints: tuple[CheckpointMetrics, ...]
    gap: Gap | None = None
    skipped: tuple[str, ...] = ()

    @property
    def suggested_threshold(self) -> float | None:
        """The threshold on size-normalized unit norms in the widest gap of their distribution (None: no gap)."""
        return None if self.gap is None else self.gap.threshold

    @property
    def ready(self) -> CheckpointMetrics | None:
        """The first checkpoint where as many units have collapsed as ever do in this run (None: none collapsed)."""
        counts = self.column("collapsed_units")
        if not counts or max(counts) <= 0:
            return None
        return self.checkpoints[counts.index(max(counts))]

    def column(self, metric: str) -> list[float]:
        return [c.scalars[metric] for c in self.checkpoints]


@dataclass(frozen=True)
class PlotData:
    """What a plot drew, read back from the matplotlib artists: per panel or line label, its x and y values."""

    path: str
    x: dict[str, list[float]]
    y: dict[str, list[float]]


# ------------------------------------------------------------------------------------------------- reading
def _natural_key(p: Path) -> list[Any]:
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", p.name)]


def _weights_in(folder: Path, depth: int) -> list[Path]:
    """Checkpoint files of a folder in natural order; a subfolder holding a Hugging Face weight file
    (`checkpoint-N/model.safetensors`) contributes that file; other subfolders are searched `depth` levels down
    (Lightning's `lightning_logs/version_0/checkpoints`)."""
    entries = sorted(folder.iterdir(), key=_natural_key)
    hf = next((folder / n for n in HF_WEIGHTS if (folder / n).is_file()), None)
    if hf is not None:
        return [hf]
    out = [f for f in entries if f.is_file() and f.suffix in CHECKPOINT_SUFFIXES and not IGNORED_FILES.match(f.name)]
    if depth > 0:
        for d in entries:
            if d.is_dir() and not d.name.startswith("."):
                out.extend(_weights_in(d, depth - 1))
    return out


def find_checkpoints(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Files as given; a folder contributes its checkpoint files (`CHECKPOINT_SUFFIXES`) in natural order
    (`epoch2` before `epoch10`), the weights of its Hugging Face `checkpoint-N` subfolders and the checkpoints
    of subfolders up to three levels down; optimizer, scheduler and RNG state files are left out."""
    out: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            found = _weights_in(p, 3)
            if not found:
                raise AnalysisError(f"folder {str(p)!r} has no checkpoint files ({', '.join(CHECKPOINT_SUFFIXES)})")
            out.extend(found)
        elif p.is_file():
            out.append(p)
        else:
            raise AnalysisError(f"checkpoint {str(p)!r} does not exist")
    if not out:
        raise AnalysisError("no checkpoints given")
    return out


def read_checkpoint(path: str | os.PathLike[str], *, trust_pickle: bool = False) -> Any:
    """The object in a checkpoint file: a state_dict-like mapping, a `save_pruned` dict, or (with
    `trust_pickle`) a whole pickled `nn.Module`. Safetensors files give their tensors."""
    path = os.fspath(path)
    try:
        verify_archive(path)
    except FileError as e:
        raise AnalysisError(str(e)) from None
    if path.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise AnalysisError(f"{path!r}: reading .safetensors needs the safetensors package") from None
        return load_file(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        if not trust_pickle:
            hint = ("it holds pickled objects (e.g. a whole model saved with torch.save(model)); pass "
                    "--trust-pickle (trust_pickle=True) to load it if you trust the file"
                    if "weights_only" in str(e) or "Unsupported global" in str(e) else f"{type(e).__name__}: {e}")
            raise AnalysisError(f"cannot read checkpoint {path!r}: {hint.splitlines()[0]}") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise AnalysisError(f"cannot read checkpoint {path!r}: {type(e).__name__}: {str(e).splitlines()[0]}") from None


def state_dict_of(obj: Any, path: str) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint object: a module's state_dict, a mapping of tensors, or the state_dict found
    under a usual key of a training checkpoint (`state_dict`, `model`, `model_state_dict`, ...)."""
    if isinstance(obj, nn.Module):
        return obj.state_dict()
    if isinstance(obj, Mapping):
        tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
        if tensors:
            return tensors
        for key in ("state_dict", "model_state_dict", "model", "module", "net", "ema"):
            inner = obj.get(key)
            if isinstance(inner, (Mapping, nn.Module)):
                return state_dict_of(inner, path)
    raise AnalysisError(f"checkpoint {path!r} holds a {type(obj).__name__} with no parameter tensors; save "
                        "model.state_dict() (or a dict with a 'state_dict' entry)")


def _strip_prefix(sd: dict[str, torch.Tensor], names: set[str]) -> dict[str, torch.Tensor]:
    """Keys saved from a DDP / torch.compile wrapper (`module.`, `_orig_mod.`) mapped back to the model's."""
    for prefix in ("module.", "_orig_mod."):
        if not any(k in names for k in sd) and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    if names and not any(k in names for k in sd):  # a wrapper's attribute (a LightningModule's `model.`)
        first = min(names, key=len)
        for prefix in sorted({k[: -len(first)] for k in sd if k.endswith("." + first)}, key=len):
            inner = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
            if sum(k in names for k in inner) * 2 >= len(names):
                return inner
    return sd


def _params_for(structure: Structure, sd: dict[str, torch.Tensor], path: str, model: str,
                model_keys: Collection[str] | None = None) -> dict[str, torch.Tensor]:
    sd = _strip_prefix(sd, {n for p in structure.params for n in (p.name, *p.aliases)})
    extra = [k for k in sd if model_keys is not None and k not in model_keys]
    if extra:
        raise AnalysisError(f"checkpoint {path!r} does not fit {model}: it has {len(extra)} entries the model does "
                            f"not have (e.g. {extra[0]!r}); is it a checkpoint of another architecture?")
    out: dict[str, torch.Tensor] = {}
    for p in structure.params:
        t = next((sd[n] for n in (p.name, *p.aliases) if n in sd), None)
        if t is None:
            some = ", ".join(list(sd)[:3])
            raise AnalysisError(f"checkpoint {path!r} does not fit {model}: it has no parameter {p.name!r} (its keys "
                                f"look like {some}); is it a checkpoint of another architecture?")
        if tuple(t.shape) != p.shape:
            raise AnalysisError(f"checkpoint {path!r} does not fit {model}: parameter {p.name!r} has shape "
                                f"{tuple(t.shape)} there, {p.shape} in the model; is it a checkpoint of another "
                                "architecture? (physically pruned models load from save_pruned checkpoints)")
        out[p.name] = t.detach().to(torch.float32) if not t.is_floating_point() else t.detach()
    return out


# ------------------------------------------------------------------------------------------------ evaluating
def metric_specs(tolerance: float = 0.0) -> list[wtcore.Spec]:
    """The specs one analysis program evaluates per checkpoint."""
    t = float(tolerance)
    return [
        wtcore.Spec("unit_l2"),
        wtcore.Spec("group_lasso"),
        wtcore.Spec("active_macs", tolerance=t),
        wtcore.Spec("structured_bops", tolerance=t),
        wtcore.Spec("unstructured_sparsity", tolerance=t),
        wtcore.Spec("active_params", tolerance=t),
        wtcore.Spec("group_active_units", tolerance=t),
    ]


@dataclass
class _Arch:
    """Checkpoints sharing one structure (the model as given, or one pruned variant of it)."""

    structure: Structure
    items: list[tuple[int, Path, dict[str, torch.Tensor]]] = field(default_factory=list)  # pending, < chunk
    program: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None  # vmapped, compiled once
    sizes: torch.Tensor | None = None  # elements per prunable unit


def _prunable_mask(structure: Structure) -> torch.Tensor:
    if not structure.groups:
        return torch.zeros(0, dtype=torch.bool)
    return torch.cat([torch.full((g.size,), g.prunable, dtype=torch.bool) for g in structure.groups])


def _metrics(structure: Structure, baseline: Structure, out: Mapping[str, torch.Tensor], i: int,
             threshold: float) -> tuple[dict[str, float], dict[str, int], torch.Tensor]:
    """Row `i` of vmapped program outputs → scalars, active units per group, prunable unit norms."""
    prunable = _prunable_mask(structure)
    l2 = out["unit_l2"][i].detach().to(torch.float64)[prunable]
    group_active = out["group_active_units"][i].tolist()
    removed_units = sum(g.baseline_size - g.size for g in structure.groups if g.prunable)
    bops = float(out["structured_bops/total"][i])
    scalars = {
        "group_lasso": float(out["group_lasso"][i]),
        "macs": float(out["active_macs/total"][i]),
        "macs_ratio": float(out["active_macs/ratio"][i]),
        "bops": bops,
        "bops_ratio": 1.0 - float(out["structured_bops/compression"][i]),
        "sparsity": float(out["unstructured_sparsity/total"][i]),
        "params": float(out["active_params/total"][i]),
        "params_ratio": float(out["active_params/total"][i]) / max(sum(p.numel for p in baseline.params), 1),
        "active_units": float(sum(a for a, g in zip(group_active, structure.groups) if g.prunable)),
        "units": float(sum(g.baseline_size for g in structure.groups if g.prunable)),
        "units_below_threshold": float(int((l2 <= threshold).sum()) + removed_units),
        "nonfinite_units": float(int((~torch.isfinite(l2)).sum())),
    }
    return scalars, {g.name: int(a) for g, a in zip(structure.groups, group_active)}, l2


def analyze(
    structure: Structure,
    paths: Sequence[str | os.PathLike[str]],
    *,
    chunk: int = 8,
    tolerance: float = 0.0,
    threshold: float = 1e-3,
    trust_pickle: bool = False,
    build: Callable[[], nn.Module] | None = None,
    example_inputs: Any = None,
    model_keys: Collection[str] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Analysis:
    """Evaluate the metrics of `METRICS` for every checkpoint in `paths` (files or folders, see
    `find_checkpoints`) of the model `structure` was traced from.

    One program (`metric_specs`) is compiled per architecture and run under `torch.func.vmap` over the stacked
    parameters of `chunk` checkpoints at a time (checkpoints are read one by one and at most `chunk` per
    architecture are held in memory). `tolerance`: |w| at or below it counts as zero (active units,
    MACs, sparsity); `threshold`: a unit whose L2 norm is at or below it counts as ready to prune. `build`
    (a fresh unpruned model) and `example_inputs` are needed for `save_pruned` checkpoints and pickled pruned
    models, which are re-traced. `progress(done, total)` is called after each chunk.

    Files that cannot be read (or hold no tensors) are skipped with a warning and listed in `skipped`; a
    checkpoint of another architecture is an error. `collapsed_units` and `macs_ratio_pruned` use the
    threshold suggested from the gap in the size-normalized unit norms of all checkpoints (`Analysis.gap`).
    """
    if chunk < 1:
        raise AnalysisError(f"chunk must be >= 1, got {chunk}")
    files = find_checkpoints(paths)
    model_name = structure.model or "the model"
    archs: dict[str, _Arch] = {structure.fingerprint: _Arch(structure)}
    rows: dict[int, CheckpointMetrics] = {}
    row_structure: dict[int, Structure] = {}
    labels: dict[int, tuple[str, int | None, int | None]] = {}
    skipped: list[str] = []

    def flush(arch: _Arch) -> None:
        if arch.program is None:
            arch.program = torch.func.vmap(wtcore.compile(arch.structure, metric_specs(tolerance)))
            arch.sizes = unit_sizes(arch.structure)[_prunable_mask(arch.structure)]
        names = [p.name for p in arch.structure.params]
        stacked = {n: torch.stack([params[n] for _, _, params in arch.items]) for n in names}
        with torch.no_grad():
            out = arch.program(stacked)
        for i, (k, path, _) in enumerate(arch.items):
            scalars, active, l2 = _metrics(arch.structure, structure, out, i, threshold)
            name, step, epoch = labels[k]
            rows[k] = CheckpointMetrics(name, str(path), scalars, active, l2, arch.sizes, step, epoch)
            row_structure[k] = arch.structure
        arch.items.clear()
        if progress is not None:
            progress(len(rows), len(files))

    for k, path in enumerate(files):
        try:
            obj = read_checkpoint(path, trust_pickle=trust_pickle)
            if not isinstance(obj, nn.Module) and not (isinstance(obj, Mapping) and obj.get("format") == PRUNED_FORMAT):
                state_dict_of(obj, str(path))  # holds tensors at all?
        except AnalysisError as e:
            if len(files) == 1:
                raise
            warnings.warn(f"wt analyze: skipping {e}", stacklevel=2)
            skipped.append(str(path))
            continue
        labels[k] = _label(path, obj)
        arch = archs[structure.fingerprint]
        module = obj if isinstance(obj, nn.Module) else None
        if isinstance(obj, Mapping) and obj.get("format") == PRUNED_FORMAT:
            if build is None or example_inputs is None:
                raise AnalysisError(f"{str(path)!r} is a pruned checkpoint (save_pruned); analyzing it needs the "
                                    "model constructor (build=) and example inputs")
            try:
                module = load_pruned(build(), path)
            except WtError as e:
                raise AnalysisError(f"checkpoint {str(path)!r} does not fit {model_name}: {e}") from None
        sd = state_dict_of(obj if module is None else module, str(path))
        if module is not None and _shapes_differ(structure, sd):
            arch = _arch_of(archs, module, structure, example_inputs, str(path))
        keys = model_keys if arch.structure is structure else None  # a pruned variant has its own buffers' shapes
        arch.items.append((k, path, _params_for(arch.structure, sd, str(path), model_name, keys)))
        del obj, module, sd
        if len(arch.items) >= chunk:
            flush(arch)
    for arch in archs.values():
        if arch.items:
            flush(arch)
    if not rows:
        raise AnalysisError(f"none of the {len(files)} checkpoint files could be read (first: {skipped[0]!r})")
    order = sorted(rows)
    gap = find_gap([rows[k].normalized for k in order])
    thr = None if gap is None else gap.threshold
    for k in order:
        c = rows[k]
        s = row_structure[k]
        prunable = _prunable_mask(s)
        keep = collapsed_keep(s, prunable, c.normalized, thr)
        removed_before = sum(g.baseline_size - g.size for g in s.groups if g.prunable)
        collapsed = int((~keep[prunable]).sum()) + removed_before
        rows[k] = replace(c, scalars={**c.scalars, "collapsed_units": float(collapsed),
                                      "macs_ratio_pruned": macs_ratio_without(s, keep)})
    return Analysis(model_name, structure, float(tolerance), float(threshold), tuple(rows[k] for k in order),
                    gap, tuple(skipped))


def _label(path: Path, obj: Any) -> tuple[str, int | None, int | None]:
    """(name, step, epoch) of a checkpoint: the folder's name for a Hugging Face `checkpoint-N/model.*` file,
    else the file's stem; step and epoch from a Lightning checkpoint (`global_step`, `epoch`) or a training
    dict, or from the `trainer_state.json` next to a Hugging Face weight file."""
    name = path.parent.name if path.name in HF_WEIGHTS else path.stem
    step = epoch = None
    if isinstance(obj, Mapping):
        s, e = obj.get("global_step", obj.get("step")), obj.get("epoch")
        step = int(s) if isinstance(s, (int, float)) and not isinstance(s, bool) else None
        epoch = int(e) if isinstance(e, (int, float)) and not isinstance(e, bool) else None
    state = path.parent / "trainer_state.json"
    if path.name in HF_WEIGHTS and state.is_file():
        try:
            doc = json.loads(state.read_text())
            step = int(doc["global_step"])
            epoch = round(float(doc["epoch"]), 3) if float(doc["epoch"]) % 1 else int(doc["epoch"])
        except (ValueError, KeyError, TypeError, OSError):
            pass
    if step is None and path.name in HF_WEIGHTS:
        m = re.fullmatch(r"checkpoint-(\d+)", path.parent.name)
        step = int(m.group(1)) if m else None
    return name, step, epoch


def _shapes_differ(structure: Structure, sd: Mapping[str, torch.Tensor]) -> bool:
    for p in structure.params:
        t = next((sd[n] for n in (p.name, *p.aliases) if n in sd), None)
        if t is not None and tuple(t.shape) != p.shape:
            return True
    return False


def _arch_of(archs: dict[str, _Arch], module: nn.Module, baseline: Structure, example_inputs: Any,
             path: str) -> _Arch:
    from ..tracing.entry import trace

    if example_inputs is None:
        raise AnalysisError(f"{path!r} holds a pruned model; re-tracing it needs example inputs")
    module.eval()
    s = trace(module, example_inputs).with_baseline(baseline)
    s = Structure(s.params, s.groups, s.ops, baseline.model, s.uncoupled)
    return archs.setdefault(s.fingerprint, _Arch(s))


# ------------------------------------------------------------------------------------------------- writing
def write_csv(analysis: Analysis, path: str | os.PathLike[str]) -> None:
    """One row per checkpoint: name, path, then the scalar metrics of `METRICS`."""
    with atomic_write(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["checkpoint", "path", "step", "epoch", *METRICS])
        for c in analysis.checkpoints:
            w.writerow([c.name, c.path, "" if c.step is None else c.step, "" if c.epoch is None else c.epoch,
                        *(repr(c.scalars[m]) for m in METRICS)])


def write_json(analysis: Analysis, path: str | os.PathLike[str]) -> None:
    """The CSV's metrics plus active units per group, the meaning of each metric and the settings."""
    doc = {
        "format": "wt.analysis/1",
        "model": analysis.model,
        "structure_fingerprint": analysis.structure.fingerprint,
        "tolerance": analysis.tolerance,
        "threshold": analysis.threshold,
        "suggested_threshold": analysis.suggested_threshold,
        "gap": None if analysis.gap is None else {"below": analysis.gap.below, "above": analysis.gap.above,
                                                   "checkpoint": analysis.checkpoints[analysis.gap.checkpoint].name},
        "ready": None if analysis.ready is None else analysis.ready.name,
        "skipped": list(analysis.skipped),
        "metrics": METRICS,
        "checkpoints": [
            {"name": c.name, "path": c.path, "step": c.step, "epoch": c.epoch, **c.scalars,
             "active_units_per_group": c.active_units}
            for c in analysis.checkpoints
        ],
    }
    with atomic_write(path, "w") as f:
        json.dump(doc, f, indent=1)


# ------------------------------------------------------------------------------------------------ plotting
def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise WtError("plots need matplotlib: pip install matplotlib (or pass --no-plots)") from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _panels(n: int, max_panels: int) -> list[int]:
    """Indices of the checkpoints that get a panel: all, or `max_panels` evenly spaced incl. first and last."""
    if n <= max_panels:
        return list(range(n))
    return sorted({round(i * (n - 1) / (max_panels - 1)) for i in range(max_panels)})


def histogram_edges(analysis: Analysis, bins: int = 40) -> torch.Tensor:
    """Log-spaced edges shared by every panel, from below the smallest nonzero unit norm (and the threshold) to
    above the largest; exact zeros get a bar of their own, left of the first edge."""
    norms = torch.cat([c.unit_l2 for c in analysis.checkpoints]) if analysis.checkpoints else torch.zeros(0)
    nz = norms[norms > 0]
    lo = float(nz.min()) if nz.numel() else 1e-6
    hi = float(nz.max()) if nz.numel() else 1.0
    if analysis.threshold > 0:
        lo = min(lo, analysis.threshold)
    lo, hi = lo / 1.5, max(hi * 1.5, lo * 10)
    return torch.logspace(math.log10(lo), math.log10(hi), bins + 1, dtype=torch.float64)


def unit_norm_counts(l2: torch.Tensor, edges: torch.Tensor) -> tuple[int, torch.Tensor]:
    """(units with norm exactly 0, units per bin `edges[k] <= norm < edges[k+1]` of the others)."""
    l2 = l2.to(torch.float64)
    zero = l2 == 0
    clamped = l2[~zero].clamp(min=float(edges[0]), max=float(edges[-1]) * (1 - 1e-12))
    return int(zero.sum()), torch.histogram(clamped, bins=edges).hist.round().to(torch.int64)


def plot_unit_norms(analysis: Analysis, path: str | os.PathLike[str], *, bins: int = 40,
                    max_panels: int = 16) -> PlotData:
    """Per-unit L2 norm histograms, one panel per checkpoint (at most `max_panels`, evenly spaced), on a shared
    log x axis; exact zeros are the red bar at the left, the threshold a dashed line. Units that collapse toward
    zero show up as a separate mode on the left: the epoch where it has separated is ready to prune.

    The returned data, per checkpoint, is read from the drawn bars: x = left edges, y = heights, the zero bar
    first."""
    plt = _pyplot()
    from matplotlib.ticker import NullFormatter

    edges = histogram_edges(analysis, bins)
    idx = _panels(len(analysis.checkpoints), max_panels)
    ncols = min(4, len(idx))
    nrows = math.ceil(len(idx) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.4 * ncols, 2.5 * nrows), squeeze=False, sharex=True)
    xs: dict[str, list[float]] = {}
    ys: dict[str, list[float]] = {}
    e = edges.numpy()
    step = e[1] / e[0]
    zero_left, zero_width = e[0] / step**3, e[0] / step**2 - e[0] / step**3
    for ax, k in zip(axes.flat, idx):
        c = analysis.checkpoints[k]
        zeros, counts = unit_norm_counts(c.unit_l2, edges)
        zbar = ax.bar([zero_left], [zeros], width=[zero_width], align="edge", color="tab:red")
        bars = ax.bar(e[:-1], counts.numpy(), width=e[1:] - e[:-1], align="edge", color="tab:blue")
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # a range under a decade would label every minor tick
        if analysis.threshold > 0:
            ax.axvline(analysis.threshold, color="tab:red", lw=0.8, ls="--")
        below = int(c.scalars["units_below_threshold"])
        ax.set_title(f"{c.name}: {zeros} zero, {below}/{int(c.scalars['units'])} <= threshold", fontsize=8)
        ax.tick_params(labelsize=7)
        drawn = [*zbar, *bars]
        xs[c.name] = [float(b.get_x()) for b in drawn]
        ys[c.name] = [float(b.get_height()) for b in drawn]
    for ax in list(axes.flat)[len(idx):]:
        ax.set_visible(False)
    fig.supxlabel("unit L2 norm (units of prunable groups; red: exactly zero; dashed: threshold)", fontsize=9)
    fig.supylabel("units", fontsize=9)
    fig.suptitle(f"{analysis.model}: per-unit L2 norms by checkpoint", fontsize=10)
    fig.tight_layout()
    with atomic_write(path) as f:
        fig.savefig(f, dpi=90, format=Path(path).suffix.lstrip(".") or "png")
    plt.close(fig)
    return PlotData(os.fspath(path), xs, ys)


TREND_LINES = {
    "macs_ratio": "active MACs / dense",
    "macs_ratio_pruned": "MACs / dense if the collapsed units were pruned",
    "bops_ratio": "structured BOPs / dense",
    "params_ratio": "active params / dense",
    "sparsity": "unstructured sparsity",
    "units_below_threshold": "units <= threshold (fraction)",
    "collapsed_units": "collapsed units (fraction)",
}


def plot_trends(analysis: Analysis, path: str | os.PathLike[str]) -> PlotData:
    """Top: active MACs, BOPs and parameters (fractions of the unpruned model), the MACs left if the collapsed
    units were pruned, unstructured sparsity and the fractions of units below the threshold and collapsed, over
    the checkpoints in order. Bottom: the group lasso (line key "group_lasso")."""
    plt = _pyplot()
    n = len(analysis.checkpoints)
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(max(6.0, 0.35 * n + 3), 5.6), sharex=True,
                                  gridspec_kw={"height_ratios": [3, 1.4]})
    xs: dict[str, list[float]] = {}
    ys: dict[str, list[float]] = {}
    x = list(range(n))
    styles = ["-", "-", "--", "-.", ":", "-", "--"]
    markers = ["o", "*", "s", "^", "D", "v", "x"]
    for j, (key, label) in enumerate(TREND_LINES.items()):
        vals = analysis.column(key)
        if key in ("units_below_threshold", "collapsed_units"):
            vals = [v / max(c.scalars["units"], 1.0) for v, c in zip(vals, analysis.checkpoints)]
        (line,) = ax.plot(x, vals, ls=styles[j], marker=markers[j], ms=4, label=label,
                          lw=2.2 if key == "macs_ratio_pruned" else 1.2)
        xs[key] = [float(v) for v in line.get_xdata()]
        ys[key] = [float(v) for v in line.get_ydata()]
    (gl,) = ax2.plot(x, analysis.column("group_lasso"), marker="o", ms=4, color="tab:gray")
    xs["group_lasso"] = [float(v) for v in gl.get_xdata()]
    ys["group_lasso"] = [float(v) for v in gl.get_ydata()]
    ax2.set_ylabel("group lasso", fontsize=8)
    ax2.grid(alpha=0.3)
    ax2.set_xticks(x)
    ax2.set_xticklabels([c.label for c in analysis.checkpoints], rotation=45, ha="right", fontsize=7)
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("fraction (1 MAC = one multiply-add)", fontsize=8)
    thr = analysis.suggested_threshold
    sub = (f"collapsed: normalized unit norm <= {thr:.2g} (the gap in their distribution)" if thr is not None
           else "no gap in the unit norms yet: nothing collapsed")
    ax.set_title(f"{analysis.model}: what pruning would keep\n{sub}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    with atomic_write(path) as f:
        fig.savefig(f, dpi=90, format=Path(path).suffix.lstrip(".") or "png")
    plt.close(fig)
    return PlotData(os.fspath(path), xs, ys)


def plot_norm_heatmap(analysis: Analysis, path: str | os.PathLike[str], *, max_units: int = 2000) -> PlotData:
    """Size-normalized unit norms (L2 / sqrt(elements), log10 colour) of every prunable unit (rows, sorted by
    the last checkpoint's value; at most `max_units`, evenly spaced) across the checkpoints (columns). Collapsing
    units form a dark band that separates from the rest; the suggested threshold is marked on the colour bar.
    Checkpoints with other unit counts (physically pruned) are left out. The returned data: x = checkpoint
    index per column, y["rows"] = the unit index of each row, y[name] = the column's log10 values."""
    plt = _pyplot()
    n_units = analysis.checkpoints[0].unit_l2.numel() if analysis.checkpoints else 0
    cols = [c for c in analysis.checkpoints if c.unit_l2.numel() == n_units]
    if not cols or n_units == 0:
        raise AnalysisError("no checkpoints with prunable units to draw")
    mat = torch.stack([c.normalized.to(torch.float64) for c in cols], dim=1)
    positive = mat[mat > 0]
    floor = float(positive.min()) / 10 if positive.numel() else 1e-12
    logs = mat.clamp(min=floor).log10()
    order = torch.argsort(logs[:, -1], stable=True)
    if order.numel() > max_units:
        order = order[torch.linspace(0, order.numel() - 1, max_units).round().long()]
    logs = logs[order]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.35 * len(cols) + 3), 4.6))
    img = ax.imshow(logs.numpy(), aspect="auto", interpolation="nearest", cmap="viridis")
    bar = fig.colorbar(img, ax=ax)
    bar.set_label("log10 normalized unit norm", fontsize=8)
    thr = analysis.suggested_threshold
    if thr is not None:
        bar.ax.axhline(math.log10(thr), color="tab:red", lw=1.5)
    ax.set_xticks(range(len(cols)))
    ax.set_xticklabels([c.label for c in cols], rotation=45, ha="right", fontsize=7)
    ax.set_ylabel(f"prunable units ({n_units}), by final norm", fontsize=8)
    ax.set_title(f"{analysis.model}: unit norms / sqrt(elements) across checkpoints"
                 + (f" (red: threshold {thr:.2g})" if thr is not None else ""), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    drawn = img.get_array()
    return PlotData(os.fspath(path), {"columns": [float(i) for i in range(len(cols))]},
                    {"rows": [float(i) for i in order.tolist()],
                     **{c.name: [float(v) for v in drawn[:, j]] for j, c in enumerate(cols)}})
