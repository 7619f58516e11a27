"""Never a crash: the native counting kernel reads only plain dense CPU tensors that own their storage.

Each kind of tensor a program may be handed — a DTensor (one-rank mesh), a FakeTensor, functorch's
`vmap`/`grad` wrappers, a `__torch_dispatch__` subclass, `meta`, a strided view with an offset — is counted
with the same numbers as the plain tensor (or, for shape-only kinds, the same shapes)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torchvision
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.utils._pytree import tree_map

import wtcore
from wtcore import native
from wtfront import trace

TOL, M, KEEP = 0.0, 4, 2


class Wrapped(torch.Tensor):
    """A `__torch_dispatch__` wrapper subclass whose own data pointer is not the data (like DTensor)."""

    @staticmethod
    def __new__(cls, inner: torch.Tensor) -> Wrapped:
        r = torch.Tensor._make_wrapper_subclass(cls, inner.shape, dtype=inner.dtype, device=inner.device)
        r.inner = inner
        return r

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        unwrap = lambda t: t.inner if isinstance(t, Wrapped) else t  # noqa: E731
        out = func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs or {}))
        return tree_map(lambda t: Wrapped(t) if isinstance(t, torch.Tensor) else t, out)


def _weights() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(8, 12, 3, 3, generator=g), torch.randn(16, 8, generator=g), torch.randn(6, 4, 1, 1, generator=g)]
    for w in ws:
        w[w.abs() < 0.7] = 0
    return ws


def _plain(t: torch.Tensor) -> torch.Tensor:
    return t.inner if isinstance(t, Wrapped) else t.full_tensor() if isinstance(t, DTensor) else t


def _assert_same(got: tuple[torch.Tensor, torch.Tensor], want: tuple[torch.Tensor, torch.Tensor]) -> None:
    for g, w in zip(got, want):
        assert torch.equal(_plain(g), w)


def test_plain_cpu_accepts_only_dense_owned_cpu_tensors():
    w = torch.randn(4, 6)
    assert native.plain_cpu(w) and native.plain_cpu(torch.nn.Parameter(w)) and native.plain_cpu(w[1:, ::2])
    assert not native.plain_cpu(torch.empty(4, 6, device="meta"))
    assert not native.plain_cpu(Wrapped(w))
    assert not native.plain_cpu(w.to_sparse())
    torch.func.vmap(lambda x: (native.plain_cpu(x) and pytest.fail("vmap wrapper taken as plain"), x)[1])(w)
    torch.func.grad(lambda x: (native.plain_cpu(x) and pytest.fail("grad wrapper taken as plain"), x.sum())[1])(w)


def test_each_tensor_kind_counts_like_a_plain_tensor():
    ws = _weights()
    want = native.nonzero_stats_torch(ws, TOL, M, KEEP)
    _assert_same(native.nonzero_stats(ws, TOL, M, KEEP), want)
    # views at an offset into a larger storage
    _assert_same(native.nonzero_stats([torch.cat([w, w])[w.shape[0]:] for w in ws], TOL, M, KEEP), want)
    _assert_same(native.nonzero_stats([Wrapped(w) for w in ws], TOL, M, KEEP), want)
    # vmap over a leading batch of 2 (each a copy): counts per copy
    batched = torch.func.vmap(lambda *xs: native.nonzero_stats(xs, TOL, M, KEEP))(*[torch.stack([w, w]) for w in ws])
    for b, w in zip(batched, want):
        assert torch.equal(b[0], w) and torch.equal(b[1], w)
    # grad: counts are constants of the function, the gradient flows through the rest
    seen = []
    torch.func.grad(lambda x: (seen.append(native.nonzero_stats([x, *ws[1:]], TOL, M, KEEP)), x.sum())[1])(ws[0])
    _assert_same(tuple(t.detach() for t in seen[0]), want)
    meta = native.nonzero_stats([w.to("meta") for w in ws], TOL, M, KEEP)
    assert [t.shape for t in meta] == [t.shape for t in want] and all(t.is_meta for t in meta)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake = native.nonzero_stats([mode.from_tensor(w) for w in ws], TOL, M, KEEP)
    assert [t.shape for t in fake] == [t.shape for t in want]


@pytest.fixture
def one_rank_mesh(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def test_dtensor_counts_and_programs_like_plain(one_rank_mesh):
    ws = _weights()
    want = native.nonzero_stats_torch(ws, TOL, M, KEEP)
    for placement in (Shard(0), Replicate()):
        _assert_same(native.nonzero_stats([distribute_tensor(w, one_rank_mesh, [placement]) for w in ws], TOL, M,
                                          KEEP), want)
    from toys import Net, X

    torch.manual_seed(0)
    model = Net()
    structure = trace(model, X)
    program = wtcore.compile(structure, ["group_lasso", "unit_l2", "unstructured_sparsity", "group_active_units",
                                         "active_macs"])
    params = {n: p.detach() for n, p in model.named_parameters()}
    ref = program(params)
    got = program({n: distribute_tensor(p, one_rank_mesh, [Shard(0)]) for n, p in params.items()})
    for k, v in ref.items():
        assert type(got[k]) is torch.Tensor, k
        torch.testing.assert_close(got[k], v, msg=k)


def test_program_on_meta_parameters_gives_shapes():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    structure = trace(model, torch.randn(1, 3, 32, 32))
    program = wtcore.compile(structure, ["unit_l2", "unstructured_sparsity", "group_active_units"])
    ref = program(dict(model.named_parameters()))
    got = program({n: p.detach().to("meta") for n, p in model.named_parameters()})
    assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in ref.items()}


@pytest.mark.slow
def test_compiled_program_on_dtensors_equals_eager_plain(one_rank_mesh):
    from toys import Net, X

    torch.manual_seed(0)
    model = Net()
    structure = trace(model, X)
    specs = ["group_lasso", "unit_l2", "group_active_units", "active_macs", "unstructured_sparsity"]
    params = {n: p.detach() for n, p in model.named_parameters()}
    ref = wtcore.compile(structure, specs)(params)
    got = wtcore.compile(structure, specs, backend="inductor")(
        {n: distribute_tensor(p, one_rank_mesh, [Shard(0)]) for n, p in params.items()})
    for k, v in ref.items():
        torch.testing.assert_close(got[k], v, msg=k)
