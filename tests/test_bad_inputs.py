"""Bad inputs, injected faults and concurrent callers: each gives a clear `WtError` naming the place, or a
correct result; never a crash, a silent wrong number, a lost file or a half-changed model.

References are independent of what is tested: sequential calls for concurrent ones, fp64 loops over slices
(`wtcore.testing.reference_unit_values`) for norms, the bytes on disk before a failed save."""

from __future__ import annotations

import copy
import functools
import math
import pickle
import signal
import struct
import sys
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import wtcore
from wtcore.checks import require_finite
from wtcore.errors import WtError
from wtcore.native import nonzero_stats, nonzero_stats_torch
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
from wtfront.prune.snapshot import Snapshot
from wtfront.tracing import budget as budget_module
from wtfront.tracing.budget import Budget
from wtfront.tracing.ties import merge_tied_groups
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


# ------------------------------------------------------------------------------------------ smaller ones
def test_programs_pickle_and_refuse_what_is_not_a_parameter_mapping(resnet):
    model, _, structure = resnet
    prog = wtcore.compile(structure, ["group_lasso", "nm_sparsity", "unit_l2"])
    again = pickle.loads(pickle.dumps(prog))
    params = dict(model.named_parameters())
    want, got = prog(params), again(params)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    for bad in (None, [1, 2], torch.zeros(3)):
        with pytest.raises(WtError, match="mapping"):
            prog(bad)


