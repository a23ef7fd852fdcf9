"""``planer export --gguf`` files run in llama.cpp itself (llama-cpp-python, a dev dependency built from source by
``make setup``): tiny Llamas with grouped key/value heads, a removed attention, a removed MLP, fewer query heads
and a narrower MLP give planer's logits at every position of a prompt and its greedy tokens."""

import llama_cpp
import numpy as np
import pytest
import torch
from test_gguf import bpe  # noqa: F401 (fixture)
from test_gguf_export import MIXED, V, export, found_model, tokenizer  # noqa: F401 (fixtures)

from planer.evaluation.generate import generate

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
