"""Does llama.cpp's converter read what ``planer export --hf OUT --format decilm`` writes?

Builds a tiny random Llama (64 wide, 4 query heads over 2 key/value heads, MLPs of 512 units) of a mixed arch,
exports it as DeciLM, runs CONVERTER (llama.cpp's convert_hf_to_gguf.py, float32) on the folder with that
checkout's own gguf-py first on PYTHONPATH, and reads the GGUF back with the gguf package: the per-layer
``deci.attention.head_count``, ``deci.attention.head_count_kv`` and ``deci.feed_forward_length`` against the
arch's, and which layers have attention and MLP tensors. llama.cpp itself is not built or run.

The converter reads a vocabulary other than Llama 3's with gguf's ``LlamaHfVocab``, which takes only a Llama-2
style tokenizer (byte-fallback BPE, a decoder ``Sequence``): the model gets a small one of those, trained here.

    PYTHONPATH=src .venv/bin/python benchmarks/decilm_llamacpp_check.py \\
        /tmp/lcp/llama_cpp_python-0.3.36/vendor/llama.cpp/convert_hf_to_gguf.py
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from planer.cli import main
from planer.config import Config, load_config
from planer.io.checkpoint import save_checkpoint
from planer.io.data import TokenizerVocab
from planer.models.arch import Arch
from planer.models.backbone import build_model

ROOT = Path(__file__).resolve().parents[1]
ARCH = "skip ffl attn:4 ffl:256 attn:4/kv1 skip attn:4 ffl"  # no attention, 1 shared kv head, no MLP, as tested
SIZES = ["model.backbone=gpt", "model.flavour=llama", "model.d_model=64", "model.n_head=4", "model.n_kv_head=2",
         "model.d_inner=512", "model.n_layer=4", "model.mem_len=0", "model.n_positions=64"]  # fmt: skip
BYTES = [f"<0x{i:02X}>" for i in range(256)]
SPECIALS = ["<unk>", "<s>", "</s>"]


def llama2_tokenizer(path: Path, text: str, size: int) -> None:
    """A Llama-2 style tokenizer.json: a BPE over "▁"-joined words with byte fallback, its vocabulary the special
    tokens, the 256 byte tokens, then what a BPE trained on ``text`` learned (``size`` tokens in all)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, trainers

    normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(Regex(" "), "▁")])
    plain = Tokenizer(models.BPE())
    plain.normalizer = normalizer
    plain.train_from_iterator([text], trainers.BpeTrainer(vocab_size=size - 259, show_progress=False))
    learned = json.loads(plain.to_str())["model"]
    vocab = {t: i for i, t in enumerate(SPECIALS + BYTES)}
    vocab |= {t: len(vocab) + i for i, t in enumerate(sorted(learned["vocab"], key=learned["vocab"].get))}
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizer
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens(SPECIALS)
    tok.save(str(path))


def exported(work: Path) -> tuple[Path, dict[str, list[int]]]:
    """The tiny model exported as DeciLM in ``work``/decilm, and the per-layer sizes its built blocks have."""
    llama2_tokenizer(work / "tokenizer.json", (ROOT / "data" / "tinyshakespeare.txt").read_text()[:20000], 400)
    vocab = TokenizerVocab(work / "tokenizer.json")
    cfg = Config(model=load_config(None, [*SIZES, f"model.vocab_size={len(vocab)}"]).model)
    torch.manual_seed(0)
    model = build_model(cfg.model, Arch.parse(ARCH))
    (work / "run").mkdir()
    save_checkpoint(work / "run", model, cfg, vocab)
    assert main(["export", "--run", str(work / "run"), "--hf", str(work / "decilm"), "--format", "decilm"]) == 0
    attention, mlps = model.blocks[0::2], model.blocks[1::2]
    return work / "decilm", {
        "attention.head_count": [getattr(a, "heads", 0) for a in attention],
        "attention.head_count_kv": [getattr(a, "kv", 0) for a in attention],
        "feed_forward_length": [m.down.in_features if hasattr(m, "down") else 0 for m in mlps],
    }


def convert(converter: Path, folder: Path, gguf: Path) -> None:
    """CONVERTER on the folder, its own gguf-py first on the path; its output is shown as it runs."""
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(converter.parent / "gguf-py"), os.environ.get("PYTHONPATH", "")])
    )
    command = [sys.executable, str(converter), str(folder), "--outfile", str(gguf), "--outtype", "f32"]
    subprocess.run(command, env=env, check=True, stdin=subprocess.DEVNULL)  # its tokenizer step asks about remote code


def field(reader, name: str):
    """A GGUF metadata value: a list for an array field, else the scalar."""
    f = reader.fields[name]
    values = [f.parts[i].tolist() for i in f.data]
    values = [v[0] if isinstance(v, list) and len(v) == 1 else v for v in values]
    return values if len(values) > 1 else values[0]


def report(gguf: Path, want: dict[str, list[int]]) -> bool:
    """Prints the per-layer metadata and tensors the GGUF holds beside the model's own sizes; True where equal."""
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf))
    got = {key: field(reader, f"deci.{key}") for key in want}
    print(f"deci.block_count {field(reader, 'deci.block_count')}; arch {ARCH}")
    for key, value in got.items():
        print(f"deci.{key}: {value}  (the model: {want[key]})")
    names = [t.name for t in reader.tensors]
    for i in range(len(want["feed_forward_length"])):
        print(f"layer {i}: " + " ".join(sorted(n.split(".", 2)[2] for n in names if n.startswith(f"blk.{i}."))))
    print("other tensors: " + " ".join(n for n in names if not n.startswith("blk.")))
    return got == want


def run() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("converter", type=Path, help="llama.cpp's convert_hf_to_gguf.py")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder, want = exported(Path(tmp))
        convert(args.converter.resolve(), folder, Path(tmp) / "decilm.gguf")
        ok = report(Path(tmp) / "decilm.gguf", want)
    print("the per-layer metadata are the model's" if ok else "the per-layer metadata DIFFER from the model's")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    run()
