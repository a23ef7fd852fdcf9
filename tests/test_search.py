"""Phase 1: weight sharing in the supernet, the dynamic latency loss, and a whole tiny search."""

import itertools
import json
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from conftest import hand_table, tiny_model

from planer.cli import main
from planer.config import LatencyConfig
from planer.io.data import load_corpus
from planer.models.arch import Arch
from planer.models.txl.model import TransformerXL
from planer.search.gumbel import GumbelSearch, latency_loss, search
from planer.search.supernet import SuperNet
from planer.training.loop import RunOptions

SPACE = ["skip", "attn:1", "attn:2", "attn:4", "ffl", "moe:top1", "moe:top2"]


def test_one_hot_supernet_equals_standalone_model():
    cfg = tiny_model(n_layer=3)
    arch = Arch.parse("attn:2 moe:top1 skip ffl attn:4 moe:top2")
    torch.manual_seed(0)
    net = SuperNet(cfg, SPACE, len(arch)).eval()
    choices = [SPACE.index(str(b)) for b in arch]
    for block, i in zip(net.blocks, choices):
        block.alpha.data[i] = 10.0  # one-hot architecture weights
    model = TransformerXL(cfg, arch).eval()
    model.embed.load_state_dict(net.model.embed.state_dict())
    model.out_bias.data.copy_(net.model.out_bias.data)
    for source, block, i in zip(net.blocks, model.blocks, choices):
        block.load_state_dict(source.candidates[i].state_dict())

    assert net.derive() == arch
    x = torch.randint(0, 40, (2, 16))
    with torch.no_grad():
        expected, mems = model(x[:, :8])
        expected2, _ = model(x[:, 8:], mems)
        for mode in ("argmax", "hard"):
            net.set_mode(mode)
            for block, i in zip(net.blocks, choices):
                block.choice = i
            got, smems = net(x[:, :8])
            got2, _ = net(x[:, 8:], smems)
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(got2, expected2, atol=1e-5, rtol=1e-5)


def test_memory_is_kept_at_the_super_block_input():
    cfg = tiny_model(n_layer=1)
    net = SuperNet(cfg, ["skip", "attn:2", "ffl"], 2).eval()
    assert all(block.uses_memory for block in net.blocks)
    x = torch.randint(0, 40, (2, 8))
    net.set_mode("hard")
    for choice in range(3):  # whatever runs, the memory holds what entered each position
        for block in net.blocks:
            block.choice = choice
        with torch.no_grad():
            _, mems = net(x)
        h = net.model.embed(x) * 32**0.5
        torch.testing.assert_close(mems[0], h)


def test_soft_path_mixes_and_trains_alpha():
    cfg = tiny_model(n_layer=1)
    net = SuperNet(cfg, ["attn:1", "ffl"], 2)
    net.set_mode("soft", tau=1.0)
    logits, _ = net(torch.randint(0, 40, (2, 8)))
    logits.sum().backward()
    assert all(a.grad is not None and a.grad.abs().sum() > 0 for a in net.alphas())
    assert net.sampled_probs().shape == (2, 2)


def test_latency_loss_drives_estimate_to_target_and_stops():
    """Latency loss alone (no cross-entropy): the estimate falls to the target, then beta switches off."""
    torch.manual_seed(0)
    lat = torch.tensor([0.0, 1.0, 2.0, 4.0, 8.0, 1.5])  # ms per option
    positions, fixed, target = 24, 2.0, 0.5  # as many positions as the paper's enwik8 backbone
    baseline = fixed + positions * 8.0
    alpha = torch.zeros(positions, len(lat), requires_grad=True)
    alpha.data[:, 4] = torch.linspace(2.0, 4.0, positions)  # start near the baseline's choice, unevenly sure
    opt = torch.optim.Adam([alpha], lr=0.01)

    def current():  # the estimate of the arch the search would return now
        return fixed + lat[alpha.detach().argmax(-1)].sum().item()

    betas, ratios = [], []
    for _ in range(1500):
        probs = F.gumbel_softmax(alpha, tau=1.0)
        loss, beta = latency_loss(fixed + (probs * lat).sum(), baseline, target, current())
        betas.append(beta)
        if beta:
            opt.zero_grad()
            loss.backward()
            opt.step()
        ratios.append(current() / (baseline * target))
    assert ratios[0] > 1.5
    assert betas[0] == 1.0 and betas[-1] == 0.0
    assert 0.85 < ratios[-1] <= 1.0  # reached the target and stopped there
    assert len(set(ratios[-500:])) == 1  # and stays: no step once the target is met


