"""Programs on FSDP2-sharded parameters: two gloo ranks against the unsharded model.

Every output of the tracked specs, `WeightTracker.track()` and the group-lasso gradients must equal the
unsharded run on every rank, and the collectives a program call makes must be unit-sized: no rank gathers a
whole parameter (`wtcore.sharded.CollectiveLog`)."""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torchvision
import transformers
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

import wtcore
from wtcore.sharded import CollectiveLog
from wtfront import WeightTracker, apply_masks, effective_params, trace

SPECS = ["group_lasso", "unit_l2", "group_active_units", "active_macs", "unstructured_sparsity"]
LLAMA = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=8,
             num_key_value_heads=2, max_position_embeddings=32)


def _model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == "resnet18":
        model = torchvision.models.resnet18(num_classes=10)
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA))
    with torch.no_grad():  # some exact zeros, so counts and activity are not trivially full
        for p in model.parameters():
            if p.dim() >= 2:
                p[: max(1, p.shape[0] // 5)] = 0
                p[:, :1] = 0
    return model


def _example(name: str) -> torch.Tensor:
    return torch.randn(1, 3, 32, 32) if name == "resnet18" else torch.randint(0, 64, (1, 8))


def _run(model: torch.nn.Module, structure: wtcore.Structure, log: CollectiveLog | None = None) -> dict:
    params = dict(model.named_parameters())
    program = wtcore.compile(structure, SPECS)
    model.zero_grad()
    with log if log is not None else contextlib.nullcontext():
        out = program(params)
        out["group_lasso"].backward()
    for n, p in params.items():  # FSDP2 adds its gradient to these shard by shard: same placements
        assert not isinstance(p, DTensor) or p.grad.placements == p.placements, n
    grads = {n: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).clone()
             for n, p in params.items() if p.grad is not None}
    tracker = WeightTracker(model, None, structure=structure)
    tracker.create_tracker(["group_lasso", "active_macs", "unstructured_sparsity", "group_active_units", "nm_sparsity"])
    tracked = tracker.track()
    mask = wtcore.compile(structure, wtcore.Spec("ln_structured", amount=0.3, scope="global"))
    keep = mask(effective_params(model, structure))["ln_structured"]
    apply_masks(model, structure, keep)  # fake pruning: zeroes each rank's own part of the parameters
    masked = {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
              for n, p in model.named_parameters()}
    return {"out": {k: v.detach() for k, v in out.items()}, "grads": grads, "track": tracked, "keep": keep,
            "masked": masked}


def _worker(rank: int, world: int, port: int, folder: str, names: list[str]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        result = {}
        for name in names:
            model = _model(name)
            structure = trace(model, _example(name))
            want = _run(copy.deepcopy(model), structure)  # (it fake-prunes the model it is given)
            for m in model.modules():
                if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear, torch.nn.Embedding)):
                    fully_shard(m, mesh=mesh)
            fully_shard(model, mesh=mesh)
            log = CollectiveLog()
            got = _run(model, structure, log)
            sizes = {n: p.numel() for n, p in model.named_parameters() if p.dim() >= 2}
            rows_cols = sum(p.shape[0] + p.shape[1] for p in model.parameters() if p.dim() >= 2)
            result[name] = {"want": want, "got": got, "calls": log.calls, "sizes": sizes, "rows_cols": rows_cols,
                            "units": structure.num_units}
        torch.save(result, Path(folder) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    folder = tmp_path_factory.mktemp("fsdp2")
    mp.spawn(_worker, args=(2, _free_port(), str(folder), ["resnet18", "llama"]), nprocs=2, join=True)
    return [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet18", "llama"])
def test_fsdp2_programs_and_fake_pruning_equal_unsharded_on_every_rank(two_ranks, name):
    for rank in two_ranks:
        r = rank[name]
        want, got = r["want"], r["got"]
        assert got["out"].keys() == want["out"].keys()
        for k, v in want["out"].items():
            torch.testing.assert_close(got["out"][k], v, rtol=1e-5, atol=1e-6, msg=f"{name}: {k}")
        assert got["grads"].keys() == want["grads"].keys() and want["grads"]
        for k, v in want["grads"].items():
            torch.testing.assert_close(got["grads"][k], v, rtol=1e-5, atol=1e-7, msg=f"{name}: grad of {k}")
        assert torch.equal(got["keep"], want["keep"])
        for k, v in want["masked"].items():
            assert torch.equal(got["masked"][k], v), f"{name}: fake-pruned {k}"
        assert got["track"].keys() == want["track"].keys()
        for k, v in want["track"].items():
            assert got["track"][k] == pytest.approx(v, rel=1e-6, abs=1e-9), f"{name}: track {k}"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet18", "llama"])
def test_fsdp2_program_communicates_unit_sized_vectors_only(two_ranks, name):
    for rank in two_ranks:
        r = rank[name]
        assert r["calls"], "a sharded program reduces across ranks"
        biggest = max(n for _, n, _ in r["calls"])
        # the largest collective is a vector with a few entries per row and column of the weights (per-row
        # counts, per-input activity, per-(slice, unit) values before the scatter into units), never a weight's
        assert biggest <= 5 * r["rows_cols"], (name, r["calls"])
        assert not {n for _, n, _ in r["calls"]} & set(r["sizes"].values()), "a whole weight was gathered"
        if name == "resnet18":  # weights much larger than their unit vectors (the tiny Llama's are not)
            assert biggest < max(r["sizes"].values()) / 50, (name, r["calls"])
            assert sum(n for _, n, _ in r["calls"]) < sum(r["sizes"].values()) / 100, (name, r["calls"])


def _example_rank(rank: int, world: int, port: int) -> None:
    spec = importlib.util.spec_from_file_location("fsdp2_group_lasso", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    torch.set_num_threads(1)
    example._rank(rank, world, port)


EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "fsdp2_group_lasso.py"


@pytest.mark.slow
def test_fsdp2_example_trains_with_group_lasso():
    """examples/fsdp2_group_lasso.py: model loss + group lasso on FSDP2 parameters, backward, steps, track()."""
    mp.spawn(_example_rank, args=(2, _free_port()), nprocs=2, join=True)
