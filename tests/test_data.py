import pytest
import torch

from planer.config import DataConfig
from planer.errors import PlanerError
from planer.io.data import EOS, UNK, Segments, Vocab, load_corpus, read_text, tokenize


def test_char_split_is_contiguous_90_5_5(tiny_text):
    corpus = load_corpus(DataConfig(path=str(tiny_text), level="char"))
    n = len(tiny_text.read_text())
    assert len(corpus.train) + len(corpus.valid) + len(corpus.test) == n
    assert len(corpus.train) == int(n * 0.9)
    text = tiny_text.read_text()
    assert corpus.vocab.decode(corpus.train[:50].tolist()) == text[:50]
    assert corpus.vocab.decode(corpus.valid[:20].tolist()) == text[int(n * 0.9) : int(n * 0.9) + 20]


def test_word_level_eos_and_unk(tmp_path):
    path = tmp_path / "w.txt"
    lines = ["the cat sat", "the dog <unk> ran"] * 50 + ["a zebra appears"] * 6
    path.write_text("\n".join(lines) + "\n")
    corpus = load_corpus(DataConfig(path=str(path), level="word"))
    assert corpus.vocab.symbols[:2] == [UNK, EOS]
    assert tokenize("a b\nc\n", "word") == ["a", "b", EOS, "c", EOS]
    # "a zebra appears" lines fall in valid/test only: unseen words become <unk> and are counted
    assert corpus.unseen["valid"] + corpus.unseen["test"] > 0
    assert corpus.unseen["train"] == 0
    # the corpus's own <unk> is a training symbol, not an unseen one
    ids, unseen = corpus.vocab.encode(["<unk>", "cat"])
    assert unseen == 0 and ids[0].item() == corpus.vocab.unk


def test_vocab_encodes_unseen_as_unk():
    vocab = Vocab.build(list("abcab"), "char")
    ids, unseen = vocab.encode(list("abz!"))
    assert unseen == 2
    assert ids[2].item() == ids[3].item() == vocab.unk


def test_min_count_leaves_rare_training_symbols_to_unk(tmp_path):
    path = tmp_path / "w.txt"
    lines = (["the cat sat", "the dog ran"] * 5 + ["the owl"]) * 6 + ["a zebra appears"] * 4
    path.write_text("\n".join(lines) + "\n")
    full = load_corpus(DataConfig(path=str(path), level="word"))
    cut = load_corpus(DataConfig(path=str(path), level="word", min_count=10))
    # cat, sat, dog and ran are seen 25-30 times in training, owl at most 6: it joins <unk>, and is counted there
    assert set(cut.vocab.symbols) == {UNK, EOS, "the", "cat", "sat", "dog", "ran"}
    owl = full.train == full.vocab.index["owl"]
    assert full.unseen["train"] == 0 and cut.unseen["train"] == owl.sum().item() > 0
    assert torch.equal(cut.train == cut.vocab.unk, owl)
    assert cut.vocab.decode(cut.train[:4].tolist()) == "the cat sat <eos>"


def test_min_count_is_refused_with_a_tokenizer():
    from planer.config import Config, validate

    cfg = Config()
    cfg.data.tokenizer, cfg.data.min_count = "some/tokenizer", 3
    with pytest.raises(PlanerError, match="data.min_count cuts planer's own vocabulary"):
        validate(cfg)


def test_segments_are_ordered_streams():
    ids = torch.arange(100)
    seg = Segments(ids, batch_size=2, tgt_len=8)
    x0, y0 = seg[0]
    x1, _ = seg[1]
    assert x0.shape == (2, 8)
    assert torch.equal(y0, x0 + 1)
    assert torch.equal(x1[:, 0], x0[:, -1] + 1)  # the next segment continues each stream
    assert x0[1, 0].item() == 50
    assert all(s.x.shape == (2, 8) for s in seg.walk(0, len(seg)))


def test_eval_segments_score_every_token_once():
    ids = torch.arange(103)
    seg = Segments(ids, batch_size=2, tgt_len=8, drop_last=False)
    targets = torch.cat([s.y for s in seg.walk(0, len(seg))], dim=1)
    assert torch.equal(targets[0], torch.arange(1, 51))


def test_too_short_for_one_segment():
    with pytest.raises(PlanerError, match="fewer than one segment"):
        Segments(torch.arange(20), batch_size=4, tgt_len=8)


def test_bad_files(tmp_path):
    with pytest.raises(PlanerError, match="not found"):
        read_text(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(PlanerError, match="empty"):
        read_text(tmp_path / "empty.txt")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00abc")
    with pytest.raises(PlanerError, match="UTF-8"):
        read_text(tmp_path / "bin.txt")
