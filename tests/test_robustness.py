"""Tracing robustness: Hugging Face LLMs, Swin Transformers, bounded group discovery, models on the meta device.

References are independent of the trace: the model's own forward with a hook that removes an MLP feature,
fp64 loops over slices (`wtcore.testing.reference_unit_values`), hand formulas for MACs, and the same model
traced on CPU with real weights.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from torch import nn

import wtcore
from wtcore.errors import TraceError
from wtcore.ir import Run, UnitGroup, runs_length, runs_to_list
from wtcore.ir import Slice as IrSlice
from wtcore.testing import reference_unit_values, structures, zero_units
from wtfront import trace
from wtfront.tracing import groups as groups_module
from wtfront.tracing.budget import Budget
from wtfront.tracing.coverage import mark_partial_coverage
from wtfront.tracing.graph import DependencyGraph
from wtfront.tracing.groups import WalkDiverged, WalkLimits, all_groups
from wtfront.tracing.inputs import forward_outputs
from wtfront.tracing.rotary import ROTARY_REASON
from wtfront.tracing.state import tracing_state
from wtfront.tracing.units import DEFAULT_UNITS

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

SEQ = 8


# --------------------------------------------------------------------------------------------- models
@dataclass
class LLM:
    """A small Hugging Face model, where its MLP features are removed, and a hand formula for its MACs."""

    name: str
    build: Callable[[], nn.Module]
    mlp_out: str  # glob-free name pattern of the MLP's output projection, "{i}" = layer
    layers: int
    macs: Callable[[int], int]  # sequence length -> MACs of one forward pass
    gqa: bool = False


def _llama_like(cls: str, cfg_cls: str, **extra: int) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        cfg = getattr(transformers, cfg_cls)(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                             num_attention_heads=8, num_key_value_heads=2, **extra)
        return getattr(transformers, cls)(cfg)

    return build


def llama_macs(s: int, h: int = 64, layers: int = 2, heads: int = 8, kv: int = 2, inter: int = 96, vocab: int = 128
               ) -> int:
    hd = h // heads
    return layers * (s * h * (2 * h + 2 * kv * hd) + 2 * heads * s * s * hd + 3 * s * h * inter) + s * h * vocab


def gpt2_macs(s: int, h: int = 64, layers: int = 2, vocab: int = 128) -> int:
    return layers * (4 * s * h * h + 2 * s * s * h + 2 * s * h * 4 * h) + s * h * vocab


def bert_macs(s: int, h: int = 64, layers: int = 2, inter: int = 96) -> int:
    return layers * (4 * s * h * h + 2 * s * s * h + 2 * s * h * inter) + h * h  # + pooler on the first token


LLMS = [
    LLM("llama", _llama_like("LlamaForCausalLM", "LlamaConfig"), "model.layers.{i}.mlp.down_proj", 2, llama_macs,
        gqa=True),
    LLM("qwen2", _llama_like("Qwen2ForCausalLM", "Qwen2Config"), "model.layers.{i}.mlp.down_proj", 2, llama_macs,
        gqa=True),
    LLM("mistral", _llama_like("MistralForCausalLM", "MistralConfig"), "model.layers.{i}.mlp.down_proj", 2,
        llama_macs, gqa=True),
    LLM("gpt2", lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=32)), "transformer.h.{i}.mlp.c_proj", 2, gpt2_macs),
    LLM("bert", lambda: transformers.BertModel(transformers.BertConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=32)), "encoder.layer.{i}.output.dense", 2, bert_macs),
]


def _outputs(model: nn.Module, params: dict[str, torch.Tensor], inputs: dict) -> torch.Tensor:
    out = torch.func.functional_call(model, params, (), inputs)
    return out[0] if isinstance(out, tuple) else next(iter(out.values()))


def _without_input_features(model: nn.Module, module: str, feats: list[int], inputs: dict) -> torch.Tensor:
    """The model's own output with features `feats` of `module`'s input set to zero (a forward pre-hook)."""

    def pre(m: nn.Module, args: tuple) -> tuple:
        x = args[0].clone()
        x[..., feats] = 0
        return (x, *args[1:])

    h = model.get_submodule(module).register_forward_pre_hook(pre)
    try:
        with torch.no_grad():
            return _outputs(model, dict(model.named_parameters()), inputs)
    finally:
        h.remove()


def _check_lasso_against_fp64(s: wtcore.Structure, model: nn.Module) -> None:
    """Per-unit sums of squares and group lasso of the program equal the float64 loops of wtcore.testing."""
    params64 = {k: v.detach().double() for k, v in model.named_parameters()}
    out = wtcore.compile(s, ["unit_sumsq", "group_lasso"])(params64)
    ref = reference_unit_values(s, params64)
    np.testing.assert_allclose(out["unit_sumsq"].numpy(), ref["sumsq"], rtol=1e-10)
    lasso = sum(float(np.sqrt(ref["count"][u] * ref["sumsq"][u])) for gg in s.groups if gg.prunable
                for u in range(s.offsets[gg.name], s.offsets[gg.name] + gg.size))
    assert out["group_lasso"].item() == pytest.approx(lasso, rel=1e-10)


# ------------------------------------------------------------------------------------ Hugging Face LLMs
@pytest.mark.parametrize("llm", LLMS, ids=[m.name for m in LLMS])
def test_hf_llm_traces_with_correct_feature_groups(llm: LLM) -> None:
    torch.manual_seed(0)
    model = llm.build().eval()
    inputs = {"input_ids": torch.randint(0, 128, (1, SEQ))}
    s = trace(model, inputs, budget_s=60, units=(*DEFAULT_UNITS, "hidden"))

    # the hidden width (when asked for) is one prunable group reaching every layer; each MLP has its own group
    hidden = s.groups[0]
    assert hidden.prunable and hidden.size == 64
    for i in range(llm.layers):
        assert any(sl.param.startswith(llm.mlp_out.format(i=i)) for sl in hidden.slices)
    mlp = [g for g in s.groups if any(sl.param == llm.mlp_out.format(i=i) + ".weight" for i in range(llm.layers)
                                      for sl in g.slices) and g is not hidden]
    assert len(mlp) == llm.layers and all(g.prunable for g in mlp)
    # prunable groups are closed: every parameter axis they touch is coupled to units entirely (GQA mis-couples
    # 16 of 64 query features)
    covered: dict[tuple[str, int], set[int]] = {}
    for g in s.groups:
        for sl in g.slices:
            covered.setdefault((sl.param, sl.axis), set()).update(
                i for i, u in enumerate(runs_to_list(sl.index)) if u >= 0)
    for g in s.groups:
        if g.prunable:
            for sl in g.slices:
                assert len(covered[sl.param, sl.axis]) == runs_length(sl.index), (g.name, sl.param, sl.axis)
    # attention: one head-level group per layer replaces Torch-Pruning's row groups (which rotary and grouped-query
    # attention mis-couple); under GQA a unit is a KV head with its query heads
    heads = [g for g in s.groups if g.kind in ("head", "kv_head")]
    assert len(heads) == llm.layers and all(g.prunable for g in heads)
    assert all(g.kind == ("kv_head" if llm.gqa else "head") for g in heads)

    # MACs: hand formula from the shapes
    assert sum(op.macs for op in s.ops) == llm.macs(SEQ)

    # zeroing an MLP feature's slices is the model with that feature removed (its own forward, hooked)
    g = mlp[0]
    layer = next(i for i in range(llm.layers) if any(sl.param == llm.mlp_out.format(i=i) + ".weight"
                                                     for sl in g.slices))
    feats = [1, 5]
    params = zero_units(s, dict(model.named_parameters()), [s.offsets[g.name] + u for u in feats])
    with torch.no_grad():
        got = _outputs(model, params, inputs)
    want = _without_input_features(model, llm.mlp_out.format(i=layer), feats, inputs)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    # group lasso and per-unit sums of squares against the fp64 loops
    _check_lasso_against_fp64(s, model)


def test_gpt2_conv1d_is_a_linear_layer() -> None:
    """HF Conv1D stores its weight [in, out]: the hidden width couples its rows, its out features its columns
    (TP alone prunes its last axis, coupling the hidden width to c_attn's out features)."""
    model = LLMS[3].build().eval()
    s = trace(model, {"input_ids": torch.randint(0, 128, (1, SEQ))})
    axes = {(sl.param, sl.axis) for sl in s.groups[0].slices}
    assert ("transformer.h.0.attn.c_attn.weight", 0) in axes and ("transformer.h.0.mlp.c_fc.weight", 0) in axes
    assert ("transformer.h.0.attn.c_attn.weight", 1) not in axes and "transformer.h.0.attn.c_attn.bias" not in {
        p for p, _ in axes}
    ops = {o.name: o for o in s.ops}
    fc = ops["transformer.h.0.mlp.c_fc"]
    assert [(a.name, a.size) for a in fc.axes] == [("out", 256), ("in", 64)]
    assert fc.axes[0].parts[0].group == "transformer.h.0.mlp.c_fc.out"


def test_gpt2_mlp_features_prune_physically() -> None:
    from wtfront import prune_units

    torch.manual_seed(0)
    model = LLMS[3].build().eval()
    inputs = {"input_ids": torch.randint(0, 128, (1, SEQ))}
    s = trace(model, inputs)
    new = prune_units(model, s, inputs, {"transformer.h.0.mlp.c_fc.out": list(range(0, 256, 3))})  # verifies
    assert model.transformer.h[0].mlp.c_fc.nf == 256 - 86 and new.group_map["transformer.h.0.mlp.c_fc.out"].size == 170


def test_fused_projections_root_no_group() -> None:
    """Phi-3 fuses q/k/v and gate/up into one Linear each, split along the features: TP would couple every part
    to the first part's consumers, so they root no TP group; their output axes are wt's units: heads not
    prunable (split at a model-wide count), gate/up features prunable (cut from the IR); the hidden width is a
    correct group (kind `hidden`, prunable with units=(..., "hidden"))."""
    cfg = transformers.Phi3Config(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                  num_attention_heads=8, num_key_value_heads=2, pad_token_id=0)
    model = transformers.Phi3ForCausalLM(cfg).eval()
    s = trace(model, {"input_ids": torch.randint(0, 128, (1, SEQ))})
    assert [g.name for g in s.groups] == [
        "model.embed_tokens.out", "model.layers.0.self_attn.kv_heads", "model.layers.1.self_attn.kv_heads",
        "lm_head.out", "model.layers.0.mlp.gate_up_proj.out", "model.layers.1.mlp.gate_up_proj.out"]
    assert [g.name for g in s.groups if g.prunable] == [f"model.layers.{i}.mlp.gate_up_proj.out" for i in range(2)]
    assert s.groups[0].kind == "hidden"
    hidden = trace(model, {"input_ids": torch.randint(0, 128, (1, SEQ))}, units=("kv_head", "mlp_feature", "hidden"))
    assert hidden.groups[0].prunable
    axes = {(sl.param, sl.axis) for sl in s.groups[0].slices}
    assert ("model.layers.0.mlp.gate_up_proj.weight", 1) in axes and ("model.layers.0.mlp.down_proj.weight", 0) in axes
    assert sum(op.macs for op in s.ops) == llama_macs(SEQ)


def test_head_norms_become_boundaries_as_if_ignored() -> None:
    """Qwen3's q_norm/k_norm normalize each head's head_dim with one shared weight: TP maps hidden channels
    onto it; they become boundaries with the reason, which traces what ignoring them traces."""
    cfg = transformers.Qwen3Config(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=8, num_key_value_heads=2, head_dim=8)
    model = transformers.Qwen3ForCausalLM(cfg).eval()
    inputs = {"input_ids": torch.randint(0, 128, (1, SEQ))}
    with pytest.warns(UserWarning, match=r"self_attn.[qk]_norm.weight'.*mis-maps it"):
        auto = trace(model, inputs)
    norms = {f"model.layers.{i}.self_attn.{n}_norm.weight" for i in (0, 1) for n in "kq"}
    assert {b for b, _ in auto.boundaries} == norms
    s = trace(model, inputs, ignore=["model.layers.*.self_attn.q_norm", "model.layers.*.self_attn.k_norm"])
    assert auto.groups == s.groups and auto.uncoupled == s.uncoupled
    assert [g.name for g in s.groups if g.prunable] == [
        f"model.layers.{i}.{n}" for i in (0, 1) for n in ("self_attn.kv_heads", "mlp.gate_proj.out")]
    assert sorted(s.uncoupled) == [f"model.layers.{i}.self_attn.{n}_norm.weight" for i in (0, 1) for n in "kq"]


# ------------------------------------------------------------------------------------------ meta device
def _llama_cfg(kv: int, attn: str) -> object:
    return transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                    num_attention_heads=8, num_key_value_heads=kv, attn_implementation=attn)