@st.composite
def _weights(draw):
    o, c = draw(st.integers(0, 6)), draw(st.integers(0, 9))
    k = draw(st.sampled_from([(), (0,), (1,), (3,), (2, 2)]))
    dtype = draw(st.sampled_from([torch.float16, torch.bfloat16, torch.float32, torch.float64]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    w = (torch.randn((o, c, *k), generator=g) * draw(st.sampled_from([1e-3, 1.0, 1e5]))).to(dtype)
    w[torch.rand(w.shape, generator=g) < 0.4] = 0
    if w.numel() and draw(st.booleans()):
        special = draw(st.sampled_from([float("nan"), float("inf"), -float("inf")]))
        w.view(-1)[draw(st.integers(0, w.numel() - 1))] = special
    return w


@settings(max_examples=60, deadline=None)
@given(ws=st.lists(_weights(), min_size=1, max_size=3),
       tol=st.sampled_from([0.0, 1e-3, 0.5, 7e4, 1e5, 1e300, math.inf]), m=st.integers(1, 5), data=st.data())
def test_native_and_torch_counts_agree_on_odd_weights(ws, tol, m, data):
    """0-size weights, NaN/inf entries, tolerances beyond a dtype's range: both implementations agree, and
    an element is nonzero where torch says `|x| > tol` (`x != 0` at 0)."""
    keep = data.draw(st.integers(0, m))
    rows, cols = nonzero_stats(ws, tol, m, keep)
    rows_t, cols_t = nonzero_stats_torch(ws, tol, m, keep)
    assert torch.equal(rows, rows_t) and torch.equal(cols, cols_t)
    exact = [(w.abs() > tol) if tol else (w != 0) for w in ws]
    assert rows[0].tolist() == [int(e[r].sum()) for e in exact for r in range(e.shape[0])]


def test_block_counts_refuse_keep_outside_0_to_m():
    w = torch.randn(4, 8)
    for m, keep in ((4, 5), (4, -1), (0, 0)):
        for fn in (nonzero_stats, nonzero_stats_torch):
            with pytest.raises(WtError, match="keep"):
                fn([w], 0.0, m, keep)


def test_snapshot_restores_tensors_given_other_data():
    torch.manual_seed(0)
    net = _Net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    snap = Snapshot(net)
    net.conv.weight.data = torch.zeros(2, 3, 3, 3)  # no version bump: a different tensor under the same Parameter
    net.fc.bias.data = net.fc.bias.data.double()
    net.fc.weight.data.mul_(2)
    snap.restore()
    after = net.state_dict()
    assert all(after[k].dtype == v.dtype and after[k].shape == v.shape and torch.equal(after[k], v)
               for k, v in before.items())


@pytest.mark.parametrize("argv", [
    ["analyze", "torchvision:resnet18", "x.pt", "--threshold", "nan"],
    ["analyze", "torchvision:resnet18", "x.pt", "--tolerance", "-1"],
    ["inspect", "torchvision:resnet18", "--rows", "-5"],
    ["bench", "torchvision:resnet18", "--reps", "0"],
    ["prune", "torchvision:resnet18", "--target-macs", "inf", "--out", "o"],
])
def test_cli_refuses_bad_numbers_before_any_work(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and "expected" in capsys.readouterr().err


def test_ctrl_c_and_what_it_breaks_read_as_an_interrupt(monkeypatch, capsys):
    """A Ctrl-C, or an import error raised while handling one (a module whose import Ctrl-C cut short), is
    reported as an interrupt (exit 130), not as the error it caused."""
    import wtfront.cli.commands as commands

    def interrupted_import(args):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise RuntimeError("triton is not installed correctly") from None

    for fn in (interrupted_import, lambda args: (_ for _ in ()).throw(KeyboardInterrupt())):
        monkeypatch.setattr(commands, "_inspect", fn)
        assert main(["inspect", "torchvision:resnet18"]) == 130
        err = capsys.readouterr().err
        assert "interrupted" in err and "triton" not in err


def test_a_tie_broken_after_the_trace_is_not_read_from_the_canonical_name_only():
    torch.manual_seed(0)
    model = TiedLM().eval()
    structure = trace(model, torch.randint(0, 16, (2, 5)))
    prog = wtcore.compile(structure, ["unit_l2"])
    prog(model.state_dict())  # both names of the tie, one tensor: fine
    model.head.weight = nn.Parameter(model.emb.weight.detach().clone() * 2)  # untied
    with pytest.raises(wtcore.StaleProgramError, match=r"'head\.weight'.*re-trace"):
        prog(dict(model.named_parameters()))


# ------------------------------------------------------------------------------- programs on bad mappings
_MUTATIONS = ("missing", "extra", "shape", "int", "not_tensor", "meta", "half", "alias")


@settings(max_examples=16, deadline=None, print_blob=False)
@given(mutation=st.sampled_from(_MUTATIONS), which=st.integers(0, 10**6))
def test_programs_on_bad_parameter_mappings_name_the_parameter_or_are_right(resnet, mutation, which):
    """Each mutation of a good mapping gives a `WtError` naming the parameter, or the result of the good one
    (extra keys are ignored; another float dtype is computed in that dtype)."""
    model, _, structure = resnet
    prog = _small_program(structure)
    good = {n: p.detach() for n, p in model.named_parameters()}
    name = sorted(good)[which % len(good)]
    bad = dict(good)
    if mutation == "missing":
        del bad[name]
    elif mutation == "extra":
        bad["not.a.parameter"] = torch.zeros(3)
    elif mutation == "shape":
        bad[name] = torch.zeros(*good[name].shape, 2)
    elif mutation == "int":
        bad[name] = good[name].to(torch.int64)
    elif mutation == "not_tensor":
        bad[name] = good[name].tolist()
    elif mutation == "meta":
        bad[name] = good[name].to("meta")
    elif mutation == "half":
        bad[name] = good[name].double()
    else:  # the names under a wrapper's prefix (DDP's `module.`): none is found
        bad = {f"module.{k}": v for k, v in good.items()}
    want = prog(good)
    try:
        got = prog(bad)
    except WtError as e:
        assert mutation not in ("extra", "half")
        assert (name in str(e)) if mutation != "alias" else ("missing" in str(e))
        return
    assert mutation in ("extra", "half"), f"{mutation} of {name!r} was accepted"
    for k in want:
        assert torch.allclose(got[k].double(), want[k].double(), rtol=1e-4, atol=1e-6), k


@functools.cache
def _small_program(structure):
    return wtcore.compile(structure, ["group_lasso", "unit_l2", "unstructured_sparsity"])


# ------------------------------------------------------------------------------ Ctrl-C at random points
class _Interrupt:
    """A `sys.settrace` hook that raises KeyboardInterrupt at the `at`-th call of a wt function (counts
    them all when `at` is None)."""

    def __init__(self, at: int | None) -> None:
        self.at, self.calls = at, 0

    def __call__(self, frame, event, arg):
        if event == "call" and frame.f_globals.get("__name__", "").startswith(("wtfront.", "wtcore.")):
            self.calls += 1
            if self.calls == self.at:
                sys.settrace(None)
                raise KeyboardInterrupt
        return None

    def run(self, fn):
        sys.settrace(self)
        try:
            return fn()
        finally:
            sys.settrace(None)


def _state(model: nn.Module) -> dict[str, tuple[int, torch.Tensor]]:
    return {k: (id(v), v.detach().clone()) for k, v in [*model.named_parameters(), *model.named_buffers()]}


@pytest.fixture(scope="module")
def small_cnn():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 6, 3), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4)).eval()
    x = torch.randn(1, 3, 16, 16)
    structure = trace(model, x)
    counter = _Interrupt(None)
    counter.run(lambda: prune_units(copy.deepcopy(model), structure, x, {"0.out": [1, 2]}))
    return model, x, structure, counter.calls


