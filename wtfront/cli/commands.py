"""The `wt` command line: inspect a model, analyze checkpoints, prune to a MAC target, benchmark programs.

Every subcommand takes a model reference (`wtfront.cli.models`) and the same model options (`--input`,
`--config`, `--heads`, `--units`, `--ignore`). Errors are one line on stderr (`wt: error: ...`): exit code 2 for
a `WtError` or an OS error (a bad reference, a missing or unfitting file), 3 for anything unforeseen
(`WT_TRACEBACK=1` re-raises it with its traceback).
"""

from __future__ import annotations

import argparse
import ast
import fnmatch
import inspect
import os
import sys
import time
from pathlib import Path
from typing import Any

from .argtypes import int_at_least, nonnegative_float
from .pruning import add_prune_options, choose_keep, save_pretrained_to, target_of

__all__ = ["build_parser", "main", "parse_spec"]

_MODEL_HELP = ("torchvision:NAME (e.g. torchvision:resnet50), timm:NAME (timm:vit_tiny_patch16_224), hf:ARCH "
               "(hf:LlamaForCausalLM, built from a small config), hf:/local/dir (a save_pretrained folder) or "
               "module.path:callable (your own model); random weights except hf:/dir with weights")

_EPILOG = """\
model references:
  torchvision:NAME         torchvision.models.get_model(NAME, weights=None)
  timm:NAME                timm.create_model(NAME, pretrained=False)
  hf:ARCH                  a transformers class from a small config (2 layers, hidden 64)
  hf:/local/dir            a save_pretrained folder: config.json, and the weights when present
  module.path:callable     your own model: callable() returns an nn.Module (the current directory is importable)
  --config key=value ...   hf: config overrides; constructor keyword arguments for the others

examples:
  wt inspect torchvision:resnet18 --input 1,3,64,64
  wt inspect hf:LlamaForCausalLM --input 32 --config num_hidden_layers=4
  wt analyze torchvision:resnet18 runs/ckpts --out report/
  wt prune torchvision:resnet18 --target-macs 0.5 --out pruned/
  wt bench timm:vit_tiny_patch16_224 --reps 10

1 MAC = one multiply-add. Docs: docs/cli.md"""


