"""Bad inputs, injected faults and concurrent callers: each gives a clear `WtError` naming the place, or a
correct result; never a crash, a silent wrong number, a lost file or a half-changed model.

References are independent of what is tested: sequential calls for concurrent ones, fp64 loops over slices
(`wtcore.testing.reference_unit_values`) for norms, the bytes on disk before a failed save."""

from __future__ import annotations

import threading

import pytest
import torch

import wtcore
from wtfront import WeightTracker
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
        except BaseException as e:  # noqa: BLE001  (reported by the main thread)
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    wrong = [(i, r) for (i, r), v in got.items() if not torch.equal(v, want[i])]
    assert not wrong, f"{len(wrong)} of 80 concurrent results differ from sequential calls"
