"""The tracker API on a live model: keys, one fused program and one host sync per track(), filters, bit
widths (static, functions, fake quantization), effective parameters, regularizers and errors."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import wtcore
from wtcore.errors import WtError
from wtfront import WeightTracker
from wtfront.train.tracker import tracker_kinds

tv = pytest.importorskip("torchvision")


@pytest.fixture(scope="module")
def traced():
    """A small resnet18 traced once (trackers on it are cheap: programs are cached by structure)."""
    torch.manual_seed(0)
    model = tv.models.resnet18(num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    return model, x, WeightTracker(model, x).structure


def fresh(traced, **kw) -> tuple[nn.Module, WeightTracker]:
    model, x, structure = traced
    return model, WeightTracker(model, x, structure=structure, **kw)


def test_all_trackers_keys_are_flat_stable_and_documented(traced):
    _, t = fresh(traced)
    kinds = tracker_kinds()
    assert {"active_macs", "structured_bops", "unstructured_bops", "compression", "unstructured_sparsity",
            "nm_sparsity", "group_pruning_summary", "unit_l2_histogram", "active_params", "group_lasso",
            "group_active_units"} <= set(kinds)
    assert not {"unit_l2", "ln_structured", "nm"} & set(kinds)  # per-unit vectors and masks are not logged
    handles = t.create_tracker(kinds)
    assert [h.kind for h in handles] == kinds
    m1 = t.track()
    assert list(m1) == list(t.track())  # stable order
    assert all(isinstance(v, float) for v in m1.values())
    for key in ("active_macs/total", "active_macs/ratio", "structured_bops/total", "structured_bops/compression",
                "unstructured_bops/compression", "compression", "unstructured_sparsity/total",
                "nm_sparsity/strict_fraction", "nm_sparsity/eligible_fraction",
                "nm_sparsity/tail_elements", "group_pruning_summary/pruned_units",
                "group_pruning_summary/pruned_params",
                "group_pruning_summary/groups/layer3.0.conv1.out/pruned_units",
                "group_pruning_summary/groups/layer3.0.conv1.out/pruned_params", "unit_l2_histogram/below",
                "unit_l2_histogram/ge_1e-06", "active_params/ratio"):
        assert key in m1, key
    assert set(m1) == {k for h in handles for k in h.keys}
    # dense random weights: nothing pruned, nothing compressed
    assert m1["structured_bops/compression"] == 0.0 and m1["group_pruning_summary/pruned_units"] == 0.0
    assert m1["active_macs/total"] == sum(o.macs for o in t.structure.ops)


def test_track_runs_one_fused_program_with_one_host_sync(traced, monkeypatch):
    _, t = fresh(traced)
    t.create_tracker(["structured_bops", "unstructured_sparsity", "nm_sparsity", "group_pruning_summary"])
    prog = t.program()
    assert prog.stats()["scatter_add"] == 1
    calls = {"program": 0, "tolist": 0}
    real_call, real_tolist = wtcore.Program.flat, torch.Tensor.tolist

    def counting_call(self, params):
        calls["program"] += 1
        return real_call(self, params)

    def counting_tolist(self):
        calls["tolist"] += 1
        return real_tolist(self)

    def no_item(self):
        raise AssertionError("track() must not call .item()")

    monkeypatch.setattr(wtcore.Program, "flat", counting_call)
    monkeypatch.setattr(torch.Tensor, "tolist", counting_tolist)
    monkeypatch.setattr(torch.Tensor, "item", no_item)
    t.track()
    assert calls == {"program": 1, "tolist": 1}


def test_values_follow_fake_pruning_and_match_the_program(traced):
    model, x, structure = traced
    model = copy.deepcopy(model)
    t = WeightTracker(model, x, structure=structure)
    t.create_tracker(["structured_bops", "group_pruning_summary", "unstructured_sparsity"], per_op=True,
                     per_param=True)
    g = structure.group_map["layer3.0.conv1.out"]
    with torch.no_grad():  # zero units 0..9 of one group: conv rows, BN entries, next conv's columns
        model.layer3[0].conv1.weight[:10] = 0
        model.layer3[0].bn1.weight[:10] = 0
        model.layer3[0].bn1.bias[:10] = 0
        model.layer3[0].conv2.weight[:, :10] = 0
    m = t.track()
    assert m["group_pruning_summary/groups/layer3.0.conv1.out/pruned_units"] == 10
    assert m["group_pruning_summary/pruned_units"] == 10
    op = {o.name: o for o in structure.ops}["layer3.0.conv1"]
    assert m["structured_bops/ops/layer3.0.conv1"] == op.macs * (g.size - 10) / g.size * 32 * 32
    assert m["unstructured_sparsity/params/layer3.0.conv1.weight"] == pytest.approx(10 / g.size)
    direct = wtcore.compile(structure, ["structured_bops"])(dict(model.named_parameters()))
    assert m["structured_bops/compression"] == direct["structured_bops/compression"].item()
    assert m["structured_bops/compression"] > 0


def test_create_tracker_returns_a_handle_that_tracks_alone(traced):
    _, t = fresh(traced)
    both = t.create_tracker(["structured_bops", "group_pruning_summary"])
    only = both[0].track()
    assert set(only) == set(both[0].keys) and all(k.startswith("structured_bops/") for k in only)
    nm = t.create_tracker("nvidia_2_4_sparsity")  # torch-weighttracker's name for 2:4
    assert "nvidia_2_4_sparsity/strict_fraction" in nm.track()
    eight = t.create_tracker("nm_sparsity", n=4, m=8)
    assert "nm_sparsity/eligible_fraction" in eight.keys
    with pytest.raises(WtError, match="pass name="):
        t.create_tracker("nm_sparsity", n=1, m=4)
    one_four = t.create_tracker("nm_sparsity", n=1, m=4, name="nm_1_4")
    assert "nm_1_4/strict_fraction" in one_four.keys
    assert set(t.track()) == set(both[0].keys) | set(both[1].keys) | set(nm.keys) | set(eight.keys) | \
        set(one_four.keys)


def test_include_ignore_by_instance_type_and_glob(traced):
    model, t = fresh(traced)
    h = t.create_tracker("structured_bops", include=[model.layer3, model.layer4], ignore=nn.BatchNorm2d,
                         per_op=True)
    ops = sorted(k.split("/")[2] for k in h.keys if k.startswith("structured_bops/ops/") and
                 not k.endswith("/compression"))
    assert ops and all(o.startswith(("layer3", "layer4")) for o in ops)
    assert len(ops) == sum(1 for o in t.structure.ops if o.module.startswith(("layer3", "layer4")))
    h2 = t.create_tracker("unstructured_sparsity", include="layer4.*", ignore=["*downsample*"], per_param=True,
                          name="sp4")
    params = [k.split("/", 2)[2] for k in h2.keys if k.startswith("sp4/params/")]
    assert params and all(p.startswith("layer4.") and "downsample" not in p for p in params)
    h3 = t.create_tracker("group_pruning_summary", include=[model.layer1], name="gp1")
    groups = [k.split("/")[2] for k in h3.keys if "/groups/" in k]
    assert groups and all(g.startswith("layer1.") for g in set(groups))
    # include restricts what is counted; the totals of a subset are below the whole model's
    t.create_tracker("active_macs", include=[nn.Linear], name="fc_macs")
    m = t.track()
    assert m["fc_macs/total"] == {o.name: o.macs for o in t.structure.ops}["fc"]


def test_errors_are_clear(traced):
    model, t = fresh(traced)
    with pytest.raises(WtError, match=r"unknown tracker 'nope'.*structured_bops"):
        t.create_tracker("nope")
    with pytest.raises(WtError, match="has no Embedding module"):
        t.create_tracker("structured_bops", include=nn.Embedding)
    with pytest.raises(WtError, match="leave no costed op"):
        t.create_tracker("structured_bops", include="nothing.here*")
    with pytest.raises(WtError, match="not a submodule"):
        t.create_tracker("structured_bops", include=nn.Linear(2, 2))
    with pytest.raises(WtError, match=r"weight bits of op 'conv1' must be a positive integer, got 0"):
        t.create_tracker("structured_bops", weight_bits=0)
    with pytest.raises(WtError, match=r"activation bits of op 'fc' must be a positive integer, got -4"):
        t.create_tracker("structured_bops", act_bits=lambda name, mod: -4 if name == "fc" else 8)
    with pytest.raises(WtError, match=r"weight bits of op 'conv1' must be a positive integer, got 8\.0"):
        t.create_tracker("structured_bops", weight_bits=8.0)
    with pytest.raises(WtError, match=r"key\(s\) \['layer9\*'\] match no costed op"):
        t.create_tracker("structured_bops", weight_bits={"layer9*": 4})
    with pytest.raises(WtError, match="no option"):
        t.create_tracker("structured_bops", log_total_bops=True)
    with pytest.raises(WtError, match="pass name="):
        t.create_tracker("active_macs")
        t.create_tracker("active_macs")
    with pytest.raises(WtError, match="no tracker registered"):
        WeightTracker(model, traced[1], structure=traced[2]).track()
    with pytest.raises(WtError, match="unknown regularizer"):
        t.create_regularizer("nope")


def test_static_mapping_and_function_bit_widths(traced):
    _, t = fresh(traced)
    ops = t.structure.ops
    t.create_tracker("structured_bops", weight_bits={"layer4.*": 4, "fc": 2}, act_bits=8, per_op=True)
    seen = []

    def bits(name, module):
        seen.append((name, type(module).__name__))
        return 4 if isinstance(module, nn.Linear) else 16

    t.create_tracker("structured_bops", weight_bits=bits, act_bits=bits, per_op=True, name="fn")
    m = t.track()
    for o in ops:
        w = 4 if o.name.startswith("layer4.") else 2 if o.name == "fc" else 32
        assert m[f"structured_bops/ops/{o.name}"] == o.macs * w * 8
        b = 4 if o.name == "fc" else 16
        assert m[f"fn/ops/{o.name}"] == o.macs * b * b
    assert ("fc", "Linear") in seen and ("conv1", "Conv2d") in seen


class QNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        import torch.ao.quantization as tq

        self.quant = tq.QuantStub()
        self.c1 = nn.Conv2d(3, 8, 3)
        self.act = nn.ReLU()
        self.c2 = nn.Conv2d(8, 4, 1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.c1(self.quant(x)))
        return self.fc(self.c2(x).mean((2, 3)))


def test_bit_widths_from_fake_quantization():
    import torch.ao.quantization as tq

    torch.manual_seed(0)
    model = QNet().train()
    model.qconfig = tq.QConfig(
        activation=tq.FakeQuantize.with_args(observer=tq.MovingAverageMinMaxObserver, quant_min=0, quant_max=15),
        weight=tq.FakeQuantize.with_args(observer=tq.MovingAverageMinMaxObserver, quant_min=-8, quant_max=7,
                                         dtype=torch.qint8, qscheme=torch.per_tensor_symmetric),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tq.prepare_qat(model, inplace=True)
    x = torch.randn(2, 3, 8, 8)
    t = WeightTracker(model, x)
    assert [o.param for o in t.structure.ops] == ["c1.weight", "c2.weight", "fc.weight"]  # through fake quant
    t.create_tracker("structured_bops", per_op=True)  # default: read fake quantization where present
    m = t.track()
    macs = {o.name: o.macs for o in t.structure.ops}
    assert m["structured_bops/ops/c1"] == macs["c1"] * 4 * 4  # input straight from QuantStub's fake quant
    assert m["structured_bops/ops/c2"] == macs["c2"] * 4 * 4  # through the ReLU module
    assert m["structured_bops/ops/fc"] == macs["fc"] * 4 * 32  # input from x.mean(): not a fake-quant output
    t.create_tracker("structured_bops", weight_bits=8, name="w8", per_op=True)
    assert t.track()["w8/ops/c1"] == macs["c1"] * 8 * 4


def test_effective_parameters_through_nn_utils_prune_and_parametrize():
    from torch.nn.utils import parametrize, prune

    class Half(nn.Module):
        def forward(self, w: torch.Tensor) -> torch.Tensor:
            return w * (torch.arange(w.shape[1]) % 2 == 0)  # zero every odd input column

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    prune.l1_unstructured(net[0], "weight", amount=0.25)
    parametrize.register_parametrization(net[2], "weight", Half())
    t = WeightTracker(net, torch.randn(2, 8))
    t.create_tracker("unstructured_sparsity", per_param=True)
    m = t.track()
    assert m["unstructured_sparsity/params/0.weight_orig"] == 0.25
    assert m["unstructured_sparsity/params/2.parametrizations.weight.original"] == 0.5
    reg = t.create_regularizer("group_lasso")
    reg().backward()
    assert net[2].parametrizations.weight.original.grad is not None


def test_regularizer_matches_the_program_and_honors_ignore(traced):
    model, t = fresh(traced)
    reg = t.create_regularizer("group_lasso", ignore=[model.fc])
    direct = wtcore.compile(t.structure, ["group_lasso"], ignore=["fc"])
    params = dict(model.named_parameters())
    torch.testing.assert_close(reg(), direct(params)["group_lasso"])
    g1 = torch.autograd.grad(reg(), [model.conv1.weight])[0]
    g2 = torch.autograd.grad(direct(params)["group_lasso"], [model.conv1.weight])[0]
    torch.testing.assert_close(g1, g2)
    plain = t.create_regularizer("group_lasso", weighted=False)
    assert plain().item() < reg().item()


def test_view_structures_prints_groups_and_ops(traced):
    _, t = fresh(traced)
    text = t.view_structures()
    assert "layer3.0.conv1.out" in text and "Cost ops (1 MAC = one multiply-add)" in text


@pytest.mark.slow
def test_compiled_track_equals_eager(traced):
    torch._dynamo.reset()
    _, t = fresh(traced)
    _, tc = fresh(traced, backend="inductor")
    kinds = ["structured_bops", "unstructured_sparsity", "nm_sparsity", "group_pruning_summary", "unit_l2_histogram"]
    t.create_tracker(kinds)
    tc.create_tracker(kinds)
    eager, compiled = t.track(), tc.track()
    assert eager.keys() == compiled.keys()
    for k in eager:
        assert compiled[k] == pytest.approx(eager[k], rel=1e-12, abs=1e-12), k
