"""Attention heads as canonical units: discovery, per-unit values, MACs, fake -> physical pruning, checkpoints.

Every model is built with random weights from a small config (no downloads). References are independent of
the IR: per-head sums of squares computed by hand from each module's own weights, attention MACs from the
shapes (B x heads x L x S x head_dim), fvcore-style counts on the physically pruned model, the model's own
forward before and after pruning.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

import wtcore
from wtcore.errors import TraceError
from wtcore.ir import Param, Structure
from wtcore.masking import keep_from_removed
from wtcore.testing import reference_unit_values
from wtfront import PruneError, apply_masks, load_pruned, prune_units, save_pruned, trace
from wtfront.costs.macs import op_macs
from wtfront.tracing.attention import AttentionLayout, Segment, discover_attention
from wtfront.tracing.units import _head_group

transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")


# ============================================================================================ the zoo
@dataclass
class Case:
    build: Callable[[], nn.Module]
    inputs: Callable[[], Any]
    layers: int
    heads: int  # query heads per attention
    kv_heads: int
    batch: int
    seq: int  # tokens (L = S)
    head_dim: int


def _hf(cls: str, cfg_cls: str, **cfg: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        config = getattr(transformers, cfg_cls)(**cfg)
        return getattr(transformers, cls)(config)

    return build


def _ids(n: int = 8, vocab: int = 64) -> Callable[[], torch.Tensor]:
    return lambda: torch.randint(0, vocab, (2, n), generator=torch.Generator().manual_seed(3))


def _img(side: int = 32) -> Callable[[], torch.Tensor]:
    return lambda: torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(3))


LLM = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=8,
           num_key_value_heads=2, max_position_embeddings=32)
CASES: dict[str, Case] = {
    "timm:vit_tiny_patch16_224": Case(
        lambda: timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=32),
        _img(), 12, 3, 3, 2, 5, 64),
    "timm:deit_small_patch16_224": Case(
        lambda: timm.create_model("deit_small_patch16_224", pretrained=False, num_classes=10, img_size=32, depth=4),
        _img(), 4, 6, 6, 2, 5, 64),
    "hf:BertModel": Case(
        _hf("BertModel", "BertConfig", vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=32),
        _ids(), 2, 4, 4, 2, 8, 8),
    "hf:ViTModel": Case(
        _hf("ViTModel", "ViTConfig", hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
            image_size=32, patch_size=8),
        _img(), 2, 4, 4, 2, 17, 8),
    "hf:GPT2LMHeadModel": Case(
        _hf("GPT2LMHeadModel", "GPT2Config", vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32,
            bos_token_id=0, eos_token_id=0),
        _ids(), 2, 4, 4, 2, 8, 8),
    "hf:LlamaForCausalLM": Case(_hf("LlamaForCausalLM", "LlamaConfig", **LLM), _ids(), 2, 8, 2, 2, 8, 4),
    "hf:Qwen2ForCausalLM": Case(_hf("Qwen2ForCausalLM", "Qwen2Config", **LLM), _ids(), 2, 8, 2, 2, 8, 4),
    "hf:MistralForCausalLM": Case(_hf("MistralForCausalLM", "MistralConfig", **LLM), _ids(), 2, 8, 2, 2, 8, 4),
    "torchvision:vit_b_16": Case(
        lambda: torchvision.models.vit_b_16(weights=None, image_size=32), _img(), 12, 12, 12, 2, 5, 64),
}
SLOW = {"torchvision:vit_b_16"}


def _params(name: str) -> list[Any]:
    return [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in CASES]


def _randomize(model: nn.Module) -> None:
    """Random values everywhere (torchvision's ViT head and HF biases start at zero)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def _call(model: nn.Module, x: Any) -> torch.Tensor:
    with torch.no_grad():
        y = model(x)
    if isinstance(y, torch.Tensor):
        return y
    for key in ("logits", "last_hidden_state"):
        if hasattr(y, key):
            return getattr(y, key)
    return y[0]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / a.double().abs().max())


def _plan(s: Structure, fraction: float = 0.3, seed: int = 0) -> dict[str, list[int]]:
    """~30% of the units of every head, KV-head and MLP group (at least one)."""
    g = torch.Generator().manual_seed(seed)
    plan = {}
    for grp in s.groups:
        if grp.prunable and grp.kind in ("head", "kv_head", "mlp_feature"):
            k = max(1, round(fraction * grp.size))
            plan[grp.name] = sorted(torch.randperm(grp.size, generator=g)[:k].tolist())
    return plan


