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

The numbers follow the model: every evaluation first checks that the model still holds the parameter objects
the tracker read (a handful of dict lookups). When physical pruning (or anything else) replaced them, the
tracker re-reads them, and when their shapes changed it re-traces the model (baselines kept, so compression
stays relative to the dense model) and recompiles every tracker and regularizer it made (`rebind`). If that
re-trace fails it raises `StaleProgramError` naming what to rebuild: never the old numbers.
"""

from __future__ import annotations

import enum
import fnmatch
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

import wtcore
from wtcore.errors import StaleProgramError, WtError
from wtcore.ir import Structure
from wtcore.spec import REGISTRY, Spec

from ..costs.bits import BitsSpec, fake_quant_bits, resolve_bits
from ..modules import effective_getters, owner
from ..tracing.entry import trace
from .decay import ChannelDecay

__all__ = ["Regularizer", "Tracker", "WeightTracker", "constant_outputs", "tracker_kinds", "unit_norm_histograms"]

Selector = nn.Module | type | str


# ----------------------------------------------------------------------------------------- kinds
#: torch-weighttracker names accepted for the same trackers (name -> spec, options)
ALIASES: dict[str, tuple[str, dict[str, Any]]] = {"nvidia_2_4_sparsity": ("nm_sparsity", {"n": 2, "m": 4})}
#: the spec option that include/ignore fill, and the output axis whose entries it selects
SELECTORS = (("ops", "op"), ("params", "param"), ("groups", "group"))
#: where the entries of a vector output go in a key: `{prefix}/ops/{op name}/...`
FOLDERS = {"op": "ops", "param": "params", "group": "groups"}
#: scalar regularizer specs (`create_regularizer` accepts any scalar spec; these are the built-in ones)
REGULARIZERS = ("group_lasso", "mac_group_lasso", "bop_group_lasso", "reweighted_group_lasso")


def _loggable(outputs: str | Mapping[str, str]) -> bool:
    """A spec a tracker can log: every output a number, or a vector over ops, parameters, groups or bins."""
    if isinstance(outputs, str):
        return outputs in ("scalar", "op", "param", "group")
    return "*" not in outputs and all(a in ("scalar", "op", "param", "group", "bin", "edge") for a in outputs.values())


def tracker_kinds() -> list[str]:
    """The registered specs `create_tracker` accepts (user specs included), in registration order."""
    return [name for name, d in REGISTRY.items() if _loggable(d.outputs_for({}))]


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
    _request: dict[str, Any] = field(default_factory=dict, repr=False)  # create_tracker's arguments, for rebind

    def track(self) -> dict[str, float]:
        """This tracker's metrics only (its own compiled program)."""
        return self.owner._evaluate([self])


