"""wtfront.trace: exact slices on small hand-made nets, agreement with Torch-Pruning's physical pruning,
the guards (devices, budget, unsupported modules, state restoration) and the model zoo."""

from __future__ import annotations

import copy
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import pytest
import torch
import torch_pruning as tp
from torch import nn
from toys import Net, X

from wtcore import Structure, TraceError, UnitGroup
from wtfront import trace
from wtfront.tracing.balance import SHUFFLE_REASON
from wtfront.tracing.budget import Budget
from wtfront.tracing.graph import normalized_dim
from wtfront.tracing.lowering import OUTPUT_REASON
from wtfront.tracing.units import HIDDEN_REASON


# ------------------------------------------------------------------------------------------ helpers
def slice_map(g: UnitGroup) -> dict[tuple[str, int], tuple[list[int], int]]:
    """(param, axis) -> (index list, groups) of one unit group."""
    return {(s.param, s.axis): (s.index_list(), s.groups) for s in g.slices}


def ident(n: int) -> list[int]:
    return list(range(n))


def zero_unit(model: nn.Module, g: UnitGroup, unit: int) -> None:
    """Zero every parameter entry of `unit` in `g`, following the IR's grouped-axis convention."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for s in g.slices:
            p = params[s.param]
            n = p.shape[s.axis]
            for c, u in enumerate(s.index_list()):
                if u != unit:
                    continue
                if s.groups == 1:
                    p.select(s.axis, c).zero_()
                else:
                    grp, j = divmod(c, n)
                    size = p.shape[s.group_axis] // s.groups
                    p.narrow(s.group_axis, grp * size, size).select(s.axis, j).zero_()


def assert_zeroing_matches_tp_pruning(model: nn.Module, x: torch.Tensor, g: UnitGroup, unit: int) -> None:
    """Zeroing a unit's slices must compute what Torch-Pruning's physical removal of that channel computes
    (exact for nets whose normalizations are BatchNorms in eval mode): the IR touches exactly TP's entries."""
    zeroed = copy.deepcopy(model).eval()
    zero_unit(zeroed, g, unit)
    pruned = copy.deepcopy(model).eval()
    dg = tp.DependencyGraph().build_dependency(pruned, example_inputs=x, verbose=False)
    root = pruned.get_submodule(g.root)
    group = dg.get_pruning_group(root, dg.get_pruner_of_module(root).prune_out_channels, idxs=[unit])
    group.prune()
    with torch.no_grad():
        torch.testing.assert_close(zeroed(x), pruned(x), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------- hand-made nets
def test_net_groups_and_exact_slices() -> None:
    s = trace(Net(), X)
    assert [g.name for g in s.groups] == ["stem.out", "gc.out", "b2.out", "fuse.out", "fc.out"]
    assert [(g.size, g.kind, g.root) for g in s.groups] == [
        (8, "channel", "stem"), (12, "channel", "gc"), (4, "channel", "b2"), (6, "channel", "fuse"),
        (5, "feature", "fc"),
    ]
    g = s.group_map
    assert slice_map(g["stem.out"]) == {
        ("stem.weight", 0): (ident(8), 1),
        ("stem.bias", 0): (ident(8), 1),
        ("bn.weight", 0): (ident(8), 1),
        ("bn.bias", 0): (ident(8), 1),
        ("dw.weight", 0): (ident(8), 1),  # depthwise: out axis only, never also an in-slice
        ("dw.bias", 0): (ident(8), 1),
        ("pw.weight", 0): (ident(8), 1),  # residual add: pw out and pw in are the same channels
        ("pw.weight", 1): (ident(8), 1),
        ("pw.bias", 0): (ident(8), 1),
        ("gc.weight", 1): (ident(8), 4),  # grouped conv: index over all 8 in-channels, 4 groups along axis 0
        ("b2.weight", 1): (ident(8), 1),
    }
    assert slice_map(g["gc.out"]) == {
        ("gc.weight", 0): (ident(12), 1),
        ("gc.bias", 0): (ident(12), 1),
        ("fuse.weight", 1): (ident(12) + [-1] * 4, 1),  # concat: first 12 inputs of fuse
    }
    assert slice_map(g["b2.out"]) == {
        ("b2.weight", 0): (ident(4), 1),
        ("b2.bias", 0): (ident(4), 1),
        ("fuse.weight", 1): ([-1] * 12 + ident(4), 1),  # concat offset 12
    }
    assert slice_map(g["fuse.out"]) == {
        ("fuse.weight", 0): (ident(6), 1),
        ("fuse.bias", 0): (ident(6), 1),
        ("fc.weight", 1): (ident(6), 1),
    }
    assert slice_map(g["fc.out"]) == {("fc.weight", 0): (ident(5), 1), ("fc.bias", 0): (ident(5), 1)}
    assert [g.prunable for g in s.groups] == [True, True, True, True, False]
    assert g["fc.out"].reason == OUTPUT_REASON
    assert s.uncoupled == ()
    assert Structure.from_json(s.to_json()) == s
    assert s == trace(Net(), X)  # deterministic
    p = s.param_map["gc.weight"]
    assert (p.shape, p.dtype, p.module, p.module_type, p.aliases) == ((12, 2, 3, 3), "float32", "gc", "Conv2d", ())


# (gc.out and stem.out touch a grouped conv, whose channels TP can only remove a whole group-multiple at a time)
@pytest.mark.parametrize("group", ["b2.out", "fuse.out"])
def test_net_zeroing_a_unit_matches_tp_pruning(group: str) -> None:
    torch.manual_seed(0)
    net = Net().eval()
    s = trace(net, X)
    for unit in (0, s.group_map[group].size - 1):
        assert_zeroing_matches_tp_pruning(net, X, s.group_map[group], unit)


class FlatNet(nn.Module):
    """conv -> flatten (2x2 spatial) -> linear: TP's flatten index mapping (4 inputs per channel)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(4)
        self.fc1 = nn.Linear(16, 6)
        self.fc2 = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(torch.flatten(self.bn(self.conv(x)), 1))))


def test_flatten_mapping_and_tp_agreement() -> None:
    torch.manual_seed(0)
    net, x = FlatNet().eval(), torch.randn(2, 3, 2, 2)
    s = trace(net, x)
    g = s.group_map["conv.out"]
    assert slice_map(g)[("fc1.weight", 1)] == ([0] * 4 + [1] * 4 + [2] * 4 + [3] * 4, 1)
    for name in ("conv.out", "fc1.out"):
        assert_zeroing_matches_tp_pruning(net, x, s.group_map[name], 1)


def test_resnet18_zeroing_matches_tp_pruning() -> None:
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    net, x = tv.models.resnet18(num_classes=10).eval(), torch.randn(1, 3, 64, 64)
    s = trace(net, x)
    for name in ("conv1.out", "layer2.0.conv1.out", "layer3.0.conv1.out", "layer4.0.conv2.out"):
        assert_zeroing_matches_tp_pruning(net, x, s.group_map[name], 3)


class TiedLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 6)
        self.norm = nn.LayerNorm(6)
        self.lm_head = nn.Linear(6, 10, bias=False)
        self.lm_head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(self.emb(ids)))


def test_tied_weight_appears_once_with_alias_and_merged_slices() -> None:
    s = trace(TiedLM(), torch.tensor([[1, 2, 3]]))
    assert [p.name for p in s.params] == ["emb.weight", "norm.weight", "norm.bias"]
    assert s.param_map["emb.weight"].aliases == ("lm_head.weight",)
    assert s.param_map["emb.weight"].module_type == "Embedding"
    hidden, vocab = s.group_map["emb.out"], s.group_map["lm_head.out"]
    assert slice_map(hidden) == {  # emb axis 1 and lm_head's in-axis 1 are one (param, axis): merged
        ("emb.weight", 1): (ident(6), 1),
        ("norm.weight", 0): (ident(6), 1),
        ("norm.bias", 0): (ident(6), 1),
    }
    assert slice_map(vocab) == {("emb.weight", 0): (ident(10), 1)}
    assert hidden.prunable and not vocab.prunable
    assert s.uncoupled == ()


class MHANet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(3, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.out = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        return self.out(self.attn(h, h, h, need_weights=False)[0])


def test_multihead_attention_slices() -> None:
    s = trace(MHANet(), torch.randn(2, 5, 3), heads={"attn": None})  # Torch-Pruning's view: embed_dim everywhere
    g = s.group_map["inp.out"]
    m = slice_map(g)
    assert m[("attn.in_proj_weight", 0)] == (ident(8) * 3, 1)  # q, k and v rows of unit i
    assert m[("attn.in_proj_weight", 1)] == (ident(8), 1)
    assert m[("attn.in_proj_bias", 0)] == (ident(8) * 3, 1)
    assert m[("attn.out_proj.weight", 0)] == (ident(8), 1)
    assert m[("attn.out_proj.weight", 1)] == (ident(8), 1)
    assert m[("attn.out_proj.bias", 0)] == (ident(8), 1)
    assert m[("out.weight", 1)] == (ident(8), 1)
    assert s.uncoupled == ()
    # by default the q/k/v rows and out_proj columns are heads (wtfront.tracing.units), not the residual stream
    s = trace(MHANet(), torch.randn(2, 5, 3))
    hidden, heads = slice_map(s.group_map["inp.out"]), slice_map(s.group_map["attn.heads"])
    assert s.group_map["inp.out"].kind == "hidden" and s.group_map["attn.heads"].kind == "head"
    assert ("attn.in_proj_weight", 0) not in hidden and ("attn.out_proj.weight", 1) not in hidden
    assert hidden[("attn.in_proj_weight", 1)] == hidden[("attn.out_proj.weight", 0)] == (ident(8), 1)
    rows = [h for h in range(2) for _ in range(4)]
    assert heads[("attn.in_proj_weight", 0)] == heads[("attn.in_proj_bias", 0)] == (rows * 3, 1)
    assert heads[("attn.out_proj.weight", 1)] == (rows, 1)
    assert s.uncoupled == ()


def test_multihead_attention_bias_kv() -> None:
    net = MHANet()
    net.attn = nn.MultiheadAttention(8, 2, batch_first=True, add_bias_kv=True)
    m = slice_map(trace(net, torch.randn(2, 5, 3)).group_map["inp.out"])
    assert m[("attn.bias_k", 2)] == m[("attn.bias_v", 2)] == (ident(8), 1)


class NormNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.gn = nn.GroupNorm(2, 8)
        self.act = nn.PReLU(8)
        self.conv2 = nn.Conv2d(8, 4, 1)
        self.inorm = nn.InstanceNorm2d(4, affine=True)
        self.act2 = nn.PReLU()  # one shared slope: TP never prunes it
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act2(self.inorm(self.conv2(self.act(self.gn(self.conv(x))))))
        return self.fc(y.mean((2, 3)))


def test_group_norm_instance_norm_prelu() -> None:
    s = trace(NormNet(), torch.randn(2, 3, 4, 4))
    assert set(slice_map(s.group_map["conv.out"])) == {
        ("conv.weight", 0), ("conv.bias", 0), ("gn.weight", 0), ("gn.bias", 0), ("act.weight", 0),
        ("conv2.weight", 1),
    }
    assert set(slice_map(s.group_map["conv2.out"])) == {
        ("conv2.weight", 0), ("conv2.bias", 0), ("inorm.weight", 0), ("inorm.bias", 0), ("fc.weight", 1),
    }
    assert s.uncoupled == ("act2.weight",)


class TransposeNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.up = nn.ConvTranspose2d(8, 12, 2, stride=2, groups=2)
        self.head = nn.Conv2d(12, 2, 1)
        self.scale = nn.Parameter(torch.ones(1, 12, 1, 1))  # unwrapped parameter on the channel axis

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.up(self.conv(x)) * self.scale)


def test_conv_transpose_and_unwrapped_parameter() -> None:
    s = trace(TransposeNet(), torch.randn(1, 3, 4, 4))
    assert slice_map(s.group_map["conv.out"]) == {
        ("conv.weight", 0): (ident(8), 1),
        ("conv.bias", 0): (ident(8), 1),
        ("up.weight", 0): (ident(8), 1),  # transposed conv: in-channels on axis 0
    }
    assert slice_map(s.group_map["up.out"]) == {
        ("up.weight", 1): (ident(12), 2),  # out-channels on axis 1, grouped along axis 0
        ("up.bias", 0): (ident(12), 1),
        ("head.weight", 1): (ident(12), 1),
        ("scale", 1): (ident(12), 1),
    }
    assert s.param_map["scale"].module_type == "TransposeNet"
    assert s.uncoupled == ()


class ShuffleNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 4, 1)
        self.c = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([self.a(x), self.b(x)], 1)
        n, ch, h, w = y.shape
        y = y.view(n, 2, ch // 2, h, w).transpose(1, 2).contiguous().view(n, ch, h, w)
        return self.c(y)


def test_channel_shuffle_couples_the_channels_of_one_view_position() -> None:
    """Output channel 2k + i of the shuffle is input channel 4i + k: a unit is a channel of a with the same channel
    of b (removing only one of them would pair the wrong channels in the smaller shuffle), and c's input columns
    2k, 2k + 1."""
    s = trace(ShuffleNet(), torch.randn(1, 3, 4, 4))
    g = s.group_map["a.out"]
    assert g.prunable and g.size == 4 and "b.out" not in s.group_map
    assert slice_map(g) == {
        ("a.weight", 0): (ident(4), 1), ("a.bias", 0): (ident(4), 1),
        ("b.weight", 0): (ident(4), 1), ("b.bias", 0): (ident(4), 1),
        ("c.weight", 1): ([0, 0, 1, 1, 2, 2, 3, 3], 1),
    }
    assert s.group_map["c.out"].reason == OUTPUT_REASON


class Rope(nn.Module):
    """Rotary-style `torch.cat(dim=-1)`/`chunk(dim=-1)`: the saved dim reads as 2**64-1 on torch>=2.x."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.o = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)

    @staticmethod
    def rot(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((-x2, x1), dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k = self.q(x), self.k(x)
        q, k = q + 0.5 * self.rot(q), k + 0.5 * self.rot(k)
        return self.o(torch.softmax(q @ k.transpose(-1, -2), -1) @ x)


def test_negative_cat_dim_is_normalized() -> None:
    s = trace(Rope(), torch.randn(1, 4, 8), budget_s=30)
    assert slice_map(s.group_map["q.out"])[("k.weight", 0)] == (ident(8), 1)
    x = torch.randn(2, 3, 4, requires_grad=True)
    for y, want in ((torch.cat([x, x], -1), 2), (torch.cat([x, x], 1), None), (x.unbind(-1)[0], 2)):
        node = type("N", (), {"grad_fn": y.grad_fn, "type": None})()
        if "Unbind" in y.grad_fn.name():
            node.type = tp.ops.OPTYPE.UNBIND
        assert normalized_dim(node) == want


def test_inputs_tuple_and_dict() -> None:
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = nn.Linear(3, 4), nn.Linear(5, 4), nn.Linear(4, 2)

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return self.c(self.a(x) + self.b(y))

    x, y = torch.randn(2, 3), torch.randn(2, 5)
    s1, s2 = trace(Two(), (x, y)), trace(Two(), {"x": x, "y": y})
    assert [g.name for g in s1.groups] == [g.name for g in s2.groups] == ["a.out", "c.out"]
    assert set(slice_map(s1.group_map["a.out"])) == {("a.weight", 0), ("a.bias", 0), ("b.weight", 0),
                                                     ("b.bias", 0), ("c.weight", 1)}


def test_outputs_with_none_and_detached_outputs() -> None:
    class Out(nn.Module):
        def __init__(self, detach: bool) -> None:
            super().__init__()
            self.fc, self.detach = nn.Linear(3, 2), detach

        def forward(self, x: torch.Tensor) -> Any:
            y = self.fc(x)
            return {"logits": y.detach() if self.detach else y, "aux": None, "ids": torch.zeros(2, dtype=torch.long)}

    s = trace(Out(False), torch.randn(2, 3))
    assert [g.name for g in s.groups] == ["fc.out"] and s.groups[0].reason == OUTPUT_REASON
    with pytest.raises(TraceError, match="no output of Out depends on its parameters"):
        trace(Out(True), torch.randn(2, 3))


def test_parametrized_and_nn_utils_pruned_weights_map_to_their_parameters() -> None:
    class Same(nn.Module):
        def forward(self, w: torch.Tensor) -> torch.Tensor:
            return w * 1.0

    from torch.nn.utils import parametrize, prune

    net = Net()
    parametrize.register_parametrization(net.pw, "weight", Same())
    prune.l1_unstructured(net.b2, "weight", amount=0.5)
    s = trace(net, X)
    m = slice_map(s.group_map["stem.out"])
    assert m[("pw.parametrizations.weight.original", 0)] == m[("pw.parametrizations.weight.original", 1)]
    assert ("b2.weight_orig", 1) in m and s.uncoupled == ()


def test_root_types() -> None:
    s = trace(Net(), X, root_types=(nn.Conv2d,))
    assert "fc.out" not in s.group_map and s.uncoupled == ("fc.bias",)


# --------------------------------------------------------------------------------------------- ignore
@pytest.mark.parametrize("how", ["instance", "type", "glob"])
def test_ignore_classifier(how: str) -> None:
    net = Net()
    ignore: Any = {"instance": [net.fc], "type": [nn.Linear], "glob": ["f?"]}[how]
    s = trace(net, X, ignore=ignore)
    assert "fc.out" not in s.group_map
    assert ("fc.weight", 1) in slice_map(s.group_map["fuse.out"])  # its inputs are still coupled to fuse
    assert s.uncoupled == ("fc.bias",)
    assert all(g.prunable for g in s.groups)


def test_ignore_glob_drops_groups_that_prune_ignored_out_channels() -> None:
    s = trace(Net(), X, ignore="dw")  # dw's (depthwise) out-channels are the stem's channels
    assert "stem.out" not in s.group_map
    assert set(s.uncoupled) == {"stem.weight", "stem.bias", "bn.weight", "bn.bias", "dw.weight", "dw.bias",
                                "pw.weight", "pw.bias"}


def test_ignore_errors() -> None:
    with pytest.raises(TraceError, match="match no module"):
        trace(Net(), X, ignore=["nope*"])
    with pytest.raises(TraceError, match="not a submodule"):
        trace(Net(), X, ignore=[nn.Linear(2, 2)])
    with pytest.raises(TraceError, match="cannot ignore"):
        trace(Net(), X, ignore=[3])


class LSTMNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(3, 6)
        self.rnn = nn.LSTM(6, 5, batch_first=True)
        self.out = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.rnn(self.inp(x))[0])


def test_unsupported_module_is_a_named_boundary_and_can_be_ignored() -> None:
    x = torch.randn(2, 4, 3)
    with pytest.warns(UserWarning, match=r"'rnn.weight_ih_l0'.*'rnn' \(LSTM\).*no pruner for its type"):
        s = trace(LSTMNet(), x)
    assert dict(s.boundaries)["rnn"].startswith("Torch-Pruning mis-maps it")
    assert not s.group_map["inp.out"].prunable and "'rnn'" in s.group_map["inp.out"].reason
    assert all(n.startswith("rnn.") for n in s.uncoupled) and s.uncoupled
    s = trace(LSTMNet(), x, ignore=["rnn"])
    assert set(s.group_map) == {"inp.out", "out.out"}
    assert all(n.startswith("rnn.") for n in s.uncoupled) and s.uncoupled
    assert dict(s.boundaries) == {"rnn": "passed in ignore="}


def test_known_type_with_unknown_parameter_is_a_boundary() -> None:
    class ScaledLinear(nn.Linear):
        def __init__(self, i: int, o: int) -> None:
            super().__init__(i, o)
            self.scale = nn.Parameter(torch.ones(o))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) * self.scale

    net = nn.Sequential(ScaledLinear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.warns(UserWarning, match=r"'0' \(ScaledLinear\).*\['scale'\]"):
        s = trace(net, torch.randn(2, 3))
    assert set(s.uncoupled) == {"0.weight", "0.bias", "0.scale"}
    assert not any(g.prunable for g in s.groups)
    s = trace(net, torch.randn(2, 3), ignore=["0"])
    assert "0.scale" in s.uncoupled


# --------------------------------------------------------------------------------------------- guards
def test_device_mismatch() -> None:
    with pytest.raises(TraceError, match=r"device meta.*parameters are on cpu"):
        trace(Net(), torch.empty(2, 3, 8, 8, device="meta"))


class Slow(nn.Module):
    """A forward pass that spins for `seconds` (in short sleeps, so any interruption mechanism works)."""

    def __init__(self, seconds: float, swallow: bool = False) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 3)
        self.seconds, self.swallow = seconds, swallow

    def spin(self) -> None:
        end = time.monotonic() + self.seconds
        while time.monotonic() < end:
            time.sleep(0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.swallow:
            try:
                self.spin()
            except BaseException:  # a library swallowing everything, like TP's bare except
                pass
        self.spin()
        return self.fc(x)


def assert_clean_after_budget() -> None:
    time.sleep(0.6)  # longer than the re-raise interval: nothing may fire any more
    if threading.current_thread() is threading.main_thread():
        assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


@pytest.mark.parametrize("swallow", [False, True])
def test_budget_interrupts_a_slow_forward(swallow: bool) -> None:
    model = Slow(20.0, swallow).train()
    t0 = time.monotonic()
    with pytest.raises(TraceError, match=r"budget_s=0\.3 s.*forward pass"):
        trace(model, torch.randn(2, 3), budget_s=0.3)
    assert time.monotonic() - t0 < 5
    assert model.training and not model.fc._forward_hooks
    assert_clean_after_budget()


class BudgetFromGrouping(Budget):
    """The trace's own budget, with its clock started when grouping starts: the phases before it (the forward
    pass, Torch-Pruning's graph build) take what they take on a busy machine, only the grouping is timed."""

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        if name == "phase" and value == "collecting pruning groups":
            self._stack.enter_context(Budget.guard(self))  # the real guard, armed now

    @contextmanager
    def guard(self) -> Iterator[Budget]:
        with ExitStack() as stack:  # unwinds the real guard (disarming its timer) however the block ends
            self._stack = stack
            yield self


def test_budget_interrupts_a_hung_grouping(monkeypatch: pytest.MonkeyPatch) -> None:
    def forever(*args: Any, **kwargs: Any) -> Any:
        while True:
            pass

    monkeypatch.setattr(sys.modules["wtfront.tracing.groups"], "pruning_group", forever)
    monkeypatch.setattr(sys.modules["wtfront.tracing.entry"], "Budget", BudgetFromGrouping)
    with pytest.raises(TraceError, match=r"budget_s=0\.5 s: gave up after [\d.]+ s while collecting pruning groups"):
        trace(Net(), X, budget_s=0.5)
    assert_clean_after_budget()


def test_budget_off_the_main_thread() -> None:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            trace(Slow(20.0), torch.randn(2, 3), budget_s=0.3)
        except BaseException as e:
            errors.append(e)
        time.sleep(0.6)  # a late injected exception would escape here and kill the thread silently
        errors.append(StopIteration())

    t0 = time.monotonic()
    th = threading.Thread(target=run)
    th.start()
    th.join(10)
    assert time.monotonic() - t0 < 5
    assert len(errors) == 2 and isinstance(errors[0], TraceError) and "forward pass" in str(errors[0])


def test_zero_budget() -> None:
    with pytest.raises(TraceError, match="budget"):
        trace(Net(), X, budget_s=0)


def test_forward_error_is_a_trace_error_with_cause() -> None:
    with pytest.raises(TraceError, match=r"forward pass.*RuntimeError") as info:
        trace(Net(), torch.randn(2, 5, 8, 8))
    assert isinstance(info.value.__cause__, RuntimeError)


def test_state_is_restored_and_no_grad_is_fine() -> None:
    net = Net().train()
    net.bn.eval()
    net.stem.weight.requires_grad_(False)
    with torch.no_grad():
        s = trace(net, X)
    assert net.training and not net.bn.training and net.fc.training
    assert not net.stem.weight.requires_grad and net.fc.weight.requires_grad
    assert all(not m._forward_hooks for m in net.modules())
    assert ("stem.weight", 0) in slice_map(s.group_map["stem.out"])  # frozen weights are still traced


def test_trace_leaves_no_cyclic_garbage_and_restores_the_collector() -> None:
    """TP's graph is cyclic; trace breaks its cycles, so nothing of it waits for (and is promoted ahead of) a
    full collection; the collector is paused while tracing and left as it was, also when tracing fails."""
    import gc

    import torchvision
    from torch_pruning.dependency.dependency import Dependency
    from torch_pruning.dependency.node import Node

    model, x = torchvision.models.resnet18(), torch.randn(1, 3, 64, 64)
    trace(model, x, costs=False)
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        assert gc.isenabled()
        trace(model, x, costs=False)
        assert gc.isenabled()
        gc.collect()
        leaked = [o for o in gc.garbage if isinstance(o, (Node, Dependency))]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert not leaked
    gc.disable()
    try:
        with pytest.raises(TraceError):
            trace(Net(), torch.randn(2, 5, 8, 8))
        assert not gc.isenabled()  # a caller's paused collector stays paused
    finally:
        gc.enable()
    with pytest.raises(TraceError):
        trace(Net(), torch.randn(2, 5, 8, 8))
    assert gc.isenabled()


# ------------------------------------------------------------------------------------------------ zoo
# (factory, input side, the one group that feeds the output). CNNs run at 64x64: the structure does not
# depend on the resolution once global pooling reduces it, and tracing is faster.
ZOO: dict[str, tuple[str, int, str]] = {
    "resnet18": ("torchvision", 64, "fc.out"),
    "resnet50": ("torchvision", 64, "fc.out"),
    "mobilenet_v3_large": ("torchvision", 64, "classifier.3.out"),
    "efficientnet_b0": ("torchvision", 64, "classifier.1.out"),
    "densenet121": ("torchvision", 64, "classifier.out"),
    "convnext_tiny": ("torchvision", 64, "classifier.2.out"),
    "regnet_y_400mf": ("torchvision", 64, "fc.out"),
    "resnext50_32x4d": ("torchvision", 64, "fc.out"),
    "shufflenet_v2_x1_0": ("torchvision", 64, "fc.out"),
    "vit_b_16": ("torchvision", 224, "heads.head.out"),
    "vit_tiny_patch16_224": ("timm", 224, "head.out"),
    "deit_small_patch16_224": ("timm", 224, "head.out"),
    "convnext_atto": ("timm", 64, "head.fc.out"),
    "efficientnet_b0 ": ("timm", 64, "classifier.out"),  # trailing space: a distinct test id from torchvision's
}
# Groups allowed to be not prunable for another reason than feeding the output, per model.
KNOWN_NOT_PRUNABLE = {"shufflenet_v2_x1_0": SHUFFLE_REASON, "vit_b_16": HIDDEN_REASON,
                      "vit_tiny_patch16_224": HIDDEN_REASON, "deit_small_patch16_224": HIDDEN_REASON}


def build(name: str, lib: str) -> nn.Module:
    if lib == "torchvision":
        tv = pytest.importorskip("torchvision")
        return tv.models.get_model(name, weights=None)
    timm = pytest.importorskip("timm")
    return timm.create_model(name.strip(), pretrained=False)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(ZOO))
def test_zoo(name: str, record_property: Any) -> None:
    lib, side, classifier = ZOO[name]
    torch.manual_seed(0)
    model = build(name, lib).eval()
    t0 = time.perf_counter()
    s = trace(model, torch.randn(1, 3, side, side))
    elapsed = time.perf_counter() - t0
    record_property("trace_s", round(elapsed, 3))
    print(f"\ntrace {lib}:{name.strip()} ({side}x{side}): {elapsed:.2f} s, {len(s.groups)} groups, {s.num_units} units")

    assert Structure.from_json(s.to_json()) == s
    assert s.uncoupled == (), f"parameters in no unit group: {s.uncoupled}"
    sliced = {sl.param for g in s.groups for sl in g.slices}
    canonical = {id(p): n for n, p in model.named_parameters()}
    for mname, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)):
            assert canonical[id(m.weight)] in sliced, f"{mname}.weight has no slice"
    output_groups = [g.name for g in s.groups if not g.prunable and g.reason == OUTPUT_REASON]
    assert output_groups == [classifier]
    other = {g.reason for g in s.groups if not g.prunable and g.reason != OUTPUT_REASON}
    assert other <= {KNOWN_NOT_PRUNABLE.get(name, OUTPUT_REASON)}
    for g in s.groups:
        units: set[int] = set()
        for sl in g.slices:
            shape = s.param_map[sl.param].shape
            assert len(sl.index_list()) == shape[sl.axis] * sl.groups
            units |= sl.units()
        assert units == set(range(g.size)), f"{g.name}: units without any parameter entry"


