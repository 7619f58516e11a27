"""The `wt` command: model references, `inspect`, `bench`, `prune`, help texts and one-line errors.

`wt analyze` is tested end to end in tests/test_analyze.py; the `wt` lines of the docs run in tests/test_docs.py.
"""

from __future__ import annotations

import argparse
import inspect
import math
import re
from pathlib import Path

import pytest
import torch
import torchvision

import wtcore
from wtcore.errors import WtError
from wtfront import load_model, trace
from wtfront.cli import build_parser, main, parse_spec
from wtfront.cli.benchmark import floor_ratios, interleaved_medians
from wtfront.cli.models import parse_config_overrides, parse_input_shape

HAS_HEADS = "heads" in inspect.signature(trace).parameters
HAS_UNITS = "units" in inspect.signature(trace).parameters


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# ------------------------------------------------------------------------------------------------------- help
def test_help_texts(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    top = capsys.readouterr().out
    for word in ("inspect", "analyze", "prune", "bench", "torchvision:NAME", "hf:ARCH", "module.path:callable",
                 "1 MAC = one multiply-add"):
        assert word in top
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) == {"inspect", "analyze", "prune", "bench"}
    for name, p in sub.choices.items():
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        assert e.value.code == 0
        text = capsys.readouterr().out
        assert p.description and len(p.description) > 80 and "--input" in text and "--ignore" in text
        for action in p._actions:  # every option says what it does
            assert action.help, f"wt {name}: {action.dest} has no help"


# ------------------------------------------------------------------------------------------ model references
def test_input_and_config_parsing() -> None:
    assert parse_input_shape("1,3,224,224") == (1, 3, 224, 224)
    assert parse_input_shape("1x3x64x64") == (1, 3, 64, 64)
    assert parse_input_shape("32") == (32,)
    with pytest.raises(WtError, match="--input"):
        parse_input_shape("1,a")
    with pytest.raises(WtError, match="positive"):
        parse_input_shape("0,3")
    assert parse_config_overrides(["num_hidden_layers=4", "hidden_act=gelu", "x=[1, 2]", "f=1e-3"]) == {
        "num_hidden_layers": 4, "hidden_act": "gelu", "x": [1, 2], "f": 1e-3}
    with pytest.raises(WtError, match="key=value"):
        parse_config_overrides(["nope"])
    spec = parse_spec("active_macs:tolerance=1e-3")
    assert spec == wtcore.Spec("active_macs", tolerance=1e-3)
    with pytest.raises(WtError, match="no option 'bogus'"):
        parse_spec("active_macs:bogus=1")


