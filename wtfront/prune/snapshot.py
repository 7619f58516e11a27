"""The transaction of physical pruning and checkpoint loading: a model restorable bit-identical."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

__all__ = ["Snapshot"]


class Snapshot:
    """Everything physical pruning may change, restorable so that the model is bit-identical afterwards: the
    module tree's attribute dicts (attributes, hooks), the very Parameter/buffer/submodule objects, and a CPU
    copy of every tensor's data, all written back on restore (in place, or as new data where the tensor was
    given other data with `p.data = x`): writes through `.data` move no version counter, so none is trusted."""

    def __init__(self, model: nn.Module) -> None:
        self.modules = []
        self.tensors: dict[int, tuple[torch.Tensor, tuple[Any, ...], torch.Tensor]] = {}
        for m in model.modules():
            attrs = {k: v for k, v in m.__dict__.items() if k not in ("_parameters", "_buffers", "_modules")}
            self.modules.append((m, attrs, dict(m._parameters), dict(m._buffers), dict(m._modules)))
            for t in (*m._parameters.values(), *m._buffers.values()):
                if t is not None and id(t) not in self.tensors:
                    self.tensors[id(t)] = (t, _layout(t), t.detach().to("cpu", copy=True))

    def restore(self) -> None:
        """Put everything back; a Ctrl-C meanwhile is re-raised once the model is whole again (restoring is
        idempotent, so it starts over), never leaving it half restored."""
        interrupted: KeyboardInterrupt | None = None
        while True:
            try:
                self._restore()
                break
            except KeyboardInterrupt as e:
                interrupted = e
        if interrupted is not None:
            raise interrupted

    @torch.no_grad()
    def _restore(self) -> None:
        for m, attrs, params, buffers, modules in self.modules:
            for k in [k for k in m.__dict__ if k not in attrs and k not in ("_parameters", "_buffers", "_modules")]:
                del m.__dict__[k]
            m.__dict__.update(attrs)
            for d, saved in ((m._parameters, params), (m._buffers, buffers), (m._modules, modules)):
                d.clear()
                d.update(saved)
        for t, layout, data in self.tensors.values():
            device = layout[-1]
            if _layout(t) == layout:  # every value written back: writes through `.data` move no version
                t.data.copy_(data.to(device))
            else:  # given other data (`p.data = x`): its own values, layout and device back
                t.data = torch.empty_strided(layout[1], layout[2], dtype=layout[3], device=device).copy_(data)


def _layout(t: torch.Tensor) -> tuple[Any, ...]:
    """What changes when a tensor is given other data (`p.data = x`, which moves no version)."""
    return (t.data_ptr(), t.shape, t.stride(), t.dtype, t.device)

