"""Bad inputs, injected faults and concurrent callers: each gives a clear `WtError` naming the place, or a
correct result; never a crash, a silent wrong number, a lost file or a half-changed model.

References are independent of what is tested: sequential calls for concurrent ones, fp64 loops over slices
(`wtcore.testing.reference_unit_values`) for norms, the bytes on disk before a failed save."""

from __future__ import annotations

import copy
import signal
import struct
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import wtcore
from wtcore.checks import require_finite
from wtcore.errors import WtError
from wtcore.solver import solve_keep
from wtcore.testing import reference_unit_values
from wtfront import (
    CheckpointError,
    WeightTracker,
    analyze,
    apply_masks,
    load_pruned,
    prune_units,
    prune_zero_units,
    save_pruned,
    trace,
    view_zero_units,
)
from wtfront.cli import main
from wtfront.prune.checkpoint import FORMAT
from wtfront.tracing import budget as budget_module
from wtfront.tracing.budget import Budget
from wtfront.train.tracker import tracker_kinds

tv = pytest.importorskip("torchvision")


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    model = tv.models.resnet18(num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    return model, x, WeightTracker(model, x).structure


def _sparse_params(model, seed: int, channels_last: bool) -> dict[str, torch.Tensor]:
    """The model's parameters with a different random pattern of zeros per seed (so results differ)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for n, p in model.named_parameters():
        t = p.detach().clone() * (torch.rand(p.shape, generator=g) > 0.5)
        if channels_last and t.dim() == 4:
            t = t.to(memory_format=torch.channels_last)
        out[n] = t
    return out


# ------------------------------------------------------------------------------------- concurrency
@pytest.mark.parametrize("channels_last", [False, True])
def test_concurrent_calls_equal_sequential_calls_with_every_tracker_spec(resnet, channels_last):
    """4 threads x 20 calls of one program (every tracker spec) on 4 parameter dicts equal sequential calls:
    programs are pure functions, safe to share between threads (data loaders, loggers, servers)."""
    model, x, structure = resnet
    t = WeightTracker(model, x, structure=structure)
    t.create_tracker(tracker_kinds())
    prog = t.program()
    dicts = [_sparse_params(model, s, channels_last) for s in range(4)]
    want = [prog.flat(d) for d in dicts]
    assert not all(torch.equal(want[0], w) for w in want[1:])  # the dicts give different results
    got: dict[tuple[int, int], torch.Tensor] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def worker(i: int) -> None:
        try:
            start.wait()
            for r in range(20):
                got[i, r] = prog.flat(dicts[i])
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    wrong = [(i, r) for (i, r), v in got.items() if not torch.equal(v, want[i])]
    assert not wrong, f"{len(wrong)} of 80 concurrent results differ from sequential calls"


# --------------------------------------------------------------------------------------------- NaN weights
def _with_nan_filter(model) -> dict[str, torch.Tensor]:
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    params["layer1.0.conv1.weight"][3, 5, 1, 1] = float("nan")
    return params


def test_a_nan_weight_shows_up_as_nan_in_every_norm_based_output(resnet):
    """One NaN entry in layer1.0.conv1: every unit it is coupled to (its filter, and its input channel in the
    stem's group) reads NaN in L1/L2/Linf norms, and so does group lasso; no norm reads 0 for it."""
    model, _, structure = resnet
    params = _with_nan_filter(model)
    ref = reference_unit_values(structure, params)
    nan_units = np.isnan(ref["sumsq"])
    assert nan_units.sum() == 2  # a filter and an input channel (the reference's own count)
    prog = wtcore.compile(structure, ["unit_l2", "unit_l1", "unit_linf", "group_lasso", "mac_group_lasso",
                                      "magnitude_importance"])
    out = prog(params)
    for key in ("unit_l2", "unit_l1", "unit_linf"):
        assert np.array_equal(torch.isnan(out[key]).numpy(), nan_units), key
        finite = ~nan_units
        assert np.allclose(out["unit_l2"].double().numpy()[finite], np.sqrt(ref["sumsq"][finite]), rtol=1e-5)
    for key in ("group_lasso", "mac_group_lasso"):
        assert torch.isnan(out[key]), key
    assert torch.isnan(out["magnitude_importance"]).numpy()[nan_units].all()
    # the gradient of group lasso stays 0 (not NaN) at a zero unit
    zeroed = dict(params, **{"layer1.0.conv1.weight": torch.zeros_like(params["layer1.0.conv1.weight"])})
    w = {k: v.clone().requires_grad_(k == "layer1.0.conv1.weight") for k, v in zeroed.items()}
    wtcore.compile(structure, ["group_lasso"])(w)["group_lasso"].backward()
    assert torch.isfinite(w["layer1.0.conv1.weight"].grad).all()


def test_decisions_refuse_nan_weights_naming_the_parameter(resnet):
    model, x, structure = resnet
    params = _with_nan_filter(model)
    with pytest.raises(WtError, match=r"layer1\.0\.conv1\.weight"):
        require_finite(params, "prune")
    with pytest.raises(WtError, match="NaN"):
        solve_keep(structure, params, target=0.5, metric="macs")
    m = copy.deepcopy(model)
    m.load_state_dict(params, strict=False)
    with pytest.raises(WtError, match=r"layer1\.0\.conv1\.weight"):
        view_zero_units(m, structure)
    with pytest.raises(WtError, match=r"layer1\.0\.conv1\.weight"):
        prune_zero_units(m, structure, x)
    assert all(torch.equal(p, params[n]) | torch.isnan(p).any() for n, p in m.named_parameters())


def test_analyze_reports_nan_units_instead_of_ready_to_prune(resnet, tmp_path):
    model, _, structure = resnet
    params = _with_nan_filter(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state.update(params)
    torch.save(state, tmp_path / "epoch_1.pt")
    torch.save(model.state_dict(), tmp_path / "epoch_2.pt")
    result = analyze(structure, [tmp_path], threshold=1e-3)
    bad, good = result.checkpoints
    assert bad.scalars["nonfinite_units"] == 2 and good.scalars["nonfinite_units"] == 0
    assert bad.scalars["units_below_threshold"] == good.scalars["units_below_threshold"] == 0
    assert np.isnan(bad.scalars["group_lasso"]) and np.isfinite(good.scalars["group_lasso"])


# ---------------------------------------------------------------------------------------- ties across groups
class TiedLM(nn.Module):
    """`emb` and `head` share one weight, with a Linear between them: the embedding's columns and the head's
    inputs are two Torch-Pruning groups (the embedding width, `proj`'s outputs) over one tensor axis."""

    def __init__(self, vocab: int = 16, dim: int = 8) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.proj = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.proj(self.emb(x))))


def _axes_in_two_groups(structure: wtcore.Structure) -> list[tuple[str, int]]:
    """(param, axis) pairs with an entry that two groups both give a unit (disjoint parts, as of a
    concatenation, are fine)."""
    seen: dict[tuple[str, int], np.ndarray] = {}
    twice = []
    for g in structure.groups:
        for s in g.slices:
            on = s.unit_ids() >= 0
            have = seen.get((s.param, s.axis))
            if have is not None and (have & on).any():
                twice.append((s.param, s.axis))
            seen[s.param, s.axis] = on if have is None else have | on
    return twice


def test_a_tied_weight_in_two_groups_is_one_group_that_prunes_consistently():
    torch.manual_seed(0)
    model = TiedLM().eval()
    x = torch.randint(0, 16, (2, 5))
    structure = trace(model, x)
    assert not _axes_in_two_groups(structure)
    g = next(g for g in structure.groups if any(s.param == "emb.weight" and s.axis == 1 for s in g.slices))
    assert g.prunable and {("proj.weight", 0), ("proj.weight", 1), ("proj.bias", 0)} <= {
        (s.param, s.axis) for s in g.slices}
    params = dict(model.named_parameters())
    ref = reference_unit_values(structure, params)  # each element once per distinct unit
    got = wtcore.compile(structure, ["unit_sumsq"])(params)["unit_sumsq"]
    assert np.allclose(got.detach().double().numpy(), ref["sumsq"], rtol=1e-6)
    # fake pruning a unit of the merged group and physically removing it compute the same function
    faked = copy.deepcopy(model)
    apply_masks(faked, structure, {g.name: [1, 5]})
    new = prune_units(model, structure, x, {g.name: [1, 5]})
    assert model.head.weight is model.emb.weight and model.emb.weight.shape == (16, 6)
    assert torch.allclose(model(x), faked(x), atol=1e-6)
    assert not _axes_in_two_groups(new)


def test_bert_mlm_traces_with_no_tensor_axis_in_two_groups():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=48, max_position_embeddings=16)
    torch.manual_seed(0)
    model = transformers.BertForMaskedLM(cfg).eval()
    structure = trace(model, torch.randint(0, 64, (1, 8)))
    assert not _axes_in_two_groups(structure)
    params = dict(model.named_parameters())
    ref = reference_unit_values(structure, params)
    got = wtcore.compile(structure, ["unit_sumsq"])(params)["unit_sumsq"]
    assert np.allclose(got.detach().double().numpy(), ref["sumsq"], rtol=1e-5)
    assert not any(g.name == "cls.predictions.transform.dense.out" for g in structure.groups)


