"""Transformer-XL's defining properties: exact memory, causality, and relative positions."""

import torch
from conftest import tiny_model

from planer.models.arch import Arch
from planer.models.txl.blocks import rel_shift
from planer.models.txl.model import TransformerXL


def make_model(arch="attn:4 ffl attn:2 ffl skip attn:1", mem_len=16, dropatt=0.0):
    cfg = tiny_model(n_layer=3, mem_len=mem_len, dropatt=dropatt, vocab_size=50)
    torch.manual_seed(0)
    return TransformerXL(cfg, Arch.parse(arch)).eval()


def test_memory_is_exact():
    model = make_model()
    x = torch.randint(0, 50, (3, 16))
    with torch.no_grad():
        full, _ = model(x)
        first, mems = model(x[:, :8])
        second, _ = model(x[:, 8:], mems)
    torch.testing.assert_close(first, full[:, :8], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(second, full[:, 8:], atol=1e-5, rtol=1e-5)


def test_memory_keeps_only_mem_len_positions():
    model = make_model(mem_len=5)
    x = torch.randint(0, 50, (2, 8))
    with torch.no_grad():
        _, mems = model(x)
        _, mems = model(x, mems)
    for spec, mem in zip(model.arch, mems):
        assert (mem is None) == (spec.kind != "attn")
        if mem is not None:
            assert mem.shape == (2, 5, 32)


def test_memory_is_truncated_context():
    """With mem_len shorter than a segment, the second segment sees only the last mem_len inputs of the first."""
    model = make_model("attn:4", mem_len=3)
    x = torch.randint(0, 50, (1, 16))
    with torch.no_grad():
        _, mems = model(x[:, :8])
        second, _ = model(x[:, 8:], mems)
        changed = x.clone()
        changed[:, :5] = (changed[:, :5] + 1) % 50  # outside the memory window
        _, mems2 = model(changed[:, :8])
        second2, _ = model(changed[:, 8:], mems2)
    torch.testing.assert_close(second, second2)


def test_causality():
    model = make_model()
    x = torch.randint(0, 50, (2, 12))
    y = x.clone()
    y[:, 7] = (y[:, 7] + 1) % 50
    with torch.no_grad():
        _, mems = model(x)
        a, _ = model(x, mems)
        b, _ = model(y, mems)
    torch.testing.assert_close(a[:, :7], b[:, :7])
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_rel_shift_matches_direct_relative_positions():
    qlen, mlen = 5, 3
    klen = qlen + mlen
    scores = torch.randn(2, 4, qlen, klen)  # scores[..., i, j] against distance klen-1-j
    shifted = rel_shift(scores)
    for i in range(qlen):
        for j in range(mlen + i + 1):  # every key the query may see
            distance = mlen + i - j
            torch.testing.assert_close(shifted[..., i, j], scores[..., i, klen - 1 - distance])


def test_fewer_heads_means_fewer_parameters():
    counts = [make_model(f"attn:{h}").num_params() for h in (1, 2, 4)]
    assert counts[0] < counts[1] < counts[2]


def test_attention_matches_the_formula_term_by_term():
    """Scores (q_i + u).k_j + (q_i + v).r(M+i-j) over keys j <= M+i, softmax, weighted values, out, residual, norm."""
    from planer.models.txl.blocks import RelAttention, sinusoid

    torch.manual_seed(0)
    att = RelAttention(d_model=16, n_head=2, d_head=4, dropout=0.0, dropatt=0.0).eval()
    for p in (att.r_w_bias, att.r_r_bias):
        torch.nn.init.normal_(p)
    x, mem = torch.randn(1, 3, 16), torch.randn(1, 2, 16)
    cat = torch.cat([mem, x], dim=1)
    M, T = 2, 3
    q, k, v = att.qkv(cat).view(5, 3, 2, 4).unbind(1)  # each (K, H, Dh)
    r = att.r_net(sinusoid(torch.arange(5), 16)).view(5, 2, 4)  # r[d]: distance d
    heads = torch.zeros(T, 2, 4)
    for i in range(T):
        for h in range(2):
            keys = range(M + i + 1)
            s = torch.stack([(q[M + i, h] + att.r_w_bias[h]) @ k[j, h] + (q[M + i, h] + att.r_r_bias[h]) @ r[M + i - j, h]
                             for j in keys]) / 2.0  # fmt: skip
            heads[i, h] = torch.softmax(s, 0) @ v[: M + i + 1, h]
    want = att.norm(x[0] + att.out(heads.reshape(T, 8)))
    with torch.no_grad():
        torch.testing.assert_close(att(x, mem)[0], want, atol=1e-5, rtol=1e-5)


def test_a_model_used_under_inference_mode_still_trains():
    """The shared position tables are made per mode: one made under inference mode cannot be saved for backward."""
    from planer.models.txl.blocks import distance_table, future_bias

    distance_table.cache_clear()
    future_bias.cache_clear()
    model = make_model()
    x = torch.randint(0, 50, (2, 8))
    with torch.inference_mode():
        model(x)
    model.train()
    logits, _ = model(x)
    logits.sum().backward()
    assert all(p.grad is not None for p in model.blocks[0].parameters())