class Regularizer:
    """A differentiable loss term: `reg()` evaluates its program on the model's current parameters (after a
    physical prune, on the pruned ones: its tracker recompiles it)."""

    def __init__(self, owner: WeightTracker, program: wtcore.Program, key: str,
                 request: dict[str, Any] | None = None) -> None:
        self.owner, self.program, self.key = owner, program, key
        self._request = request or {}

    def __call__(self) -> torch.Tensor:
        params = self.owner.params()  # first: it may rebind (and recompile this regularizer)
        return self.program(params)[self.key]

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
        self.trace_opts = trace_opts
        self.structure = structure if structure is not None else trace(model, example_inputs, **trace_opts)
        self._trackers: list[Tracker] = []
        self._regularizers: list[Regularizer] = []
        self._fused: wtcore.Program | None = None
        self._const_keys: frozenset[str] | None = None
        self._constants_sent = False
        self._fq: tuple[dict[str, int], dict[str, int]] | None = None
        self.refresh()

    # ------------------------------------------------------------------------------ parameters
    def refresh(self) -> None:
        """Re-read the parameter objects of the model (after replacing a parameter or adding a
        reparametrization). If their shapes no longer fit the structure (physically pruned), re-trace and
        `rebind`; `StaleProgramError` if that fails."""
        try:
            getters = list(effective_getters(self.model, [p.name for p in self.structure.params]).items())
            current = {n: tuple(g().shape) for n, g in getters}
        except WtError:  # a parameter of the structure is gone: the model changed its layout
            current = None
        if current is None or any(current[p.name] != tuple(p.shape) for p in self.structure.params):
            self._retrace()
            return
        self._getters = getters
        self._watched = [(m, leaf, m._parameters.get(leaf)) for m, leaf in
                         (owner(self.model, p.name) for p in self.structure.params)]

    def _stale(self) -> bool:
        """The model no longer holds the parameter objects the getters read."""
        return any(m._parameters.get(leaf) is not obj for m, leaf, obj in self._watched)

    def _retrace(self) -> None:
        try:
            new = trace(self.model, self.example_inputs, **self.trace_opts)
        except Exception as e:
            raise StaleProgramError(
                f"the model's parameters no longer fit the structure this WeightTracker was built on (physically "
                f"pruned?) and re-tracing failed ({type(e).__name__}: {e}); build a new WeightTracker and its "
                "trackers and regularizers, or call rebind(structure) with the pruned model's structure"
            ) from e
        self.rebind(new.with_baseline(self.structure))

    def rebind(self, structure: Structure) -> None:
        """Follow the model to `structure` (e.g. the one `prune_units` returns): re-read the parameters and
        recompile every tracker and regularizer made here, with the same arguments (keys unchanged)."""
        if not structure.groups and not structure.params:
            raise WtError("rebind: the structure is empty")
        self.structure = structure
        self._fq = None
        self._fused = None
        self._getters = list(effective_getters(self.model, [p.name for p in structure.params]).items())
        self._watched = [(m, leaf, m._parameters.get(leaf)) for m, leaf in
                         (owner(self.model, p.name) for p in structure.params)]
        getters = dict(self._getters)
        bad = [p.name for p in structure.params if tuple(getters[p.name]().shape) != tuple(p.shape)]
        if bad:
            raise StaleProgramError(f"rebind: the model's {bad[:3]} do not have the shapes of the structure given; "
                                    "pass the structure of the model as it is now")
        old, self._trackers = self._trackers, []
        for t in old:
            fresh = self.create_tracker(**t._request)
            self._trackers.remove(fresh)
            t.spec, t.keys, t._format = fresh.spec, fresh.keys, fresh._format
            self._trackers.append(t)
        regs, self._regularizers = self._regularizers, []
        for r in regs:
            fresh = self.create_regularizer(**r._request)
            r.program, r.key = fresh.program, fresh.key
        self._regularizers = regs

    def params(self) -> dict[str, torch.Tensor]:
        """The model's effective parameters by canonical name (masks and parametrizations applied); follows
        the model when its parameters were replaced (see the module docstring)."""
        if self._stale():
            self.refresh()
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
        request = dict(kinds=kinds, include=include, ignore=ignore, name=name, per_op=per_op, per_param=per_param,
                       per_group=per_group, **opts)
        kname = _kind_name(kinds)
        spec_name, extra = ALIASES.get(kname, (kname, {}))
        d = REGISTRY.get(spec_name)
        if d is None or not _loggable(d.outputs_for(extra)):
            raise WtError(f"unknown tracker {kname!r}; known trackers: {', '.join([*tracker_kinds(), *ALIASES])}")
        selector = next(((opt, axis) for opt, axis in SELECTORS if opt in d.options), None)
        allowed = [o for o in d.options if selector is None or o != selector[0]]
        unknown = [o for o in opts if o not in allowed]
        if unknown:
            raise WtError(f"tracker {kname!r} has no option(s) {unknown}; its options are: {', '.join(allowed)}")
        options = self._resolve_bits(d.options, {**extra, **opts})
        prefix = name or kname
        if include is not None or ignore is not None:
            if selector is None:
                raise WtError(f"tracker {kname!r} takes no include/ignore")
            pool = wtcore.compile(self.structure, [Spec(spec_name, **options)])
            items = next(pool.item_names[key] for key, _, axis in _outputs(pool, spec_name, d.outputs_for(options))
                         if axis == selector[1])
            options[selector[0]] = self._select(kname, selector[1], items, include, ignore)
        spec = Spec(spec_name, key=f"t{len(self._trackers)}:{prefix}", **options)
        try:
            prog = wtcore.compile(self.structure, [spec], backend=None)  # validates options now, fills the cache
        except wtcore.WtError as e:
            raise WtError(f"tracker {kname!r}: {e}") from e
        per = {"op": per_op, "param": per_param, "group": per_group}
        fmt, keys = _formatter(prefix, spec.key, prog, d.outputs_for(options), per)
        clash = set(keys) & {key for t in self._trackers for key in t.keys}
        if clash:
            raise WtError(f"tracker {kname!r} would produce keys that another tracker already produces "
                          f"({sorted(clash)[:3]}); pass name= to give it its own prefix")
        tracker = Tracker(self, kname, spec, keys, fmt, request)
        self._trackers.append(tracker)
        self._fused = None
        self._const_keys, self._constants_sent = None, False
        return tracker

    def remove_tracker(self, tracker: Tracker) -> None:
        self._trackers.remove(tracker)
        self._fused = None
        self._const_keys, self._constants_sent = None, False

    def clear_trackers(self) -> None:
        self._trackers.clear()
        self._fused = None
        self._const_keys, self._constants_sent = None, False

    @property
    def trackers(self) -> tuple[Tracker, ...]:
        return tuple(self._trackers)

    def track(self, constants: bool = True) -> dict[str, float]:
        """Every registered tracker's metrics as one flat dict of Python floats (stable key order).

        `constants=False` leaves out, from the second call on, the keys whose value cannot change while the
        structure stays the same (baselines, element and unit counts: outputs that depend on no parameter), so a
        logger records them once; the first call, and the first after the trackers change, has them all."""
        if not self._trackers:
            raise WtError("no tracker registered; call create_tracker(...) first")
        out = self._evaluate(self._trackers)
        if constants:
            return out
        const = self._constant_keys()
        if not self._constants_sent:
            self._constants_sent = True
            return out
        return {k: v for k, v in out.items() if k not in const}

    def _constant_keys(self) -> frozenset[str]:
        if self._const_keys is None:
            prog = self.program()
            const_outputs = constant_outputs(prog)
            keys: set[str] = set()
            for t in self._trackers:  # a flat key is constant when every program output it reads is
                probe = {k: [0.0] * n for k, n in zip(prog.output_keys, prog.output_numels)}
                for key in t._format(probe):
                    keys.add(key)
                for src in prog.output_keys:
                    if src in const_outputs:
                        continue
                    changed = {k: ([1.0] * n if k == src else [0.0] * n)
                               for k, n in zip(prog.output_keys, prog.output_numels)}
                    keys -= {k for k, v in t._format(changed).items() if v != 0.0}
            self._const_keys = frozenset(keys)
        return self._const_keys

    def program(self) -> wtcore.Program:
        """The fused program `track()` evaluates."""
        if self._fused is None:
            self._fused = wtcore.compile(self.structure, [t.spec for t in self._trackers], backend=self.backend)
        return self._fused

    def _evaluate(self, trackers: Sequence[Tracker]) -> dict[str, float]:
        params = self.params()  # first: it may rebind (and recompile the trackers)
        prog = self.program() if trackers is self._trackers else wtcore.compile(
            self.structure, [t.spec for t in trackers], backend=self.backend)
        with torch.no_grad():
            flat = prog.flat(params).tolist()  # one host sync for every metric
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
        request = dict(kind=kind, include=include, ignore=ignore, **opts)
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
        reg = Regularizer(self, prog, prog.output_keys[0], request)
        self._regularizers.append(reg)
        return reg

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
    def _resolve_bits(self, spec_options: Sequence[str], options: dict[str, Any]) -> dict[str, Any]:
        for opt, what in (("weight_bits", "weight bits"), ("act_bits", "activation bits")):
            if opt not in spec_options:
                continue
            spec: BitsSpec = options.get(opt)
            fq = None
            if spec is None or spec == "fake_quant":
                if self._fq is None:
                    self._fq = fake_quant_bits(self.structure, self.model, self.example_inputs)
                fq = self._fq[0 if opt == "weight_bits" else 1]
            options[opt] = resolve_bits(self.structure, self.model, spec, what=what, fake_quant=fq)
        return options

    def _select(self, kname: str, axis: str, items: Sequence[str], include: Any, ignore: Any) -> tuple[str, ...]:
        """The ops / parameters / groups (`axis`) of the tracker's own items that include/ignore keep."""
        s = self.structure
        inc = _module_names(self.model, include, "include")
        ign = _module_names(self.model, ignore, "ignore") or set()
        inc_g, ign_g = _globs(include), _globs(ignore)
        if inc is not None and not inc and not inc_g:
            raise WtError(f"include={include!r} matches no module of the model")
        ops = {o.name: o for o in s.ops}

        def names(item: str) -> list[str]:  # the item's names, its module's last
            if axis == "op":
                return [item, ops[item].param, ops[item].module]
            if axis == "param":
                return [item, s.param_map[item].module]
            return [item, s.group_map[item].root]

        def keep(item: str) -> bool:
            if inc is not None and not _hit(names(item), inc, inc_g):
                return False
            return not _hit(names(item), ign, ign_g)

        out = tuple(i for i in items if keep(i))
        if not out:
            what = {"op": "costed op", "param": "parameter", "group": "unit group"}[axis]
            raise WtError(f"include={include!r} / ignore={ignore!r} leave no {what} for tracker {kname!r}")
        return out


