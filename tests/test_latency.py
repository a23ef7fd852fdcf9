"""Latency table and end-to-end measurement: orderings (never absolute times), refusals, the estimator, the CLI."""

import io
import json
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from types import SimpleNamespace

import pytest
import torch
from conftest import QUICK, cli_sets, tiny_overrides

from planer.cli import main
from planer.errors import PlanerError
from planer.latency.table import LatencyTable, load_or_profile, measure_models, profile
from planer.models.arch import Arch
from planer.models.txl.model import TransformerXL


def test_attention_cost_grows_with_heads(tiny_cfg):
    cfg = tiny_cfg(
        "model.d_model=128",
        "model.n_head=8",
        "model.tgt_len=64",
        "model.mem_len=64",
        "latency.batch_size=4",
        "latency.threads=1",
        "latency.repeats=60",
        "latency.warmup=5",
        "search.space=[skip, attn:1, attn:2, attn:4, attn:8]",
    )
    table = profile(cfg)
    lat = [table.latency(s) for s in ("skip", "attn:1", "attn:2", "attn:4", "attn:8")]
    assert lat == sorted(lat) and len(set(lat)) == len(lat), table.blocks
    assert table.fixed_ms > 0


def test_table_covers_space_iso_ffl_and_baseline(tiny_cfg, tmp_path):
    cfg = tiny_cfg("search.space=[skip, attn:1]", "model.n_experts=4")
    table = load_or_profile(cfg, tmp_path / "lut.json")
    assert set(table.blocks) == {"skip", "attn:1", "ffl:x4", "attn:4", "ffl"}
    fp = table.fingerprint
    assert fp["threads"] == cfg.latency.threads and fp["vocab_size"] > 0 and fp["torch"] == torch.__version__
    assert table.baseline(cfg) == pytest.approx(table.fixed_ms + 2 * (table.latency("attn:4") + table.latency("ffl")))


def test_moe_blocks_are_profiled_like_any_block(tiny_cfg):
    pytest.importorskip("planer.models.moe")
    cfg = tiny_cfg("search.space=[skip, ffl, moe:top1, moe:top2]")
    table = profile(cfg)
    assert {"moe:top1", "moe:top2"} <= table.blocks.keys()
    assert table.estimate(Arch.parse("moe:top1 ffl moe:top2 skip")) > table.fixed_ms


def test_matching_table_is_reused_and_another_fingerprint_refused(tiny_cfg, tmp_path):
    path = tmp_path / "lut.json"
    cfg = tiny_cfg()
    first = load_or_profile(cfg, path)
    assert not first.reused
    written = path.read_bytes()
    again = load_or_profile(tiny_cfg(), path)
    assert again.reused and again.blocks == first.blocks and path.read_bytes() == written
    for change in ("latency.batch_size=3", "model.mem_len=8", "latency.threads=2", "model.d_inner=32"):
        with pytest.raises(PlanerError, match="was profiled for"):
            load_or_profile(tiny_cfg(change), path)
    with pytest.raises(PlanerError, match="lacks the blocks attn:3"):
        load_or_profile(tiny_cfg("search.space=[skip, attn:3]"), path)
    assert path.read_bytes() == written
    forced = load_or_profile(tiny_cfg("latency.batch_size=3"), path, force=True)
    assert forced.fingerprint["batch"] == 3 and LatencyTable.load(path).fingerprint["batch"] == 3


def test_a_table_of_other_block_code_is_refused(tiny_cfg, tmp_path, monkeypatch):
    """A table profiled before a block's forward changed (an older BLOCKS_REVISION) times other code."""
    path = tmp_path / "lut.json"
    monkeypatch.setattr("planer.latency.table.BLOCKS_REVISION", 1)
    load_or_profile(tiny_cfg(), path)
    monkeypatch.undo()
    with pytest.raises(PlanerError, match="was profiled for blocks=1, but this run needs blocks=2"):
        load_or_profile(tiny_cfg(), path)


