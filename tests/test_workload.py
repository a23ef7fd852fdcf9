"""Latency workloads: a segment, a prompt's prefill, or one decoded token after a cached context."""

import json

import pytest
import torch
from conftest import LLAMA_SETTINGS

from planer.cli import main
from planer.errors import PlanerError
from planer.latency.table import FIXED, load_or_profile, measure_models, probe_calls, probe_models, profile
from planer.latency.workload import chain_call, workload_call
from planer.models.arch import Arch
from planer.models.backbone import build_model
from planer.models.gpt.cache import KVCache

FAST = ["latency.repeats=3", "latency.warmup=1", "latency.batch_size=2"]
LLAMA = [*LLAMA_SETTINGS, "model.n_positions=48", "latency.prompt=24", "latency.context=40"]


def model_of(cfg) -> torch.nn.Module:
    cfg.model.vocab_size = 65
    return build_model(cfg.model, Arch.parse("attn:4 ffl skip moe:top1")).eval()


@torch.no_grad()
def test_decode_reads_one_token_after_the_context_every_call(tiny_cfg):
    cfg = tiny_cfg(*LLAMA, "latency.workload=decode")
    model = model_of(cfg)
    calls = []
    forward = model.forward
    model.forward = lambda idx, state=None, last_only=False: (
        calls.append((idx.shape, state.length)) or forward(idx, state, last_only)
    )
    call = workload_call(model, 3, cfg.latency, torch.device("cpu"))
    for _ in range(3):
        logits, state = call()
    assert calls == [((3, 1), 40)] * 3 and isinstance(state, KVCache) and state.length == 41
    assert logits.shape == (3, 1, 65)


@torch.no_grad()
def test_prefill_reads_the_prompt_into_an_emptied_cache(tiny_cfg):
    cfg = tiny_cfg(*LLAMA, "latency.workload=prefill")
    model = model_of(cfg)
    call = workload_call(model, 2, cfg.latency, torch.device("cpu"))
    for _ in range(2):
        logits, state = call()
    assert state.length == 24 and logits.shape == (2, 1, 65)


@torch.no_grad()
def test_a_transformer_xl_decodes_one_token_with_its_memory_full(tiny_cfg):
    cfg = tiny_cfg("latency.workload=decode")
    model = model_of(cfg)
    logits, mems = workload_call(model, 2, cfg.latency, torch.device("cpu"))()
    assert logits.shape == (2, 1, 65) and mems[0].shape == (2, cfg.model.mem_len, cfg.model.d_model)


@torch.no_grad()
def test_a_probed_block_reads_its_cache_layer_at_the_context_every_call(tiny_cfg):
    cfg = tiny_cfg(*LLAMA, "latency.workload=decode")
    model = model_of(cfg)
    seen = []
    model.blocks[0].register_forward_pre_hook(lambda _m, args: seen.append((args[0].shape, args[1].start)))
    call = chain_call(model, [0], 3, cfg.latency, torch.device("cpu"))
    outputs = [call() for _ in range(3)]
    assert seen == [((3, 1, cfg.model.d_model), 40)] * 3 and torch.equal(outputs[0], outputs[2])


