"""The tracker API on a live model: metrics and regularizers compiled once, evaluated every step.

    tracker = WeightTracker(model, example_inputs)
    tracker.create_tracker(["structured_bops", "nm_sparsity", "group_pruning_summary"])
    group_lasso = tracker.create_regularizer("group_lasso")
    ...
    loss = task_loss + 1e-4 * group_lasso()
    metrics = tracker.track()          # {"structured_bops/compression": 0.31, ...}: Python floats

Method names follow the torch-weighttracker package (`create_tracker`, `track`, `create_regularizer`,
`view_structures`); see docs/tracking.md for the keys and the differences.

`track()` evaluates ONE program (every registered tracker fused: shared reductions are computed once, one
`index_add` in all) on the model's current effective parameters (through `nn.utils.prune` masks and
parametrizations) and converts all values to floats with one device-to-host copy.
"""

from __future__ import annotations

import enum
import fnmatch
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

import wtcore
from wtcore.errors import WtError
from wtcore.ir import Structure
from wtcore.spec import REGISTRY, Spec
from wtcore.specs.costs import WEIGHT_KINDS, weight_params
from wtcore.specs.sparsity import NM_KINDS, histogram_edges

from ..costs.bits import BitsSpec, fake_quant_bits, resolve_bits
from ..modules import effective_getters
from ..tracing.entry import trace
from .decay import ChannelDecay

__all__ = ["TRACKER_KINDS", "Regularizer", "Tracker", "WeightTracker"]

Selector = nn.Module | type | str


# ----------------------------------------------------------------------------------------- kinds
@dataclass(frozen=True)
class _Kind:
    """How a tracker kind maps to a spec: its options, what include/ignore select, and its keys."""

    spec: str
    prefix: str
    selects: str  # "ops" | "params" | "nm_params" | "groups" | "none"
    spec_options: tuple[str, ...]
    scalars: tuple[str, ...]  # spec output -> key f"{prefix}/{name}"
    doc: str
    defaults: tuple[tuple[str, Any], ...] = ()


_BOPS_OPTS = ("weight_bits", "act_bits", "tolerance")
TRACKER_KINDS: dict[str, _Kind] = {
    "active_macs": _Kind("active_macs", "active_macs", "ops", ("tolerance",),
                         ("total", "dense", "baseline", "ratio"), "active MACs (1 MAC = one multiply-add)"),
    "structured_bops": _Kind("structured_bops", "structured_bops", "ops", _BOPS_OPTS,
                             ("total", "baseline", "compression"), "active MACs x act bits x weight bits"),
    "unstructured_bops": _Kind("unstructured_bops", "unstructured_bops", "ops", _BOPS_OPTS,
                               ("total", "baseline", "compression"), "BOPs of multiply-adds with a nonzero weight"),
    "compression": _Kind("compression", "compression", "ops", _BOPS_OPTS, ("",),
                         "1 - structured BOPs / dense 32x32-bit BOPs"),
    "unstructured_sparsity": _Kind("unstructured_sparsity", "unstructured_sparsity", "params", ("tolerance",),
                                   ("total", "zeros", "numel"), "fraction of exactly-zero weights"),
    "nm_sparsity": _Kind("nm_sparsity", "nm_sparsity", "nm_params", ("n", "m", "tolerance"),
                         ("strict_fraction", "eligible_fraction", "blocks", "strict_blocks", "eligible_blocks",
                          "tail_elements", "layers", "strict_layers", "eligible_layers"),
                         "N:M blocks along the input axis of linear/conv weights", (("n", 2), ("m", 4))),
    "group_pruning_summary": _Kind("group_pruning_summary", "group_pruning", "groups", ("tolerance",),
                                   ("pruned_units", "pruned_params", "units"), "pruned units and parameters"),
    "unit_l2_histogram": _Kind("unit_l2_histogram", "unit_l2_histogram", "none",
                               ("bins", "lo", "hi", "log", "groups"), ("below", "above", "zero", "units"),
                               "histogram of unit L2 norms over fixed bins"),
    "active_params": _Kind("active_params", "active_params", "params", ("tolerance",),
                           ("total", "numel", "baseline", "ratio"), "parameter elements physical pruning would keep"),
}
#: scalar regularizer specs (`create_regularizer` accepts any scalar spec; these are the built-in ones)
REGULARIZERS = ("group_lasso", "mac_group_lasso", "bop_group_lasso", "reweighted_group_lasso")
#: torch-weighttracker names accepted for the same trackers
_ALIASES = {"nvidia_2_4_sparsity": ("nm_sparsity", {"n": 2, "m": 4})}


