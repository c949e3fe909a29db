"""capture_eager_attention on a Falcon-shaped toy: inline attention becomes one ``fxbridge::attention`` call."""
import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fxbridge.passes import capture_eager_attention
from fxbridge.passes import NoMatch
from toy import (missed, LLAMA_SPEC, TOL, Attention, DecoderLayer, capture_toy, captured, delta, eager, max_diff, no_match,
                 op_counts, run, run_pass, tokens, toy_dims, toy_lm, toy_spec)

ATTENTION = "fxbridge.attention.default"


def repeat_kv(x, n):
    """HF's repeat_kv: [B,Hkv,S,d] -> [B,Hkv*n,S,d], head h reads KV head h // n."""
    b, g, s, d = x.shape
    return x[:, :, None].expand(b, g, n, s, d).reshape(b, g * n, s, d)


class EagerAttention(Attention):
    """Falcon's eager ALiBi branch in miniature: softmax((q k^T + alibi) * scale + mask) @ v, K/V repeated."""

    def __init__(self, config, layer_idx, **kw):
        super().__init__(config, layer_idx, **kw)
        self.slopes = nn.Parameter(torch.tensor([0.5, 0.25, 0.125, 0.0625]))

    def forward(self, x, mask, state):
        b, s, _ = x.shape
        q, k, v = (proj(x).view(b, s, -1, self.d).transpose(1, 2) for proj in (self.q_proj, self.k_proj, self.v_proj))
        k, v = repeat_kv(k, self.h // self.g), repeat_kv(v, self.h // self.g)
        alibi = self.slopes[:, None, None] * torch.arange(s, dtype=x.dtype)[None, None, :]  # [H,1,S]
        scores = (q @ k.transpose(-1, -2) + alibi) * self.scaling
        pattern = torch.softmax(scores + mask, dim=-1, dtype=torch.float32).to(q.dtype)
        z = F.dropout(pattern, p=0.1, training=False) @ v
        return self.o_proj(z.transpose(1, 2).reshape(b, s, -1))


class EagerLayer(DecoderLayer):
    def __init__(self, config, i, **kw):
        super().__init__(config, i, **kw)
        self.self_attn = EagerAttention(config, i)


@functools.cache
def _toy():
    return capture_toy(toy_lm(1, layer=EagerLayer))


def _without_alibi(toy, ids):
    """The toy as HF's sdpa branch computes it: ALiBi only through the mask (here: no ALiBi)."""
    slopes = [layer.self_attn.slopes for layer in toy.model.model.layers]
    saved = [s.detach().clone() for s in slopes]
    try:
        with torch.no_grad():
            for s in slopes:
                s.zero_()
        return eager(toy.model, ids)
    finally:
        with torch.no_grad():
            for s, v in zip(slopes, saved):
                s.copy_(v)


@pytest.mark.parametrize("drop", [False, True])
def test_inline_attention_becomes_one_attention_call_per_layer(drop):
    toy = _toy()
    root, graph = toy.fresh()
    before = op_counts(graph)
    assert before[ATTENTION] == 0 and before["aten.softmax.int"] == 1
    spec = toy_spec(passes=(capture_eager_attention(drop_pre_scale_bias=drop),))
    assert run_pass("capture_eager_attention", graph, root, spec, toy_dims(toy.model.config)) == 1
    changed = delta(before, op_counts(graph))
    # per layer, gone: q@k^T and its k transpose, + alibi, * scale, + mask, softmax, the cast, dropout, @ v;
    # new: the call and its output transpose (transposes even out), K/V un-repeated (unflatten + select each) and,
    # unless dropped, the mask alibi * scale + mask (one mul, one add)
    want = {ATTENTION: 1, "aten.softmax.int": -1, "aten.matmul.default": -2, "aten.dropout.default": -1,
            "aten.unflatten.int": 2, "aten.select.int": 2, "aten.add.Tensor": -1, "aten.to.dtype": -1}
    if drop:  # the alibi term nothing reads any more goes too: slopes[:, None, None] * arange(S)[None, None, :]
        want.update({"aten.add.Tensor": -2, "aten.mul.Tensor": -2, "aten.arange.default": -1,
                     "aten.unsqueeze.default": -4})
    assert changed == want
    call = next(n for n in graph.nodes if str(n.target) == ATTENTION)
    assert call.args[4] == pytest.approx(8 ** -0.5) and call.args[5] is None and call.args[6] == 0
    ids = tokens()
    want_out = _without_alibi(toy, ids) if drop else eager(toy.model, ids)
    assert max_diff(run(root, graph, ids), want_out) < TOL
    # and hook_attention takes it from there, as for the families HF routes through AttentionInterface
    assert run_pass("hook_attention", graph, root, LLAMA_SPEC, toy_dims(toy.model.config), toy.model.config) == 1
    assert max_diff(run(root, graph, ids), want_out) < TOL


def test_a_softmax_over_another_dim_is_refused():
    toy = _toy()
    root, graph = toy.fresh()
    softmax = next(n for n in graph.nodes if str(n.target) == "aten.softmax.int")
    softmax.args = (softmax.args[0], 1, *softmax.args[2:])
    err = no_match("capture_eager_attention", graph, root, LLAMA_SPEC, toy_dims(toy.model.config))
    assert missed(err, 1, 0) and "over dim 1" in str(err)


def test_a_graph_without_inline_attention_matches_nothing():
    toy = captured("llama")  # attention already a call: no softmax in the attention modules
    root, graph = toy.fresh()
    before = op_counts(graph)
    err = no_match("capture_eager_attention", graph, root, LLAMA_SPEC, toy_dims(toy.model.config))
    assert missed(err, 2, 0)
    assert isinstance(err.__cause__, NoMatch) and err.where == "model.layers.0.self_attn" and "one softmax" in err.expected
    assert op_counts(graph) == before
