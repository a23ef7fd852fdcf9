"""The command line: one line on stderr and exit 2 for bad input, and nothing of an earlier run overwritten."""

import json
import subprocess
import sys

import pytest
from conftest import QUICK, cli_sets, tiny_overrides


def planer(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "planer", *map(str, args)], capture_output=True, text=True, cwd=cwd)


def assert_user_error(result, fragment):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("planer: error:"), result.stderr
    assert fragment in lines[0], lines[0]


SETS = cli_sets(tiny_overrides(*QUICK))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    text = root / "text.txt"
    text.write_text("To be, or not to be, that is the question:\n" * 400)
    config = root / "c.yaml"
    config.write_text(f"data:\n  path: {text}\n")
    result = planer("train", "--config", config, "--out", root / "run", *SETS)
    assert result.returncode == 0, result.stderr
    return root, config


@pytest.mark.slow
def test_evaluate_json_and_unseen_symbols(trained):
    root, _ = trained
    result = planer("evaluate", "--run", root / "run", "--json")
    data = json.loads(result.stdout)
    assert {"loss", "ppl", "bpc", "tokens", "unk"} <= data.keys()
    novel = root / "novel.txt"
    novel.write_text("Zounds! Quixotic jackdaws vex 42 émigrés.\n" * 5)
    result = planer("evaluate", "--run", root / "run", "--text", novel, "--json")
    data = json.loads(result.stdout)
    assert data["unk"] > 0 and data["loss"] < float("inf") and data["tokens"] > 0


@pytest.mark.slow
def test_existing_output_is_not_overwritten(trained):
    root, config = trained
    before = (root / "run" / "model.safetensors").read_bytes()
    assert_user_error(planer("train", "--config", config, "--out", root / "run", *SETS), "not empty")
    assert (root / "run" / "model.safetensors").read_bytes() == before


@pytest.mark.parametrize(
    "make_case, fragment",
    [
        (lambda r: ["--config", r / "none.yaml"], "cannot read config"),
        (lambda r: ["--config", r / "c.yaml", "--set", "model.d_model=0"], "model.d_model must be positive"),
        (lambda r: ["--config", r / "c.yaml", "--set", "model.nope=3"], "unknown config key 'model.nope'"),
        (lambda r: ["--config", r / "c.yaml", "--set", "model.d_model=abc"], "expected int"),
        (lambda r: ["--config", r / "c.yaml", "--set", "model.n_head=3"], "must divide"),
        (lambda r: ["--config", r / "c.yaml", "--arch", "attn:8 conv"], "unknown block 'conv'"),
        (lambda r: ["--config", r / "c.yaml", "--set", "data.path=/nonexistent.txt"], "data file not found"),
        (lambda r: ["--config", r / "empty.yaml", "--set", f"data.path={r / 'empty.txt'}"], "is empty"),
        (lambda r: ["--config", r / "c.yaml", "--set", f"data.path={r / 'short.txt'}"], "fewer than one segment"),
        (lambda r: ["--config", r / "c.yaml", "--set", "search.target=1.5"], "unknown config key 'search.target'"),
        (lambda r: ["--config", r / "c.yaml", "--set", "data.min_count=0"], "data.min_count must be positive"),
    ],
)
@pytest.mark.slow
def test_bad_train_input(trained, tmp_path, make_case, fragment):
    root, _ = trained
    (root / "empty.txt").write_text("")
    (root / "empty.yaml").write_text("")
    (root / "short.txt").write_text("Now is the winter of our discontent, made glorious summer.\n")
    assert_user_error(planer("train", "--out", tmp_path / "out", *SETS, *make_case(root)), fragment)


@pytest.mark.slow
def test_missing_and_corrupt_checkpoints(trained, tmp_path):
    root, _ = trained
    assert_user_error(planer("evaluate", "--run", tmp_path), "config.json is missing")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_bytes((root / "run" / "config.json").read_bytes())
    weights = (root / "run" / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    assert_user_error(planer("evaluate", "--run", broken), "corrupt")
    meta = json.loads((root / "run" / "config.json").read_text())
    meta["config"]["model"]["d_model"] = 64
    meta["config"]["model"]["n_head"] = 4
    (broken / "config.json").write_text(json.dumps(meta))
    (broken / "model.safetensors").write_bytes(weights)
    assert_user_error(planer("evaluate", "--run", broken), "does not match")


# -- first contact: version, usage, hints ----------------------------------------------------------------------


def test_version():
    result = planer("--version")
    assert result.returncode == 0 and result.stdout.startswith("planer 0.") and "torch" in result.stdout


def test_no_command_prints_usage_and_one_line_error():
    result = planer()
    assert "usage: planer" in result.stdout and "train" in result.stdout
    assert_user_error(result, "no command given; choose one of train,")
    assert "planer: error: planer:" not in result.stderr


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["train", "--out", "x"], "usage: planer train --config CONFIG --out OUT [options]; see 'planer train --help'"),
        (["frobnicate"], "usage: planer COMMAND [options]"),
        (["export", "--run", "x"], "usage: planer export --run RUN (--onnx OUT | --hf OUT | --gguf OUT) [options]"),
    ],
)
def test_argparse_errors_end_with_a_usage_hint(argv, fragment):
    assert_user_error(planer(*argv), fragment)


def test_set_without_equals_hints_at_key_value(tmp_path):
    result = planer("train", "--config", "c.yaml", "--out", tmp_path / "out", "--set", "train.steps", "40")
    assert_user_error(result, "--set expects section.key=value, got 'train.steps'; write --set train.steps=VALUE")
    assert not (tmp_path / "out").exists()


def test_every_option_has_help():
    from planer.cli import build_parser, subcommands

    parser = build_parser()
    for name, sub in {"planer": parser, **subcommands(parser)}.items():
        for action in sub._actions:
            assert action.help, f"{name} {'/'.join(action.option_strings) or action.dest} has no help text"


@pytest.mark.slow
def test_profile_shows_a_progress_bar(trained, tmp_path):
    _, config = trained
    result = planer("profile", "--config", config, "--out", tmp_path / "lut", *SETS, "--set", "latency.batch_size=2")
    assert result.returncode == 0, result.stderr
    assert "profiling" in result.stderr and " blocks" in result.stderr and "/4 [" in result.stderr  # 1 + 3 rounds
    assert "lut.json" in result.stdout
