"""Checks of parameter values that programs cannot make themselves (a program never syncs with the host)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .errors import ParamsError

__all__ = ["nonfinite_params", "require_finite"]


def nonfinite_params(params: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """Number of NaN/inf entries of every floating-point tensor that has some, by name (one host sync)."""
    names = [n for n, t in params.items() if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel()]
    if not names:
        return {}
    counts = torch.stack([(~torch.isfinite(params[n].detach())).sum().cpu() for n in names]).tolist()
    return {n: int(c) for n, c in zip(names, counts) if c}


def require_finite(params: Mapping[str, torch.Tensor], what: str) -> None:
    """Raise `ParamsError` naming the parameters that hold NaN/inf: `what` would silently read them as some
    number (a NaN unit is neither zero nor ranked), so it refuses them."""
    bad = nonfinite_params(params)
    if bad:
        listed = ", ".join(f"{n!r} ({c} entries)" for n, c in list(bad.items())[:5])
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise ParamsError(f"{what}: parameter {listed}{more} holds NaN/inf values; fix the weights (e.g. restore "
                          "an earlier checkpoint or lower the learning rate) before deciding what to prune")