# ------------------------------------------------------------------------------------- saves and loads
class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).mean((2, 3)))


class _Fault(Exception):
    pass


@pytest.mark.parametrize("fault", [OSError(28, "No space left on device"), KeyboardInterrupt(), _Fault()],
                         ids=["disk-full", "ctrl-c", "bug"])
def test_a_failed_or_interrupted_save_leaves_the_previous_file_intact(tmp_path, monkeypatch, fault):
    torch.manual_seed(0)
    path = tmp_path / "pruned.pt"
    save_pruned(_Net(), path)
    before = path.read_bytes()
    real_save = torch.save

    def failing_save(obj, f, *a, **kw):  # half of the bytes reach the disk, then the write fails
        real_save(obj, f, *a, **kw)
        f.truncate(f.tell() // 2)
        raise fault

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises((CheckpointError, type(fault))):
        save_pruned(_Net(), path)
    monkeypatch.setattr(torch, "save", real_save)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pruned.pt"]  # no temporary file left behind
    load_pruned(_Net(), path)


def _flip(path: Path, member_suffix: str, n: int = 64) -> None:
    """Flip `n` bytes in the middle of the data of the first zip member whose name ends with the suffix."""
    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if i.filename.endswith(member_suffix))
    raw = bytearray(path.read_bytes())
    # the member's data follows its 30-byte local header, file name and extra field
    name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26: info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len + info.compress_size // 2 - n // 2
    for i in range(start, start + n):
        raw[i] ^= 0x5A
    path.write_bytes(bytes(raw))


