"""split_fused_qkv on toy graphs: HF's own split of a fused projection, in each layout, replaced by hooked q/k/v."""
import functools

import pytest
import torch
from torch import nn

from fxbridge.passes import NoMatch
from fxbridge.runtime.names import aliases_for
from toy import (missed, D, TOL, DecoderLayer, capture_toy, captured, eager, hook_nodes, max_diff, module_io, no_match,
                 op_counts, run, run_pass, tokens, toy_config, toy_dims, toy_lm, toy_spec, watch, hook_points)

HEADS = {"contiguous": (4, 2, 8), "per_head": (4, 4, 8), "per_group": (4, 2, 8)}  # H, Hkv, dh
HOOKS = ["blocks.0.attn.hook_q", "blocks.0.attn.hook_k", "blocks.0.attn.hook_v"]
QKV = "model.layers.0.self_attn.query_key_value"


class FusedAttention(nn.Module):
    """One fused projection split the way HF's GPTBigCode (MQA, MHA) and Falcon (new architecture) split it."""

    def __init__(self, layer_idx, layout):
        super().__init__()
        self.layer_idx, self.layout = layer_idx, layout
        self.h, self.g, self.d = HEADS[layout]
        self.query_key_value = nn.Linear(D, (self.h + 2 * self.g) * self.d)
        self.dense = nn.Linear(self.h * self.d, D)

    def forward(self, x, mask, state):
        b, s, _ = x.shape
        h, g, d = self.h, self.g, self.d
        fused = self.query_key_value(x)
        if self.layout == "contiguous":  # [q | k | v]
            q, k, v = (t.view(b, s, -1, d).transpose(1, 2) for t in fused.split([h * d, g * d, g * d], dim=-1))
        elif self.layout == "per_head":  # [B,S,H,3*dh], each head's q, k, v side by side
            q, k, v = fused.view(b, s, h, 3 * d).transpose(1, 2).split(d, dim=3)
        else:  # per group [q x R, k, v]; K/V broadcast to the group's R query heads
            qkv = fused.view(b, s, -1, h // g + 2, d)
            q = qkv[:, :, :, :-2]
            k, v = (torch.broadcast_to(qkv[:, :, :, [i]], q.shape) for i in (-2, -1))
            q, k, v = (t.flatten(2, 3).transpose(1, 2) for t in (q, k, v))
        z = torch.ops.fxbridge.attention(q, k, v, mask, d ** -0.5, None, self.layer_idx)
        return self.dense(z.reshape(b, s, -1))


class FusedLayer(DecoderLayer):
    def __init__(self, config, i, *, layout, **kw):
        super().__init__(config, i, **kw)
        self.self_attn = FusedAttention(i, layout)


def _spec(layout):
    return toy_spec(q=None, k=None, v=None, qkv="query_key_value", qkv_layout=layout, o_proj="dense")


def _config(layout):
    h, g, d = HEADS[layout]
    return toy_config(1, num_attention_heads=h, num_key_value_heads=g, head_dim=d)


@functools.cache
def _toy(layout):
    return capture_toy(toy_lm(config=_config(layout), layer=FusedLayer, layout=layout))


def _by_hand(fused, layout):
    """q [B,S,H,dh], k/v [B,S,Hkv,dh] of the fused output, written from the layout's definition."""
    h, g, d = HEADS[layout]
    b, s, _ = fused.shape
    if layout == "contiguous":
        return fused[..., :h * d].view(b, s, h, d), fused[..., h * d:(h + g) * d].view(b, s, g, d), \
            fused[..., (h + g) * d:].view(b, s, g, d)
    if layout == "per_head":
        x = fused.view(b, s, h, 3, d)
        return x[..., 0, :], x[..., 1, :], x[..., 2, :]
    r = h // g
    x = fused.view(b, s, g, r + 2, d)
    return x[..., :r, :].reshape(b, s, h, d), x[..., r, :], x[..., r + 1, :]


# The ops the pass emits: one unflatten of the fused output, the layout's slice/select (+ flatten) ops, and the
# form of the first HF node that holds q, k or v: contiguous and per_group hold them as [B,S,h,d] (HF's own
# transposes stay, reading the hooks), per_group's K/V repeated to H heads (unsqueeze, expand, flatten), and
# per_head splits after its transpose, so q, k, v are first seen as [B,h,S,d] (one transpose each).
EMITTED = {
    "contiguous": {"aten.unflatten.int": 1, "aten.slice.Tensor": 3},
    "per_head": {"aten.unflatten.int": 1, "aten.select.int": 3, "aten.transpose.int": 3},
    "per_group": {"aten.unflatten.int": 1, "aten.slice.Tensor": 1, "aten.select.int": 2,
                  "aten.flatten.using_ints": 3, "aten.unsqueeze.default": 2, "aten.expand.default": 2},
}


@pytest.mark.parametrize("layout", sorted(HEADS))
def test_each_layout_is_split_into_hooked_q_k_v_and_hf_split_is_gone(layout):
    toy = _toy(layout)
    root, graph = toy.fresh()
    fused = next(n for n in graph.nodes if str(n.target) == "aten.linear.default"
                 and QKV in [p for p, _ in n.meta["nn_module_stack"].values()])
    hf_split = {n for n in graph.nodes if n.op == "call_function" and n in fused.users}
    assert run_pass("split_fused_qkv", graph, root, _spec(layout), toy_dims(toy.model.config)) == 3
    assert hook_nodes(graph) == HOOKS
    assert aliases_for(hook_points(root)) == {f"blocks.0.attn.{r}.hook_out": f"blocks.0.attn.hook_{r}" for r in "qkv"}
    assert not hf_split & set(graph.nodes)  # HF's split ops were erased ...
    assert all(u.meta.get("fxbridge_pass") == "split_fused_qkv" for u in fused.users)  # ... only the layout reads it
    emitted = op_counts([n for n in graph.nodes if n.meta.get("fxbridge_pass") == "split_fused_qkv"])
    assert dict(emitted) == EMITTED[layout]
    seen = watch(root, HOOKS)
    ids = tokens()
    assert max_diff(run(root, graph, ids), eager(toy.model, ids)) < TOL
    want = _by_hand(module_io(toy.model, ids, [QKV])[QKV][1], layout)
    for name, part in zip(HOOKS, want):
        assert torch.equal(seen[name], part), name


def test_an_edit_of_one_kv_head_reaches_exactly_its_query_group():
    toy = _toy("per_group")
    root, graph = toy.fresh()
    run_pass("split_fused_qkv", graph, root, _spec("per_group"), toy_dims(toy.model.config))

    def zero_kv_head_1(t, hook):
        t[:, :, 1] = 0
    root.get_submodule("blocks.0.attn.hook_v").add_hook(zero_kv_head_1)

    def zero_group_1_value(mod, args, out):  # group 1 = features [1*(R+2)*d, 2*(R+2)*d); its v is the last d
        out = out.clone()
        out[..., 2 * 32 - 8:] = 0
        return out
    handle = toy.model.get_submodule(QKV).register_forward_hook(zero_group_1_value)
    ids = tokens()
    try:
        want = eager(toy.model, ids)
    finally:
        handle.remove()
    got = run(root, graph, ids)
    assert max_diff(got, want) < TOL and max_diff(got, eager(toy.model, ids)) > 1e-3


def test_a_layout_the_code_does_not_implement_is_refused():
    toy = _toy("per_group")
    root, graph = toy.fresh()
    err = no_match("split_fused_qkv", graph, root, _spec("contiguous"), toy_dims(toy.model.config))  # same sizes
    assert missed(err, 3, 0)
    assert isinstance(err.__cause__, NoMatch) and "does not produce" in str(err)
    assert hook_nodes(graph) == []


def test_sizes_unlike_the_dims_are_refused_and_named():
    toy = _toy("contiguous")
    root, graph = toy.fresh()
    dims = toy_dims(toy.model.config) | {"n_kv_heads": 1}  # (4 + 2*1) * 8 = 48 != 64 features
    err = no_match("split_fused_qkv", graph, root, _spec("contiguous"), dims)
    assert isinstance(err.__cause__, NoMatch) and "64 output features" in str(err) and "= 48" in str(err)


def test_a_graph_without_a_fused_projection_matches_nothing():
    toy = captured("llama")
    root, graph = toy.fresh()
    before = op_counts(graph)
    err = no_match("split_fused_qkv", graph, root, _spec("contiguous"), toy_dims(toy.model.config))
    assert missed(err, 6, 0) and isinstance(err.__cause__, NoMatch)
    assert hook_nodes(graph) == [] and op_counts(graph) == before