@pytest.mark.parametrize(("kv", "attn"), [(8, "sdpa"), (2, "eager")])
def test_meta_llama_matches_cpu(kv: int, attn: str) -> None:
    """A Llama built on the meta device (no weights) traces to the same structure and MACs as on CPU."""
    cfg = _llama_cfg(kv, attn)
    with torch.device("meta"):
        meta = transformers.LlamaForCausalLM(cfg)
    assert all(p.is_meta for p in meta.parameters())
    cpu = transformers.LlamaForCausalLM(cfg).eval()
    s_meta = trace(meta, {"input_ids": torch.zeros(1, SEQ, dtype=torch.long, device="meta")})
    s_cpu = trace(cpu, {"input_ids": torch.randint(0, 128, (1, SEQ))})
    assert s_meta == s_cpu
    assert sum(o.macs for o in s_meta.ops) == llama_macs(SEQ, kv=kv)
    heads = [g for g in s_meta.groups if g.kind in ("head", "kv_head")]
    assert len(heads) == 2 and all(g.prunable for g in heads)
    # without head discovery, Torch-Pruning's row groups through rotate_half are reported, not mis-coupled
    legacy = trace(meta, {"input_ids": torch.zeros(1, SEQ, dtype=torch.long, device="meta")},
                   heads={f"model.layers.{i}.self_attn": None for i in (0, 1)})
    assert ROTARY_REASON in legacy.group_map["model.layers.0.self_attn.q_proj.out"].reason
    assert not legacy.group_map["model.layers.0.self_attn.q_proj.out"].prunable