# ============================================================================================ hand references
def _attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Attention modules found by hand, per family (independent of wtfront.tracing.attention)."""
    out = []
    for name, m in model.named_modules():
        t = type(m).__name__
        if t == "Attention" and hasattr(m, "qkv"):
            out.append((name, m))
        elif isinstance(m, nn.MultiheadAttention):
            out.append((name, m))
        elif t in ("BertSelfAttention", "ViTAttention", "ViTSelfAttention", "GPT2Attention", "LlamaAttention",
                   "Qwen2Attention", "MistralAttention"):
            out.append((name, m))
    return out


def _qkvo(model: nn.Module, name: str, m: nn.Module) -> tuple[torch.Tensor, ...]:
    """(q, k, v weights as [rows, in], q, k, v biases or None, output weight as [out, inner]) of an attention."""
    t = type(m).__name__
    if t == "Attention":
        w, b = m.qkv.weight, m.qkv.bias
        a = w.shape[0] // 3
        bs = (None, None, None) if b is None else (b[:a], b[a:2 * a], b[2 * a:])
        return (w[:a], w[a:2 * a], w[2 * a:], *bs, m.proj.weight)
    if isinstance(m, nn.MultiheadAttention):
        w, b = m.in_proj_weight, m.in_proj_bias
        a = w.shape[0] // 3
        return (w[:a], w[a:2 * a], w[2 * a:], b[:a], b[a:2 * a], b[2 * a:], m.out_proj.weight)
    if t == "GPT2Attention":
        w, b = m.c_attn.weight.t(), m.c_attn.bias  # Conv1D stores [in, out]
        a = w.shape[0] // 3
        return (w[:a], w[a:2 * a], w[2 * a:], b[:a], b[a:2 * a], b[2 * a:], m.c_proj.weight.t())
    if t == "BertSelfAttention":
        out = model.get_submodule(name.rpartition(".")[0]).output.dense
        return (m.query.weight, m.key.weight, m.value.weight, m.query.bias, m.key.bias, m.value.bias, out.weight)
    return (m.q_proj.weight, m.k_proj.weight, m.v_proj.weight, m.q_proj.bias, m.k_proj.bias, m.v_proj.bias,
            m.o_proj.weight)


def _hand_unit_sumsq(model: nn.Module, name: str, m: nn.Module, heads: int, kv_heads: int) -> np.ndarray:
    """Sum of squares of each head unit: head h owns q/k/v rows h*hd..(h+1)*hd (and their biases) and the
    output's input columns; under GQA a KV-head unit g owns k/v head g and query heads g*n_rep..(g+1)*n_rep-1."""
    q, k, v, bq, bk, bv, o = (None if t is None else t.detach().double() for t in _qkvo(model, name, m))
    hd = q.shape[0] // heads
    n_rep = heads // kv_heads

    def rows(w: torch.Tensor | None, h: int) -> float:
        return 0.0 if w is None else float(w[h * hd:(h + 1) * hd].pow(2).sum())

    def cols(h: int) -> float:
        return float(o[:, h * hd:(h + 1) * hd].pow(2).sum())

    out = np.zeros(kv_heads)
    for g in range(kv_heads):
        out[g] += rows(k, g) + rows(v, g) + rows(bk, g) + rows(bv, g)
        for h in range(g * n_rep, (g + 1) * n_rep):
            out[g] += rows(q, h) + rows(bq, h) + cols(h)
    return out