def test_tiny_search_writes_arch_and_log(tiny_cfg, tmp_path):
    cfg = tiny_cfg(
        "search.epochs=4",
        "search.steps_per_epoch=10",
        "search.freeze_fraction=0.25",
        "latency.batch_size=2",
        "model.n_layer=2",
    )
    cfg.search.space = ["skip", "attn:1", "attn:4", "ffl"]
    arch = search(cfg, tmp_path / "s", target=0.5, options=RunOptions(quiet=True))
    assert len(arch) == 4
    logged = [json.loads(l) for l in (tmp_path / "s" / "search.jsonl").read_text().splitlines()]
    records = [r for r in logged if not r.get("correction")]
    assert len(records) == 4
    # the timed table may leave the last argmax over the target: then one correction follows the epochs
    assert logged[:4] == records and len(logged) <= 5
    assert "beta" not in records[0] and "beta" in records[1]  # alpha frozen during the first epoch
    assert records[0]["tau"] == 5.0 and records[2]["tau"] < records[1]["tau"]
    assert records[0]["alpha"] == [[0.0] * 4] * 4 and records[-1]["alpha"] != records[0]["alpha"]
    saved = json.loads((tmp_path / "s" / "arch.json").read_text())
    assert Arch.load(tmp_path / "s" / "arch.json") == arch
    assert saved["target"] == 0.5 and saved["estimated_ms"] > 0


def test_warm_start_reproduces_the_baseline():
    """Started from a trained baseline, the supernet's baseline choices compute what the baseline computes, and a
    top-2 MoE of upcycled experts computes what the feed-forward block it came from computes."""
    from planer.search.supernet import warm_start

    cfg = tiny_model()
    torch.manual_seed(1)
    baseline = TransformerXL(cfg, Arch.baseline(2, 4)).eval()
    net = SuperNet(cfg, SPACE, 4).eval()
    assert warm_start(net, baseline) == 2 * 3 + 2 * 3  # attn:1/2/4 at attention positions, ffl + 2 MoE at the others
    x = torch.randint(0, 40, (2, 8))
    with torch.no_grad():
        expected, _ = baseline(x)
        net.set_mode("hard")
        for block, spec in zip(net.blocks, baseline.arch):
            block.choice = net.space.index(str(spec))
        torch.testing.assert_close(net(x)[0], expected, atol=1e-5, rtol=1e-5)
        for block, spec in zip(net.blocks, baseline.arch):
            if spec.kind == "ffl":
                block.choice = net.space.index("moe:top2")
        torch.testing.assert_close(net(x)[0], expected, atol=1e-5, rtol=1e-5)
        # attn:2 is the baseline block restricted to its first two heads
        attn2 = net.blocks[0].candidates[net.space.index("attn:2")]
        full = baseline.blocks[0]
        h = torch.randn(2, 8, 32)
        masked = full.out.weight.clone()
        full.out.weight[:, 2 * 8 :] = 0.0  # silence heads 3 and 4
        torch.testing.assert_close(attn2(h), full(h), atol=1e-5, rtol=1e-5)
        full.out.weight.copy_(masked)


def test_search_over_target_at_the_end_gets_a_correction(tiny_cfg, tmp_path, capsys):
    """Too few architecture steps to reach a tight target (only all-skip meets it): the search keeps stepping alpha
    after the last epoch, logs it, arch.json states the estimate honestly, and the CLI warns when it is over."""
    sets = ["search.epochs=2", "search.steps_per_epoch=10", "search.freeze_fraction=0.5", "model.n_layer=2",
            "search.space=[skip, attn:1, attn:4, ffl]"]  # fmt: skip
    cfg = tiny_cfg(*sets)
    cfg.model.vocab_size = len(load_corpus(cfg.data).vocab)
    hand_table(cfg).save(tmp_path / "lut.json")  # baseline 5.7 ms, all-skip 0.5 ms: 0.088
    config = tmp_path / "c.yaml"
    cfg.save(config)
    code = main(["search", "--method", "gumbel", "--config", str(config), "--out", str(tmp_path / "s"), "--target", "0.1", "--lut",
                 str(tmp_path / "lut.json")])  # fmt: skip
    assert code == 0
    records = [json.loads(l) for l in (tmp_path / "s" / "search.jsonl").read_text().splitlines()]
    assert records[-1]["correction"] is True and len(records[-1]["probs"]) == 4
    saved = json.loads((tmp_path / "s" / "arch.json").read_text())
    assert saved["estimated_ms"] == records[-1]["arch_estimated_ms"]
    assert saved["meets_target"] == (saved["estimated_ratio"] <= 0.1)
    err = capsys.readouterr().err
    assert ("over its target" in err) == (not saved["meets_target"])
    assert "correcting to meet the target" in err  # the correction shows its progress