def test_rotate_half_is_not_element_wise() -> None:
    """Zeroing entry d of q and k does not remove it from the rotated q and k (it comes back from d ± head_dim/2),
    so a group whose channels pass through rotate_half is not prunable."""
    from test_trace import Rope

    model = Rope()
    s = trace(model, torch.randn(1, 4, 8))
    assert not s.group_map["q.out"].prunable and ROTARY_REASON in s.group_map["q.out"].reason
    q = torch.randn(3, 8)
    q[:, 2] = 0
    rotated = q + 0.5 * Rope.rot(q)  # what the model computes from q
    assert (rotated[:, 2] == 0.5 * -q[:, 6]).all() and (rotated[:, 2] != 0).all()


# ------------------------------------------------------------------------------------- bounded discovery
def test_walk_limits_stop_a_growing_walk() -> None:
    """An index set past the limit raises WalkDiverged naming the node, instead of walking on."""
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18(weights=None).eval()
    with tracing_state(model):
        dg = DependencyGraph(Budget(60))
        dg.build_dependency(model, example_inputs=(torch.randn(1, 3, 32, 32),), forward_fn=forward_outputs,
                            verbose=False)
    roots = (nn.Conv2d, nn.Linear)
    assert len(list(all_groups(dg, [], roots, WalkLimits.for_model(model)))) > 5
    with pytest.raises(WalkDiverged) as e:
        list(all_groups(dg, [], roots, WalkLimits(max_index=32, max_total=1 << 20)))
    assert e.value.value > 32 and e.value.node is not None
    with pytest.raises(WalkDiverged, match="index entries of the group"):
        list(all_groups(dg, [], roots, WalkLimits(max_index=1 << 20, max_total=600)))
    assert WalkLimits.for_model(model, slack=100) == WalkLimits(max_index=100 * 1000, max_total=1 << 25)