# ============================================================================================ the model tests
@pytest.mark.parametrize("name", _params("x"))
def test_heads_metrics_macs_and_physical_pruning(name: str, record_property: Any) -> None:
    case = CASES[name]
    torch.manual_seed(0)
    model = case.build().eval()
    _randomize(model)
    x = case.inputs()
    t0 = time.perf_counter()
    s = trace(model, x)
    record_property("trace_s", round(time.perf_counter() - t0, 3))
    assert Structure.from_json(s.to_json()) == s

    # heads discovered with the right counts; under GQA the default unit is the KV head
    kind = "head" if case.kv_heads == case.heads else "kv_head"
    head_groups = [g for g in s.groups if g.kind in ("head", "kv_head")]
    assert len(head_groups) == case.layers
    assert {(g.kind, g.size, g.prunable) for g in head_groups} == {(kind, case.kv_heads, True)}
    assert [g for g in s.groups if g.kind == "mlp_feature" and g.prunable]
    hidden = [g for g in s.groups if g.kind == "hidden"]
    assert len(hidden) == 1 and not hidden[0].prunable and "units=(..., 'hidden')" in hidden[0].reason
    # no parameter axis is coupled to two groups (the head groups replaced the row-level channel groups)
    keys = [(sl.param, sl.axis) for g in s.groups for sl in g.slices]
    assert len(keys) == len(set(keys))

    # group lasso and per-unit norms against the float64 loop reference, and per-head values by hand
    params = {p.name: model.get_parameter(p.name).detach() for p in s.params}
    out = wtcore.compile(s, ["group_lasso", "unit_l2", "group_active_units"])(params)
    ref = reference_unit_values(s, params)
    np.testing.assert_allclose(out["unit_l2"].double().numpy(), np.sqrt(ref["sumsq"]), rtol=1e-5)
    prunable = np.concatenate([np.full(g.size, g.prunable) for g in s.groups])
    gl = float((np.sqrt(ref["count"]) * np.sqrt(ref["sumsq"]))[prunable].sum())
    assert math.isclose(float(out["group_lasso"]), gl, rel_tol=1e-5)
    by_module = {g.root: g for g in head_groups}
    attn = _attention_modules(model)
    assert len(attn) == case.layers
    for mname, m in attn:
        g = by_module[mname]
        off = s.offsets[g.name]
        hand = _hand_unit_sumsq(model, mname, m, case.heads, case.kv_heads)
        np.testing.assert_allclose(ref["sumsq"][off: off + g.size], hand, rtol=1e-9)
        np.testing.assert_allclose(out["unit_l2"][off: off + g.size].double().numpy(), np.sqrt(hand), rtol=1e-5)

    # attention matmul MACs from the shapes: B x heads x L x S x head_dim, for QK^T and for A.V
    attn_ops = [o for o in s.ops if o.kind in ("attn_qk", "attn_av")]
    assert len(attn_ops) == 2 * case.layers
    dense = case.batch * case.heads * case.seq * case.seq * case.head_dim
    assert {o.macs for o in attn_ops} == {dense}

    # fake-prune ~30% of the heads and MLP features, then remove them physically: same outputs, no user hook
    plan = _plan(s)
    keep = keep_from_removed(s, plan)
    y_dense = _call(model, x)
    apply_masks(model, s, keep)
    y_fake = _call(model, x)
    assert _rel(y_dense, y_fake) > 1e-3  # the removed heads and features matter
    zeroed = {p.name: model.get_parameter(p.name).detach() for p in s.params}
    active = wtcore.compile(s, ["active_macs"])(zeroed)["active_macs/per_op"].tolist()
    for o, got in zip(s.ops, active):
        if o.kind in ("attn_qk", "attn_av"):
            gone = len(plan.get(by_module[o.module].name, ()))
            kept_q = case.heads - gone * (case.heads // case.kv_heads)
            assert got == case.batch * kept_q * case.seq * case.seq * case.head_dim, o.name
    n_before = sum(p.numel() for p in model.parameters())
    new = prune_units(model, s, x, keep)
    assert sum(p.numel() for p in model.parameters()) < n_before
    y = _call(model, x)
    err = _rel(y_fake, y)
    record_property("fake_physical_rel_err", err)
    assert err <= 1e-5
    # MACs counted on the physically pruned model equal the active MACs of the fake-pruned one, op by op
    pruned_macs = op_macs(model, x)
    assert {o.name for o in s.ops} <= set(pruned_macs)
    for o, got in zip(s.ops, active):
        assert pruned_macs[o.name] == got, f"{o.name}: active {got} != pruned {pruned_macs[o.name]}"
    # the re-traced structure: fewer heads, baseline kept; module metadata synced (heads consistent per KV head)
    for g in head_groups:
        ng = new.group_map[g.name]
        assert (ng.size, ng.baseline_size) == (g.size - len(plan.get(g.name, ())), g.size)
    for mname, m in _attention_modules(model):
        q, k = _qkvo(model, mname, m)[:2]
        assert q.shape[0] == k.shape[0] * (case.heads // case.kv_heads)  # n_rep query heads per KV head
        for attr in ("num_heads", "num_attention_heads"):
            if isinstance(getattr(m, attr, None), int):
                assert getattr(m, attr) * case.head_dim == q.shape[0]
        if hasattr(m, "num_key_value_groups"):
            assert m.num_key_value_groups == case.heads // case.kv_heads


# ============================================================================================ GQA and options
def _llama(**kw: Any) -> nn.Module:
    return _hf("LlamaForCausalLM", "LlamaConfig", **{**LLM, **kw})()


def test_gqa_query_head_slots_keep_heads_per_kv_head_consistent() -> None:
    """units=("head", ...) under GQA: a unit is query head r of every KV group, so pruning keeps the same number
    of query heads per KV head (n_rep drops, the KV heads stay)."""
    torch.manual_seed(0)
    model = _llama().eval()
    x = _ids()()
    s = trace(model, x, units=("head", "mlp_feature"))
    g = s.group_map["model.layers.0.self_attn.heads"]
    assert (g.kind, g.size) == ("head", 4)  # n_rep = 8 / 2 slots
    q = next(sl for sl in g.slices if sl.param.endswith("q_proj.weight"))
    assert q.index_list() == [h % 4 for h in range(8) for _ in range(4)]
    assert not any(sl.param.endswith(("k_proj.weight", "v_proj.weight")) for sl in g.slices)
    y0 = _call(model, x)
    keep = keep_from_removed(s, {"model.layers.0.self_attn.heads": [1], "model.layers.1.self_attn.heads": [0, 3]})
    apply_masks(model, s, keep)
    y_fake = _call(model, x)
    assert _rel(y0, y_fake) > 1e-3
    prune_units(model, s, x, keep, trace_kwargs={"units": ("head", "mlp_feature")})
    assert _rel(y_fake, _call(model, x)) <= 1e-5
    a0, a1 = model.model.layers[0].self_attn, model.model.layers[1].self_attn
    assert (a0.num_key_value_groups, a1.num_key_value_groups) == (3, 2)
    assert a0.q_proj.out_features == 2 * 3 * 4 and a0.k_proj.out_features == 2 * 4


def test_unit_kind_selection_and_errors() -> None:
    torch.manual_seed(0)
    model = _llama().eval()
    x = _ids()()
    s = trace(model, x, units=(), costs=False)
    kinds = {g.kind: g for g in s.groups}
    assert not kinds["kv_head"].prunable and "units=(..., 'kv_head')" in kinds["kv_head"].reason
    assert not kinds["mlp_feature"].prunable and "'mlp_feature'" in kinds["mlp_feature"].reason
    s = trace(model, x, units=("hidden",), costs=False)
    assert s.group_map["model.embed_tokens.out"].prunable
    with pytest.raises(TraceError, match=r"'model.layers.0.self_attn' uses rotary.*not supported for rotary"):
        trace(model, x, units=("head_dim",))
    with pytest.raises(TraceError, match="'head_dim' excludes 'head' and 'kv_head'"):
        trace(model, x, units=("kv_head", "head_dim"))
    with pytest.raises(TraceError, match="unknown unit kind"):
        trace(model, x, units=("heads",))
    with pytest.raises(PruneError, match="not prunable"):
        s = trace(model, x, units=("mlp_feature",), costs=False)
        prune_units(model, s, x, {"model.layers.0.self_attn.kv_heads": [0]})


def test_hidden_width_when_selected() -> None:
    """The residual width, selected with units=(..., "hidden"): normalized by LayerNorm / RMSNorm, so pruning it
    is refused unless strict=False; GPT-2's goes through IR surgery (Conv1D), keeping the tied embedding."""
    torch.manual_seed(0)
    x = _ids()()
    kw = {"units": ("kv_head", "mlp_feature", "hidden")}
    llm = _llama().eval()
    s = trace(llm, x, **kw)
    with pytest.raises(PruneError, match=r"LlamaRMSNorm .*strict=False"):
        prune_units(llm, s, x, {"model.embed_tokens.out": [0, 5]}, trace_kwargs=kw)
    gpt = CASES["hf:GPT2LMHeadModel"].build().eval()
    s = trace(gpt, x, **kw)
    with pytest.raises(PruneError, match=r"LayerNorm .*strict=False"):
        prune_units(gpt, s, x, {"transformer.wte.out": [0, 5]}, trace_kwargs=kw)
    new = prune_units(gpt, s, x, {"transformer.wte.out": [0, 5]}, strict=False, trace_kwargs=kw)
    assert gpt.lm_head.weight is gpt.transformer.wte.weight and gpt.transformer.wte.weight.shape == (64, 30)
    assert gpt.config.n_embd == 30 and new.group_map["transformer.wte.out"].size == 30
    assert _call(gpt, x).shape == (2, 8, 64)


def test_head_overrides() -> None:
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=32, depth=2).eval()
    x = _img()()
    s = trace(model, x, heads={"blocks.0.attn": None}, costs=False)  # left to Torch-Pruning's row-level groups
    assert "blocks.0.attn.heads" not in s.group_map and "blocks.0.attn.qkv.out" in s.group_map
    assert s.group_map["blocks.1.attn.heads"].size == 3
    s = trace(model, x, heads={"blocks.0.attn": 6}, costs=False)  # 6 heads of 32 rows
    assert s.group_map["blocks.0.attn.heads"].size == 6
    with pytest.raises(TraceError, match="not a multiple"):
        trace(model, x, heads={"blocks.0.attn": 5})
    with pytest.raises(TraceError, match="not in the model"):
        trace(model, x, heads={"blocks.9.attn": 3})
    with pytest.raises(TraceError, match="does not recognize"):
        trace(model, x, heads={"blocks.0.mlp": 3})


def test_failed_head_pruning_leaves_the_model_bit_identical(monkeypatch: pytest.MonkeyPatch) -> None:
    import wtfront.prune.physical as prune_mod

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=32, depth=2).eval()
    x = _img()()
    s = trace(model, x)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    objects = {n: p for n, p in model.named_parameters()}
    real = prune_mod.remove_units

    def broken(*args: Any) -> None:
        real(*args)
        raise RuntimeError("injected")

    monkeypatch.setattr(prune_mod, "remove_units", broken)
    with pytest.raises(PruneError, match=r"removing attention heads.*injected.*restored"):
        prune_units(model, s, x, {"blocks.0.attn.heads": [1], "blocks.0.mlp.fc1.out": [0, 5]})
    assert model.blocks[0].attn.num_heads == 3 and model.blocks[0].attn.attn_dim == 192
    for n, p in model.named_parameters():
        assert p is objects[n] and torch.equal(p, before[n])


