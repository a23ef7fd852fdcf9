"""``planer export --hf OUT --format decilm``, offline, on a tiny random Llama: the DeciLM / Nemotron-NAS folder
loads with trust_remote_code from a copy of itself alone and equals planer's logits and greedy decoding; its
block_configs carry the fields vLLM and llama.cpp read; a model DeciLM cannot hold is refused in one line."""

import json

import pytest
import torch
from test_hf_export import PROMPT, V, export, found_model, logits_close, moved, tokenizer  # noqa: F401 (fixture)

from planer.cli import main
from planer.evaluation.generate import generate
from planer.models.gpt import decilm

transformers = pytest.importorskip("transformers")

# 64-wide with 4 query heads over 2 key/value heads and MLPs of 512 units: the loaders' widths are multiples of
# 256, so ffl (512) and ffl:256 fit. Layer 0's attention is skipped (the cache's layer 0 is layer 1's), layer 2
# shares one key/value head and has no MLP.
SIZES = dict(d_model=64, n_head=4, d_inner=512)
FITS = "skip ffl attn:4 ffl:256 attn:4/kv1 skip attn:4 ffl"


def decilm_model(folder, arch: str, tokenizer):  # noqa: F811 (the fixture)
    return found_model(folder, "llama", arch, tokenizer, **SIZES)


def test_fitting_model_loads_and_equals_planer(tmp_path, tokenizer, capsys):  # noqa: F811 (the fixture)
    """The folder alone, moved elsewhere, loads with trust_remote_code; logits and 16 greedy tokens are planer's."""
    model = decilm_model(tmp_path / "found", FITS, tokenizer)
    assert "DeciLMForCausalLM" in export(tmp_path / "found", tmp_path / "hf", capsys, "--format", "decilm")
    folder = moved(tmp_path / "hf", tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, local_files_only=True)
    hf.eval()
    assert type(hf).__name__ == "DeciLMForCausalLM" and hf.config.block_configs[1].ffn.ffn_mult == 6.0
    logits_close(hf, model, torch.randint(0, V, (2, 20)))
    with torch.no_grad():
        expected = generate(model, PROMPT, 16, temperature=0)
        got = hf.generate(torch.tensor([PROMPT]), max_new_tokens=16, do_sample=False)[0, len(PROMPT) :].tolist()
    assert got == expected and len(set(expected)) > 2


def test_config_and_tensors_have_the_loaders_names(tmp_path, tokenizer, capsys):  # noqa: F811 (the fixture)
    """block_configs as vLLM and llama.cpp read them; Llama's tensor names, none for a skipped block."""
    decilm_model(tmp_path / "found", FITS, tokenizer)
    export(tmp_path / "found", tmp_path / "hf", capsys, "--format", "decilm")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["architectures"], config["model_type"]) == (["DeciLMForCausalLM"], "nemotron-nas")
    assert config["num_hidden_layers"] == 4 and config["num_attention_heads"] == 4
    assert config["block_configs"][2] == {
        "attention": {"no_op": False, "replace_with_linear": False, "n_heads_in_group": 4},
        "ffn": {"no_op": True, "replace_with_linear": False, "ffn_mult": None},
    }
    assert config["block_configs"][0]["attention"]["n_heads_in_group"] is None
    assert [b["ffn"]["ffn_mult"] for b in config["block_configs"]] == [12.0, 6.0, None, 12.0]
    from safetensors import safe_open

    with safe_open(tmp_path / "hf" / "model.safetensors", "pt") as f:
        names = set(f.keys())
        assert f.get_slice("model.layers.2.self_attn.k_proj.weight").get_shape() == [16, 64]
    assert "model.layers.1.self_attn.q_proj.weight" in names and "lm_head.weight" in names
    assert not any(n.startswith(("model.layers.0.self_attn", "model.layers.0.input_layernorm")) for n in names)
    assert not any(n.startswith(("model.layers.2.mlp", "model.layers.2.post_attention")) for n in names)


def test_width_formula_is_the_loaders():
    """ffn_mult gives back every multiple of 256 and nothing else; the modeling file's formula is the exporter's."""
    from planer.models.gpt.modeling_decilm import intermediate_size

    for hidden in (64, 576, 4096, 8192):
        assert [w for w in range(1, 3000) if decilm.ffn_mult(w, hidden)] == list(range(256, 3000, 256))
        for mult in (0.5, 1.3125, 2.625, 4.0, 5.25):
            assert intermediate_size(mult, hidden) == decilm.intermediate_size(mult, hidden)


@pytest.mark.parametrize(
    ("arch", "says"),
    [
        ("attn:2 ffl attn:4 ffl", "block 0 (attn:2) keeps 2 of 4 query heads; DeciLM keeps all of them"),
        ("attn:4 ffl:300 attn:4 ffl", "block 1 (ffl:300) has 300 hidden units"),
        ("attn:4 moe:top1 attn:4 ffl", "block 1 (moe:top1) is a mixture of experts"),
        ("ffl attn:4 attn:4 ffl", "block 0 (ffl) stands where a layer's attention goes"),
    ],
)
def test_misfits_are_refused_in_one_line(tmp_path, tokenizer, capsys, arch, says):  # noqa: F811 (the fixture)
    decilm_model(tmp_path / "found", arch, tokenizer)
    capsys.readouterr()
    assert main(["export", "--run", str(tmp_path / "found"), "--hf", str(tmp_path / "hf"), "--format", "decilm"]) == 2
    err = capsys.readouterr().err
    assert f"cannot write DeciLM: {says}" in err and err.count("\n") == 1 and not (tmp_path / "hf").exists()
