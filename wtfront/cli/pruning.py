"""`wt prune`'s pruning options: what the library's solver and mask specs offer, with `wtcore.policy`'s defaults.

A cost target (`--target-macs`, `--target-params` or `--target-bops`) is solved exactly by `wtcore.solver`;
per-kind ratios (`--head-ratio`, `--kv-head-ratio`, `--head-dim-ratio`, `--mlp-ratio`) remove that fraction of
every group of the kind (ranked within the group) before the target is solved over the other groups. Either
or both may be given.
"""

from __future__ import annotations

import argparse
import glob
import sys
from typing import Any

from .argtypes import finite_float, int_at_least

__all__ = ["IMPORTANCES", "KIND_RATIOS", "add_prune_options", "choose_keep", "save_pretrained_to", "target_of"]

#: `--importance` choices → the per-unit score spec (or "random") the solver ranks by
IMPORTANCES = {
    "l2": "unit_l2",
    "l1": "unit_l1",
    "bn_scale": "bn_scale_importance",
    "mac_aware": "mac_aware_importance",
    "random": "random",
}
#: `--X-ratio` options → the unit kind whose groups they prune
KIND_RATIOS = {
    "head_ratio": "head",
    "kv_head_ratio": "kv_head",
    "head_dim_ratio": "head_dim",
    "mlp_ratio": "mlp_feature",
}


