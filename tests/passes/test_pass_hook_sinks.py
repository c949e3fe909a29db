"""hook_attention on a toy with attention sinks: the sinks input of ``fxbridge::attention`` reaches the AttentionCore,
which gets ``hook_sink_logits``; values are kept, edits of the sinks hook take effect and never reach the weight.
(HF parity of the sink math itself: tests/architectures/test_sinks.py.)"""
import functools

import torch
from torch import nn

from fxbridge.runtime.cores import AttentionCore
from fxbridge.tracer.attention_op import AttentionCall
from toy import (LLAMA_SPEC, TOL, Attention, DecoderLayer, capture_toy, captured, eager, hook_points, max_diff,
                 rotary, run, run_pass, tokens, toy_dims, toy_lm)


class SinkAttention(Attention):
    """gpt_oss's attention in miniature: RoPE, then the attention op with a learned sink logit per head."""

    def __init__(self, config, layer_idx: int, **kw):
        super().__init__(config, layer_idx, rotary=True, **kw)
        self.sinks = nn.Parameter(torch.linspace(-1.0, 1.5, self.h) + layer_idx)

    def forward(self, x, mask, state):
        b, s, _ = x.shape
        q = rotary(self.q_proj(x).view(b, s, -1, self.d).transpose(1, 2))
        k = rotary(self.k_proj(x).view(b, s, -1, self.d).transpose(1, 2))
        v = self.v_proj(x).view(b, s, -1, self.d).transpose(1, 2)
        z = torch.ops.fxbridge.attention(q, k, v, mask, self.scaling, None, self.layer_idx, self.sinks)
        return self.o_proj(z.reshape(b, s, -1))


class SinkLayer(DecoderLayer):
    def __init__(self, config, i: int, **kw):
        super().__init__(config, i, **kw)
        self.self_attn = SinkAttention(config, i)


@functools.cache
def _sink_toy():
    return capture_toy(toy_lm(2, layer=SinkLayer))


def _hooked():
    toy = _sink_toy()
    root, graph = toy.fresh()
    assert run_pass("hook_attention", graph, root, LLAMA_SPEC, toy_dims(toy.model.config), toy.model.config) == 2
    return toy, root, graph


def test_the_sinks_reach_each_core_and_get_a_hook():
    toy, root, graph = _hooked()
    calls = [AttentionCall.of(n) for n in graph.nodes if AttentionCall.is_core(n)]
    assert [c.layer_idx for c in calls] == [0, 1]
    for call in calls:
        assert call.sinks.op == "get_attr" and call.sinks.target.endswith(f"layers.{call.layer_idx}.self_attn.sinks")
        assert call.replace(node=None) == AttentionCall.of(call.node)  # read back as written
        core = root.get_submodule(f"blocks.{call.layer_idx}.attn")
        assert isinstance(core, AttentionCore) and core.sinks and core.needs_eager()
    names = hook_points(root)
    assert {"blocks.0.attn.hook_sink_logits", "blocks.1.attn.hook_sink_logits"} <= set(names)
    assert names.index("blocks.0.attn.hook_attn_scores") < names.index("blocks.0.attn.hook_sink_logits") \
        < names.index("blocks.0.attn.hook_pattern")  # firing order
    ids = tokens()
    assert max_diff(run(root, graph, ids), eager(toy.model, ids)) < TOL


def test_a_core_without_sinks_has_no_sink_hook():
    toy = captured("llama")
    root, graph = toy.fresh()
    run_pass("hook_attention", graph, root, LLAMA_SPEC, toy_dims(toy.model.config), toy.model.config)
    assert not any(n.endswith("hook_sink_logits") for n in hook_points(root))
    assert all(AttentionCall.of(n).sinks is None for n in graph.nodes if AttentionCall.is_core(n))


def test_editing_the_sink_hook_equals_editing_the_parameter():
    toy, root, graph = _hooked()
    ids = tokens()
    point = root.get_submodule("blocks.1.attn.hook_sink_logits")
    handle = point.add_hook(lambda t, hook: t.mul_(-2.0))
    try:
        out = run(root, graph, ids)
    finally:
        handle.remove()
    sinks = toy.model.model.layers[1].self_attn.sinks
    before = eager(toy.model, ids)
    with torch.no_grad():
        saved = sinks.detach().clone()
        sinks.mul_(-2.0)
        try:
            want = eager(toy.model, ids)
        finally:
            sinks.copy_(saved)
    assert max_diff(out, want) < TOL and max_diff(out, before) > 1e-3
    assert torch.equal(sinks.detach(), saved)
