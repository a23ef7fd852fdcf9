"""The MoE block against a per-token reference: routing, expert compute, gradients, balance loss, capacity."""

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F

from planer.models.moe import MoEConfig, MoEFeedForward

D, DI, E = 16, 24, 4


def make(top_k=1, routing="random", **kwargs):
    """An MoE block and an input (2, 9, D) whose routing is chosen by construction.

    The first input feature is a constant 1 and the router reads it with a large weight, so the router decides:
    "random" leaves the router random; "skip_some" forbids experts 1 and 3; "one" sends every token to expert 2
    first (and expert 0 second).
    """
    torch.manual_seed(0)
    block = MoEFeedForward(MoEConfig(D, DI, E, top_k, dropout=kwargs.pop("dropout", 0.0), **kwargs))
    with torch.no_grad():
        for p in (block.w1, block.w2, block.router.weight):
            p.normal_(0.0, 0.3)
        block.b1.normal_(0.0, 0.1)
        block.b2.normal_(0.0, 0.1)
        if routing == "skip_some":
            block.router.weight[[1, 3], 0] = -50.0
        elif routing == "one":
            block.router.weight.zero_()
            block.router.weight[:, 0] = torch.tensor([10.0, 0.0, 20.0, -10.0])
    x = torch.randn(2, 9, D)
    x[..., 0] = 1.0
    return block, x


def reference(block, x, kept=None):
    """Each token alone: softmax router, its top-k experts, their outputs weighted by the (renormalised) gates.

    ``kept``, when given, is the set of (token, expert) pairs that fit in the experts' capacity; the others add nothing.
    """
    out = []
    for i, t in enumerate(x.reshape(-1, D)):
        probs = F.softmax(block.router.weight @ t, dim=-1)
        gates, experts = probs.topk(block.top_k)
        if block.top_k > 1:
            gates = gates / gates.sum()
        y = sum(
            g * (F.relu(block.w1[e] @ t + block.b1[e]) @ block.w2[e].T + block.b2[e])
            for g, e in zip(gates, experts.tolist())
            if kept is None or (i, e) in kept
        )
        out.append(F.layer_norm(t + y, (D,), block.norm.weight, block.norm.bias))
    return torch.stack(out).view_as(x)


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("routing", ["random", "skip_some", "one"])
@pytest.mark.parametrize("impl", ["grouped", "sequential"])
def test_matches_per_token_reference(top_k, routing, impl):
    block, x = make(top_k, routing, impl=impl)
    block.eval()
    with torch.no_grad():
        expected = reference(block, x)
    torch.testing.assert_close(block(x), expected, atol=1e-5, rtol=1e-5)
    with torch.inference_mode():
        torch.testing.assert_close(block(x), expected, atol=1e-5, rtol=1e-5)
    counts = block.expert_counts
    assert counts.dtype == torch.long and counts.shape == (E,) and counts.sum() == x.shape[0] * x.shape[1] * top_k
    if routing == "skip_some":
        assert counts[1] == 0 and counts[3] == 0
    if routing == "one":
        assert counts.tolist() == ([0, 0, 18, 0] if top_k == 1 else [18, 0, 18, 0])


@pytest.mark.parametrize("top_k", [1, 2])
def test_gradients_match_sequential_and_reach_only_used_experts(top_k):
    grads = {}
    for impl in ("grouped", "sequential"):
        block, x = make(top_k, "skip_some", impl=impl)
        x.requires_grad_()
        (block(x).square().sum() + block.balance_loss).backward()
        grads[impl] = {"x": x.grad, **{n: p.grad for n, p in block.named_parameters()}}
    for name, g in grads["grouped"].items():
        torch.testing.assert_close(g, grads["sequential"][name], atol=1e-5, rtol=1e-5, msg=name)
    g = grads["grouped"]
    assert g["router.weight"].abs().sum() > 0
    for name in ("w1", "b1", "w2", "b2"):
        per_expert = g[name].flatten(1).abs().sum(1)
        assert (per_expert[[0, 2]] > 0).all(), name
        assert (per_expert[[1, 3]] == 0).all(), name


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_gradcheck(top_k, dropout):
    """Finite differences agree with backward; reseeding keeps the dropout masks fixed between evaluations."""
    torch.manual_seed(0)
    block = MoEFeedForward(MoEConfig(6, 5, 3, top_k, dropout=dropout)).double()
    with torch.no_grad():
        block.router.weight.normal_(0.0, 1.0)
    x = torch.randn(1, 7, 6, dtype=torch.double, requires_grad=True)

    def run(x, *params):
        torch.manual_seed(1)
        return block(x)

    assert torch.autograd.gradcheck(run, (x, *block.parameters()))


def test_expert_dropout_only_in_training():
    block, x = make(1, dropout=0.5)
    torch.manual_seed(1)
    a = block(x)
    torch.manual_seed(2)
    assert not torch.allclose(a, block(x))
    block.eval()
    torch.testing.assert_close(block(x), reference(block, x), atol=1e-5, rtol=1e-5)