def _outputs(prog: wtcore.Program, spec_key: str, outputs: str | Mapping[str, str]) -> Iterator[tuple[str, str, str]]:
    """(program output key, output name, declared axis) of every output of a one-spec program."""
    for key in prog.output_keys:
        name = key[len(spec_key) + 1:] if key != spec_key else ""
        yield key, name, outputs if isinstance(outputs, str) else outputs[name]


Formatter = Callable[[Mapping[str, list[float]]], dict[str, float]]


def _formatter(prefix: str, spec_key: str, prog: wtcore.Program, outputs: str | Mapping[str, str],
               per: Mapping[str, bool]) -> tuple[Formatter, tuple[str, ...]]:
    """How a tracker turns its program's outputs into flat keys, from what the spec declares: a number gives
    `{prefix}/{output}` (`{prefix}` for a spec returning one number), a vector over ops / parameters / groups
    one key per entry, `{prefix}/ops/{op}/{rest of the output name after per_op}` (when `per_op` etc. is on),
    histogram bins `{prefix}/{bin}`; bin edges are not logged."""
    picks: list[tuple[str, str, int]] = []  # (flat key, program output, entry)
    for key, name, axis in _outputs(prog, spec_key, outputs):
        if axis == "scalar":
            picks.append((f"{prefix}/{name}" if name else prefix, key, 0))
        elif axis == "bin":
            picks += [(f"{prefix}/{item}", key, i) for i, item in enumerate(prog.item_names[key])]
        elif axis in FOLDERS and per[axis]:
            rest = name.removeprefix(f"per_{axis}").lstrip("_")
            picks += [(f"{prefix}/{FOLDERS[axis]}/{item}" + (f"/{rest}" if rest else ""), key, i)
                      for i, item in enumerate(prog.item_names[key])]

    def fmt(values: Mapping[str, list[float]]) -> dict[str, float]:
        return {flat: values[src][i] for flat, src, i in picks}

    return fmt, tuple(flat for flat, _, _ in picks)