# ------------------------------------------------------------------------------------------------- helpers
def parse_spec(text: str) -> Any:
    """`"group_lasso"` or `"active_macs:tolerance=1e-3,ops=None"` → a `wtcore.Spec` (values are Python literals)."""
    import wtcore
    from wtcore.errors import WtError

    name, sep, rest = text.partition(":")
    options: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in rest.split(","))) if sep else ():
        key, eq, value = item.partition("=")
        if not eq:
            raise WtError(f"spec {text!r}: options are key=value pairs, e.g. active_macs:tolerance=1e-3")
        try:
            options[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            options[key.strip()] = value.strip()
    spec = wtcore.Spec(name.strip(), **options)
    spec.resolved()  # unknown names and options fail here, with the list of known ones
    return spec


def _trace_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """`--ignore`, `--units` and `--heads` for `wtfront.trace`. `--units`/`--heads` go to the trace options of
    the same names (unit kinds of transformers; head-count overrides by module) when `trace()` has them; without
    them `--heads` notes that attention is traced at channel level and `--units` is an error."""
    from wtcore.errors import WtError

    from ..tracing.entry import trace

    accepted = inspect.signature(trace).parameters
    kwargs: dict[str, Any] = {}
    if args.ignore:
        kwargs["ignore"] = tuple(args.ignore)
    units = getattr(args, "units", None)
    if units:
        if "units" not in accepted:
            raise WtError("--units needs a wtfront.trace with unit kinds of transformers (heads); this one has none")
        kwargs["units"] = tuple(units)
    heads = getattr(args, "heads", None)
    if heads is not None:
        overrides = dict(_heads_override(h) for h in heads)
        if "heads" in accepted:
            if overrides:
                kwargs["heads"] = overrides
        else:
            print("wt: note: this version of wtfront.trace has no heads option; attention is traced at channel "
                  "level", file=sys.stderr)
    return kwargs


def _heads_override(item: str) -> tuple[str, int | tuple[int, int]]:
    """`blocks.0.attn=6` → 6 query heads; `model.layers.0.self_attn=8:2` → 8 query heads on 2 KV heads."""
    from wtcore.errors import WtError

    name, eq, value = item.partition("=")
    counts = value.split(":")
    if not eq or not name.strip() or not 1 <= len(counts) <= 2 or not all(c.strip().isdigit() for c in counts):
        raise WtError(f"--heads takes MODULE=NUM_HEADS or MODULE=NUM_HEADS:NUM_KV_HEADS overrides (e.g. "
                      f"blocks.0.attn=6), got {item!r}")
    n = [int(c) for c in counts]
    return name.strip(), n[0] if len(n) == 1 else (n[0], n[1])


def _load(args: argparse.Namespace) -> Any:
    from .models import load_model, parse_config_overrides, parse_input_shape

    shape = parse_input_shape(args.input) if args.input else None
    return load_model(args.model, shape, parse_config_overrides(args.config or ()))


def _trace(args: argparse.Namespace, ref: Any) -> Any:
    from ..tracing.entry import trace
    from .report import phases

    with phases(f"tracing {args.model} (Torch-Pruning's dependency graph, then the unit groups)"):
        return trace(ref.model, ref.example_inputs, **_trace_kwargs(args))


def _console() -> Any:
    from .report import console

    return console()


def _text(con: Any, text: str) -> None:
    con.print(text, markup=False, highlight=False, soft_wrap=True)


# ------------------------------------------------------------------------------------------------ commands
def _inspect(args: argparse.Namespace) -> int:
    import torch

    import wtcore

    from ..files import atomic_write
    from ..modules import effective_params
    from . import report

    specs = [parse_spec(s) for s in args.program] if args.program else ["group_lasso", "group_active_units"]
    ref = _load(args)
    t0 = time.perf_counter()
    structure = _trace(args, ref)
    t_trace = time.perf_counter() - t0
    if args.json:
        with atomic_write(args.json, "w") as f:
            f.write(structure.to_json(indent=1))
    con = _console()
    _text(con, report.summary_line(structure))
    _text(con, wtcore.ir.coverage(structure).line())
    con.print(report.groups_table(structure, args.rows))
    for table in (report.heads_table(structure), report.ops_table(structure, args.rows)):
        if table is not None:
            con.print(table)
    con.print(report.params_table(structure, args.rows))
    t0 = time.perf_counter()
    program = wtcore.compile(structure, specs)
    t_compile = time.perf_counter() - t0
    with torch.no_grad():
        out = program(effective_params(ref.model, structure))
    con.print(report.values_table(structure, out))
    if args.program:
        _text(con, str(program))
        _text(con, program.code)
    _text(con, f"trace {t_trace:.2f}s, compile {t_compile:.2f}s" + (f"; structure written to {args.json}"
                                                                     if args.json else ""))
    return 0


def _analyze(args: argparse.Namespace) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from wtcore.errors import WtError

    from . import report
    from .analyze import analyze, plot_norm_heatmap, plot_trends, plot_unit_norms, write_csv, write_json

    for p in args.checkpoints:  # fail on a missing file before the (slower) trace
        if not os.path.exists(p):
            raise WtError(f"checkpoint {p!r} does not exist")
    ref = _load(args)
    structure = _trace(args, ref)

    def build() -> Any:  # a fresh unpruned model, for save_pruned checkpoints
        return _load(args).model

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    with Progress(TextColumn("analyzing"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=report.console(sys.stderr), transient=True) as bar:
        task = bar.add_task("checkpoints", total=None)
        result = analyze(structure, args.checkpoints, chunk=args.chunk, tolerance=args.tolerance,
                         threshold=args.threshold, trust_pickle=args.trust_pickle, build=build,
                         example_inputs=ref.example_inputs, model_keys=set(ref.model.state_dict()),
                         progress=lambda done, total: bar.update(task, completed=done, total=total))
    write_csv(result, out_dir / "metrics.csv")
    write_json(result, out_dir / "metrics.json")
    written = ["metrics.csv", "metrics.json"]
    if not args.no_plots:
        plot_unit_norms(result, out_dir / "unit_norms.png")
        plot_trends(result, out_dir / "trends.png")
        plot_norm_heatmap(result, out_dir / "unit_norms_heatmap.png")
        written += ["unit_norms.png", "trends.png", "unit_norms_heatmap.png"]
    con = _console()
    con.print(report.analysis_table(result))
    for c in result.checkpoints:
        if c.scalars["nonfinite_units"]:
            print(f"wt: warning: checkpoint {c.path!r} has {int(c.scalars['nonfinite_units'])} units with NaN/inf "
                  "weights (not ready to prune; their norms and group_lasso read NaN)", file=sys.stderr)
    _text(con, report.collapse_summary(result))
    _text(con, f"wrote {', '.join(str(out_dir / w) for w in written)}")
    return 0


def _prune(args: argparse.Namespace) -> int:
    import torch

    from wtcore.errors import WtError

    from ..files import atomic_write, refuse_overwrite
    from ..modules import effective_params
    from ..prune.checkpoint import save_pruned
    from ..prune.physical import prune_units
    from . import report

    target = target_of(args)
    for name in ("pruned.pt", "structure.json"):  # before the (slow) work, not after it
        refuse_overwrite(Path(args.out) / name, args.force)
    ref = _load(args)
    if args.weights:
        _load_weights(ref.model, args.weights)
    kwargs = _trace_kwargs(args)
    structure = _trace(args, ref)
    with torch.no_grad():
        params = {k: v.detach() for k, v in effective_params(ref.model, structure).items()}
    eligible = [g.name for g in structure.groups if g.prunable]  # the groups that may lose units
    if args.groups:
        eligible = [n for n in eligible if any(fnmatch.fnmatchcase(n, p) for p in args.groups)]
        if not eligible:
            raise WtError(f"--groups {' '.join(args.groups)} matches no prunable unit group; group names look like "
                          f"{', '.join(g.name for g in structure.groups[:3])}")
    if not args.allow_lossy:  # groups where removing is not zeroing (a LayerNorm over the units) keep their units
        with report.phases("checking which groups can be removed without changing the output"):
            lossy = _lossy(ref.model, structure, ref.example_inputs, eligible)
        eligible = [n for n in eligible if n not in lossy]
        if lossy:
            name, reason = next(iter(lossy.items()))
            print(f"wt: note: {len(lossy)} groups keep their units because removing them would change the output "
                  f"(e.g. {name!r}: {reason.split(' (')[0]}); --allow-lossy prunes them too", file=sys.stderr)
    if not eligible:
        raise WtError("no unit group may lose units (all are lossy or excluded); see --allow-lossy and --groups")
    with report.phases("solving which units to remove") as phase:
        keep = choose_keep(args, structure, params, eligible)
        phase("pruning with Torch-Pruning, re-tracing, checking the output")
        new = prune_units(ref.model, structure, ref.example_inputs, keep, trace_kwargs=kwargs,
                          strict=not args.allow_lossy)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_pruned(ref.model, out_dir / "pruned.pt")
    with atomic_write(out_dir / "structure.json", "w") as f:
        f.write(new.to_json(indent=1))
    if args.save_pretrained:
        save_pretrained_to(ref.model, args.save_pretrained, out_dir / "pruned.pt")
    con = _console()
    con.print(report.comparison_table(structure, new, args.rows))
    macs_before = sum(o.macs for o in structure.ops) or 1
    goal = f" (target {target[0]} {100 * target[1]:.1f}%)" if target else ""
    _text(con, f"MACs {100 * sum(o.macs for o in new.ops) / macs_before:.1f}% of the original{goal}, 1 MAC = one "
               f"multiply-add; wrote {out_dir / 'pruned.pt'} (load with wtfront.load_pruned) and "
               f"{out_dir / 'structure.json'}")
    return 0


def _lossy(model: Any, structure: Any, inputs: Any, names: list[str]) -> dict[str, str]:
    """`wtfront.lossy_groups`, asked only about the groups named (the ones that may lose units). Attention
    head groups are left out: `prune_units` removes heads from the IR itself, not through Torch-Pruning's groups,
    and does not check them for lossiness either."""
    from wtcore.ir import Structure

    from ..prune.checks import lossy_groups
    from ..tracing.units import HEAD_KINDS

    wanted = set(names)
    subset = Structure(structure.params, tuple(g for g in structure.groups if g.name in wanted
                                               and g.kind not in HEAD_KINDS), (), structure.model, structure.uncoupled)
    return lossy_groups(model, subset, inputs)


def _load_weights(model: Any, path: str) -> None:
    from wtcore.errors import WtError

    from .analyze import read_checkpoint, state_dict_of

    sd = state_dict_of(read_checkpoint(path), path)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise WtError(f"--weights {path!r} does not fit the model: {first}") from None


def _bench(args: argparse.Namespace) -> int:
    from . import report
    from .benchmark import floor_ratios

    spec = parse_spec(args.spec)
    ref = _load(args)
    structure = _trace(args, ref)
    with report.phases(f"timing {spec.name} against the floor ({args.reps} interleaved repetitions)"):
        r = floor_ratios(structure, dict(ref.model.named_parameters()), spec=spec, reps=args.reps,
                         grad=not args.no_grad)
    con = _console()
    _text(con, report.summary_line(structure))
    _text(con, f"floor: sum(p.pow(2).sum() for p in params); medians of {r.reps} interleaved repetitions, "
               f"{r.threads} threads, one process; every output of the program")
    t = report.table(f"{spec.name} against the floor", [("", "left"), ("ms", "right"), ("x floor", "right")])
    for k in ("floor fwd", "wt fwd", "floor fwd+bwd", "wt fwd+bwd"):
        if k in r.seconds:
            base = r.seconds["floor fwd+bwd" if "bwd" in k else "floor fwd"]
            report.add_row(t, k, f"{1e3 * r.seconds[k]:.3f}", f"{r.seconds[k] / base:.2f}")
    con.print(t)
    if r.fwd_bwd is None:
        why = "--no-grad" if args.no_grad else f"{spec.name} has no gradient (counts, masks)"
        _text(con, f"forward {r.fwd:.2f}x floor; forward+backward not timed: {why}")
    else:
        _text(con, f"forward {r.fwd:.2f}x floor, forward+backward {r.fwd_bwd:.2f}x floor")
    return 0


# -------------------------------------------------------------------------------------------------- parser
def _model_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("model options")
    g.add_argument("model", help=_MODEL_HELP)
    g.add_argument("--input", metavar="SHAPE",
                   help="example input shape, e.g. 1,3,224,224; for language models a token length (32) or "
                        "batch,length (default: the model's own image size, or 16 tokens)")
    g.add_argument("--config", nargs="+", metavar="KEY=VALUE",
                   help="hf: config overrides (num_hidden_layers=4), or constructor keyword arguments for the "
                        "others (num_classes=10, timm's img_size=64)")
    g.add_argument("--heads", nargs="*", metavar="MODULE=N[:NKV]",
                   help="attention heads as units, with optional head counts per module (N query heads, NKV "
                        "key/value heads); needs a wtfront.trace with the heads option")
    g.add_argument("--units", nargs="+", metavar="KIND",
                   help="unit kinds of transformers to make prunable, e.g. head kv_head mlp_feature hidden "
                        "(default: the trace's own choice)")
    g.add_argument("--ignore", nargs="+", metavar="NAME",
                   help="module names or fnmatch globs to leave out of the trace, e.g. 'head' 'blocks.*.attn'")
    p.add_argument("--rows", type=int_at_least(0), default=40, metavar="N", help="rows per table (0: all; default 40)")
    return p


def build_parser() -> argparse.ArgumentParser:
    common = _model_options()
    p = argparse.ArgumentParser(
        prog="wt",
        description="Structured-sparsity programs for PyTorch models: trace a model to canonical units (coupled "
                    "channels, features, heads), compile norms, group lasso, MACs and masks over them, analyze "
                    "checkpoints and prune.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from .. import __version__

    p.add_argument("--version", action="version", version=f"wt {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    i = sub.add_parser(
        "inspect", parents=[common], help="print a model's unit groups, heads, cost ops, parameters and a program",
        description="Trace MODEL and print tables of its unit groups (kind, size, members), attention heads, cost "
                    "ops (MACs and share; 1 MAC = one multiply-add) and parameters, then evaluate a compiled "
                    "program on its weights (default: group lasso and active units).",
    )
    i.add_argument("--json", metavar="PATH", help="also write the structure (the IR) as JSON")
    i.add_argument("--program", nargs="+", metavar="SPEC",
                   help="specs to compile instead, e.g. group_lasso active_macs:tolerance=1e-3; prints the "
                        "program's equations and generated code")
    i.set_defaults(func=_inspect)

    a = sub.add_parser(
        "analyze", parents=[common], help="metrics and plots over many checkpoints (which epoch is ready to prune)",
        description="Evaluate group lasso, active MACs/BOPs/parameters, sparsity and unit norms for every "
                    "checkpoint with one vmapped program, suggest a threshold from the gap in the size-normalized "
                    "unit norms and report the MACs left if the units below it were pruned; write metrics.csv, "
                    "metrics.json, unit_norms.png (per-unit L2 norm histograms per checkpoint), trends.png "
                    "(metrics and group lasso over checkpoints) and unit_norms_heatmap.png.",
    )
    a.add_argument("checkpoints", nargs="+", metavar="CKPT",
                   help="checkpoint files or folders: state_dict files, dicts holding one ('state_dict', 'model'), "
                        "Lightning .ckpt files, Hugging Face Trainer output folders (checkpoint-N/), save_pruned "
                        "checkpoints, or whole pickled models (with --trust-pickle)")
    a.add_argument("--out", default="wt-analysis", metavar="DIR", help="output folder (default: wt-analysis)")
    a.add_argument("--chunk", type=int_at_least(1), default=8, metavar="N",
                   help="checkpoints per vmapped evaluation; bounds memory to N copies of the weights (default 8)")
    a.add_argument("--tolerance", type=nonnegative_float, default=0.0,
                   help="|w| at or below it counts as zero for active units, MACs and sparsity (default 0)")
    a.add_argument("--threshold", type=nonnegative_float, default=1e-3,
                   help="a unit whose L2 norm is at or below it counts as ready to prune (default 1e-3)")
    a.add_argument("--trust-pickle", action="store_true",
                   help="allow checkpoints that are pickled objects (torch.save(model)); only for trusted files")
    a.add_argument("--no-plots", action="store_true", help="write the CSV and JSON only")
    a.set_defaults(func=_analyze)

    r = sub.add_parser(
        "prune", parents=[common], help="one-shot structured pruning to a cost target, physical, saved",
        description="Remove the least important units until the model's MACs (parameters, BOPs) are at most the "
                    "target fraction of the original (1 MAC = one multiply-add), physically (Torch-Pruning; the "
                    "output is checked to equal the masked model's), and save a checkpoint that "
                    "wtfront.load_pruned reads. Default policy (wtcore.policy): scores normalized by their group's "
                    "mean, ranked globally, no group loses more than 90%%; a warning names any group left below "
                    "10%% of its width.",
    )
    add_prune_options(r)
    r.add_argument("--groups", nargs="+", metavar="PATTERN",
                   help="only these unit groups may lose units (fnmatch patterns over group names, as wt inspect "
                        "lists them), e.g. '*.mlp.fc1.out'")
    r.add_argument("--weights", metavar="CKPT", help="load this state_dict into the model first")
    r.add_argument("--allow-lossy", action="store_true",
                   help="also prune groups whose units a norm mixes (e.g. a transformer's LayerNorm'ed hidden width), "
                        "where removing a unit is not the same as zeroing it: the output changes, unverified")
    r.add_argument("--out", required=True, metavar="DIR", help="folder for pruned.pt and structure.json")
    r.add_argument("--force", action="store_true", help="overwrite pruned.pt and structure.json if --out has them")
    r.set_defaults(func=_prune)

    b = sub.add_parser(
        "bench", parents=[common], help="time a program against the floor of reading every weight once",
        description="The design's performance contract on your model: the compiled program (default group lasso) "
                    "forward and forward+backward, against the floor sum(p.pow(2).sum() for p in params), as "
                    "medians over interleaved repetitions in one process. Ratios, not absolute times, compare.",
    )
    b.add_argument("--reps", type=int_at_least(1), default=15, help="interleaved repetitions (default 15)")
    b.add_argument("--spec", default="group_lasso",
                   help="the spec to time, any registered one with its options, e.g. active_macs or "
                        "ln_structured:amount=0.3 (default group_lasso)")
    b.add_argument("--no-grad", action="store_true",
                   help="time the forward only (specs without a gradient, such as counts and masks, always are)")
    b.set_defaults(func=_bench)
    return p


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text or type(e).__name__


def _interrupted(e: BaseException | None) -> bool:
    """Whether `e` is a Ctrl-C, or was raised while handling one (the chain of causes and contexts)."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, KeyboardInterrupt):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


def main(argv: list[str] | None = None) -> int:
    """Run the `wt` command; returns the exit code (0, or 2 with a one-line error on stderr). Parsing (and
    `--help`) imports no torch: the commands import it when they run."""
    args = build_parser().parse_args(argv)
    try:
        from wtcore.errors import WtError  # imports torch: the slow part of start-up
    except BaseException as e:
        if not _interrupted(e):
            raise
        print("wt: interrupted (Ctrl-C) while starting up; nothing was written", file=sys.stderr)
        return 130

    try:
        return args.func(args)
    except WtError as e:
        print(f"wt: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except BaseException as e:
        if _interrupted(e):  # also an import that failed because Ctrl-C cut a module's import short
            print("wt: interrupted (Ctrl-C); files already written are complete, none is half-written",
                  file=sys.stderr)
            return 130
        if isinstance(e, OSError):
            print(f"wt: error: {type(e).__name__}: {_one_line(e)}", file=sys.stderr)
            return 2
        if not isinstance(e, Exception) or os.environ.get("WT_TRACEBACK"):
            raise
        print(f"wt: error: unexpected {type(e).__name__}: {_one_line(e)} (set WT_TRACEBACK=1 for the traceback)",
              file=sys.stderr)
        return 3