def test_balance_loss():
    """E * sum_i f_i P_i: 1 when tokens and probabilities are spread evenly, E when everything goes to one expert."""
    block = MoEFeedForward(MoEConfig(D, DI, E, 1, dropout=0.0))
    assert block.balance_loss is None and block.expert_counts is None
    with torch.no_grad():
        block.router.weight.copy_(torch.eye(E, D))
    even = 30.0 * F.one_hot(torch.arange(32) % E, D).float().view(1, 32, D)
    block(even)
    assert block.expert_counts.tolist() == [8] * E
    assert block.balance_loss.item() == pytest.approx(1.0, abs=1e-6)
    one = 30.0 * F.one_hot(torch.zeros(32, dtype=torch.long), D).float().view(1, 32, D)
    block(one)
    assert block.balance_loss.item() == pytest.approx(E, abs=1e-6)

    block, x = make(2)
    block(x)
    block.balance_loss.backward()
    assert block.router.weight.grad.abs().sum() > 0
    assert block.w1.grad is None


@pytest.mark.parametrize("impl", ["grouped", "sequential"])
@pytest.mark.parametrize(
    "top_k, capacity_factor, kept",
    [
        (1, 1.0, {(t, 2) for t in range(5)}),  # capacity ceil(1.0 * 18 / 4) = 5 on expert 2
        (2, 0.5, {(t, e) for t in range(5) for e in (0, 2)}),  # capacity 5 on experts 2 and 0
        (2, 2.0, {(t, e) for t in range(18) for e in (0, 2)}),  # capacity 18: nothing dropped
    ],
)
def test_capacity_drops_overflow_to_the_residual(impl, top_k, capacity_factor, kept):
    """Every token wants expert 2, then expert 0; an expert keeps its first tokens up to its capacity."""
    block, x = make(top_k, "one", impl=impl, capacity_factor=capacity_factor)
    block.eval()
    with torch.no_grad():
        torch.testing.assert_close(block(x), reference(block, x, kept), atol=1e-5, rtol=1e-5)
    assert block.expert_counts.tolist() == ([0, 0, 18, 0] if top_k == 1 else [18, 0, 18, 0])


def test_capacity_serves_first_choices_first():
    """Tokens 0-8 want expert 2 then 0, tokens 9-17 expert 0 then 2: with capacity 5 no second choice is served."""
    block, x = make(2, "one", capacity_factor=0.5)
    with torch.no_grad():
        block.router.weight[:, 1] = torch.tensor([15.0, 0.0, -15.0, 0.0])
    x[..., 1] = 0.0
    x.view(-1, D)[9:, 1] = 1.0
    block.eval()
    kept = {(t, 2) for t in range(5)} | {(t, 0) for t in range(9, 14)}
    with torch.no_grad():
        torch.testing.assert_close(block(x), reference(block, x, kept), atol=1e-5, rtol=1e-5)


def test_inference_fast_path_follows_weight_changes():
    block, x = make(2, "random")
    block.eval()
    with torch.inference_mode():
        fast = block(x)
    torch.testing.assert_close(fast, block(x), atol=1e-5, rtol=1e-5)

    with torch.no_grad():
        block.w1.mul_(1.5)  # an in-place update, as an optimizer step does
    with torch.inference_mode():
        fast = block(x)
    torch.testing.assert_close(fast, reference(block, x), atol=1e-5, rtol=1e-5)

    block.train()
    block.w2.data.mul_(0.5)  # an update the version counter cannot see: leaving eval mode is what invalidates
    block.eval()
    with torch.no_grad():
        torch.testing.assert_close(block(x), reference(block, x), atol=1e-5, rtol=1e-5)

    for copied in (copy.deepcopy(block), pickle.loads(pickle.dumps(block))):  # packed weights cannot be copied
        with torch.inference_mode():
            torch.testing.assert_close(copied(x), reference(block, x), atol=1e-5, rtol=1e-5)
    assert set(block.state_dict()) == {"router.weight", "w1", "b1", "w2", "b2", "norm.weight", "norm.bias"}


def test_reset_parameters():
    block = MoEFeedForward(MoEConfig(64, 128, 8, 1))
    block.reset_parameters(std=0.05)
    assert block.w1.std().item() == pytest.approx(0.05, rel=0.05)
    assert block.w2.std().item() == pytest.approx(0.05, rel=0.05)
    assert block.b1.abs().sum() == 0 and block.b2.abs().sum() == 0
    assert (block.norm.weight == 1).all() and (block.norm.bias == 0).all()


@pytest.mark.parametrize("kwargs", [dict(top_k=3, n_experts=2), dict(impl="fast"), dict(capacity_factor=0.0)])
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        MoEFeedForward(MoEConfig(D, DI, **kwargs))