def constant_outputs(program: wtcore.Program) -> frozenset[str]:
    """The output keys of `program` that depend on no parameter (folded constants: baselines, counts)."""
    depends: dict[Any, bool] = {}
    for e in program.eqns:
        depends[e.out] = e.prim == "param" or any(depends.get(v, False) for v in e.vars)
    return frozenset(k for k, v in program.outputs if not depends.get(v, False))


def unit_norm_histograms(model: nn.Module, structure: Structure, *, groups: Iterable[str] | None = None,
                         normalized: bool = False) -> dict[str, torch.Tensor]:
    """Per-unit L2 norms of the model's current parameters, one 1-D CPU tensor per prunable unit group (key
    `unit_norms/{group}`) and all of them together (`unit_norms/all`), in the form histogram loggers take:
    `SummaryWriter.add_histogram(key, values, step)`, `wandb.Histogram(values.numpy())`.
    `normalized=True` divides each norm by sqrt(elements per unit), so units of wide and narrow layers compare.
    `groups`: fnmatch patterns of the groups to include (default: every prunable group)."""
    from ..modules import effective_params

    with torch.no_grad():
        l2 = wtcore.compile(structure, ["unit_l2"])(effective_params(model, structure))["unit_l2"]
        l2 = l2.detach().to("cpu", torch.float64)
        if normalized:
            ones = {p.name: torch.ones(p.shape) for p in structure.params}
            sizes = wtcore.compile(structure, ["unit_l2"])(ones)["unit_l2"].to(torch.float64)
            l2 = l2 / sizes.clamp(min=1e-12)
    patterns = list(groups) if groups is not None else None
    out: dict[str, torch.Tensor] = {}
    parts = []
    start = 0
    for g in structure.groups:
        sl = l2[start:start + g.size]
        start += g.size
        if not g.prunable or (patterns is not None and not any(fnmatch.fnmatchcase(g.name, p) for p in patterns)):
            continue
        out[f"unit_norms/{g.name}"] = sl.clone()
        parts.append(sl)
    if not parts:
        raise WtError(f"no prunable unit group matches {patterns!r}")
    return {"unit_norms/all": torch.cat(parts), **out}