def test_failed_hf_pruning_restores_the_config(monkeypatch: pytest.MonkeyPatch) -> None:
    import wtfront.prune.physical as prune_mod

    torch.manual_seed(0)
    model = _llama().eval()
    x = _ids()()
    s = trace(model, x)
    cfg = model.config
    real = prune_mod.trace

    def broken(*args: Any, **kwargs: Any) -> Structure:  # the re-trace fails after pruning and metadata sync
        raise RuntimeError("injected")

    monkeypatch.setattr(prune_mod, "trace", broken)
    with pytest.raises(PruneError, match=r"re-tracing.*injected"):
        prune_units(model, s, x, {"model.layers.0.self_attn.kv_heads": [0], "model.layers.1.self_attn.kv_heads": [1]})
    monkeypatch.setattr(prune_mod, "trace", real)
    assert model.config is cfg and (cfg.num_attention_heads, cfg.num_key_value_heads) == (8, 2)
    assert all(m.config is cfg for m in model.modules() if hasattr(m, "config"))
    assert model.model.layers[0].self_attn.q_proj.out_features == 32


# ============================================================================================ head dims
HD_UNITS = ("head_dim", "mlp_feature")
HD_CASES: dict[str, Case] = {
    "timm:vit_tiny": Case(
        lambda: timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=32, depth=2),
        _img(), 2, 3, 3, 2, 5, 64),
    "hf:BertModel": CASES["hf:BertModel"],
    "hf:ViTModel": CASES["hf:ViTModel"],
    "hf:GPT2LMHeadModel": CASES["hf:GPT2LMHeadModel"],
}