def test_hf_references(tmp_path: Path) -> None:
    llama = load_model("hf:LlamaForCausalLM", (32,), {"num_hidden_layers": 1})
    assert type(llama.model).__name__ == "LlamaForCausalLM" and llama.model.config.num_hidden_layers == 1
    assert llama.model.config.hidden_size == 64 and llama.example_inputs["input_ids"].shape == (1, 32)
    gpt2 = load_model("hf:GPT2LMHeadModel", (2, 8))
    assert gpt2.model.config.n_embd == 64 and gpt2.example_inputs["input_ids"].shape == (2, 8)
    assert gpt2.model.config.eos_token_id < gpt2.model.config.vocab_size  # small vocab, ids moved inside it
    vit = load_model("hf:ViTForImageClassification")
    assert vit.example_inputs["pixel_values"].shape == (1, 3, 32, 32)
    # a save_pretrained folder, with its weights
    llama.model.save_pretrained(tmp_path / "llama")
    again = load_model(f"hf:{tmp_path / 'llama'}", (32,))
    for (k, a), (_, b) in zip(llama.model.state_dict().items(), again.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    with pytest.raises(WtError, match="has no key 'num_hiden_layers'"):
        load_model("hf:LlamaForCausalLM", config={"num_hiden_layers": 1})
    with pytest.raises(WtError, match=r"no config\.json"):
        load_model(f"hf:{tmp_path}")


def test_constructor_options_and_own_modules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    r = load_model("torchvision:resnet18", (1, 3, 32, 32), {"num_classes": 7})
    assert r.model.fc.out_features == 7 and r.example_inputs.shape == (1, 3, 32, 32)
    (tmp_path / "my_models.py").write_text(
        "import torch\n\ndef tiny(width=4):\n"
        "    return torch.nn.Sequential(torch.nn.Conv2d(3, width, 3), torch.nn.ReLU(), torch.nn.Conv2d(width, 2, 1))\n"
    )
    (tmp_path / "my_lm.py").write_text(
        "import torch\n\ndef lm():\n"
        "    return torch.nn.Sequential(torch.nn.Embedding(50, 8), torch.nn.Linear(8, 16), torch.nn.Linear(16, 50))\n"
    )
    monkeypatch.chdir(tmp_path)
    own = load_model("my_models:tiny", (1, 3, 8, 8), {"width": 5})
    assert own.model[0].out_channels == 5
    s = trace(own.model, own.example_inputs)
    assert [g.size for g in s.groups] == [5, 2]
    lm = load_model("my_lm:lm", (12,))  # starts with an embedding: a token length gives token ids
    assert lm.example_inputs.shape == (1, 12) and lm.example_inputs.dtype == torch.long
    assert int(lm.example_inputs.max()) < 50
    assert [g.size for g in trace(lm.model, lm.example_inputs).groups] == [8, 16, 50]


# ------------------------------------------------------------------------------------------------- inspect
def test_inspect_cnn(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)  # the command builds its model from the global RNG, so the reference gets the same weights
    code, out, err = run(capsys, "inspect", "torchvision:resnet18", "--input", "1,3,64,64", "--rows", "0",
                         "--json", str(tmp_path / "s.json"))
    assert code == 0, err
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    structure = trace(model, torch.randn(1, 3, 64, 64))
    saved = wtcore.Structure.from_json((tmp_path / "s.json").read_text())
    assert saved == structure  # the same IR as a direct trace
    for g in structure.groups:
        assert g.name in out
    for o in structure.ops:
        assert o.name in out
    assert "no: feeds the model output" in out  # why the classifier's units are not prunable
    assert "1 MAC = one multiply-add" in out
    total = sum(o.macs for o in structure.ops)
    assert f"{total / 1e6:.3g}M MACs" in out
    assert "3880/3880 units active in 13 groups" in out
    gl = re.search(r"group_lasso\s+([0-9.e+]+)", out).group(1)
    with torch.no_grad():
        ref = float(wtcore.compile(structure, ["group_lasso"])(dict(model.named_parameters()))["group_lasso"])
    assert gl == f"{ref:.6g}"


def test_inspect_vit_program(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "inspect", "hf:ViTForImageClassification", "--heads", "--program", "group_lasso",
                         "active_macs:tolerance=0.0")
    assert code == 0, err
    ref = load_model("hf:ViTForImageClassification")
    structure = trace(ref.model, ref.example_inputs)
    assert "def wt_program" in out and "scatter_add(" in out  # the generated code
    assert f"program over ViTForImageClassification [{structure.fingerprint}]" in out
    total = float(re.search(r"active_macs/total\s+([0-9.e+]+)", out).group(1))
    assert total == pytest.approx(sum(o.macs for o in structure.ops), rel=1e-5)  # dense weights: all MACs active
    if HAS_HEADS:
        assert "Attention heads" in out
    else:
        assert "has no heads option" in err and "Attention heads" not in out


def test_units_option(capsys: pytest.CaptureFixture[str]) -> None:
    """`--units` reaches the trace's unit-kind option (attention heads) when it has one, else is a clear error."""
    code, out, err = run(capsys, "inspect", "hf:BertModel", "--units", "head", "--rows", "0")
    if HAS_UNITS:
        assert code == 0 and "Attention heads" in out, err
    else:
        assert code == 2 and err.startswith("wt: error: --units needs") and len(err.strip().splitlines()) == 1


def test_inspect_llm_token_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "inspect", "hf:LlamaForCausalLM", "--input", "32", "--config",
                         "num_hidden_layers=1", "--ignore", "lm_head", "--json", str(tmp_path / "s.json"))
    assert code == 0, err
    s = wtcore.Structure.from_json((tmp_path / "s.json").read_text())
    assert not any(g.name.startswith("lm_head") for g in s.groups)  # --ignore reached the trace
    assert any(p.name.startswith("model.layers.0.") for p in s.params)
    assert not any(p.name.startswith("model.layers.1.") for p in s.params)
    q = next(o for o in s.ops if o.name == "model.layers.0.self_attn.q_proj")
    assert q.macs == 32 * 64 * 64  # tokens x in x out: 1 MAC = one multiply-add
    assert "LlamaForCausalLM" in out


