"""Group lasso and tracking on an FSDP2-sharded model: every rank holds a shard of each weight.

    torchrun --nproc-per-node 2 examples/fsdp2_group_lasso.py      # CPU (gloo) or one GPU per rank (nccl)
    python examples/fsdp2_group_lasso.py                           # starts 2 CPU ranks itself

The structure is traced once on the unsharded model (tracing runs the model's forward on an example input);
after `fully_shard`, `dict(model.named_parameters())` holds DTensors and the same compiled programs run on
them: each rank reduces its own rows, and only per-unit vectors cross ranks. The regularizer is a plain
scalar tensor, equal on every rank, whose gradient lands in the sharded parameters' gradients.
"""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torchvision
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import wtcore
from wtfront import WeightTracker, trace


def train(steps: int = 3, reg: float = 1e-4) -> dict[str, float]:
    """A few training steps of a ResNet-18 on random 32x32 images with group lasso; the tracked metrics."""
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    torch.manual_seed(0)  # the same initial model on every rank
    model = torchvision.models.resnet18(num_classes=10).to(device)
    structure = trace(model, torch.randn(1, 3, 32, 32, device=device))  # before sharding
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for m in model.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            fully_shard(m, mesh=mesh)
    fully_shard(model, mesh=mesh)

    lasso = wtcore.compile(structure, ["group_lasso"])
    tracker = WeightTracker(model, None, structure=structure)  # reads the (sharded) parameters at each call
    tracker.create_tracker(["active_macs", "unstructured_sparsity", "group_lasso"])
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    torch.manual_seed(1 + dist.get_rank())  # each rank its own batch
    for _ in range(steps):
        x, y = torch.randn(8, 3, 32, 32, device=device), torch.randint(0, 10, (8,), device=device)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss = loss + reg * lasso(dict(model.named_parameters()))["group_lasso"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    metrics = tracker.track()  # the same numbers on every rank
    if dist.get_rank() == 0:
        print({k: round(v, 4) for k, v in metrics.items() if "/" not in k or k.endswith(("total", "ratio"))})
    return metrics


def _rank(rank: int, world: int, port: int) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        train()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    if "RANK" in os.environ:  # under torchrun
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        try:
            train()
        finally:
            dist.destroy_process_group()
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            free = s.getsockname()[1]
        torch.multiprocessing.spawn(_rank, args=(2, free), nprocs=2)
