"""The program language: one definition per primitive, the reference interpreter, the passes, the generated code."""

from __future__ import annotations

import dataclasses
import inspect
import re
import traceback
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
import torchvision
from hypothesis import given, settings
from toys import Net, X

import wtcore
from wtcore.testing import structures_and_params
from wtcore.testing import zero_units as zeroed
from wtfront import trace

TRACKED = ["group_lasso", "unit_l2", "unit_active", "group_active_units", "structured_bops", "active_macs",
           "unstructured_sparsity", "nm_sparsity", "group_pruning_summary", "active_params", "params_per_unit"]


@contextmanager
def counting_primitives() -> Iterator[Counter[str]]:
    """Count every call of every primitive's implementation, in programs compiled inside the block."""
    calls: Counter[str] = Counter()
    saved = dict(wtcore.PRIMITIVES)

    def counted(name: str, fn):
        def run(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)

        return run

    for name, p in saved.items():
        wtcore.PRIMITIVES[name] = dataclasses.replace(p, impl=counted(name, p.impl))
    wtcore.clear_cache()
    try:
        yield calls
    finally:
        wtcore.PRIMITIVES.update(saved)
        wtcore.clear_cache()


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]) or torch.allclose(a[k], b[k], rtol=1e-6, atol=0, equal_nan=True), k


@pytest.fixture(scope="module")
def resnet18() -> tuple[torch.nn.Module, wtcore.Structure]:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    return model, trace(model, torch.randn(1, 3, 32, 32))


# ----------------------------------------------------------------------------- primitives
def test_every_primitive_is_one_documented_function() -> None:
    for name, p in wtcore.PRIMITIVES.items():
        assert p.doc, f"primitive {name!r} has no docstring"
        sig = inspect.signature(p.impl)
        for q in sig.parameters.values():
            assert q.kind in (q.POSITIONAL_OR_KEYWORD, q.VAR_POSITIONAL, q.KEYWORD_ONLY), (name, q)
    # the compiler's plumbing and unused primitives are gone
    assert not {"nonzero_stats_batch", "stats_part", "to_float", "head", "column", "transpose", "dot", "sign",
                "clamp", "stack0", "isum", "rpow", "sumsq_rows_cols", "unit_reduce"} & set(wtcore.PRIMITIVES)


def test_every_primitive_is_used_by_some_program() -> None:
    """No dead primitive: each appears in a program compiled from the built-in specs on the toy net."""
    model = Net()
    s = trace(model, X)
    used: set[str] = set()
    for name, d in wtcore.REGISTRY.items():
        opts = {"amount": 0.3} if "amount" in d.options else {}
        if name in ("importance",):
            opts["scores"] = torch.rand(s.num_units)
        if name == "custom":
            opts = {"keep": torch.ones(s.num_units, dtype=torch.bool)}
        if "per_param" in d.options:
            opts["per_param"] = True
        if name == "decay_gamma":
            opts = {}
        prog = wtcore.compile(s, [wtcore.Spec(name, **opts)])
        used |= set(prog.stats())
        used |= {e.prim for e in wtcore.lower(s, [wtcore.Spec(name, **opts)], passes=()).eqns}
    more = wtcore.compile(s, [wtcore.Spec("group_lasso", reweighted=True), "unit_l1",
                              wtcore.Spec("ln_structured", amount=0.3, round_to=2),
                              wtcore.Spec("unstructured_sparsity", params=("bn.weight",))])
    used |= set(more.stats())
    nm_pad = trace(torch.nn.Sequential(torch.nn.Linear(6, 5)), torch.randn(2, 6))
    used |= set(wtcore.compile(nm_pad, [wtcore.Spec("nm", n=1, m=4, indivisible="pad")]).stats())
    grouped = wtcore.Structure(
        (wtcore.Param("w", (4, 6)),),
        (wtcore.UnitGroup("g", "channel", 12, (wtcore.Slice("w", 0, wtcore.runs_from_list(list(range(12))), 3, 1),)),),
    )
    used |= set(wtcore.compile(grouped, ["unit_sumsq", "unit_linf"]).stats())
    assert set(wtcore.PRIMITIVES) <= used, sorted(set(wtcore.PRIMITIVES) - used)


# ----------------------------------------------------------------------------- the interpreter
@settings(max_examples=40, deadline=None)
@given(structures_and_params())
def test_interpreter_equals_generated_code_on_random_structures(case) -> None:
    structure, params = case
    prog = wtcore.compile(structure, ["unit_sumsq", "unit_l2", "unit_l1", "unit_active", "group_active_units",
                                      "params_per_unit", "group_lasso", "unit_linf"])
    _assert_same(prog(params), wtcore.interpret(prog, params))


def test_interpreter_equals_generated_code_on_resnet18(resnet18) -> None:
    model, s = resnet18
    params = zeroed(s, {k: v.detach() for k, v in model.named_parameters()}, [0, 1, 70])
    prog = wtcore.compile(s, TRACKED)
    _assert_same(prog(params), wtcore.interpret(prog, params))


# ----------------------------------------------------------------------------- each equation once
def test_each_equation_is_evaluated_once_per_call(resnet18) -> None:
    """The generated code calls each primitive exactly as often as the program has equations of it, and runs
    the same ATen operations as the interpreter (which evaluates each equation once by construction)."""
    model, s = resnet18
    params = {k: v.detach() for k, v in model.named_parameters()}
    with counting_primitives() as calls:
        prog = wtcore.compile(s, TRACKED)
        calls.clear()
        prog(params)
        assert calls == Counter({p: n for p, n in prog.stats().items() if p not in ("param", "const")})

    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: Counter[str] = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops[str(func)] += 1
            return func(*args, **(kwargs or {}))

    with Ops() as generated:
        prog(params)
    with Ops() as interpreted:
        wtcore.interpret(prog, params)
    assert generated.ops == interpreted.ops


