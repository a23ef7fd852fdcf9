"""Configs as a user writes them: relative paths from the config's folder, scientific notation, `planer config`."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import QUICK, cli_sets, tiny_overrides

from planer.cli import main
from planer.config import Config, load_config, saved_config_matches
from planer.errors import PlanerError

TEXT = "To be, or not to be, that is the question:\n" * 400
SETS = cli_sets(tiny_overrides(*QUICK))


def planer(*args, cwd):
    return subprocess.run([sys.executable, "-m", "planer", *map(str, args)], capture_output=True, text=True, cwd=cwd)


@pytest.fixture
def project(tmp_path):
    """A config in configs/ naming its data as ../data/text.txt, and an unrelated folder to run from."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "text.txt").write_text(TEXT)
    (tmp_path / "configs").mkdir()
    config = tmp_path / "configs" / "c.yaml"
    config.write_text("data:\n  path: ../data/text.txt\n")
    (tmp_path / "elsewhere").mkdir()
    return tmp_path, config


def test_relative_paths_in_a_config_are_read_from_its_folder(project, monkeypatch):
    root, config = project
    monkeypatch.chdir(root / "elsewhere")
    cfg = load_config(config)
    assert cfg.data.path == str(root / "data" / "text.txt")
    monkeypatch.chdir(root)  # on the command line, the current folder counts
    assert load_config(config, ["data.path=data/text.txt"]).data.path == str(root / "data" / "text.txt")
    assert load_config(None).data.path == str(root / "data" / "tinyshakespeare.txt")  # so does a default


def test_a_missing_data_file_names_the_absolute_path(project, monkeypatch, capsys):
    root, config = project
    config.write_text("data:\n  path: ../data/missing.txt\n")
    monkeypatch.chdir(root / "elsewhere")
    assert main(["train", "--config", "../configs/c.yaml", "--out", "out", *SETS]) == 2
    assert f"data file not found: {root / 'data' / 'missing.txt'}" in capsys.readouterr().err
    assert not (root / "elsewhere" / "out").exists()


@pytest.mark.slow
def test_train_and_resume_from_other_folders(project):
    """The config names its data relative to itself; runs from two other folders read the same file and agree."""
    root, config = project
    done = planer("train", "--config", config, "--out", root / "run", *SETS, cwd=root / "elsewhere")
    assert done.returncode == 0, done.stderr
    again = planer("train", "--config", "configs/c.yaml", "--out", "run", *SETS, "--resume", cwd=root)
    assert again.returncode == 2 and "nothing to resume" in again.stderr, again.stderr  # the config matched


def test_saved_configs_match_whatever_the_current_folder(project, monkeypatch, tmp_path):
    root, config = project
    saved = tmp_path / "saved.yaml"
    load_config(config).save(saved)
    assert str(root) in saved.read_text()  # absolute: the same files wherever it is read
    monkeypatch.chdir(root / "elsewhere")
    assert saved_config_matches(saved, load_config(config))
    assert not saved_config_matches(saved, load_config(config, ["data.level=word"]))


def test_a_config_saved_before_a_key_was_added_still_matches(project, tmp_path):
    """A run made by an earlier planer continues: the keys added since read as their defaults."""
    _, config = project
    saved = tmp_path / "saved.yaml"
    load_config(config).save(saved)
    text = saved.read_text()
    assert "  block_tokens: 0\n" in text
    saved.write_text(text.replace("  block_tokens: 0\n", ""))
    assert saved_config_matches(saved, load_config(config))
    assert not saved_config_matches(saved, load_config(config, ["phase2.block_tokens=64", "phase2.tokens=640"]))
    saved.write_text(text.replace("  block_tokens: 0\n", "  block_tokens: 0\n  retired_key: 1\n"))
    assert not saved_config_matches(saved, load_config(config))


@pytest.mark.parametrize("text, value", [("3e-4", 3e-4), ("1e5", 1e5), ("+2.5E+3", 2500.0), (".5e-1", 0.05)])
def test_scientific_notation_is_a_number(tmp_path, text, value):
    config = tmp_path / "c.yaml"
    config.write_text(f"train:\n  lr: {text}\n")
    assert load_config(config).train.lr == value
    assert load_config(None, [f"train.lr={text}"]).train.lr == value


def test_scientific_notation_is_not_an_int():
    with pytest.raises(PlanerError, match="model.d_model: expected int, got 100000.0"):
        load_config(None, ["model.d_model=1e5"])


def test_planer_config_prints_every_key_with_type_default_and_value(project):
    root, config = project
    result = planer("config", "--config", config, "--set", "train.lr=3e-4", cwd=root / "elsewhere")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["key", "type", "default", "value"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    sections = Config().to_dict()
    assert set(rows) == {f"{s}.{k}" for s, keys in sections.items() for k in keys}
    assert rows["train.lr"] == ["train.lr", "float", "0.004", "0.0003"]
    assert rows["data.path"][1:] == ["str", "data/tinyshakespeare.txt", str(root / "data" / "text.txt")]
    assert rows["search.space"][1].startswith("list")