def _hand_dim_sumsq(model: nn.Module, name: str, m: nn.Module, heads: int) -> np.ndarray:
    """Sum of squares of each head-dim unit d: q/k/v row d of every head (and biases), and the output
    projection's input column d of every head."""
    q, k, v, bq, bk, bv, o = (None if t is None else t.detach().double() for t in _qkvo(model, name, m))
    hd = q.shape[0] // heads
    out = np.zeros(hd)
    for d in range(hd):
        rows = [h * hd + d for h in range(heads)]
        out[d] = sum(float(w[rows].pow(2).sum()) for w in (q, k, v, bq, bk, bv) if w is not None)
        out[d] += float(o[:, rows].pow(2).sum())
    return out


@pytest.mark.parametrize("name", list(HD_CASES))
def test_head_dim_units_metrics_macs_and_physical_pruning(name: str) -> None:
    """units=("head_dim", ...): one group per attention whose unit d is entry d of every head's q, k, v and
    output column; group lasso vs the float64 reference, per-dim sums by hand, attention MACs follow the
    kept dims, and removing dims physically keeps the output (the attention scale stays at its original value)."""
    case = HD_CASES[name]
    torch.manual_seed(0)
    model = case.build().eval()
    _randomize(model)
    x = case.inputs()
    s = trace(model, x, units=HD_UNITS)
    groups = [g for g in s.groups if g.kind == "head_dim"]
    assert len(groups) == case.layers and {(g.size, g.prunable) for g in groups} == {(case.head_dim, True)}
    assert not [g for g in s.groups if g.kind in ("head", "kv_head")]
    keys = [(sl.param, sl.axis) for g in s.groups for sl in g.slices]
    assert len(keys) == len(set(keys))

    params = {p.name: model.get_parameter(p.name).detach() for p in s.params}
    out = wtcore.compile(s, ["group_lasso", "unit_l2"])(params)
    ref = reference_unit_values(s, params)
    prunable = np.concatenate([np.full(g.size, g.prunable) for g in s.groups])
    gl = float((np.sqrt(ref["count"]) * np.sqrt(ref["sumsq"]))[prunable].sum())
    assert math.isclose(float(out["group_lasso"]), gl, rel_tol=1e-5)
    by_module = {g.root: g for g in groups}
    for mname, m in _attention_modules(model):
        g = by_module[mname]
        off = s.offsets[g.name]
        hand = _hand_dim_sumsq(model, mname, m, case.heads)
        np.testing.assert_allclose(ref["sumsq"][off: off + g.size], hand, rtol=1e-9)
        np.testing.assert_allclose(out["unit_l2"][off: off + g.size].double().numpy(), np.sqrt(hand), rtol=1e-5)

    gen = torch.Generator().manual_seed(1)
    plan = {g.name: sorted(torch.randperm(g.size, generator=gen)[: max(1, round(0.3 * g.size))].tolist())
            for g in groups}
    plan[groups[0].name] = plan[groups[0].name][:1]  # uneven dims per layer
    keep = keep_from_removed(s, plan)
    y_dense = _call(model, x)
    apply_masks(model, s, keep)
    y_fake = _call(model, x)
    assert _rel(y_dense, y_fake) > 1e-3
    zeroed = {p.name: model.get_parameter(p.name).detach() for p in s.params}
    active = wtcore.compile(s, ["active_macs"])(zeroed)["active_macs/per_op"].tolist()
    attn = [(o, got) for o, got in zip(s.ops, active) if o.kind in ("attn_qk", "attn_av")]
    assert len(attn) == 2 * case.layers
    for o, got in attn:  # B x heads x L x S x kept head dims
        kept = case.head_dim - len(plan[by_module[o.module].name])
        assert got == case.batch * case.heads * case.seq * case.seq * kept, o.name
    scales = {n: (getattr(m, "scale", None), getattr(m, "scaling", None)) for n, m in _attention_modules(model)}
    new = prune_units(model, s, x, keep, trace_kwargs={"units": HD_UNITS})
    assert _rel(y_fake, _call(model, x)) <= 1e-5
    pruned_macs = op_macs(model, x)
    for o, got in zip(s.ops, active):
        assert pruned_macs[o.name] == got, f"{o.name}: active {got} != pruned {pruned_macs[o.name]}"
    for mname, m in _attention_modules(model):
        g = by_module[mname]
        kept = g.size - len(plan[g.name])
        assert (new.group_map[g.name].size, new.group_map[g.name].baseline_size) == (kept, g.size)
        q = _qkvo(model, mname, m)[0]
        assert q.shape[0] == case.heads * kept
        hd = getattr(m, "head_dim", None) or getattr(m, "attention_head_size", None)
        assert hd == kept and (getattr(m, "scale", None), getattr(m, "scaling", None)) == scales[mname]
        for attr in ("num_heads", "num_attention_heads"):
            if isinstance(getattr(m, attr, None), int):
                assert getattr(m, attr) == case.heads


def test_head_dim_uniform_pruning_updates_the_hf_config() -> None:
    torch.manual_seed(0)
    model = CASES["hf:BertModel"].build().eval()
    x = _ids()()
    s = trace(model, x, units=HD_UNITS, costs=False)
    plan = {g.name: [2, 5] for g in s.groups if g.kind == "head_dim"}
    keep = keep_from_removed(s, plan)
    apply_masks(model, s, keep)
    y_fake = _call(model, x)
    prune_units(model, s, x, keep, trace_kwargs={"units": HD_UNITS, "costs": False})
    assert _rel(y_fake, _call(model, x)) <= 1e-5
    assert (model.config.num_attention_heads, model.config.head_dim) == (4, 6)
    assert model.encoder.layer[1].attention.self.all_head_size == 24


