"""hook_diff_attention on toy graphs: a layer's two attention calls (same q/k, the two value halves) and HF's
``z1 - lambda * z2`` become one DiffAttentionCore with lambda / difference / z hooks."""
import functools

import pytest
import torch
from torch import nn

from fxbridge.passes.hook_diff_attention import DiffAttentionCore
from toy import (Attention, DecoderLayer, RMSNorm, TOL, capture_toy, captured, delta, eager, hook_nodes, max_diff, missed, no_match, op_counts,
                 rotary, run, run_pass, tokens, toy_dims, toy_lm, toy_spec, watch)

ATTENTION = "fxbridge.attention.default"
SPEC = toy_spec()


class DiffAttention(Attention):
    """DiffLlama's attention in miniature: two calls over the halves of V, then (z1 - lam z2), RMSNorm, o_proj.
    ``same_q=False`` gives the second call another query (not differential attention: the pass must refuse)."""

    def __init__(self, config, layer_idx, *, same_q: bool = True, **kw):
        super().__init__(config, layer_idx, rotary=True, **kw)
        self.same_q, self.lambda_init = same_q, 0.8 - 0.6 * torch.exp(torch.tensor(-0.3 * layer_idx)).item()
        self.lambda_q1, self.lambda_k1, self.lambda_q2, self.lambda_k2 = (
            nn.Parameter(torch.randn(self.d) * 0.3) for _ in range(4))

    def forward(self, x, mask, state):
        b, s, _ = x.shape
        q = rotary(self.q_proj(x).view(b, s, -1, self.d).transpose(1, 2))
        k = rotary(self.k_proj(x).view(b, s, -1, self.d).transpose(1, 2))
        v = self.v_proj(x).view(b, s, -1, self.d).transpose(1, 2)
        v1, v2 = (h.repeat(1, 2, 1, 1) for h in torch.chunk(v, 2, dim=1))
        z1 = torch.ops.fxbridge.attention(q, k, v1, mask, self.scaling, None, self.layer_idx)
        q2 = q if self.same_q else q * 2.0
        z2 = torch.ops.fxbridge.attention(q2, k, v2, mask, self.scaling, None, self.layer_idx)
        z = torch.cat([z1, z2], dim=-1)
        a, c = torch.chunk(z, 2, dim=2)
        lam = (torch.exp(torch.sum(self.lambda_q1 * self.lambda_k1, dim=-1)) -
               torch.exp(torch.sum(self.lambda_q2 * self.lambda_k2, dim=-1)) + self.lambda_init)
        d = a - lam * c
        d = d * torch.rsqrt(d.pow(2).mean(-1, keepdim=True) + 1e-5)
        return self.o_proj(((1 - self.lambda_init) * d).reshape(b, s, -1))

    def maps(self, x, mask):
        """The softmax maps [B,H,S,S] and lambda, by hand (the oracle)."""
        b, s, _ = x.shape
        q = rotary(self.q_proj(x).view(b, s, -1, self.d).transpose(1, 2))
        k = rotary(self.k_proj(x).view(b, s, -1, self.d).transpose(1, 2)).repeat_interleave(self.h // self.g, dim=1)
        p = torch.softmax(q @ k.transpose(2, 3) * self.scaling + mask, dim=-1)
        lam = (torch.exp((self.lambda_q1 * self.lambda_k1).sum()) - torch.exp((self.lambda_q2 * self.lambda_k2).sum())
               + self.lambda_init)
        return p, lam


class DiffLayer(DecoderLayer):
    """The toy pre-norm layer with DiffAttention."""

    def __init__(self, config, i, *, norm=RMSNorm, same_q: bool = True):
        super().__init__(config, i, norm=norm)
        self.self_attn = DiffAttention(config, i, same_q=same_q)


@functools.cache
def _toy(same_q: bool = True):
    return capture_toy(toy_lm(2, layer=DiffLayer, same_q=same_q))


def test_two_calls_become_one_core_with_lambda_difference_and_z_hooks():
    t = _toy()
    root, graph = t.fresh()
    before = op_counts(graph)
    assert before[ATTENTION] == 4
    assert run_pass("hook_diff_attention", graph, root, SPEC, toy_dims(t.model.config), t.model.config) == 2
    assert delta(before, op_counts(graph))[ATTENTION] == -4
    assert sorted(hook_nodes(graph)) == sorted(f"blocks.{i}.attn.{h}" for i in range(2) for h in (
        "hook_lambda", "hook_rot_q", "hook_rot_k", "hook_diff", "hook_z"))
    assert all(isinstance(root.get_submodule(f"blocks.{i}.attn"), DiffAttentionCore) for i in range(2))
    ids = tokens()
    want = eager(t.model, ids)
    assert max_diff(run(root, graph, ids), want) < TOL  # unhooked: HF's two fused SDPA calls
    names = [f"blocks.0.attn.{h}" for h in ("hook_pattern", "hook_lambda", "hook_diff_pattern")]
    seen = watch(root, names)  # the difference hook makes the core multiply the difference map with V
    assert max_diff(run(root, graph, ids), want) < TOL
    layer = t.model.model.layers[0]
    with torch.no_grad():
        x = layer.input_layernorm(t.model.model.embed_tokens(ids))
        p, lam = layer.self_attn.maps(x, torch.full((5, 5), torch.finfo(x.dtype).min).triu(1)[None, None])
    h = p.shape[1]
    assert max_diff(seen["blocks.0.attn.hook_pattern"], p) < TOL
    assert max_diff(seen["blocks.0.attn.hook_lambda"], lam.reshape(1)) < TOL
    assert max_diff(seen["blocks.0.attn.hook_diff_pattern"], p[:, : h // 2] - lam * p[:, h // 2:]) < TOL


def test_zeroing_the_difference_zeroes_what_the_norm_reads():
    t = _toy()
    root, graph = t.fresh()
    run_pass("hook_diff_attention", graph, root, SPEC, toy_dims(t.model.config), t.model.config)
    seen = watch(root, ["blocks.1.attn.hook_diff"])
    root.get_submodule("blocks.1.attn.hook_diff_pattern").add_hook(lambda d, hook: torch.zeros_like(d))
    out = run(root, graph, tokens())
    assert seen["blocks.1.attn.hook_diff"].abs().max().item() == 0.0
    assert max_diff(out, eager(t.model, tokens())) > 1e-3


def test_refuses_calls_that_are_not_one_differential_pair():
    t = _toy(same_q=False)  # the second call has another query
    root, graph = t.fresh()
    err = no_match("hook_diff_attention", graph, root, SPEC, toy_dims(t.model.config), t.model.config)
    assert missed(err, 2, 0) and "sharing q, k" in err.expected
    plain = captured("llama")  # one attention call per layer
    root, graph = plain.fresh()
    err = no_match("hook_diff_attention", graph, root, SPEC, toy_dims(plain.model.config), plain.model.config)
    assert missed(err, 2, 0) and "two attention calls" in err.expected