def touches_grouped_conv(model: nn.Module, g: UnitGroup) -> bool:
    """TP cannot physically remove a single channel of a grouped (non-depthwise) conv."""
    owners = {s.param.rpartition(".")[0] for s in g.slices}
    return any(
        isinstance(m, nn.modules.conv._ConvNd) and 1 < m.groups != m.out_channels
        for name, m in model.named_modules()
        if name in owners
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "name",
    ["resnet50", "densenet121", "efficientnet_b0", "mobilenet_v3_large", "regnet_y_400mf", "timm:efficientnet_b0"],
)
def test_zoo_zeroing_matches_tp_pruning(name: str) -> None:
    """On sampled groups of real CNNs, zeroing a unit's slices equals TP's physical removal of that channel."""
    torch.manual_seed(0)
    if name.startswith("timm:"):
        model = pytest.importorskip("timm").create_model(name[5:], pretrained=False, num_classes=10)
    else:
        model = pytest.importorskip("torchvision").models.get_model(name, weights=None, num_classes=10)
    model.eval()
    for m in model.modules():  # non-trivial statistics, so a missed BatchNorm entry changes the output
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
    x = torch.randn(1, 3, 64, 64)
    s = trace(model, x)
    groups = [g for g in s.groups if g.prunable and not touches_grouped_conv(model, g)]
    assert len(groups) >= 4
    for g in groups[:: max(1, len(groups) // 6)]:
        assert_zeroing_matches_tp_pruning(model, x, g, g.size // 2)