def add_prune_options(r: argparse.ArgumentParser) -> None:
    """The targets, ranking and policy options of `wt prune`."""
    t = r.add_argument_group("targets (a cost target, per-kind ratios, or both)")
    t.add_argument(
        "--target-macs",
        type=finite_float,
        metavar="FRACTION",
        help="keep at most this fraction of the MACs, e.g. 0.5 (1 MAC = one multiply-add)",
    )
    t.add_argument(
        "--target-params", type=finite_float, metavar="FRACTION", help="keep at most this fraction of parameters"
    )
    t.add_argument(
        "--target-bops",
        type=finite_float,
        metavar="FRACTION",
        help="keep at most this fraction of the bit operations (MACs x weight bits x activation bits)",
    )
    t.add_argument(
        "--weight-bits", type=int_at_least(1), default=32, metavar="N", help="weight bits for --target-bops (32)"
    )
    t.add_argument(
        "--act-bits", type=int_at_least(1), default=32, metavar="N", help="activation bits for --target-bops (32)"
    )
    for opt, kind in KIND_RATIOS.items():
        t.add_argument(
            f"--{opt.replace('_', '-')}",
            type=finite_float,
            metavar="F",
            help=f"remove this fraction of every {kind} group's units (ranked within the group)",
        )
    p = r.add_argument_group("ranking and policy (defaults: wtcore.policy)")
    p.add_argument(
        "--importance",
        choices=tuple(IMPORTANCES),
        default=None,
        help="unit score: L2 / L1 norm of its coupled weights, |BatchNorm gamma| (network slimming), "
        "L2 made MAC-aware, or random (default l2)",
    )
    p.add_argument("--method", choices=("l2", "random"), default=None, help=argparse.SUPPRESS)  # old name
    p.add_argument(
        "--scope",
        choices=("global", "local", "isomorphic"),
        default="global",
        help="rank units across all groups, per group (every group loses the same fraction), or per "
        "class of identical groups (default global)",
    )
    p.add_argument(
        "--normalize",
        choices=("mean", "none"),
        default="mean",
        help="divide scores by their group's mean before a global ranking, so layers of different "
        "scale and heads vs MLP features compare (default mean)",
    )
    p.add_argument(
        "--max-fraction",
        type=finite_float,
        default=None,
        metavar="F",
        help="remove at most this fraction of any group's units (default 0.9 for global/isomorphic)",
    )
    p.add_argument(
        "--round-to", type=int_at_least(1), default=None, metavar="N", help="keep unit counts multiples of N"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of --importance random (default 0)")
    r.add_argument(
        "--save-pretrained",
        metavar="DIR",
        help="hf: models: also write a save_pretrained folder (config updated with the pruned shapes) "
        "that from_pretrained reloads; an error says why when the config cannot express them "
        "(uneven widths across layers: use the per-kind ratios or --scope local)",
    )


def target_of(args: argparse.Namespace) -> tuple[str, float] | None:
    """`(metric, fraction)` of the one cost target given, or None."""
    from wtcore.errors import WtError

    given = [
        (m, getattr(args, f"target_{m}"))
        for m in ("macs", "params", "bops")
        if getattr(args, f"target_{m}") is not None
    ]
    if len(given) > 1:
        raise WtError("give one of --target-macs, --target-params, --target-bops")
    for m, v in given:
        if not 0.0 < v <= 1.0:
            raise WtError(
                f"--target-{m} is a fraction of the model's {m.upper() if m != 'params' else m} in (0, 1], got {v}"
            )
    return given[0] if given else None


def _ratios(args: argparse.Namespace) -> dict[str, float]:
    from wtcore.errors import WtError

    out = {}
    for opt, kind in KIND_RATIOS.items():
        v = getattr(args, opt)
        if v is None:
            continue
        if not 0.0 <= v < 1.0:
            raise WtError(f"--{opt.replace('_', '-')} is the fraction of units to remove, in [0, 1), got {v}")
        out[kind] = v
    return out


def choose_keep(args: argparse.Namespace, structure: Any, params: dict[str, Any], eligible: list[str]) -> Any:
    """The `[num_units]` keep-mask that `wt prune`'s options ask for, over the `eligible` groups."""
    import torch

    import wtcore
    from wtcore.errors import WtError
    from wtcore.masking import param_masks
    from wtcore.policy import MIN_WIDTH_FRACTION, narrow_groups
    from wtcore.solver import solve

    target = target_of(args)
    ratios = _ratios(args)
    if target is None and not ratios:
        raise WtError(
            "give a target: --target-macs (or --target-params / --target-bops) and/or per-kind ratios "
            "(--head-ratio, --kv-head-ratio, --head-dim-ratio, --mlp-ratio)"
        )
    name = args.importance or args.method or "l2"
    importance = IMPORTANCES[name]
    normalize = None if args.normalize == "none" else args.normalize
    keep = torch.ones(structure.num_units, dtype=torch.bool)
    rest = list(eligible)
    for kind, ratio in ratios.items():
        names = [n for n in eligible if structure.group_map[n].kind == kind]
        if not names:
            raise WtError(
                f"--{next(k for k, v in KIND_RATIOS.items() if v == kind).replace('_', '-')}: the model has "
                f"no prunable {kind!r} group (trace units: --units)"
            )
        rest = [n for n in rest if n not in names]
        if ratio == 0:
            continue
        if name == "random":
            spec = wtcore.Spec(
                "random_structured",
                amount=ratio,
                seed=args.seed,
                scope="local",
                groups=tuple(glob.escape(n) for n in names),
                round_to=args.round_to or 1,
                lossy=args.allow_lossy,
            )
        else:
            with torch.no_grad():
                scores = wtcore.compile(structure, [importance])(params)[importance].to(torch.float64)
            spec = wtcore.Spec(
                "importance",
                scores=scores,
                amount=ratio,
                scope="local",
                groups=tuple(glob.escape(n) for n in names),
                round_to=args.round_to or 1,
                lossy=args.allow_lossy,
            )
        with torch.no_grad():
            keep &= wtcore.compile(structure, [spec])(params)[spec.key].to(torch.bool)
    if target is None:
        return keep
    if not rest:
        raise WtError("the per-kind ratios cover every group that may lose units; drop the cost target or a ratio")
    masks = param_masks(structure, keep)
    zeroed = {k: (v * masks[k].to(v.device) if k in masks else v) for k, v in params.items()}
    metric, fraction = target
    sol = solve(
        structure,
        zeroed,
        target=fraction,
        metric=metric,
        importance=importance,
        scope=args.scope,
        normalize=normalize,
        max_fraction=args.max_fraction,
        round_to=args.round_to,
        seed=args.seed,
        groups=[glob.escape(n) for n in rest],
        weight_bits=args.weight_bits,
        act_bits=args.act_bits,
        warn=False,
        lossy=args.allow_lossy,
    )
    keep &= sol.keep
    for group, kept, width in narrow_groups(structure, keep.numpy()):
        print(
            f"wt: warning: {group} keeps {kept} of {width} units (< {MIN_WIDTH_FRACTION:.0%}); see --max-fraction",
            file=sys.stderr,
        )
    return keep


def save_pretrained_to(model: Any, directory: str, pruned_path: Any) -> None:
    """`wtfront.integrations.transformers.save_pretrained`, for `--save-pretrained`: a one-line error (the
    pruned checkpoint is written already) when the model is not a transformers model or its config cannot
    express the pruned shapes."""
    from wtcore.errors import WtError

    from ..integrations.transformers import save_pretrained

    if not callable(getattr(model, "save_pretrained", None)) or getattr(model, "config", None) is None:
        raise WtError(
            f"--save-pretrained needs a transformers model (hf:...), not a {type(model).__name__}; "
            f"the pruned checkpoint is in {pruned_path}"
        )
    try:
        save_pretrained(model, directory)
    except WtError as e:
        raise WtError(f"--save-pretrained: {e} (the pruned checkpoint is in {pruned_path})") from e