def test_failed_head_dim_pruning_leaves_the_model_bit_identical(monkeypatch: pytest.MonkeyPatch) -> None:
    import wtfront.prune.physical as prune_mod

    torch.manual_seed(0)
    model = HD_CASES["timm:vit_tiny"].build().eval()
    x = _img()()
    s = trace(model, x, units=HD_UNITS)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    objects = {n: p for n, p in model.named_parameters()}
    attrs = {k: v for k, v in vars(model.blocks[0].attn).items() if not k.startswith("_")}

    def broken(*args: Any) -> None:  # metadata sync fails after the dims were cut and head_dim was set
        raise RuntimeError("injected")

    monkeypatch.setattr(prune_mod, "sync_metadata", broken)
    with pytest.raises(PruneError, match=r"syncing module metadata.*injected.*restored"):
        prune_units(model, s, x, {"blocks.0.attn.head_dims": [1, 7], "blocks.1.attn.head_dims": [0]})
    assert {k: v for k, v in vars(model.blocks[0].attn).items() if not k.startswith("_")} == attrs
    for n, p in model.named_parameters():
        assert p is objects[n] and torch.equal(p, before[n])


def test_head_dim_pruned_timm_model_round_trips_through_save_pruned(tmp_path: Any) -> None:
    """load_pruned restores the head size; the fresh model's `scale` is the original one, as it must be."""
    torch.manual_seed(0)
    model = HD_CASES["timm:vit_tiny"].build().eval()
    x = _img()()
    s = trace(model, x, units=HD_UNITS, costs=False)
    prune_units(model, s, x, {"blocks.0.attn.head_dims": [3, 9], "blocks.1.attn.head_dims": [0]},
                trace_kwargs={"units": HD_UNITS, "costs": False})
    y = _call(model, x)
    save_pruned(model, tmp_path / "m.pt")
    torch.manual_seed(1)
    fresh = load_pruned(HD_CASES["timm:vit_tiny"].build().eval(), tmp_path / "m.pt")
    assert fresh.blocks[0].attn.head_dim == 62 and fresh.blocks[1].attn.head_dim == 63
    assert _rel(y, _call(fresh, x)) <= 1e-6


def test_head_dim_on_multihead_attention_is_not_prunable() -> None:
    """nn.MultiheadAttention derives its scale from head_dim: the group is in the IR but not prunable."""
    layer = nn.TransformerEncoderLayer(16, 2, 24, batch_first=True, dropout=0.0).eval()
    s = trace(layer, torch.randn(2, 5, 16), units=HD_UNITS)
    g = s.group_map["self_attn.head_dims"]
    assert (g.size, g.prunable) == (8, False) and "derives its attention scale from head_dim" in g.reason


def _toy_layout(kv: int, n_rep: int, hd: int, fused: bool) -> tuple[tuple[Param, ...], AttentionLayout]:
    """The parameters and attention layout of a fused (`qkv`/`proj`) or separate (`q`/`k`/`v`/`o`) attention."""
    nh = kv * n_rep
    a, akv, hidden = nh * hd, kv * hd, 3
    if fused:
        params = (Param("qkv.weight", (a + 2 * akv, hidden)), Param("proj.weight", (hidden, a)))
        segs = (Segment("qkv.weight", 0, 0, "q"), Segment("qkv.weight", 0, a, "k"),
                Segment("qkv.weight", 0, a + akv, "v"), Segment("proj.weight", 1, 0, "o"))
    else:
        params = (Param("q.weight", (a, hidden)), Param("k.weight", (akv, hidden)), Param("v.weight", (akv, hidden)),
                  Param("o.weight", (hidden, a)))
        segs = (Segment("q.weight", 0, 0, "q"), Segment("k.weight", 0, 0, "k"), Segment("v.weight", 0, 0, "v"),
                Segment("o.weight", 1, 0, "o"))
    return params, AttentionLayout("attn", "test", nh, kv, hd, segs, ())


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 3), st.integers(1, 3), st.integers(1, 4), st.booleans())
def test_head_dim_group_index_property(kv: int, n_rep: int, hd: int, fused: bool) -> None:
    """Entry d of every q/k/v head and output column maps to unit d, for MHA and GQA, fused and separate
    layouts; per-unit sums equal a loop over heads and dims."""
    nh = kv * n_rep
    params, lay = _toy_layout(kv, n_rep, hd, fused)
    kind = lay.kind(HD_UNITS)
    g = _head_group(lay, kind, Structure(params, ()), HD_UNITS)
    assert (kind, g.name, g.size, g.prunable) == ("head_dim", "attn.head_dims", hd, True)
    s = Structure(params, (g,))
    gen = torch.Generator().manual_seed(nh * 7 + hd)
    p = {x.name: torch.randn(x.shape, generator=gen, dtype=torch.float64) for x in params}
    want = np.zeros(hd)
    for seg in lay.segments:
        w = p[seg.param] if seg.axis == 0 else p[seg.param].t()
        for h in range(kv if seg.role in ("k", "v") else nh):
            for d in range(hd):
                want[d] += float(w[seg.offset + h * hd + d].pow(2).sum())
    np.testing.assert_allclose(reference_unit_values(s, p)["sumsq"], want, rtol=1e-12)
    np.testing.assert_allclose(wtcore.compile(s, ["unit_sumsq"])(p)["unit_sumsq"].numpy(), want, rtol=1e-9)


