"""Every module wt cannot lower is reported at once: Qwen3's q_norm and k_norm are both named, with the reason,
in the one warning a trace gives, and the rest traces with no ignore= needed."""

from __future__ import annotations

import pytest
import torch
import transformers

from wtfront import trace
from wtfront.tracing.entry import OutsideGroups


def test_qwen3_names_q_norm_and_k_norm_in_one_trace() -> None:
    cfg = transformers.Qwen3Config(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=8, num_key_value_heads=2, head_dim=8)
    model = transformers.Qwen3ForCausalLM(cfg).eval()
    with pytest.warns(OutsideGroups) as caught:
        s = trace(model, {"input_ids": torch.randint(0, 128, (1, 8))})
    assert len(caught) == 1
    message = str(caught[0].message)
    norms = [f"model.layers.{i}.self_attn.{n}_norm.weight" for i in (0, 1) for n in "qk"]
    assert all(f"{n!r}: Torch-Pruning mis-maps it" in message for n in norms)
    assert sorted(s.uncoupled) == sorted(norms)
    assert sum(g.prunable for g in s.groups) >= 2  # the rest traces, with prunable groups
