"""`wt bench` times every registered spec: forward always, forward+backward when the program has a gradient and
--no-grad is not given; a spec that needs options says which."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from toys import Net, X

import wtcore
from wtcore.errors import SpecError
from wtcore.realizable import unit_ties
from wtcore.spec import REGISTRY
from wtfront import trace
from wtfront.cli import main
from wtfront.cli.benchmark import floor_ratios


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    model = Net().eval()
    return model, trace(model, X)


def spec_for(name: str, structure: wtcore.Structure) -> Any:
    """The spec with defaults, plus each option its errors say it needs."""
    n = structure.num_units
    # a random keep-mask that physical pruning carries out: each unit takes the draw of its tie's first unit
    values = {"amount": 0.3, "scores": torch.rand(n), "keep": (torch.rand(n) > 0.5)[unit_ties(structure)]}
    given: dict[str, Any] = {}
    for _ in range(len(values) + 1):
        try:
            spec = wtcore.Spec(name, **given)
            wtcore.compile(structure, [spec])
            return spec
        except SpecError as e:
            needed = next(o for o in values if f"needs {o}=" in str(e))
            given[needed] = values[needed]
    raise AssertionError(f"{name}: options never sufficed")


@pytest.mark.parametrize("name", list(REGISTRY))
def test_every_spec_times_forward_and_backward_when_it_has_one(net, name: str) -> None:
    model, structure = net
    params = dict(model.named_parameters())
    spec = spec_for(name, structure)
    differentiable = any(v.requires_grad for v in wtcore.compile(structure, [spec])(params).values())
    r = floor_ratios(structure, params, spec=spec, reps=1, warmup=0)
    assert r.fwd > 0
    assert (r.fwd_bwd is not None) == differentiable
    if name in ("group_lasso", "unit_l2"):
        assert differentiable
    if name in ("active_macs", "ln_structured", "group_active_units"):
        assert not differentiable
    assert floor_ratios(structure, params, spec=spec, reps=1, warmup=0, grad=False).fwd_bwd is None


@pytest.mark.parametrize("argv", [["--spec", "active_macs"], ["--spec", "group_lasso", "--no-grad"],
                                  ["--spec", "ln_structured:amount=0.3"]])
def test_cli_bench(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "torchvision:resnet18", "--input", "1,3,32,32", "--reps", "2", *argv]) == 0
    out = capsys.readouterr().out
    assert "forward" in out and "x floor" in out
