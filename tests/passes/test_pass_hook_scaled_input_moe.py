"""hook_scaled_input_moe on a Llama-4-shaped toy: experts run on every token with the router's sigmoid scores
multiplied into their input, plus a shared expert added in place; the MoE layer interleaved with a dense one."""
import functools

import torch
import torch.nn.functional as F
from torch import nn

from toy import (D, DecoderLayer, GatedMLP, captured, capture_toy, eager, hook_nodes, max_diff, missed,
                 no_match, run, run_pass, tokens, toy_dims, toy_lm, toy_spec)
from fxbridge.passes import hook_scaled_input_moe

E, K, FE = 4, 2, 12
SPEC = toy_spec(moe_layers=(1,), passes=(hook_scaled_input_moe(moe="mlp", router="mlp.router", experts="mlp.experts",
                                              shared="mlp.shared_expert"),))
HOOKS = ["mlp.hook_router_logits", "mlp.hook_expert_indices", "mlp.hook_routing_weights", "mlp.hook_expert_out",
         "mlp.hook_shared_out"]


class Router(nn.Linear):
    def __init__(self):
        super().__init__(D, E, bias=False)

    def forward(self, x):
        logits = super().forward(x)
        v, i = torch.topk(logits, K, dim=1)
        scores = torch.full_like(logits, float("-inf")).scatter_(1, i, v)
        return torch.sigmoid(scores.float()).to(scores.dtype), logits


class Experts(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.randn(E, D, 2 * FE) * 0.2)
        self.down_proj = nn.Parameter(torch.randn(E, FE, D) * 0.2)

    def forward(self, x):
        x = x.view(E, -1, D)
        gate, up = torch.bmm(x, self.gate_up_proj).chunk(2, dim=-1)
        return torch.bmm(up * F.silu(gate), self.down_proj).view(-1, D)


class MoE(nn.Module):
    def __init__(self):
        super().__init__()
        self.router, self.experts, self.shared_expert = Router(), Experts(), GatedMLP()

    def forward(self, h):
        x = h.reshape(-1, D)
        scores, logits = self.router(x)
        routed = self.experts(x.repeat(E, 1) * scores.transpose(0, 1).reshape(-1, 1))
        out = self.shared_expert(x)
        out.add_(routed.reshape(E, -1, D).sum(dim=0))
        return out, logits


class Layer(DecoderLayer):
    def __init__(self, config, i, **kw):
        super().__init__(config, i, **kw)
        if i == 1:
            self.mlp = MoE()

    def forward(self, x, mask, state):
        x = x + self.self_attn(self.input_layernorm(x), mask, state)
        out = self.mlp(self.post_attention_layernorm(x))
        return x + (out[0] if isinstance(out, tuple) else out).view(x.shape)


def _io(model, ids, paths):
    """path -> (first input, output as a tuple of copies) in one eager forward (these modules return tuples, and
    the shared expert's output is added into in place afterwards)."""
    seen, handles = {}, []
    for path in paths:
        def keep(mod, args, out, path=path):
            seen[path] = (args[0].clone(), tuple(o.clone() for o in out) if isinstance(out, tuple) else (out.clone(),))
        handles.append(model.get_submodule(path).register_forward_hook(keep))
    try:
        eager(model, ids)
    finally:
        for h in handles:
            h.remove()
    return seen


def _expert(experts, e, x):
    gate, up = (x @ experts.gate_up_proj[e]).chunk(2, dim=-1)
    return (up * F.silu(gate)) @ experts.down_proj[e]


@functools.cache
def _toy():
    return capture_toy(toy_lm(2, layer=Layer))


def test_five_points_on_the_moe_layer_values_as_the_toy_computes():
    toy = _toy()
    root, graph = toy.fresh()
    dims = toy_dims(toy.model.config, n_experts=E, top_k=K)
    assert run_pass("hook_scaled_input_moe", graph, root, SPEC, dims) == 5
    assert sorted(hook_nodes(graph)) == sorted(f"blocks.1.{h}" for h in HOOKS)
    seen = {}
    for h in HOOKS:
        root.get_submodule(f"blocks.1.{h}").add_hook(lambda t, hook: seen.__setitem__(hook.name, t.clone()))
    ids = tokens(3, 4)
    assert max_diff(run(root, graph, ids), eager(toy.model, ids)) < 1e-6
    io = _io(toy.model, ids, ["model.layers.1.mlp.router", "model.layers.1.mlp", "model.layers.1.mlp.shared_expert"])
    scores, logits = io["model.layers.1.mlp.router"][1]
    top = torch.topk(logits, K, dim=1)
    b = "blocks.1.mlp"
    assert torch.equal(seen[f"{b}.hook_router_logits"], logits.view(3, 4, E))
    assert torch.equal(seen[f"{b}.hook_expert_indices"], top.indices.view(3, 4, K))
    assert torch.equal(seen[f"{b}.hook_routing_weights"], scores.gather(1, top.indices).view(3, 4, K))
    x = io["model.layers.1.mlp"][0].reshape(-1, D)
    experts = toy.model.model.layers[1].mlp.experts
    want = torch.stack([torch.stack([_expert(experts, int(top.indices[n, k]), scores[n, top.indices[n, k]] * x[n])
                                     for k in range(K)]) for n in range(x.shape[0])])
    assert max_diff(seen[f"{b}.hook_expert_out"], want.view(3, 4, K, D)) < 1e-6
    # the shared expert's output as it was computed, before HF's in-place add of the routed output
    assert max_diff(seen[f"{b}.hook_shared_out"], io["model.layers.1.mlp.shared_expert"][1][0].view(3, 4, D)) == 0.0
    assert max_diff(seen[f"{b}.hook_shared_out"] + seen[f"{b}.hook_expert_out"].sum(2),
                    io["model.layers.1.mlp"][1][0].view(3, 4, D)) < 1e-6


def test_zeroing_a_slot_removes_that_expert_there():
    toy = _toy()
    root, graph = toy.fresh()
    run_pass("hook_scaled_input_moe", graph, root, SPEC, toy_dims(toy.model.config, n_experts=E, top_k=K))
    ids = tokens(2, 5)
    seen = {}
    for h in ("mlp.hook_expert_out", "mlp.hook_expert_indices", "mlp.hook_routing_weights"):
        root.get_submodule(f"blocks.1.{h}").add_hook(lambda t, hook: seen.__setitem__(hook.name, t.clone()))
    plain = run(root, graph, ids)

    def zero(t, hook):
        t[1, 2, 1] = 0
    root.get_submodule("blocks.1.mlp.hook_expert_out").add_hook(zero)
    got = run(root, graph, ids)
    slot = seen["blocks.1.mlp.hook_expert_out"][1, 2, 1]
    assert slot.abs().max() > 1e-3
    moe = toy.model.model.layers[1].mlp

    def remove(mod, args, out):
        y = out[0].clone().view(2, 5, D)
        y[1, 2] -= slot
        return y.view(out[0].shape), out[1]
    handle = moe.register_forward_hook(remove)
    try:
        want = eager(toy.model, ids)
    finally:
        handle.remove()
    assert max_diff(got, want) < 1e-6 and max_diff(got, plain) > 1e-4


def test_a_dense_model_matches_nothing_where_moe_layers_are_announced():
    toy = captured("llama")
    root, graph = toy.fresh()
    err = no_match("hook_scaled_input_moe", graph, root, SPEC,
                   toy_dims(toy.model.config, n_experts=E, top_k=K))
    assert missed(err, 5, 0)
    assert hook_nodes(graph) == []