@settings(max_examples=20, deadline=None, print_blob=False)
@given(where=st.floats(0.0, 1.0))
def test_ctrl_c_anywhere_in_physical_pruning_leaves_the_model_bit_identical(small_cnn, where):
    model, x, structure, calls = small_cnn
    net = copy.deepcopy(model)
    before = _state(net)
    try:
        _Interrupt(1 + int(where * (calls - 1))).run(lambda: prune_units(net, structure, x, {"0.out": [1, 2]}))
    except (KeyboardInterrupt, WtError):
        pass
    else:  # past its last call (caches make later runs shorter): pruned, whole
        assert net[0].weight.shape == (6, 3, 3, 3) and net[3].weight.shape == (6, 6, 3, 3)
        return
    after = _state(net)
    assert after.keys() == before.keys()
    for k, (ident, value) in before.items():
        assert after[k][0] == ident and torch.equal(after[k][1], value), k


@pytest.mark.parametrize("kw", [{"amount": 0.5}, {"amount": 0.3, "scope": "global", "normalize": "mean"}])
def test_structured_masks_keep_nan_units_and_rank_the_rest_as_without_them(resnet, kw):
    """A NaN unit ranks nowhere: kept, never removed as if small, even where a whole group reads NaN (a NaN
    filter of layer1.0.conv1 reaches every unit of the stem's group through its input channels)."""
    model, _, structure = resnet
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    params["layer1.0.conv1.weight"][3] = float("nan")
    nan_units = torch.isnan(wtcore.compile(structure, ["unit_l2"])(params)["unit_l2"])
    keep = wtcore.compile(structure, [wtcore.Spec("ln_structured", **kw)])(params)["ln_structured"]
    assert nan_units.any() and keep[nan_units].all()


def test_groups_whose_tied_axis_does_not_map_one_to_one_are_not_prunable_with_the_reason():
    from wtcore.ir import Param, Slice, Structure, UnitGroup, runs_from_list

    emb = Param("emb.weight", (8, 4), aliases=("head.weight",))
    a = UnitGroup("a.out", "feature", 4, (Slice("emb.weight", 1, runs_from_list([0, 1, 2, 3])),))
    b = UnitGroup("b.out", "feature", 2, (Slice("emb.weight", 1, runs_from_list([0, 0, 1, 1])),))
    c = UnitGroup("c.out", "feature", 4, (Slice("emb.weight", 0, runs_from_list([0, 1, 2, 3, -1, -1, -1, -1])),))
    d = UnitGroup("d.out", "feature", 4, (Slice("emb.weight", 0, runs_from_list([-1, -1, -1, -1, 3, 2, 1, 0])),))
    out = merge_tied_groups(Structure((emb,), (a, b, c, d)))
    ga, gb, gc, gd = out.groups
    assert not ga.prunable and not gb.prunable and "b.out" in ga.reason and "a.out" in gb.reason
    assert gc.prunable and gd.prunable  # disjoint entries of one axis (a concatenation): apart, untouched
