"""What a new user sees: a run that names its stages and ends with its verdict, a report on models trained by hand,
and word-level training that speaks of perplexity."""

import pytest
from conftest import QUICK, ROOT, cli_sets, tiny_overrides

from planer.cli import main


def tiny_sets(*extra: str) -> list[str]:
    return cli_sets(tiny_overrides(*QUICK, "latency.batch_size=2", *extra))


@pytest.fixture
def config(tmp_path):
    (tmp_path / "text.txt").write_text((ROOT / "data" / "tinyshakespeare.txt").read_text()[:30000])
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  path: text.txt\n")
    return path


@pytest.mark.slow
def test_run_names_its_stages_and_ends_with_the_verdict(config, tmp_path, capsys):
    # A model this small costs mostly its embedding and softmax, so only a loose target is reachable.
    argv = ["run", "--config", str(config), "--out", str(tmp_path / "run"), "--designs", "dense-depth", "--batches",
            "2", "--targets", "1.0", *tiny_sets("search.space=[skip, attn:1, attn:2, attn:4, ffl]")]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    for stage in ("train baseline", "profile blocks at batch 2", "search planer-t1.00 (knapsack)",
                  "train planer-t1.00", "train dense-depth-t1.00", "bench planer-t1.00"):  # fmt: skip
        assert f"planer run: {stage}" in out, stage
    assert "Target 1.00: the found model" in out and f"report: {tmp_path / 'run' / 'report.md'}" in out
    assert "| model |" not in out  # the summary, not the report's Markdown
    assert main(argv) == 0
    assert "were done before and skipped" in capsys.readouterr().out


@pytest.mark.slow
def test_report_on_models_trained_by_hand(config, tmp_path):
    models = tmp_path / "mine"
    for name, arch in (("base", "baseline"), ("small", "attn:1 ffl")):
        assert main(["train", "--config", str(config), "--out", str(models / name), "--arch", arch, *tiny_sets()]) == 0
    assert main(["bench", "--run", str(models / "small"), "--baseline", str(models / "base"), "--batch", "1",
                 "--repeats", "2"]) == 0  # fmt: skip
    assert main(["report", "--run", str(models)]) == 0
    report = (models / "report.md").read_text()
    assert "| base | `a4f` |" in report and "| small | `a1f` |" in report


def test_word_level_training_speaks_of_perplexity(tmp_path, capsys):
    text = (ROOT / "data" / "wikitext2-valid.txt").read_text()[:40000]
    (tmp_path / "words.txt").write_text(text)
    config = tmp_path / "w.yaml"
    config.write_text("data:\n  path: words.txt\n  level: word\n")
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "w"), *tiny_sets("train.steps=10",
                 "train.eval_every=10")]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "ppl" in out and "bits" not in out
