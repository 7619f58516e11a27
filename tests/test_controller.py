"""The pruning controller: scheduled targets met step by step, physical pruning checked with fvcore, resume after
preemption, config files."""

from __future__ import annotations

import copy
import itertools
import json
import warnings

import pytest
import torch
from torch import nn

import wtcore
from wtcore.solver import TargetError, metric_ratio
from wtfront import Controller, ControllerConfig, ControllerError, Schedule, effective_params, trace
from wtfront.train.controller import StepReport, read_config


class SmallCNN(nn.Module):
    """Two conv blocks with a residual add and a classifier: a few dozen units, fast on a CPU."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.b1 = nn.BatchNorm2d(16)
        self.c2 = nn.Conv2d(16, 16, 3, padding=1)
        self.b2 = nn.BatchNorm2d(16)
        self.c3 = nn.Conv2d(16, 24, 3, padding=1, stride=2)
        self.fc = nn.Linear(24, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.b1(self.c1(x)))
        y = y + torch.relu(self.b2(self.c2(y)))
        return self.fc(torch.relu(self.c3(y)).mean((2, 3)))


X = torch.randn(2, 3, 12, 12)


def _setup(seed: int = 0) -> tuple[nn.Module, wtcore.Structure]:
    torch.manual_seed(seed)
    model = SmallCNN()
    return model, trace(model.eval(), X)


def _train(model: nn.Module, opt: torch.optim.Optimizer, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    model.train()
    for x, y in batches:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def _data(epochs: int, seed: int = 1) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    g = torch.Generator().manual_seed(seed)
    return [[(torch.randn(8, 3, 12, 12, generator=g), torch.randint(0, 5, (8,), generator=g)) for _ in range(2)]
            for _ in range(epochs)]


def _config(**kw) -> ControllerConfig:
    opts = dict(kind="cubic", start=1, end=4, every=1, scope="global", max_fraction=0.9)
    opts.update(kw)
    return ControllerConfig.make(kw.pop("target", 0.5), **{k: v for k, v in opts.items() if k != "target"})


# ------------------------------------------------------------------------------------------ gradual pruning
@pytest.mark.parametrize(("metric", "scope", "kind"), [("macs", "global", "cubic"), ("params", "local", "linear"),
                                                        ("bops", "isomorphic", "geometric")])
def test_scheduled_targets_are_met_each_step(metric, scope, kind):
    model, s = _setup()
    # raw scores: the step pattern asserted below (done exactly at the end) is that of raw L2 ranking
    ctrl = Controller(_config(metric=metric, scope=scope, kind=kind, target=0.4, normalize=None)).bind(model, s)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    ctrl.attach(opt)
    data = _data(6)
    reports: list[StepReport] = []
    for epoch in range(6):
        _train(model, opt, data[epoch])
        r = ctrl.step(epoch)
        reports.append(r)
        params = effective_params(model, s)
        measured = metric_ratio(s, params, metric)
        if r.pruned:
            assert r.ratio == measured <= r.target
            assert r.target == pytest.approx(1 - Schedule(0.6, 1, 4, 1, kind).sparsity(epoch))
        removed = (~ctrl.fake.keep).nonzero().flatten().tolist()
        zero = wtcore.compile(s, ["unit_active"])(params)["unit_active"]
        assert set(removed) <= set((~zero).nonzero().flatten().tolist())  # removed units stay zero while training
    assert [r.pruned for r in reports] == [False, True, True, True, True, False]
    ratios = [r.ratio for r in reports if r.pruned]
    assert all(a >= b for a, b in itertools.pairwise(ratios)) and ratios[-1] <= 0.4
    assert [r.done for r in reports] == [False, False, False, False, True, True]
    assert reports[4].physical_prune_due and reports[4].rebuild_optimizer and "physical pruning is due" in str(
        reports[4])
    assert [h["t"] for h in ctrl.history] == [1, 2, 3, 4]


def test_physically_pruned_model_meets_target_fvcore():
    """After the last step, `prune()` shrinks a torchvision model; fvcore counts the target on it."""
    torchvision = pytest.importorskip("torchvision")
    from fvcore.nn import FlopCountAnalysis

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    s = trace(model, x)
    ctrl = Controller(ControllerConfig.make(0.5, start=0, end=2, round_to=8, max_fraction=0.8)).bind(model, s)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    ctrl.attach(opt)
    for t in range(3):
        model.train()
        opt.zero_grad()
        model(torch.randn(4, 3, 32, 32)).logsumexp(1).mean().backward()
        opt.step()
        rep = ctrl.step(t)
    assert rep.physical_prune_due
    model.eval()
    with torch.no_grad():
        y_fake = model(x)

    def fv(m: nn.Module) -> float:  # fvcore's MACs of the costed modules (convs, linear)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fca = FlopCountAnalysis(m, x).unsupported_ops_warnings(False).uncalled_modules_warnings(False)
            by = fca.by_module()
            return float(sum(by[o.module] for o in s.ops))

    dense = fv(torchvision.models.resnet18(num_classes=10).eval())
    new = ctrl.prune(x)
    assert not ctrl.physical_prune_due and new.num_units < s.num_units
    after = ctrl.step(3)  # fine-tuning goes on: nothing left to do
    assert not after.pruned and after.done and not after.physical_prune_due
    with torch.no_grad():
        assert torch.allclose(model(x), y_fake, rtol=1e-4, atol=1e-5)
    assert fv(model) / dense == pytest.approx(rep.ratio, rel=1e-12) and rep.ratio <= 0.5
    assert rep.ratio > 0.45  # not overshooting: the smallest removal that reaches the target
    for g in new.groups:  # round_to=8 where a group was cut
        assert g.size == g.baseline_size or g.size % 8 == 0


# ------------------------------------------------------------------------------------------ resume
def _run(cfg_path, epochs: int, stop_at: int | None, tmp_path) -> tuple[nn.Module, Controller]:
    model, s = _setup()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    ctrl = Controller.from_config(cfg_path).bind(model, s)
    ctrl.attach(opt)
    data = _data(epochs)
    for epoch in range(epochs):
        _train(model, opt, data[epoch])
        ctrl.step(epoch)
        if epoch == stop_at:  # preempted: checkpoint, then start over from files in a fresh process state
            torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
            (tmp_path / "ctrl.json").write_text(json.dumps(ctrl.state_dict()))
            model, s = _setup(seed=123)  # different initial weights: everything must come from the checkpoint
            opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
            ck = torch.load(tmp_path / "ckpt.pt", weights_only=True)
            model.load_state_dict(ck["model"])
            opt.load_state_dict(ck["opt"])
            ctrl = Controller.from_config(cfg_path).load_state_dict(json.loads((tmp_path / "ctrl.json").read_text()))
            ctrl.bind(model, s)
            ctrl.attach(opt)
            ctrl.step(epoch)  # a replayed step is a no-op
    return model, ctrl


@pytest.mark.parametrize("importance", ["unit_l2", "random"])
def test_resume_after_preemption_gives_the_same_decisions(tmp_path, importance):
    cfg = tmp_path / "prune.toml"
    cfg.write_text(f'target = 0.45\nimportance = "{importance}"\nscope = "global"\nmax_fraction = 0.9\n\n'
                   '[schedule]\nkind = "cubic"\nstart = 1\nend = 5\nevery = 2\n')
    ref_model, ref = _run(cfg, 7, None, tmp_path)
    for stop in (1, 3):
        model, ctrl = _run(cfg, 7, stop, tmp_path)
        assert ctrl.history == ref.history
        assert torch.equal(ctrl.fake.keep, ref.fake.keep)
        for (n, a), (_, b) in zip(model.state_dict().items(), ref_model.state_dict().items()):
            assert torch.equal(a, b), n
    assert [h["t"] for h in ref.history] == [1, 3, 5] and ref.done


def test_state_dict_is_json_and_guards_its_structure():
    model, s = _setup()
    ctrl = Controller(_config()).bind(model, s)
    ctrl.step(1)
    ctrl.step(2)
    state = json.loads(json.dumps(ctrl.state_dict()))
    assert state["removed"] and state["next_due"] == 3 and state["last_t"] == 2
    other = SmallCNN()
    other.c3 = nn.Conv2d(16, 20, 3, padding=1, stride=2)
    other.fc = nn.Linear(20, 5)
    with pytest.raises(ControllerError, match="structure"):
        Controller(_config()).load_state_dict(state).bind(other, trace(other.eval(), X))
    with pytest.raises(ControllerError, match="another config"):
        Controller(_config(target=0.3)).load_state_dict(state)
    with pytest.raises(ControllerError, match="format"):
        Controller(_config()).load_state_dict({"removed": {}})
    # restoring re-applies the removed units on a model that still has them
    fresh, s2 = _setup(seed=5)
    Controller(_config()).load_state_dict(state).bind(fresh, s2)
    zero = wtcore.compile(s2, ["unit_active"])(effective_params(fresh, s2))["unit_active"]
    assert int((~zero).sum()) == sum(len(v) for v in state["removed"].values())


def test_step_order_and_errors():
    model, s = _setup()
    with pytest.raises(ControllerError, match="not bound"):
        Controller(_config()).step(0)
    ctrl = Controller(_config(start=2, end=2)).bind(model, s)
    assert not ctrl.step(0).pruned and not ctrl.step(1).pruned
    with pytest.raises(ControllerError, match="not met"):
        ctrl.prune(X)
    r = ctrl.step(5)  # a late call still prunes (one shot, to the final target)
    assert r.pruned and r.done and r.ratio <= 0.5
    assert not ctrl.step(6).pruned
    with pytest.raises(ControllerError, match="non-negative int"):
        ctrl.step(-1)
    hard = Controller(_config(target=0.05, max_fraction=0.3, start=0, end=0)).bind(*_setup())
    with pytest.raises(TargetError, match=r"t=0.*out of reach"):
        hard.step(0)
    scores = torch.arange(s.num_units, dtype=torch.float64)  # user scores: lowest index first
    ctrl2 = Controller(_config(start=0, end=0)).bind(*_setup())
    ctrl2.step(0, scores=scores)
    removed = (~ctrl2.fake.keep).nonzero().flatten()
    assert removed.numel() and bool((removed < s.num_units // 2).all())


# ------------------------------------------------------------------------------------------ config files
def test_config_files_toml_and_json(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('[controller]\ntarget = 0.5\nmetric = "params"\nround_to = 4\ngroups = ["c*"]\n\n'
                    '[controller.schedule]\nkind = "linear"\nstart = 2\nend = 10\nevery = 2\nby = "step"\n')
    cfg = read_config(toml)
    assert cfg == ControllerConfig.make(0.5, kind="linear", start=2, end=10, every=2, by="step", metric="params",
                                        round_to=4, groups=("c*",))
    js = tmp_path / "c.json"
    js.write_text(json.dumps(cfg.to_dict()))
    assert read_config(js) == cfg and Controller.from_config(js).config == cfg
    assert Controller.from_config(cfg.to_dict()).schedule.sparsity(6) == pytest.approx(0.25)
    for bad, match in [({"target": 0.5, "frequency": 2}, "unknown key"), ({"metric": "macs"}, "required"),
                       ({"target": 1.5}, "target"), ({"target": 0.5, "metric": "flops"}, "metric"),
                       ({"target": 0.5, "schedule": {"final": 0.5}}, "final"),
                       ({"target": 0.5, "schedule": {"kind": "exp"}}, "kind"),
                       ({"target": 0.5, "schedule": {"frequency": 2}}, "unknown schedule key"),
                       ({"target": 0.5, "schedule": {"start": 3, "end": 1}}, "end")]:
        with pytest.raises(ControllerError, match=match):
            read_config(bad)
    (tmp_path / "broken.toml").write_text("target = ")
    with pytest.raises(ControllerError, match="not valid TOML"):
        read_config(tmp_path / "broken.toml")
    with pytest.raises(ControllerError, match="cannot read"):
        read_config(tmp_path / "missing.json")


def test_epoch_schedule_driven_per_step():
    """An epoch schedule converted with `in_steps` prunes a little after every optimizer step."""
    model, s = _setup()
    cfg = _config(start=0, end=2, target=0.6)
    cfg = ControllerConfig(cfg.target, cfg.schedule.in_steps(3, every=1), scope="global", max_fraction=0.9)
    ctrl = Controller(cfg).bind(model, s)
    reports = [ctrl.step(k) for k in range(8)]
    last = [r.done for r in reports].index(True)  # done at the end step, or earlier if a step overshoots
    assert 4 <= last <= 6 and all(r.pruned for r in reports[: last + 1])
    assert not any(r.pruned for r in reports[last + 1:])
    assert ctrl.done and copy.deepcopy(ctrl.history)[-1]["ratio"] <= 0.6


def test_failed_physical_prune_keeps_the_masks_enforced(monkeypatch):
    import wtfront.train.controller as controller_module
    from wtfront import PruneError

    model, s = _setup()
    ctrl = Controller(_config(start=0, end=0)).bind(model, s)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ctrl.attach(opt)
    assert ctrl.step(0).physical_prune_due

    def refuse(*args, **kwargs):
        raise PruneError("refused (test)")

    monkeypatch.setattr(controller_module, "prune_zero_units", refuse)
    with pytest.raises(PruneError, match="refused"):
        ctrl.prune(X)
    assert ctrl.physical_prune_due
    _train(model, opt, _data(1)[0])  # the optimizer hook still re-zeroes the removed units
    active = wtcore.compile(s, ["unit_active"])(effective_params(model, s))["unit_active"]
    assert not bool(active[~ctrl.fake.keep].any())
    monkeypatch.undo()
    ctrl.prune(X)
    with pytest.raises(ControllerError, match="physically pruned"):
        ctrl.attach(torch.optim.SGD(model.parameters(), lr=0.1))
