"""``planer export --gguf`` files run in llama.cpp itself (llama-cpp-python, a dev dependency built from source by
``make setup``): tiny Llamas with grouped key/value heads, a removed attention, a removed MLP, fewer query heads
and a narrower MLP give planer's logits at every position of a prompt and its greedy tokens."""

import json

import llama_cpp
import numpy as np
import pytest
import torch
from test_gguf import bpe  # noqa: F401 (fixture)
from test_gguf_export import MIXED, V, export, found_model, tokenizer  # noqa: F401 (fixtures)

from planer.errors import PlanerError
from planer.evaluation.generate import generate
from planer.latency.llamacpp import record, time_files
from planer.models.arch import Arch
from planer.report.details import in_llamacpp
from planer.report.rows import ModelRow

PROMPT = 8
GREEDY = 16
F32 = 0  # ggml_type of a float32 key/value cache (the default, f16, rounds keys and values)


def llama_cpp_run(path, prompt: list[int]) -> tuple[np.ndarray, list[int]]:
    """llama.cpp's logits for every prompt position and its next ``GREEDY`` greedy tokens (one thread: exact)."""
    llm = llama_cpp.Llama(
        str(path), n_ctx=PROMPT + GREEDY, n_threads=1, logits_all=True, verbose=False, type_k=F32, type_v=F32
    )
    llm.eval(prompt)
    logits = np.array(llm.scores[: len(prompt)])
    tokens = []
    for _ in range(GREEDY):
        tokens.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([tokens[-1]])
    return logits, tokens


@pytest.mark.parametrize(
    ("arch", "layout"),
    [(MIXED, "llama.cpp deci, 6 layers"), ("attn:4 ffl attn:4 ffl attn:4 ffl", "llama.cpp llama, 3 layers")],
)
def test_llama_cpp_computes_planers_logits_and_tokens(tmp_path, tokenizer, capsys, arch, layout):  # noqa: F811
    model = found_model(tmp_path / "found", arch, tokenizer)
    assert layout in export(tmp_path / "found", tmp_path / "m.gguf", capsys)
    prompt = torch.randint(1, V, (PROMPT,), generator=torch.Generator().manual_seed(0)).tolist()
    theirs, their_tokens = llama_cpp_run(tmp_path / "m.gguf", prompt)
    with torch.no_grad():
        ours = model(torch.tensor([prompt]))[0][0].numpy()
    assert np.abs(theirs - ours).max() <= 1e-3
    assert their_tokens == generate(model, prompt, GREEDY, temperature=0)


def test_timings_are_recorded_and_reported_beside_pytorchs(tmp_path, tokenizer, capsys):  # noqa: F811
    """Two exported files timed in llama.cpp: the baseline's speed-up is 1 and every other is the ratio of the
    medians; the record shows in the report's llama.cpp table with the run's PyTorch speed-up of the same name."""
    for name, arch in [("found", MIXED), ("baseline", "attn:4 ffl attn:4 ffl attn:4 ffl")]:
        found_model(tmp_path / name, arch, tokenizer)
        export(tmp_path / name, tmp_path / f"{name}.gguf", capsys)
    files = {name: tmp_path / f"{name}.gguf" for name in ("found", "baseline")}
    result = time_files(files, "baseline", prompt=8, decode=4, rounds=3, threads=1)
    base, found = result["models"]["baseline"], result["models"]["found"]
    assert base["decode_speedup"] == base["prefill_speedup"] == 1.0
    assert found["decode_speedup"] == pytest.approx(base["decode_ms"] / found["decode_ms"])
    assert found["bytes"] == files["found"].stat().st_size and result["rounds"] == 3
    path = record(tmp_path, result)
    row = ModelRow(name="found", path=tmp_path / "found", design="planer", arch=Arch.parse(MIXED),
                   bench={"batches": [{"batch": 1, "speedup": 1.25}]})  # fmt: skip
    lines = in_llamacpp(json.loads(path.read_text()), [row])
    assert lines[0] == "## In llama.cpp" and "llama-cpp-python 0.3.36" in lines[2]
    found_line = next(line for line in lines if line.startswith("| found |"))
    assert f"{found['decode_speedup']:.2f}x" in found_line and found_line.endswith("| 1.25x |")
    assert next(line for line in lines if line.startswith("| baseline |")).endswith("| 1.00x | 1.00x | – |")
    with pytest.raises(PlanerError, match="llamacpp.json is damaged"):
        in_llamacpp({"runtime": "llama.cpp", "models": {"found": {}}}, [row])
