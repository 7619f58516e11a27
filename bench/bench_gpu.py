"""Programs on CUDA parameters against a floor: group lasso forward + backward and `track()`, eager and compiled.

    python bench/bench_gpu.py [--models resnet50 vit_b_16 llama1b] [--reps 20]

Same code path as on the CPU (the nonzero counts use the operator's torch formulation on CUDA). Floors:
`sum(p.pow(2).sum() for p in params)` forward + backward for the lasso, the same under no_grad for
`track()` (the four tracker kinds). Medians of interleaved repetitions, each synchronized; `llama1b` is a
Llama of ~1.2B parameters (16 layers, hidden 2048, 32 heads / 8 KV heads, intermediate 8192) traced on the
`meta` device and materialized on the GPU. Without a GPU it says so and exits.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

import torch

KINDS = ["structured_bops", "unstructured_sparsity", "nm_sparsity", "group_pruning_summary"]


def _model(name: str, device: torch.device) -> tuple[torch.nn.Module, object]:
    from wtfront import trace

    if name == "llama1b":
        import transformers

        config = transformers.LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=8192,
                                          num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8)
        with torch.device("meta"):
            model = transformers.LlamaForCausalLM(config)
        structure = trace(model, {"input_ids": torch.zeros(1, 16, dtype=torch.long, device="meta")}, budget_s=600)
        model = model.to_empty(device=device)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.02)
        return model, structure
    from wtfront import load_model

    ref = load_model(f"torchvision:{name}")
    model = ref.model.to(device)
    return model, trace(model, ref.example_inputs.to(device))


def _timed(fn: Callable[[], object]) -> Callable[[], object]:
    def run() -> object:
        out = fn()
        torch.cuda.synchronize()
        return out

    return run


def bench(name: str, reps: int) -> None:
    import wtcore
    from wtfront import WeightTracker
    from wtfront.cli.benchmark import interleaved_medians

    device = torch.device("cuda")
    model, structure = _model(name, device)
    plist = [p for p in model.parameters() if p.requires_grad]
    params = dict(model.named_parameters())
    lasso = {b: wtcore.compile(structure, ["group_lasso"], backend=b) for b in (None, "inductor")}
    trackers = {b: WeightTracker(model, None, structure=structure, backend=b) for b in (None, "inductor")}
    for t in trackers.values():
        t.create_tracker(KINDS)

    def floor_bwd() -> None:
        sum(p.pow(2).sum() for p in plist).backward()

    def floor_fwd() -> None:
        with torch.no_grad():
            sum(p.pow(2).sum() for p in plist)

    fns = {"floor fwd+bwd": floor_bwd, "floor no_grad": floor_fwd}
    for b, label in ((None, "eager"), ("inductor", "compiled")):
        fns[f"lasso fwd+bwd {label}"] = lambda prog=lasso[b]: prog(params)["group_lasso"].backward()
        fns[f"track() {label}"] = trackers[b].track
    med = interleaved_medians({k: _timed(f) for k, f in fns.items()}, reps=reps, warmup=2, clock=time.perf_counter)
    n = sum(p.numel() for p in plist)
    print(f"== {name} ({n / 1e6:.0f} M parameters, {torch.cuda.get_device_name()}): floor fwd+bwd "
          f"{med['floor fwd+bwd'] * 1e3:.2f} ms, no_grad {med['floor no_grad'] * 1e3:.2f} ms", flush=True)
    for label in ("eager", "compiled"):
        print(f"   {label:8s} lasso fwd+bwd {med[f'lasso fwd+bwd {label}'] / med['floor fwd+bwd']:.2f}x, "
              f"track() {med[f'track() {label}'] / med['floor no_grad']:.2f}x", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["resnet50", "vit_b_16", "llama1b"])
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_gpu: no CUDA device here; nothing to measure")
        sys.exit(0)
    print(f"torch {torch.__version__}; {time.strftime('%Y-%m-%d')}")
    for name in args.models:
        bench(name, args.reps)


if __name__ == "__main__":
    main()
