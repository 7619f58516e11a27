"""Pruned checkpoints: weights_only-safe files that restore a pruned architecture into a fresh model."""

from __future__ import annotations

import pickle
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from wtfront import CheckpointError, load_pruned, prune_units, register_metadata_hook, save_pruned, trace
from wtfront.prune.checkpoint import manifest, register_manifest_attrs


class Types(nn.Module):
    """One of (almost) every module type Torch-Pruning prunes: embedding, attention, norms, PReLU, convs
    (plain, depthwise, transposed), BatchNorm, Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
        self.ln = nn.LayerNorm(8)
        self.fc = nn.Linear(8, 12)
        self.prelu = nn.PReLU(12)
        self.conv = nn.Conv1d(12, 16, 3, padding=1)
        self.gn = nn.GroupNorm(4, 16)
        self.dw = nn.Conv1d(16, 16, 3, padding=1, groups=16)
        self.inorm = nn.InstanceNorm1d(16, affine=True)
        self.up = nn.ConvTranspose1d(16, 6, 2, stride=2)
        self.bn = nn.BatchNorm1d(6)
        self.head = nn.Linear(6, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        h = h + self.mha(h, h, h, need_weights=False)[0]
        h = self.prelu(self.fc(self.ln(h)).transpose(1, 2)).transpose(1, 2)
        c = self.inorm(self.dw(self.gn(self.conv(h.transpose(1, 2)))))
        return self.head(self.bn(self.up(c)).mean(-1))


IDS = torch.tensor([[1, 4, 2, 9, 3], [0, 5, 5, 7, 19]])


def pruned_types() -> Types:
    torch.manual_seed(0)
    net = Types().eval()
    with torch.no_grad():
        net.bn.running_mean.uniform_(-0.5, 0.5)
        net.bn.running_var.uniform_(0.5, 1.5)
    # the hidden width is pruned as a whole, MHA included (Torch-Pruning's embed_dim pruning: no head units)
    kw = {"units": ("head", "mlp_feature", "hidden"), "heads": {"mha": None}}
    s = trace(net, IDS, **kw)
    # the hidden width (MHA, LayerNorm) and the GroupNorm'ed channels are lossy: strict=False; one channel of
    # each GroupNorm group and one per attention head, so both stay divisible
    removed = {"emb.out": [0, 7], "fc.out": [2, 3, 11], "conv.out": [0, 5, 10, 15], "up.out": [4]}
    prune_units(net, s, IDS, removed, strict=False, trace_kwargs=kw)
    return net


def attrs(m: nn.Module) -> dict[str, Any]:
    return {k: v for k, v in vars(m).items() if not k.startswith("_") and not isinstance(v, torch.Tensor)}


def test_every_prunable_type_round_trips_weights_only(tmp_path: Any) -> None:
    net = pruned_types()
    assert (net.mha.embed_dim, net.mha.head_dim, net.gn.num_channels, net.dw.groups, net.up.out_channels) == (
        6, 3, 12, 12, 5)
    path = tmp_path / "types.pt"
    save_pruned(net, path)
    raw = torch.load(path, weights_only=True)  # no allowlist needed
    assert raw["format"] == "wt.pruned/1" and set(raw["state_dict"]) == set(net.state_dict())
    assert len(pickle.dumps(raw["manifest"])) < 10_000
    fresh = Types()
    assert load_pruned(fresh, path) is fresh
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(IDS), net(IDS))
    for (name, a), (_, b) in zip(net.named_modules(), fresh.named_modules()):
        assert attrs(a) == attrs(b), name
        assert {k: v.shape for k, v in a.named_parameters(recurse=False)} == {
            k: v.shape for k, v in b.named_parameters(recurse=False)}, name


def test_resnet_round_trip_and_fresh_model_is_required(tmp_path: Any) -> None:
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    net = tv.models.resnet18(num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    s = trace(net, x)
    prune_units(net, s, x, {"layer1.0.conv1.out": list(range(0, 64, 3)), "conv1.out": [1, 2]})
    save_pruned(net, tmp_path / "r.pt")
    with pytest.raises(CheckpointError, match=r"is of a torchvision\.models\.resnet\.ResNet, not a"):
        load_pruned(tv.models.vgg11(num_classes=10), tmp_path / "r.pt")
    fresh = tv.models.resnet18(num_classes=10)
    load_pruned(fresh, tmp_path / "r.pt")
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), net(x))
    assert fresh.layer1[0].conv1.out_channels == 42 and fresh.bn1.num_features == 62


def test_a_failed_load_leaves_the_fresh_model_untouched(tmp_path: Any) -> None:
    net = pruned_types()
    path = tmp_path / "bad.pt"
    ckpt = {"format": "wt.pruned/1", "manifest": manifest(net), "state_dict": net.state_dict()}
    ckpt["state_dict"]["fc.weight"] = torch.zeros(3, 3)  # does not fit the manifest's shape
    torch.save(ckpt, path)
    fresh = Types()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    params = list(fresh.parameters())
    with pytest.raises(CheckpointError, match="the model was left as constructed"):
        load_pruned(fresh, path)
    assert all(a is b for a, b in zip(fresh.parameters(), params))
    assert all(torch.equal(v, before[k]) for k, v in fresh.state_dict().items())
    assert fresh.fc.out_features == 12 and fresh.mha.embed_dim == 8
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a wt pruned checkpoint"):
        load_pruned(fresh, tmp_path / "other.pt")


def test_reparametrized_models_are_refused(tmp_path: Any) -> None:
    net = Types()
    torch_prune.l1_unstructured(net.fc, "weight", amount=0.5)
    with pytest.raises(CheckpointError, match="re-parametrized"):
        save_pruned(net, tmp_path / "x.pt")
    torch_prune.remove(net.fc, "weight")
    save_pruned(net, tmp_path / "x.pt")


def test_extra_attributes_and_metadata_hooks_on_load(tmp_path: Any) -> None:
    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(4, 8)
            self.out = nn.Linear(8, 2)
            self.scale = 8 ** -0.5  # a float derived from a width: recorded because it is registered

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(self.proj(x) * self.scale)

    register_manifest_attrs(Scaled, "scale")
    hooked = []

    @register_metadata_hook(Scaled)
    def resync(m: nn.Module) -> None:
        hooked.append(m.proj.out_features)
        m.scale = m.proj.out_features ** -0.5

    x = torch.randn(3, 4)
    net = Scaled()
    # the hook changes the function (the scale follows the width), so the fake-vs-physical check would flag it
    prune_units(net, trace(net, x), x, {"proj.out": [0, 1, 2, 3]}, verify=False)
    assert net.scale == 0.5 and manifest(net)["modules"][""]["attrs"]["scale"] == 0.5
    save_pruned(net, tmp_path / "s.pt")
    fresh = Scaled()
    hooked.clear()
    load_pruned(fresh, tmp_path / "s.pt")
    assert fresh.scale == 0.5 and hooked == [4]
    assert torch.equal(fresh(x), net(x))