def test_unreachable_target_is_refused_before_any_output(tiny_cfg, tmp_path, capsys):
    cfg = tiny_cfg("model.n_layer=2", "search.space=[skip, attn:1, attn:4, ffl]")
    cfg.model.vocab_size = len(load_corpus(cfg.data).vocab)
    hand_table(cfg).save(tmp_path / "lut.json")
    config = tmp_path / "c.yaml"
    cfg.save(config)
    args = ["search", "--method", "gumbel", "--config", str(config), "--out", str(tmp_path / "s"), "--lut",
            str(tmp_path / "lut.json")]  # fmt: skip
    assert main([*args, "--target", "0.05"]) == 2
    err = capsys.readouterr().err
    assert "target 0.05 cannot be met" in err and "at least 0.088" in err
    assert not (tmp_path / "s").exists()
    other = tiny_cfg("model.n_layer=2", "model.d_inner=128")
    other.model.vocab_size = cfg.model.vocab_size
    hand_table(other).save(tmp_path / "foreign.json")
    assert main([*args[:-1], str(tmp_path / "foreign.json"), "--target", "0.5"]) == 2
    assert "was profiled for" in capsys.readouterr().err and not (tmp_path / "s").exists()


def test_an_argmax_under_the_window_is_filled_with_the_most_probable_arch_in_it():
    """The Gumbel search spends its budget: an argmax under 0.95 x the target becomes the arch of largest summed
    log-probability whose estimate lies in [0.95, 1] x the target (checked against every arch), and an argmax
    already in the window is kept."""
    cfg = tiny_model()
    space = ["skip", "attn:1", "attn:4", "ffl"]
    net = SuperNet(cfg, space, 4)
    with torch.no_grad():
        for a, row in zip(
            net.alphas(), ([2.0, 1.0, 0.5, 0.0], [1.5, 0.0, 1.2, 0.3], [3.0, 0.1, 0.2, 1.0], [2.0, 0.0, 0.0, 1.9])
        ):
            a.copy_(torch.tensor(row))
    table = hand_table(SimpleNamespace(model=cfg, latency=LatencyConfig()), fixed=0.5)
    baseline_ms = table.estimate(Arch.baseline(2, 4))  # 0.5 + 2 x (2.0 + 0.6) = 5.7
    run = SimpleNamespace(net=net, table=table, baseline_ms=baseline_ms, target=0.8)
    argmax = net.derive()  # all skip: 0.5 ms, far under the budget
    filled, unfilled = GumbelSearch.fill_up(run, argmax)
    budget = 0.8 * baseline_ms
    assert unfilled["arch"] == argmax.specs() and 0.95 * budget <= table.estimate(filled) <= budget
    log_p = torch.log_softmax(net.alpha_matrix(), dim=-1)
    best = max(
        (c for c in itertools.product(range(4), repeat=4)
         if 0.95 * budget <= table.estimate([space[i] for i in c]) <= budget),
        key=lambda c: sum(log_p[p, i].item() for p, i in enumerate(c)),
    )  # fmt: skip
    assert filled == Arch.parse(" ".join(space[i] for i in best))
    in_window = Arch.parse(" ".join(space[i] for i in best))
    assert GumbelSearch.fill_up(run, in_window) == (in_window, None)
    run.target = 0.7  # blocks would need 3.29-3.49 ms: no sum of 0, 0.6, 1 and 2 ms lands there
    assert GumbelSearch.fill_up(run, argmax) == (argmax, None)
