"""A trace error names every module that cannot be lowered at once, with the ignore= list that traces."""

from __future__ import annotations

import pytest
import torch
import transformers

from wtfront import trace
from wtfront.tracing.slicers import UnloweredModule


def test_qwen3_error_lists_q_norm_and_k_norm_and_its_suggestion_traces() -> None:
    cfg = transformers.Qwen3Config(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=8, num_key_value_heads=2, head_dim=8)
    model = transformers.Qwen3ForCausalLM(cfg).eval()
    inputs = {"input_ids": torch.randint(0, 128, (1, 8))}
    with pytest.raises(UnloweredModule) as info:
        trace(model, inputs)
    message = str(info.value)
    assert "q_norm" in message and "k_norm" in message
    assert sorted(info.value.ignore) == ["model.layers.*.self_attn.k_norm", "model.layers.*.self_attn.q_norm"]
    assert f"ignore={list(info.value.ignore)!r}" in message
    s = trace(model, inputs, ignore=list(info.value.ignore))  # one re-run with the suggestion traces
    assert sorted(s.uncoupled) == [f"model.layers.{i}.self_attn.{n}_norm.weight" for i in (0, 1) for n in "kq"]