def test_corrupted_checkpoints_are_refused_not_loaded_as_wrong_weights(tmp_path, resnet):
    torch.manual_seed(0)
    path = tmp_path / "pruned.pt"
    net = _Net()
    net.conv.weight.data = torch.randn(8, 3, 32, 32)  # a big tensor (data/0 in the archive)
    save_pruned(net, path)
    with zipfile.ZipFile(path) as z:
        biggest = max(z.infolist(), key=lambda i: i.file_size).filename
    _flip(path, biggest)
    fresh = _Net()
    with pytest.raises(CheckpointError, match="CRC"):
        load_pruned(fresh, path)
    assert fresh.conv.weight.shape == (8, 3, 3, 3)  # the model is left as constructed
    # wt analyze reads checkpoints through the same check
    model, _, structure = resnet
    torch.save(model.state_dict(), tmp_path / "epoch_1.pt")
    with zipfile.ZipFile(tmp_path / "epoch_1.pt") as z:
        biggest = max(z.infolist(), key=lambda i: i.file_size).filename
    _flip(tmp_path / "epoch_1.pt", biggest)
    with pytest.raises(WtError, match="CRC"):
        analyze(structure, [tmp_path / "epoch_1.pt"])
    # truncated or foreign files: a named error, never a traceback from deep inside torch
    good = tmp_path / "good.pt"
    save_pruned(_Net(), good)
    (tmp_path / "half.pt").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    (tmp_path / "foreign.pt").write_bytes(b"not a checkpoint at all")
    torch.save({"state_dict": _Net().state_dict(), "format": FORMAT}, tmp_path / "no_manifest.pt")
    for name in ("half.pt", "foreign.pt", "no_manifest.pt"):
        with pytest.raises(CheckpointError, match=name):
            load_pruned(_Net(), tmp_path / name)


def test_wt_prune_refuses_to_overwrite_without_force(tmp_path, capsys):
    (tmp_path / "pruned.pt").write_bytes(b"an earlier result")
    code = main(["prune", "torchvision:resnet18", "--input", "1,3,32,32", "--target-macs", "0.5",
                 "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "--force" in err and "pruned.pt" in err
    assert (tmp_path / "pruned.pt").read_bytes() == b"an earlier result"


# ----------------------------------------------------------------------------------------------- interrupts
def _interrupt_once_after(module, name: str, monkeypatch) -> None:
    """`module.name` runs, then raises KeyboardInterrupt (once): a Ctrl-C right after that call."""
    real = getattr(module, name)
    fired = []

    def wrapped(*a, **kw):
        out = real(*a, **kw)
        if not fired:
            fired.append(1)
            raise KeyboardInterrupt
        return out

    monkeypatch.setattr(module, name, wrapped)


@pytest.mark.parametrize("path", ["sigalrm", "watcher"])
def test_ctrl_c_while_a_budget_arms_leaves_no_timer_behind(monkeypatch, path):
    if path == "sigalrm":
        assert budget_module._can_use_sigalrm()
        _interrupt_once_after(signal, "setitimer", monkeypatch)
    else:
        monkeypatch.setattr(budget_module, "_can_use_sigalrm", lambda: False)
        _interrupt_once_after(threading.Thread, "start", monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        with Budget(0.05, repeat_s=0.05).guard():
            time.sleep(1)
    monkeypatch.undo()
    time.sleep(0.3)  # a leaked timer would raise BudgetExceeded here, and again every 0.05 s
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    assert signal.getsignal(signal.SIGALRM) in (signal.SIG_DFL, None)
    assert not [t for t in threading.enumerate() if t.name == "wt-budget"]
