"""Trace a Llama of 7B shape built on the meta device: structure and MACs without allocating weights.

    python bench/bench_meta_llama.py [--layers 32] [--seq 128] [--kv-heads 32]
    python bench/bench_meta_llama.py --preset 70b      # 80 layers, hidden 8192, 64 heads / 8 KV heads

The model is built under `with torch.device("meta")`, so no parameter memory is allocated; the example
forward pass (Torch-Pruning's autograd trace and fvcore's jit trace) runs on meta tensors, which carry
shapes only. Prints the seconds and peak RSS of the trace (`resource.getrusage`, the whole process, imports
included), the number of unit groups and units, and the total MACs (1 MAC = one multiply-add), checked
against a hand formula for one Llama forward pass of `seq` tokens:

    per layer: projections  S*h*(h + 2*kv*hd + h)       q, k, v, o
               attention    2 * heads * S*S * hd        scores (QKᵀ) and context (A·V)
               MLP          3 * S*h*I                   gate, up, down
    plus lm_head            S*h*V                       (the embedding is a lookup: no MACs)
"""

from __future__ import annotations

import argparse
import resource
import time

import torch


def llama_macs(*, hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int, vocab: int,
               seq: int) -> int:
    """MACs of one Llama forward pass on `seq` tokens (fvcore's convention: full S×S attention, no bias/norms)."""
    hd = hidden // heads
    proj = seq * hidden * (hidden + 2 * kv_heads * hd + hidden)
    attn = 2 * heads * seq * seq * hd
    mlp = 3 * seq * hidden * intermediate
    return layers * (proj + attn + mlp) + seq * hidden * vocab


#: model shapes by name (Llama-2/3 70B: grouped-query attention with 8 KV heads; vocab of Llama 2)
PRESETS = {
    "7b": dict(layers=32, hidden=4096, heads=32, kv_heads=32, intermediate=11008, vocab=32000),
    "70b": dict(layers=80, hidden=8192, heads=64, kv_heads=8, intermediate=28672, vocab=32000),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), help="a model shape (the size options below override it)")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=32)
    ap.add_argument("--intermediate", type=int, default=11008)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--seq", type=int, default=128)
    preset = ap.parse_known_args()[0].preset
    if preset:
        ap.set_defaults(**PRESETS[preset])
    args = ap.parse_args()

    import transformers

    from wtfront import trace

    rss_start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    config = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
    )
    t0 = time.perf_counter()
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    build_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())
    ids = torch.zeros(1, args.seq, dtype=torch.long, device="meta")
    t0 = time.perf_counter()
    structure = trace(model, {"input_ids": ids}, budget_s=600)
    trace_s = time.perf_counter() - t0
    rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    macs = sum(op.macs for op in structure.ops)
    want = llama_macs(hidden=args.hidden, layers=args.layers, heads=args.heads, kv_heads=args.kv_heads,
                      intermediate=args.intermediate, vocab=args.vocab, seq=args.seq)
    prunable = [g for g in structure.groups if g.prunable]
    print(f"torch {torch.__version__}, transformers {transformers.__version__}; {time.strftime('%Y-%m-%d')}")
    print(f"Llama on meta: {n_params / 1e9:.2f}B parameters, {args.layers} layers, hidden {args.hidden}, "
          f"{args.heads} heads / {args.kv_heads} KV heads, intermediate {args.intermediate}, vocab {args.vocab}, "
          f"{args.seq} tokens")
    print(f"build (meta) {build_s:.1f} s; trace (structure + MACs) {trace_s:.1f} s")
    print(f"peak RSS {rss_peak:,.0f} MB (at start, after imports: {rss_start:,.0f} MB)")
    print(f"{len(structure.groups)} unit groups ({len(prunable)} prunable), {sum(g.size for g in structure.groups):,} "
          f"units, {len(structure.ops)} cost ops")
    print(f"total MACs (1 MAC = one multiply-add) {macs:,}; hand formula {want:,}; "
          f"{'match' if macs == want else f'MISMATCH ({macs - want:+,})'}")
    if macs != want:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
