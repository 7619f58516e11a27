"""The `wt` command line. `wt inspect MODEL` prints the structure and the group-lasso value of a model."""

from __future__ import annotations

import argparse
import sys
import time

from wtcore.errors import WtError

__all__ = ["main"]


def _inspect(args: argparse.Namespace) -> int:
    import wtcore

    from .models import load_model, parse_input_shape
    from .trace import trace

    shape = parse_input_shape(args.input) if args.input else None
    ref = load_model(args.model, shape)
    t0 = time.perf_counter()
    structure = trace(ref.model, ref.example_inputs, ignore=tuple(args.ignore or ()))
    t_trace = time.perf_counter() - t0
    if args.json:
        with open(args.json, "w") as f:
            f.write(structure.to_json(indent=1))
    print(structure)
    specs = list(args.program or ["group_lasso", "group_active_units"])
    t0 = time.perf_counter()
    program = wtcore.compile(structure, specs)
    t_compile = time.perf_counter() - t0
    out = program(dict(ref.model.named_parameters()))
    print()
    for key, value in out.items():
        if value.numel() == 1:
            print(f"{key} = {value.item():.6g}")
        elif key == "group_active_units":
            active, total = int(value.sum()), structure.num_units
            print(f"{key}: {active}/{total} units active in {len(structure.groups)} groups")
        else:
            print(f"{key}: tensor of shape {tuple(value.shape)}")
    if args.program:
        print()
        print(program)
        print(program.code)
    print(f"\ntrace {t_trace:.2f}s, compile {t_compile:.2f}s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="wt", description="Compile structured-sparsity programs for PyTorch models (canonical units, group lasso)."
    )
    sub = p.add_subparsers(dest="command", required=True)
    i = sub.add_parser(
        "inspect",
        help="trace a model and print its unit groups and group-lasso value",
        description="Trace MODEL (torchvision:NAME, timm:NAME or module.path:callable; random weights) "
        "and print its unit groups, then evaluate a compiled program on its parameters.",
    )
    i.add_argument("model", help="torchvision:resnet50, timm:vit_tiny_patch16_224, or module.path:callable")
    i.add_argument("--input", help="example input shape, e.g. 1,3,224,224 (default: the model's own)")
    i.add_argument("--ignore", nargs="*", help="module names or globs to leave out of the trace")
    i.add_argument("--json", metavar="PATH", help="also write the structure as JSON")
    i.add_argument("--program", nargs="+", metavar="SPEC", help="specs to compile; prints the program and its code")
    i.set_defaults(func=_inspect)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except WtError as e:
        print(f"wt: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