def test_partly_coupled_axis_makes_groups_not_prunable() -> None:
    full = IrSlice("a.weight", 0, (Run(4, 0),))
    part = IrSlice("b.weight", 0, (Run(2, 0), Run(2, -1, 0)))
    groups = [UnitGroup("a.out", "feature", 4, (full,)), UnitGroup("b.out", "feature", 2, (part,)),
              UnitGroup("c.out", "feature", 4, (IrSlice("c.weight", 1, (Run(4, 0),)),), prunable=False,
                        reason="feeds the model output")]
    shapes = {"a.weight": (4, 3), "b.weight": (4, 3), "c.weight": (2, 4)}
    out = mark_partial_coverage(groups, shapes)
    assert [g.prunable for g in out] == [True, False, False]
    assert "only 2 of the 4 entries of 'b.weight' axis 0" in out[1].reason
    assert out[2].reason == "feeds the model output"
    # the rest of the axis covered by another group: closed again
    rest = UnitGroup("d.out", "feature", 2, (IrSlice("b.weight", 0, (Run(2, -1, 0), Run(2, 0))),))
    assert all(g.prunable for g in mark_partial_coverage([*groups[:2], rest], shapes))


@settings(max_examples=60, deadline=None)
@given(structures())
def test_partial_coverage_marking_matches_elementwise_reference(s: wtcore.Structure) -> None:
    """A group stays as it is iff every (param, axis) it touches is covered entry by entry by some group."""
    covered: dict[tuple[str, int, int], set[int]] = {}  # per layout (a grouped conv's axis is longer)
    for g in s.groups:
        for sl in g.slices:
            covered.setdefault((sl.param, sl.axis, sl.groups), set()).update(
                i for i, u in enumerate(runs_to_list(sl.index)) if u >= 0)
    shapes = {p.name: p.shape for p in s.params}
    out = mark_partial_coverage(list(s.groups), shapes)
    for g, h in zip(s.groups, out):
        closed = all(len(covered[sl.param, sl.axis, sl.groups]) == runs_length(sl.index) for sl in g.slices)
        assert (h == g) if closed else (not h.prunable and "not closed" in h.reason and h.slices == g.slices)