# ----------------------------------------------------------------------------- the passes
def test_passes_keep_a_valid_graph(resnet18) -> None:
    _, s = resnet18
    g = wtcore.lower(s, [*TRACKED, wtcore.Spec("ln_structured", amount=0.3, per_param=True)], verify=True)
    assert not any(e.prim == "unit_reduce" for e in g.eqns)
    assert [p.__name__ for p in wtcore.PASSES] == ["lower_unit_reduce", "schedule", "fold_constants",
                                                   "eliminate_dead_code", "batch_nonzero_stats"]


def test_verifier_rejects_malformed_graphs() -> None:
    from wtcore.passes import verify

    g = wtcore.Graph()
    b = wtcore.Builder(g)
    x = b.param("w")
    y = b.square(x)
    g.outputs = [("y", y)]
    verify(g)
    g.eqns.reverse()  # read before defined
    with pytest.raises(wtcore.StructureError, match="before they are defined"):
        verify(g)
    with pytest.raises(wtcore.SpecError, match="takes 1 operand"):
        b.emit("square", x, x)
    with pytest.raises(wtcore.SpecError, match="unknown parameter"):
        b.emit("sum", x, axes=(0,))
    with pytest.raises(wtcore.SpecError, match="unknown primitive"):
        b.emit("frobnicate", x)


# ----------------------------------------------------------------------------- the generated code
def test_resnet18_code_evaluates_each_cat_once_with_short_lines(resnet18) -> None:
    _, s = resnet18
    prog = wtcore.compile(s, ["group_lasso", "group_active_units", "structured_bops"])
    assert prog.code.count("cat(") <= prog.stats()["cat"]
    assert max(len(line) for line in prog.code.splitlines()) <= 160
    assert prog.stats()["scatter_add"] == 1


def test_a_traceback_shows_the_generated_line(monkeypatch: pytest.MonkeyPatch) -> None:
    s = trace(Net(), X)

    def broken(x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("boom")

    monkeypatch.setitem(wtcore.PRIMITIVES, "safe_sqrt", dataclasses.replace(wtcore.PRIMITIVES["safe_sqrt"],
                                                                            impl=broken))
    wtcore.clear_cache()
    prog = wtcore.compile(s, ["unit_l2"])
    with pytest.raises(RuntimeError, match="boom") as e:
        prog(dict(Net().named_parameters()))
    text = "".join(traceback.format_exception(e.value))
    assert "<wt program" in text and "= safe_sqrt(" in text
    wtcore.clear_cache()


def test_print_shows_shapes_and_dtypes() -> None:
    s = trace(Net(), X)
    prog = wtcore.compile(s, ["group_lasso", "group_active_units"])
    text = str(prog)
    assert f": f32[{s.num_units}] = " in text
    assert ": f32[] = sum(" in text
    assert f"group_active_units: i64[{len(s.groups)}]" not in text  # outputs are listed by name at the end
    assert text.splitlines()[-1].startswith("  return group_lasso=")
    assert prog.output_numels == (1, len(s.groups))


# ----------------------------------------------------------------------------- specs declare their outputs
def _expected_numel(axis: str, s: wtcore.Structure, opts: dict) -> int | None:
    return {"scalar": 1, "unit": s.num_units, "group": len(s.groups), "op": len(s.ops)}.get(axis)


def test_every_builtin_spec_returns_what_it_declares(resnet18) -> None:
    _, s = resnet18
    for name, d in sorted(wtcore.REGISTRY.items()):
        opts: dict = {"amount": 0.3} if "amount" in d.options else {}
        if name == "importance":
            opts["scores"] = torch.rand(s.num_units)
        if name == "custom":
            opts = {"keep": torch.ones(s.num_units, dtype=torch.bool)}
        declared = d.outputs_for(opts)
        g = wtcore.lower(s, [wtcore.Spec(name, **opts)])
        prog = wtcore.compile(s, [wtcore.Spec(name, **opts)])
        numels = dict(zip(prog.output_keys, prog.output_numels))
        if isinstance(declared, str):
            assert prog.output_keys == (name,), name
            want = _expected_numel(declared, s, opts)
            assert want is None or numels[name] == want, (name, declared)
            continue
        keys = {k.split("/", 1)[1] for k in prog.output_keys}
        fixed = {k for k in declared if k != "*"}
        assert fixed <= keys, (name, fixed - keys)
        assert "*" in declared or keys == fixed, (name, keys - fixed)
        for k in fixed:
            want = _expected_numel(declared[k], s, opts)
            assert want is None or numels[f"{name}/{k}"] == want, (name, k)
        assert g.outputs


def test_define_spec_rejects_unknown_axes() -> None:
    with pytest.raises(wtcore.SpecError, match="unknown axes"):
        @wtcore.define_spec("bad_outputs_spec", outputs={"x": "rows"})
        def bad(ctx):
            return ctx.b.unit_reduce("sumsq")


def test_literals_of_equal_value_and_different_type_are_different_equations() -> None:
    b = wtcore.Builder()
    x = b.param("w")
    assert b.mul(x, 1) is not b.mul(x, 1.0) and b.mul(x, True) is not b.mul(x, 1)
    assert b.add(x, 0.0) is not b.add(x, -0.0)
    assert b.mul(x, 2) is b.mul(x, 2)


def test_the_docs_list_every_primitive() -> None:
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "programs.md").read_text()
    listed = set(re.findall(r"^\| `(\w+)\(", text, flags=re.M))
    assert listed == set(wtcore.PRIMITIVES)