def _kind_name(kind: Any) -> str:
    if isinstance(kind, enum.Enum):
        kind = kind.value
    if not isinstance(kind, str):
        raise WtError(f"a tracker kind is a name such as 'structured_bops', got {kind!r}")
    return kind.lower()


# ----------------------------------------------------------------------------------------- selection
def _module_names(model: nn.Module, items: Iterable[Selector] | Selector | None, what: str) -> set[str] | None:
    """Module instances, nn.Module classes and qualified-name globs -> module names (with submodules).
    Globs that match no module are kept as name patterns (op and parameter names); None stays None."""
    if items is None:
        return None
    if isinstance(items, (nn.Module, str, type)):
        items = [items]
    named = list(model.named_modules())
    by_id = {id(m): n for n, m in named}
    chosen: set[str] = set()
    for item in items:
        if isinstance(item, nn.Module):
            if id(item) not in by_id:
                raise WtError(f"{what}: module {type(item).__name__} is not a submodule of the tracked model")
            chosen.add(by_id[id(item)])
        elif isinstance(item, type) and issubclass(item, nn.Module):
            hits = {n for n, m in named if isinstance(m, item)}
            if not hits:
                raise WtError(f"{what}: the model has no {item.__name__} module")
            chosen |= hits
        elif isinstance(item, str):
            chosen |= {n for n, _ in named if fnmatch.fnmatchcase(n, item)}
        else:
            raise WtError(f"{what}: pass module instances, nn.Module classes or name globs, got {item!r}")
    expanded = set(chosen)
    for n in chosen:
        prefix = f"{n}." if n else ""
        expanded |= {m for m, _ in named if m.startswith(prefix)}
    return expanded


def _globs(items: Iterable[Selector] | Selector | None) -> list[str]:
    if items is None:
        return []
    if isinstance(items, (nn.Module, str, type)):
        items = [items]
    return [i for i in items if isinstance(i, str)]


def _hit(names: Sequence[str], modules: set[str] | None, globs: Sequence[str]) -> bool:
    return any(n in (modules or ()) for n in names[-1:]) or any(
        fnmatch.fnmatchcase(n, g) for n in names[:-1] for g in globs)


# ----------------------------------------------------------------------------------------- handles
@dataclass
class Tracker:
    """One registered tracker: a spec request and how its outputs become flat keys."""

    owner: WeightTracker
    kind: str
    spec: Spec
    keys: tuple[str, ...]
    _format: Callable[[Mapping[str, list[float]]], dict[str, float]] = field(repr=False)

    def track(self) -> dict[str, float]:
        """This tracker's metrics only (its own compiled program)."""
        return self.owner._evaluate([self])


class Regularizer:
    """A differentiable loss term: `reg()` evaluates its program on the model's current parameters."""

    def __init__(self, owner: WeightTracker, program: wtcore.Program, key: str) -> None:
        self.owner, self.program, self.key = owner, program, key

    def __call__(self) -> torch.Tensor:
        return self.program(self.owner.params())[self.key]

    def __repr__(self) -> str:
        return f"<wt Regularizer {self.key!r}>"