# --------------------------------------------------------------------------------------------------- bench
def test_interleaved_medians_runs_each_function_in_rounds() -> None:
    calls: list[str] = []
    med = interleaved_medians({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, reps=3, warmup=1)
    assert calls == ["a", "b"] * 4 and set(med) == {"a", "b"} and all(v >= 0 for v in med.values())


def test_bench(capsys: pytest.CaptureFixture[str]) -> None:
    import timm

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2)
    structure = trace(model, torch.randn(1, 3, 32, 32), costs=False)
    r = floor_ratios(structure, dict(model.named_parameters()), reps=2, warmup=1)
    assert math.isfinite(r.fwd) and r.fwd > 0 and math.isfinite(r.fwd_bwd) and r.fwd_bwd > 0 and r.reps == 2
    code, out, err = run(capsys, "bench", "timm:vit_tiny_patch16_224", "--config", "img_size=32", "depth=2",
                         "--input", "1,3,32,32", "--reps", "2")
    assert code == 0, err
    assert re.search(r"forward \d+\.\d\dx floor, forward\+backward \d+\.\d\dx floor", out)
    assert "wt fwd+bwd" in out and "floor fwd" in out


# --------------------------------------------------------------------------------------------------- prune
def _conv_linear_macs(model: torch.nn.Module, x: torch.Tensor) -> int:
    """fvcore's count (its "flops" are MACs) of the ops wt costs: convolutions and linear layers."""
    from fvcore.nn import FlopCountAnalysis

    by_op = FlopCountAnalysis(model, x).unsupported_ops_warnings(False).uncalled_modules_warnings(False).by_operator()
    return sum(v for k, v in by_op.items() if k in ("conv", "linear", "addmm", "matmul", "bmm", "einsum"))