# ============================================================================================ checkpoints
def _prune_llama(model: nn.Module, x: torch.Tensor, plan: dict[str, list[int]]) -> torch.Tensor:
    s = trace(model, x)
    keep = keep_from_removed(s, plan)
    apply_masks(model, s, keep)
    prune_units(model, s, x, keep)
    return _call(model, x)


def test_hf_save_pretrained_round_trip(tmp_path: Any) -> None:
    from wtfront.integrations.transformers import save_pretrained

    torch.manual_seed(0)
    model = _llama().eval()
    x = _ids()()
    plan = {"model.layers.0.self_attn.kv_heads": [1], "model.layers.1.self_attn.kv_heads": [0],
            "model.layers.0.mlp.gate_proj.out": list(range(0, 48, 4)),
            "model.layers.1.mlp.gate_proj.out": list(range(1, 48, 4))}
    y = _prune_llama(model, x, plan)
    cfg = model.config
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size) == (4, 1, 4, 36)
    save_pretrained(model, tmp_path / "hf")
    fresh = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert torch.equal(_call(fresh, x), y)


@pytest.mark.parametrize("name", ["hf:Qwen2ForCausalLM", "hf:MistralForCausalLM", "hf:GPT2LMHeadModel",
                                  "hf:ViTModel"])
def test_hf_save_pretrained_round_trip_other_families(name: str, tmp_path: Any) -> None:
    """Grouped-query families with KV heads and MLP features pruned evenly; GPT-2 and ViT (whose configs derive
    the head size from the hidden size) with MLP features only."""
    from wtfront.integrations.transformers import save_pretrained

    case = CASES[name]
    torch.manual_seed(0)
    model = case.build().eval()
    x = case.inputs()
    s = trace(model, x)
    plan = {g.name: list(range(i % 2, g.size, 4)) for i, g in enumerate(s.groups) if g.kind == "mlp_feature"}
    if case.kv_heads < case.heads:
        plan.update({g.name: [i % 2] for i, g in enumerate(s.groups) if g.kind == "kv_head"})
    keep = keep_from_removed(s, plan)
    apply_masks(model, s, keep)
    prune_units(model, s, x, keep)
    y = _call(model, x)
    save_pretrained(model, tmp_path / "hf")
    fresh = type(model).from_pretrained(tmp_path / "hf").eval()
    assert torch.equal(_call(fresh, x), y)


def test_uneven_heads_refuse_save_pretrained_but_save_pruned_works(tmp_path: Any) -> None:
    from wtfront.integrations.transformers import ConfigMismatch, save_pretrained

    torch.manual_seed(0)
    model = _llama().eval()
    x = _ids()()
    y = _prune_llama(model, x, {"model.layers.0.self_attn.kv_heads": [1]})  # layer 1 keeps both KV heads
    with pytest.raises(ConfigMismatch, match=r"cannot express.*q_proj.*save_pruned"):
        save_pretrained(model, tmp_path / "hf")
    save_pruned(model, tmp_path / "pruned.pt")
    fresh = load_pruned(_llama(), tmp_path / "pruned.pt").eval()
    assert torch.equal(_call(fresh, x), y)
    assert fresh.model.layers[0].self_attn.num_key_value_groups == 4


def test_bert_head_pruning_saves_with_save_pruned(tmp_path: Any) -> None:
    """BERT's config derives the head size from hidden_size / num_attention_heads: pruned heads are not
    expressible there, but save_pruned / load_pruned restore them (metadata synced by the hooks)."""
    from wtfront.integrations.transformers import ConfigMismatch, save_pretrained

    case = CASES["hf:BertModel"]
    torch.manual_seed(0)
    model = case.build().eval()
    x = case.inputs()
    s = trace(model, x)
    keep = keep_from_removed(s, {"encoder.layer.0.attention.self.heads": [2],
                                 "encoder.layer.1.attention.self.heads": [0]})
    apply_masks(model, s, keep)
    prune_units(model, s, x, keep)
    y = _call(model, x)
    with pytest.raises(ConfigMismatch):
        save_pretrained(model, tmp_path / "hf")
    save_pruned(model, tmp_path / "bert.pt")
    fresh = load_pruned(case.build(), tmp_path / "bert.pt").eval()
    assert torch.equal(_call(fresh, x), y)
    assert fresh.encoder.layer[0].attention.self.num_attention_heads == 3