# ------------------------------------------------------------------------------------------------- Swin
_CHILD = textwrap.dedent("""
    import json, resource, sys, time, warnings
    warnings.simplefilter("ignore")
    import torch
    from wtfront import trace
    if sys.argv[1] == "torchvision":
        import torchvision
        model = torchvision.models.swin_t(weights=None).eval()
    else:
        import timm
        model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False).eval()
    x = torch.randn(1, 3, 224, 224)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.monotonic()
    prunable = []
    try:
        s = trace(model, x, budget_s=60, costs=False)
        error = None
        prunable = [g.name for g in s.groups if g.prunable]
    except Exception as e:
        error = f"{type(e).__name__}: {e}"
    print(json.dumps({"seconds": time.monotonic() - t0, "error": error, "prunable": prunable,
                      "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "growth_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024}))
""")


def _trace_in_child(which: str) -> dict:
    """Trace in a fresh process, so its peak RSS is the trace's own (bounded by a 6 GB address-space cap)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-c", f"import resource; resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))\n"
           f"{_CHILD}", which]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=170, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize(("which", "mlp"), [("torchvision", ".mlp.0.out"), ("timm", ".mlp.fc1.out")])
def test_swin_traces_fast_and_bounded_with_its_mlps_prunable(which: str, mlp: str) -> None:
    """Torch-Pruning's walks diverge or mis-map around window attention: they are contained (not prunable),
    and the MLP of every block roots its own prunable group."""
    pytest.importorskip("torchvision" if which == "torchvision" else "timm")
    r = _trace_in_child(which)
    assert r["error"] is None, r
    assert len([n for n in r["prunable"] if n.endswith(mlp)]) == 12, r
    assert r["seconds"] < 60 and r["growth_mb"] < 1500, r


@pytest.mark.slow
def test_timm_swin_mlp_features_with_attention_ignored() -> None:
    """Following the error's advice (ignore the attention modules) gives correct MLP feature groups."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False).eval()
    x = torch.randn(1, 3, 224, 224)
    s = trace(model, x, ignore="*.attn", costs=False)
    mlp = [g for g in s.groups if g.name.endswith(".mlp.fc1.out")]
    assert len(mlp) == 12 and all(g.prunable and g.size == model.get_submodule(g.root).out_features for g in mlp)
    g = s.group_map["layers.1.blocks.1.mlp.fc1.out"]
    feats = [0, 7]
    params = zero_units(s, dict(model.named_parameters()), [s.offsets[g.name] + u for u in feats])
    with torch.no_grad():
        got = torch.func.functional_call(model, params, (x,))
        h = model.get_submodule("layers.1.blocks.1.mlp.fc2").register_forward_pre_hook(
            lambda m, a: (a[0].index_fill(-1, torch.tensor(feats), 0.0),))
        try:
            want = model(x)
        finally:
            h.remove()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    _check_lasso_against_fp64(s, model)


def test_trace_error_is_raised_for_a_diverging_walk(monkeypatch: pytest.MonkeyPatch) -> None:
    """trace() turns WalkDiverged it cannot contain into a TraceError naming the group's root and the nearest
    module."""
    torchvision = pytest.importorskip("torchvision")
    monkeypatch.setattr(WalkLimits, "for_model", staticmethod(lambda model, slack=4: WalkLimits(max_index=40)))
    monkeypatch.setattr(groups_module, "MAX_CONTAINED", 0)
    with pytest.raises(TraceError, match=r"diverge while collecting the group of '.*' \(.*\).* next to '"):
        trace(torchvision.models.resnet18(weights=None), torch.randn(1, 3, 32, 32), costs=False)