def test_prune_cnn_to_target(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from wtfront import load_pruned

    x = torch.randn(1, 3, 64, 64)
    code, out, err = run(capsys, "prune", "torchvision:resnet18", "--input", "1,3,64,64", "--target-macs", "0.5",
                         "--max-fraction", "0.8", "--out", str(tmp_path))
    assert code == 0, err
    dense = _conv_linear_macs(torchvision.models.resnet18(weights=None).eval(), x)
    pruned = load_pruned(torchvision.models.resnet18(weights=None), tmp_path / "pruned.pt").eval()
    macs = _conv_linear_macs(pruned, x)
    assert 0.45 * dense < macs <= 0.5 * dense
    saved = wtcore.Structure.from_json((tmp_path / "structure.json").read_text())
    assert sum(o.macs for o in saved.ops) == macs and sum(o.baseline_macs for o in saved.ops) == dense
    assert all(g.size >= 0.2 * g.baseline_size - 1 for g in saved.groups)  # --max-fraction 0.8
    assert "Before → after" in out and f"{100 * macs / dense:.1f}% of the original" in out


@pytest.mark.slow
def test_prune_trained_weights_removes_the_zero_units(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A model whose units were zeroed in training: pruning to the MACs they leave removes exactly them, and the
    pruned model computes what the trained one did."""
    from wtfront import apply_masks, load_pruned

    torch.manual_seed(1)
    x = torch.randn(1, 3, 64, 64)
    model = torchvision.models.resnet18(weights=None).eval()
    structure = trace(model, x)
    mask = wtcore.compile(structure, wtcore.Spec("random_structured", amount=0.3, scope="local"))
    apply_masks(model, structure, mask(dict(model.named_parameters()))["random_structured"])
    with torch.no_grad():
        ratio = float(wtcore.compile(structure, ["active_macs"])(dict(model.named_parameters()))["active_macs/ratio"])
        y = model(x)
    torch.save(model.state_dict(), tmp_path / "trained.pt")
    code, _, err = run(capsys, "prune", "torchvision:resnet18", "--input", "1,3,64,64", "--weights",
                       str(tmp_path / "trained.pt"), "--target-macs", f"{ratio + 1e-6}", "--out", str(tmp_path / "o"))
    assert code == 0, err
    pruned = load_pruned(torchvision.models.resnet18(weights=None), tmp_path / "o" / "pruned.pt").eval()
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), y, rtol=1e-5, atol=1e-5)
    assert _conv_linear_macs(pruned, x) == round(ratio * _conv_linear_macs(torchvision.models.resnet18().eval(), x))


@pytest.mark.slow
def test_prune_vit_mlp_features(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import timm

    from wtfront import load_pruned

    code, _, err = run(capsys, "prune", "timm:vit_tiny_patch16_224", "--config", "img_size=32", "depth=2",
                         "--input", "1,3,32,32", "--target-macs", "0.7", "--method", "random", "--scope", "local",
                         "--groups", "*mlp.fc1.out", "--out", str(tmp_path))
    assert code == 0, err
    saved = wtcore.Structure.from_json((tmp_path / "structure.json").read_text())
    assert sum(o.macs for o in saved.ops) <= 0.7 * sum(o.baseline_macs for o in saved.ops)
    changed = {g.name: g.size for g in saved.groups if g.size != g.baseline_size}
    assert set(changed) == {"blocks.0.mlp.fc1.out", "blocks.1.mlp.fc1.out"}
    assert len(set(changed.values())) == 1  # local scope: the same fraction of every group
    fresh = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2)
    pruned = load_pruned(fresh, tmp_path / "pruned.pt").eval()
    assert pruned.blocks[0].mlp.fc1.out_features == changed["blocks.0.mlp.fc1.out"]
    assert pruned(torch.randn(2, 3, 32, 32)).shape == (2, 1000)


# -------------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["inspect", "resnet18"], "is not understood"),
        (["inspect", "torchvision:resnet_nope"], "torchvision has no model named 'resnet_nope'"),
        (["inspect", "timm:nope_net"], "timm cannot build 'nope_net'"),
        (["inspect", "hf:NoSuchModel"], "transformers has no model class 'NoSuchModel'"),
        (["inspect", "no_such_module_xyz:make"], "cannot import module 'no_such_module_xyz'"),
        (["inspect", "hf:/no/such/dir"], "no config.json"),
        (["inspect", "hf:BertModel", "--config", "num_layerz=1"], "BertConfig has no key 'num_layerz'"),
        (["inspect", "torchvision:resnet18", "--config", "bogus_option=1"], "does not take the --config options"),
        (["inspect", "torchvision:resnet18", "--input", "1,three"], "--input must be"),
        (["inspect", "torchvision:resnet18", "--input", "1,3,64,64", "--program", "no_such_spec"],
         "unknown spec 'no_such_spec'"),
        (["analyze", "torchvision:resnet18", "/no/such/ckpt.pt"], "checkpoint '/no/such/ckpt.pt' does not exist"),
        (["prune", "torchvision:resnet18", "--target-macs", "1.5", "--out", "x"], "--target-macs is a fraction"),
        (["inspect", "hf:BertModel", "--heads", "encoder.layer.0.attention=x"], "--heads takes MODULE=NUM_HEADS"),
        (["prune", "torchvision:resnet18", "--input", "1,3,32,32", "--target-macs", "0.5", "--groups", "nope*",
          "--out", "x"], "--groups nope* matches no prunable unit group"),
    ],
)
def test_errors_are_one_line(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, *argv)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("wt: error: "), err
    assert message in lines[0]


def test_wrong_architecture_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), tmp_path / "r34.pt")
    code, _, err = run(capsys, "analyze", "torchvision:resnet18", "--input", "1,3,32,32", str(tmp_path / "r34.pt"),
                       "--out", str(tmp_path / "out"))
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "does not fit ResNet" in lines[0] and "another architecture" in lines[0], err


# ------------------------------------------------------------------------------------------------------- docs
def test_api_reference_is_current() -> None:
    from wtfront.cli.apidoc import render

    path = Path(__file__).resolve().parent.parent / "docs" / "api.md"
    assert path.read_text() == render(), "docs/api.md is stale: run python -m wtfront.cli.apidoc > docs/api.md"


def test_unexpected_errors_are_one_line_too(monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    import wtfront.cli.models

    def broken(*args: object, **kwargs: object) -> None:
        raise ValueError("something\nunforeseen")

    monkeypatch.setattr(wtfront.cli.models, "load_model", broken)
    code, _, err = run(capsys, "inspect", "torchvision:resnet18")
    assert code == 3 and err.strip() == ("wt: error: unexpected ValueError: something unforeseen (set WT_TRACEBACK=1 "
                                         "for the traceback)")
    monkeypatch.setenv("WT_TRACEBACK", "1")
    with pytest.raises(ValueError, match="unforeseen"):
        main(["inspect", "torchvision:resnet18"])