@pytest.mark.parametrize(
    "damage, fragment",
    [
        (lambda text: text[: len(text) // 2], "not valid JSON"),
        (lambda text: text.replace('"median": ', '"median": 1', 1), "checksum"),
        (lambda text: json.dumps({k: v for k, v in json.loads(text).items() if k != "checksum"}), "checksum"),
        (lambda text: "[1, 2]", "not a planer latency table"),
    ],
)
def test_edited_or_corrupt_table_is_refused(tiny_cfg, tmp_path, damage, fragment):
    path = tmp_path / "lut.json"
    cfg = tiny_cfg()
    load_or_profile(cfg, path)
    path.write_text(damage(path.read_text()))
    with pytest.raises(PlanerError, match=fragment):
        load_or_profile(cfg, path)


def hand_table() -> LatencyTable:
    stats = lambda ms: {"median": ms, "p10": ms, "p90": ms}  # noqa: E731
    blocks = {"skip": 0.0, "attn:1": 1.0, "attn:2": 2.0, "ffl": 3.0, "moe:top1": 5.0}
    return LatencyTable({}, stats(0.5), {k: stats(v) for k, v in blocks.items()}, {})


def test_expected_is_differentiable_and_equals_estimate_when_one_hot():
    table, options = hand_table(), ["skip", "attn:1", "attn:2", "ffl", "moe:top1"]
    arch = Arch.parse("attn:2 ffl skip moe:top1")
    one_hot = torch.zeros(len(arch), len(options))
    for b, spec in enumerate(arch.specs()):
        one_hot[b, options.index(spec)] = 1.0
    assert table.expected(one_hot, options).item() == pytest.approx(table.estimate(arch)) == 0.5 + 2 + 3 + 0 + 5

    alpha = torch.randn(len(arch), len(options), requires_grad=True)
    probs = alpha.softmax(-1)
    expected = table.expected(probs, options)
    expected.backward()
    lat = torch.tensor([0.0, 1.0, 2.0, 3.0, 5.0])
    assert expected.item() == pytest.approx(0.5 + (probs.detach() * lat).sum().item())
    assert alpha.grad is not None and alpha.grad.abs().sum() > 0
    with pytest.raises(PlanerError, match="not in the latency table"):
        table.expected(torch.ones(1, 1), ["attn:8"])


def test_measurement_leaves_model_and_process_state_untouched(tiny_cfg):
    cfg = tiny_cfg("model.vocab_size=40")
    model = TransformerXL(cfg.model, Arch.parse("attn:2 ffl skip attn:4")).train()
    model.blocks[1].eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [m.training for m in model.modules()]
    torch.set_num_threads(1)
    rng = torch.get_rng_state()
    stats = measure_models({"m": model}, 2, cfg.latency)
    profile(cfg)
    assert stats["m"]["p10"] <= stats["m"]["median"] <= stats["m"]["p90"]
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert [m.training for m in model.modules()] == modes
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng) and torch.get_num_threads() == 1


# ---------------------------------------------------------------------------------------------------------------
# The command line, on a checkpoint trained in a few steps


SETS = cli_sets(tiny_overrides(*QUICK))


def planer_process(*args):
    return subprocess.run([sys.executable, "-m", "planer", *map(str, args)], capture_output=True, text=True)


def planer(*args):
    """The command line in this process: the same parsing and exit codes, without a second torch start-up."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            code = main([str(a) for a in args])
        except SystemExit as e:
            code = e.code
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


def assert_user_error(result, fragment):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("planer: error:") and fragment in lines[0], result.stderr


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("latency")
    (root / "text.txt").write_text("Now is the winter of our discontent made glorious summer.\n" * 300)
    (root / "c.yaml").write_text(f"data:\n  path: {root / 'text.txt'}\n")
    result = planer_process("train", "--config", root / "c.yaml", "--out", root / "run", "--arch", "attn:2 ffl", *SETS)
    assert result.returncode == 0, result.stderr
    return root


@pytest.mark.slow
def test_cli_profile_writes_reuses_and_refuses(trained):
    root = trained
    args = [
        "profile",
        "--config",
        root / "c.yaml",
        "--out",
        root / "prof",
        *SETS,
        "--set",
        "search.space=[skip, attn:1, ffl]",
    ]
    result = planer_process(*args)
    assert result.returncode == 0, result.stderr
    table = LatencyTable.load(root / "prof" / "lut.json")
    assert set(table.blocks) == {"skip", "attn:1", "ffl", "ffl:x8", "attn:4"}
    assert "reused" in planer(*args).stdout
    assert_user_error(planer_process(*args, "--batch", "3"), "was profiled for")
    assert_user_error(planer(*args, "--batch", "x"), "latency.batch_size")
    result = planer(*args, "--batch", "3", "--force")
    assert result.returncode == 0 and LatencyTable.load(root / "prof" / "lut.json").fingerprint["batch"] == 3
    (root / "prof" / "lut.json").write_text("{}")
    assert_user_error(planer(*args), "not a planer latency table")
    assert_user_error(
        planer("profile", "--config", root / "c.yaml", "--out", root / "text.txt", *SETS), "not a directory"
    )


def test_cli_bench(trained):
    root = trained
    result = planer("bench", "--run", root / "run", "--batch", "1,2", "--repeats", "3")
    assert result.returncode == 0, result.stderr
    bench = json.loads((root / "run" / "bench.json").read_text())
    assert [row["batch"] for row in bench["batches"]] == [1, 2] and bench["arch"] == ["attn:2", "ffl"]
    assert bench["baseline_arch"] == ["attn:4", "ffl"] and bench["environment"]["threads"] == 1
    for row in bench["batches"]:
        assert row["speedup"] == pytest.approx(row["baseline"]["median"] / row["model"]["median"], rel=1e-3)
    result = planer("bench", "--run", root / "run", "--baseline", root / "run", "--batch", "2", "--repeats", "3")
    assert result.returncode == 0, result.stderr
    assert_user_error(planer("bench", "--run", root / "missing"), "no checkpoint")
    assert_user_error(planer("bench", "--run", root / "run", "--batch", "1,x"), "comma-separated integers")
    assert_user_error(planer("bench", "--run", root / "run", "--batch", "0"), "positive")
    assert_user_error(planer("bench", "--run", root / "run", "--threads", "0"), "latency.threads")