def test_torch_mha_pruned_heads_forward_matches_fake_pruning_with_masks() -> None:
    """nn.MultiheadAttention cannot run its own forward with fewer heads than embed_dim / head_dim; the synced
    module runs an equivalent forward (also with need_weights and a key padding mask)."""
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp = nn.Linear(3, 8)
            self.attn = nn.MultiheadAttention(8, 4, batch_first=True)
            self.out = nn.Linear(8, 2)

        def forward(self, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
            h = self.inp(x)
            a, w = self.attn(h, h, h, key_padding_mask=pad, need_weights=True)
            return self.out(a) + w.sum(-1, keepdim=True)

    net = Net().eval()
    x = torch.randn(2, 5, 3)
    pad = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    s = trace(net, (x, pad))
    assert s.group_map["attn.heads"].size == 4 and s.group_map["inp.out"].kind == "hidden"
    keep = keep_from_removed(s, {"attn.heads": [1, 2]})
    apply_masks(net, s, keep)
    with torch.no_grad():
        y_fake = net(x, pad)
    prune_units(net, s, (x, pad), keep)
    assert net.attn.num_heads == 2 and net.attn.in_proj_weight.shape == (12, 8)
    with torch.no_grad():
        assert _rel(y_fake, net(x, pad)) <= 1e-5


# ============================================================================================ properties
@settings(max_examples=40, deadline=None)
@given(st.integers(1, 4), st.integers(1, 4), st.integers(1, 3), st.booleans(), st.booleans())
def test_head_group_index_property(kv: int, n_rep: int, hd: int, fused: bool, slots: bool) -> None:
    """Every q/k/v row and output column of a head maps to the unit that owns that head, for fused and separate
    layouts, MHA and GQA, KV-head units and query-head slots; the per-unit sums equal a loop over heads."""
    nh = kv * n_rep
    params, lay = _toy_layout(kv, n_rep, hd, fused)
    units = ("head", "mlp_feature") if slots else ("head", "kv_head")
    kind = lay.kind(units)
    base = Structure(params, ())
    g = _head_group(lay, kind, base, units)
    s = Structure(params, (g,))
    gen = torch.Generator().manual_seed(nh * 7 + hd)
    p = {x.name: torch.randn(x.shape, generator=gen, dtype=torch.float64) for x in params}
    ref = reference_unit_values(s, p)["sumsq"]
    want = np.zeros(g.size)
    for seg in lay.segments:
        w = p[seg.param] if seg.axis == 0 else p[seg.param].t()
        count = kv if seg.role in ("k", "v") else nh
        for h in range(count):
            if seg.role in ("k", "v"):
                u = h if kind == "kv_head" or nh == kv else -1
            else:
                u = h if nh == kv else (h // n_rep if kind == "kv_head" else h % n_rep)
            if u >= 0:
                want[u] += float(w[seg.offset + h * hd: seg.offset + (h + 1) * hd].pow(2).sum())
    np.testing.assert_allclose(ref, want, rtol=1e-12)
    out = wtcore.compile(s, ["unit_sumsq"])(p)["unit_sumsq"]
    np.testing.assert_allclose(out.numpy(), want, rtol=1e-9)
    assert g.size == (nh if nh == kv else (kv if kind == "kv_head" else n_rep))


def test_discovery_reads_counts_from_weights_not_configs() -> None:
    """After pruning, heads are re-derived from the projection rows (the config is shared by all layers)."""
    model = _llama().eval()
    with torch.no_grad():
        attn = model.model.layers[1].self_attn
        for lin, rows in ((attn.q_proj, 16), (attn.k_proj, 4), (attn.v_proj, 4)):
            lin.weight = nn.Parameter(lin.weight[:rows].clone())
            lin.out_features = rows
        attn.o_proj.weight = nn.Parameter(attn.o_proj.weight[:, :16].clone())
        attn.o_proj.in_features = 16
    lays = {lay.module: lay for lay in discover_attention(model)}
    assert (lays["model.layers.0.self_attn"].num_heads, lays["model.layers.0.self_attn"].num_kv_heads) == (8, 2)
    assert (lays["model.layers.1.self_attn"].num_heads, lays["model.layers.1.self_attn"].num_kv_heads) == (4, 1)
    assert lays["model.layers.1.self_attn"].n_rep == 4 and lays["model.layers.1.self_attn"].head_dim == 4


@pytest.mark.parametrize("head_first", [True, False])
def test_maxxvit_attention2d_heads_follow_its_own_view(head_first: bool) -> None:
    """timm's `Attention2d` (CoAtNet/MaxxViT) views its qkv rows as `[heads, 3 * dim_head]` (head_first) or
    `[3, heads, dim_head]`: each head's rows are read off that view of `arange(rows)`, and its relative-position
    table column joins it; the heads stay whole (its forward reads the recorded head count)."""
    from functools import partial

    from timm.layers.pos_embed_rel import RelPosBias
    from timm.models.maxxvit import Attention2d

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 32, 1)
            self.attn = Attention2d(32, dim_head=8, head_first=head_first,
                                    rel_pos_cls=partial(RelPosBias, window_size=(4, 4)))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.attn(self.conv(x))

    model = Block().eval()
    structure = trace(model, torch.randn(1, 3, 4, 4))
    g = structure.group_map["attn.heads"]
    assert g.size == 4 and not g.prunable and "records the head count" in g.reason
    by = {(s.param, s.axis): s.index_list() for s in g.slices}
    rows = torch.arange(96)
    view = rows.view(4, 24) if head_first else rows.view(3, 4, 8).transpose(0, 1).reshape(4, 24)
    for h in range(4):
        assert sorted(i for i, u in enumerate(by[("attn.qkv.weight", 0)]) if u == h) == sorted(view[h].tolist())
        assert [i for i, u in enumerate(by[("attn.proj.weight", 1)]) if u == h] == list(range(8 * h, 8 * h + 8))
    assert by[("attn.rel_pos.relative_position_bias_table", 1)] == [0, 1, 2, 3]
