"""`wt prune hf:... --save-pretrained DIR`: a folder from_pretrained reloads when the config can express the pruned
shapes, else a one-line error (the pruned checkpoint is written either way)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from wtfront import load_model, load_pruned
from wtfront.cli import main


@pytest.mark.slow
def test_save_pretrained_reloads_with_from_pretrained(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["prune", "hf:LlamaForCausalLM", "--kv-head-ratio", "0.5", "--mlp-ratio", "0.25", "--out",
                 str(tmp_path / "o"), "--save-pretrained", str(tmp_path / "hf")])
    assert code == 0, capsys.readouterr().err
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert reloaded.config.num_key_value_heads == 1 and reloaded.config.intermediate_size == 96
    pruned = load_pruned(load_model("hf:LlamaForCausalLM").model, tmp_path / "o" / "pruned.pt").eval()
    ids = torch.randint(0, reloaded.config.vocab_size, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, pruned(ids).logits)


def test_save_pretrained_refuses_uneven_widths(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["prune", "hf:LlamaForCausalLM", "--target-macs", "0.5", "--out", str(tmp_path / "o"),
                 "--save-pretrained", str(tmp_path / "hf")])
    err = capsys.readouterr().err
    assert code == 2 and "cannot express its pruned shapes" in err and "pruned.pt" in err
    assert (tmp_path / "o" / "pruned.pt").exists() and not (tmp_path / "hf").exists()