@pytest.mark.parametrize("workload", ["segment", "prefill", "decode"])
@pytest.mark.parametrize("family", [LLAMA, ["latency.prompt=24", "latency.context=40"]], ids=["llama", "txl"])
def test_the_table_times_the_output_layer_once_and_each_block_in_a_chain(tiny_cfg, workload, family):
    """The fixed part is the one call that runs a model's forward (embedding and output layer); every block's call
    runs n_layer copies of that block only, with weights of their own, on hidden states of the new positions."""
    cfg = tiny_cfg(*family, f"latency.workload={workload}", "latency.batch_size=2")
    cfg.model.vocab_size = 65
    specs = ["attn:2", "ffl", "moe:top1", "skip"]
    fixed, blocks = probe_models(cfg, specs)
    forwards, ran = [], []
    for model in (fixed, blocks):
        model.register_forward_pre_hook(lambda m, _args: forwards.append(m))
    chain = cfg.model.n_layer
    for k, block in enumerate(blocks.blocks):
        block.register_forward_pre_hook(lambda _m, args, k=k: ran.append((specs[k // chain], args[0].shape[:2])))
    with torch.inference_mode():
        calls = probe_calls(cfg, specs, fixed, blocks)
        for name in [FIXED, *specs]:
            calls[name]()
    new = {"segment": cfg.model.tgt_len, "prefill": 24, "decode": 1}[workload]
    assert forwards == [fixed] and ran == [(spec, (2, new)) for spec in specs for _ in range(chain)]
    copies = blocks.blocks[specs.index("ffl") * chain :][:chain]
    pairs = zip(copies[0].parameters(), copies[1].parameters())
    assert chain > 1 and any(not torch.equal(a, b) for a, b in pairs)


def test_decode_table_records_its_workload_and_refuses_another(tiny_cfg, tmp_path):
    cfg = tiny_cfg(*LLAMA, *FAST, "latency.workload=decode", "search.space=[skip, attn:1, ffl]")
    table = load_or_profile(cfg, tmp_path / "lut.json")
    assert (table.fingerprint["workload"], table.fingerprint["tokens"]) == ("decode", 40)
    for other in (["latency.workload=prefill"], ["latency.context=20"], ["latency.workload=segment"]):
        with pytest.raises(PlanerError, match="was profiled for"):
            load_or_profile(tiny_cfg(*LLAMA, *FAST, "search.space=[skip, attn:1, ffl]", "latency.workload=decode",
                                     *other), tmp_path / "lut.json")  # fmt: skip


def test_a_segment_table_keeps_the_fingerprint_of_tables_before_workloads(tiny_cfg):
    table = profile(tiny_cfg(*FAST, "search.space=[skip, ffl]"))
    assert "workload" not in table.fingerprint and "tokens" not in table.fingerprint


def test_measured_decode_is_cheaper_than_a_segment(tiny_cfg):
    """One new token against a 64-token segment of the same model: an ordering, never an absolute time."""
    stats = {}
    for workload in ("segment", "decode"):
        cfg = tiny_cfg(*LLAMA, "latency.repeats=15", "latency.warmup=2", "model.tgt_len=48",
                       f"latency.workload={workload}", "model.d_model=64", "model.d_inner=256")  # fmt: skip
        stats[workload] = measure_models({"m": model_of(cfg)}, 4, cfg.latency)["m"]["median"]
    assert stats["decode"] < stats["segment"]


@pytest.mark.parametrize(
    "setting, message",
    [
        ("latency.workload=generate", "latency.workload must be segment, prefill, decode"),
        ("latency.context=0", "latency.context must be a positive number of tokens"),
        ("latency.prompt=-3", "latency.prompt must be a positive number of tokens"),
    ],
)
def test_bad_workload_settings_are_one_line(tiny_text, tmp_path, capsys, setting, message):
    code = main(["profile", "--config", "configs/shakespeare-char.yaml", "--out", str(tmp_path / "p"), "--set",
                 f"data.path={tiny_text}", "--set", setting])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and err.count("\n") == 0 and not (tmp_path / "p").exists()


def test_a_context_past_the_model_positions_is_one_line(tiny_text, tmp_path, capsys):
    sets = [f"data.path={tiny_text}", *LLAMA, *FAST, "latency.workload=decode", "latency.context=48",
            "model.d_model=32", "model.n_head=4", "model.d_inner=64", "model.n_layer=1", "model.tgt_len=16"]  # fmt: skip
    code = main(["profile", "--config", "configs/shakespeare-char.yaml", "--out", str(tmp_path / "p"),
                 *[a for s in sets for a in ("--set", s)]])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0, err
    assert "latency.workload decode (48 cached, 1 new positions)" in err and "48 positions, not 49" in err
    assert not (tmp_path / "p" / "lut.json").exists()


def test_bench_records_the_workload(tiny_cfg, tmp_path):
    from planer.latency.table import bench
    from planer.training.loop import RunOptions
    from planer.training.train import train

    cfg = tiny_cfg(*LLAMA, *FAST, "latency.workload=decode", "train.steps=2", "train.eval_every=2")
    train(cfg, tmp_path / "m", Arch.parse("attn:2 ffl skip ffl"), options=RunOptions(quiet=True))
    result = bench(tmp_path / "m", batches=[1])
    saved = json.loads((tmp_path / "m" / "bench.json").read_text())
    assert result["workload"] == saved["workload"] == "decode" and saved["tokens_per_call"] == 1