# ----------------------------------------------------------------------------------------- tracker
class WeightTracker:
    """Trackers and regularizers on a live model, compiled once over its traced `Structure`.

    Args:
        model: the model; its parameters are read (not copied) at every `track()`/regularizer call.
        example_inputs: a tensor, tuple of positional arguments or mapping of keyword arguments.
        structure: a structure traced before (skips tracing).
        backend: a `torch.compile` backend (e.g. "inductor") for the programs, or None for eager.
        **trace_opts: passed to `wtfront.trace` (ignore=, root_types=, budget_s=, check_device=).
    """

    def __init__(self, model: nn.Module, example_inputs: Any, *, structure: Structure | None = None,
                 backend: str | None = None, **trace_opts: Any) -> None:
        self.model = model
        self.example_inputs = example_inputs
        self.backend = backend
        self.structure = structure if structure is not None else trace(model, example_inputs, **trace_opts)
        self._trackers: list[Tracker] = []
        self._fused: wtcore.Program | None = None
        self._fq: tuple[dict[str, int], dict[str, int]] | None = None
        self.refresh()

    # ------------------------------------------------------------------------------ parameters
    def refresh(self) -> None:
        """Re-read the parameter objects of the model (after replacing a parameter or adding a
        reparametrization); shapes must still match the structure (physically pruned: trace again)."""
        self._getters = list(effective_getters(self.model, [p.name for p in self.structure.params]).items())

    def params(self) -> dict[str, torch.Tensor]:
        """The model's effective parameters by canonical name (masks and parametrizations applied)."""
        return {n: g() for n, g in self._getters}

    # ------------------------------------------------------------------------------ trackers
    def create_tracker(self, kinds: Any, include: Iterable[Selector] | Selector | None = None,
                       ignore: Iterable[Selector] | Selector | None = None, *, name: str | None = None,
                       per_op: bool = False, per_param: bool = False, per_group: bool = True,
                       **opts: Any) -> Tracker | list[Tracker]:
        """Register one tracker kind (or a list of them) and return its handle(s).

        include/ignore: module instances, nn.Module classes or fnmatch globs over module, op and parameter
        names; they select what is counted (ops for MACs/BOPs, weights for sparsity, groups by root for
        the pruning summary). Whether a unit is zero always looks at every parameter coupled to it.
        name: key prefix instead of the kind's default (needed to register a kind twice).
        per_op / per_param / per_group: also emit one key per op / weight / unit group.
        opts: the kind's options (`tolerance`, `weight_bits`, `act_bits`, `n`, `m`, histogram `bins`, ...);
        bit widths may be ints, mappings from op names/globs, functions `(op_name, module) -> int`, or
        "fake_quant" (default None: fake-quant modules where present, else 32).
        """
        if isinstance(kinds, (list, tuple)):
            return [self.create_tracker(k, include, ignore, name=name, per_op=per_op, per_param=per_param,
                                        per_group=per_group, **opts) for k in kinds]
        kname = _kind_name(kinds)
        extra: dict[str, Any] = {}
        if kname in _ALIASES:
            kname, extra = _ALIASES[kname]
        k = TRACKER_KINDS.get(kname)
        if k is None:
            raise WtError(f"unknown tracker {kname!r}; known trackers: {', '.join([*TRACKER_KINDS, *_ALIASES])}")
        unknown = [o for o in opts if o not in k.spec_options]
        if unknown:
            raise WtError(f"tracker {kname!r} has no option(s) {unknown}; its options are: {', '.join(k.spec_options)}")
        options = {**dict(k.defaults), **extra, **opts}
        options = self._resolve_bits(kname, options)
        prefix = name or k.prefix
        if kname == "nm_sparsity" and name is None:
            prefix = f"{k.prefix}/{options['n']}:{options['m']}"
        selected = self._select(kname, k, include, ignore)
        if selected is not None:
            options[{"nm_params": "params"}.get(k.selects, k.selects)] = selected
        spec = Spec(k.spec, key=f"t{len(self._trackers)}:{prefix}", **options)
        try:
            wtcore.compile(self.structure, [spec], backend=None)  # validates options now, fills the cache
        except wtcore.WtError as e:
            raise WtError(f"tracker {kname!r}: {e}") from e
        fmt, keys = self._formatter(kname, k, prefix, spec, per_op, per_param, per_group, selected, options)
        clash = set(keys) & {key for t in self._trackers for key in t.keys}
        if clash:
            raise WtError(f"tracker {kname!r} would produce keys that another tracker already produces "
                          f"({sorted(clash)[:3]}); pass name= to give it its own prefix")
        tracker = Tracker(self, kname, spec, keys, fmt)
        self._trackers.append(tracker)
        self._fused = None
        return tracker

    def remove_tracker(self, tracker: Tracker) -> None:
        self._trackers.remove(tracker)
        self._fused = None

    def clear_trackers(self) -> None:
        self._trackers.clear()
        self._fused = None

    @property
    def trackers(self) -> tuple[Tracker, ...]:
        return tuple(self._trackers)

    def track(self) -> dict[str, float]:
        """Every registered tracker's metrics as one flat dict of Python floats (stable key order)."""
        if not self._trackers:
            raise WtError("no tracker registered; call create_tracker(...) first")
        return self._evaluate(self._trackers)

    def program(self) -> wtcore.Program:
        """The fused program `track()` evaluates."""
        if self._fused is None:
            self._fused = wtcore.compile(self.structure, [t.spec for t in self._trackers], backend=self.backend)
        return self._fused

    def _evaluate(self, trackers: Sequence[Tracker]) -> dict[str, float]:
        prog = self.program() if trackers is self._trackers else wtcore.compile(
            self.structure, [t.spec for t in trackers], backend=self.backend)
        with torch.no_grad():
            flat = prog.flat(self.params()).tolist()  # one host sync for every metric
        values: dict[str, list[float]] = {}
        pos = 0
        for key, n in zip(prog.output_keys, prog.output_numels):
            values[key] = flat[pos: pos + n]
            pos += n
        result: dict[str, float] = {}
        for t in trackers:
            result.update(t._format(values))
        return result

    # ------------------------------------------------------------------------------ regularizers
    def create_regularizer(self, kind: Any = "group_lasso", include: Iterable[Selector] | Selector | None = None,
                           ignore: Iterable[Selector] | Selector | None = None, **opts: Any) -> Regularizer:
        """A callable loss (a scalar tensor with gradients) over the current parameters, e.g. group lasso.

        include/ignore decide which parameters' slices enter the per-unit norms (module instances, classes or
        name globs, resolved to module names). opts are the spec's options (`weighted=`, `groups=`)."""
        kname = _kind_name(kind)
        if kname not in REGISTRY:
            raise WtError(f"unknown regularizer {kname!r}; regularizers: {', '.join(REGULARIZERS)}")
        inc = self._filter_names(include, "include")
        ign = self._filter_names(ignore, "ignore") or ()
        try:
            prog = wtcore.compile(self.structure, [Spec(kname, **opts)], include=inc, ignore=ign,
                                  backend=self.backend)
        except wtcore.WtError as e:
            raise WtError(f"regularizer {kname!r}: {e}") from e
        if len(prog.output_keys) != 1:
            raise WtError(f"regularizer {kname!r} has outputs {list(prog.output_keys)}; a regularizer is a scalar")
        return Regularizer(self, prog, prog.output_keys[0])

    def create_channel_decay(self, reg: float = 1e-4, rule: str = "depgraph",
                             include: Iterable[Selector] | Selector | None = None,
                             ignore: Iterable[Selector] | Selector | None = None, **opts: Any) -> ChannelDecay:
        """Gradient-side channel decay (`wtfront.ChannelDecay`): call `.step()` after `loss.backward()`.
        opts: `alpha=`, `delta_reg=`, `bias=`."""
        return ChannelDecay(self.model, self.structure, reg=reg, rule=rule,
                            include=self._filter_names(include, "include"),
                            ignore=self._filter_names(ignore, "ignore"), **opts)

    def _filter_names(self, items: Any, what: str) -> list[str] | None:
        mods = _module_names(self.model, items, what)
        if mods is None:
            return None
        names = sorted(m for m in mods if m) + _globs(items)
        if "" in mods:
            names.append("*")
        if not names:
            raise WtError(f"{what}={items!r} matches no module of the model")
        return names

    # ------------------------------------------------------------------------------ views
    def view_structures(self) -> str:
        """The structure's table: unit groups, their members, cost ops and MACs (1 MAC = one multiply-add)."""
        return str(self.structure)

    # ------------------------------------------------------------------------------ internals
    def _resolve_bits(self, kname: str, options: dict[str, Any]) -> dict[str, Any]:
        for opt, what in (("weight_bits", "weight bits"), ("act_bits", "activation bits")):
            if opt not in TRACKER_KINDS[kname].spec_options:
                continue
            spec: BitsSpec = options.get(opt)
            fq = None
            if spec is None or spec == "fake_quant":
                if self._fq is None:
                    self._fq = fake_quant_bits(self.structure, self.model, self.example_inputs)
                fq = self._fq[0 if opt == "weight_bits" else 1]
            options[opt] = resolve_bits(self.structure, self.model, spec, what=what, fake_quant=fq)
        return options

    def _select(self, kname: str, k: _Kind, include: Any, ignore: Any) -> tuple[str, ...] | None:
        if include is None and ignore is None:
            return None
        s = self.structure
        inc = _module_names(self.model, include, "include")
        ign = _module_names(self.model, ignore, "ignore") or set()
        inc_g, ign_g = _globs(include), _globs(ignore)
        if inc is not None and not inc and not inc_g:
            raise WtError(f"include={include!r} matches no module of the model")

        def keep(names: Sequence[str]) -> bool:
            if inc is not None and not _hit(names, inc, inc_g):
                return False
            return not _hit(names, ign, ign_g)

        if k.selects == "ops":
            out = tuple(o.name for o in s.ops if keep([o.name, o.param, o.module]))
            what = "costed op"
        elif k.selects in ("params", "nm_params"):
            pool = (weight_params(s, NM_KINDS) if k.selects == "nm_params" else
                    weight_params(s, WEIGHT_KINDS) if kname == "unstructured_sparsity" else [p.name for p in s.params])
            out = tuple(n for n in pool if keep([n, s.param_map[n].module]))
            what = "weight" if kname != "active_params" else "parameter"
        elif k.selects == "groups":
            out = tuple(g.name for g in s.groups if keep([g.name, g.root]))
            what = "unit group"
        else:
            raise WtError(f"tracker {kname!r} takes no include/ignore")
        if not out:
            raise WtError(f"include={include!r} / ignore={ignore!r} leave no {what} for tracker {kname!r}")
        return out

    def _formatter(self, kname: str, k: _Kind, prefix: str, spec: Spec, per_op: bool, per_param: bool,
                   per_group: bool, selected: tuple[str, ...] | None, options: Mapping[str, Any]
                   ) -> tuple[Callable[[Mapping[str, list[float]]], dict[str, float]], tuple[str, ...]]:
        s = self.structure
        out_key = spec.key
        if kname == "compression":
            def fmt_c(v: Mapping[str, list[float]]) -> dict[str, float]:
                return {prefix: v[out_key][0]}

            return fmt_c, (prefix,)
        scalars = [(f"{prefix}/{n}", f"{out_key}/{n}") for n in k.scalars]
        vectors: list[tuple[str, list[str], str]] = []  # (program output, item names, key template)
        if k.selects == "ops" and per_op:
            names = list(selected) if selected is not None else [o.name for o in s.ops]
            vectors.append((f"{out_key}/per_op", names, f"{prefix}/ops/{{}}"))
            if kname.endswith("_bops"):
                vectors.append((f"{out_key}/per_op_compression", names, f"{prefix}/ops/{{}}/compression"))
        if k.selects in ("params", "nm_params") and per_param:
            if selected is not None:
                names = list(selected)
            elif kname == "active_params":
                names = [p.name for p in s.params]
            else:
                names = weight_params(s, NM_KINDS if k.selects == "nm_params" else WEIGHT_KINDS)
            if kname == "nm_sparsity":
                for out in ("strict_fraction", "eligible_fraction", "tail_elements"):
                    vectors.append((f"{out_key}/per_param_{out}", names, f"{prefix}/params/{{}}/{out}"))
            else:
                vectors.append((f"{out_key}/per_param", names, f"{prefix}/params/{{}}"))
        if k.selects == "groups" and per_group:
            names = list(selected) if selected is not None else [g.name for g in s.groups]
            vectors.append((f"{out_key}/per_group_pruned_units", names, f"{prefix}/groups/{{}}/pruned_units"))
            vectors.append((f"{out_key}/per_group_pruned_params", names, f"{prefix}/groups/{{}}/pruned_params"))
        if kname == "unit_l2_histogram":
            edges = histogram_edges(options.get("bins", 16), options.get("lo", 1e-6), options.get("hi", 1e2),
                                    options.get("log", True)).tolist()
            vectors.append((f"{out_key}/counts", [f"{e:.3g}" for e in edges[:-1]], f"{prefix}/ge_{{}}"))

        def fmt(v: Mapping[str, list[float]]) -> dict[str, float]:
            res = {key: v[src][0] for key, src in scalars}
            for src, names, tmpl in vectors:
                res.update({tmpl.format(n): x for n, x in zip(names, v[src])})
            return res

        keys = tuple(key for key, _ in scalars) + tuple(
            tmpl.format(n) for _, names, tmpl in vectors for n in names)
        return fmt, keys

