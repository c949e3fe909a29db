"""hook_moe on a Gemma-4-shaped toy: router logits, expert probabilities, chosen experts, routing weights,
per-slot expert outputs and the MoE block output, token-major tensors seen as [B,S,...]."""
import functools
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from toy import (missed, D, LLAMA_SPEC, DecoderLayer, RMSNorm, capture_toy, captured, delta, eager, hook_nodes, max_diff,
                 module_io, no_match, op_counts, run, run_pass, tokens, toy_dims, toy_lm)

E, K, FE = 4, 2, 12  # experts, top-k, expert width
HOOKS = ["mlp.hook_router_logits", "mlp.hook_router_probs", "mlp.hook_expert_indices", "mlp.hook_routing_weights",
         "mlp.hook_expert_out", "hook_moe_out"]
MOE_SPEC = replace(LLAMA_SPEC, moe_layers=(0,), moe_beside_mlp=True)  # layer 0's MoE block runs beside its MLP


class Router(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(D, E, bias=False)

    def forward(self, x):  # x [N,D]
        weights, indices = torch.topk(torch.softmax(self.proj(x), dim=-1), K, dim=-1)
        return weights / weights.sum(dim=-1, keepdim=True), indices


class Experts(nn.Module):
    """Batched experts: each token's K chosen experts, weighted, as [N,K,D] slots summed over K."""

    def __init__(self):
        super().__init__()
        self.w_in, self.w_out = nn.Parameter(torch.randn(E, D, FE) * 0.2), nn.Parameter(torch.randn(E, FE, D) * 0.2)
        self.record, self.slots = False, None

    def forward(self, x, indices, weights):
        h = F.gelu(torch.einsum("nd,nkdf->nkf", x, self.w_in[indices]))
        slots = torch.einsum("nkf,nkfd->nkd", h, self.w_out[indices]) * weights[..., None]
        if self.record:
            self.slots = slots.detach().clone()
        return slots.sum(dim=1)


class MoELayer(DecoderLayer):
    """The MoE block next to the dense MLP, on the flattened residual, normed by post_feedforward_layernorm_2."""

    def __init__(self, config, i, **kw):
        super().__init__(config, i, **kw)
        self.router, self.experts, self.post_feedforward_layernorm_2 = Router(), Experts(), RMSNorm()

    def forward(self, x, mask, state):
        x = x + self.self_attn(self.input_layernorm(x), mask, state)
        h = self.post_attention_layernorm(x)
        flat = h.reshape(-1, h.shape[-1])
        weights, indices = self.router(flat)
        moe = self.post_feedforward_layernorm_2(self.experts(flat, indices, weights).reshape(h.shape))
        return x + self.mlp(h) + moe


@functools.cache
def _toy():
    return capture_toy(toy_lm(1, layer=MoELayer))


def _names():
    return [f"blocks.0.{h}" for h in HOOKS]


def test_hooks_six_points_per_layer_seen_per_token():
    toy = _toy()
    root, graph = toy.fresh()
    before = op_counts(graph)
    assert run_pass("hook_moe", graph, root, MOE_SPEC, toy_dims(toy.model.config, n_experts=E, top_k=K)) == 6
    # B and S read off the [B,S,D] residual; five [N,...] tensors seen as [B,S,...] through unflatten / flatten
    assert delta(before, op_counts(graph)) == {"aten.flatten.using_ints": 5, "aten.sym_size.int": 2,
                                               "aten.unflatten.int": 5}
    assert sorted(hook_nodes(graph)) == sorted(_names())
    seen = {}
    for name in _names():
        root.get_submodule(name).add_hook(lambda t, hook: seen.__setitem__(hook.name, t.clone()))
    ids = tokens(3, 4)
    assert max_diff(run(root, graph, ids), eager(toy.model, ids)) == 0.0
    experts = [layer.experts for layer in toy.model.model.layers]
    for i in range(1):
        layer = f"model.layers.{i}"
        experts[i].record = True
        try:
            io = module_io(toy.model, ids, [f"{layer}.router.proj", f"{layer}.post_feedforward_layernorm_2"])
        finally:
            experts[i].record = False
        logits = io[f"{layer}.router.proj"][1]
        probs = torch.softmax(logits, dim=-1)
        top = torch.topk(probs, K, dim=-1)
        b = f"blocks.{i}.mlp"
        assert torch.equal(seen[f"{b}.hook_router_logits"], logits.view(3, 4, E))
        assert torch.equal(seen[f"{b}.hook_router_probs"], probs.view(3, 4, E))
        assert torch.equal(seen[f"{b}.hook_expert_indices"], top.indices.view(3, 4, K))
        assert max_diff(seen[f"{b}.hook_routing_weights"],
                        (top.values / top.values.sum(-1, keepdim=True)).view(3, 4, K)) == 0.0
        assert torch.equal(seen[f"{b}.hook_expert_out"], experts[i].slots.view(3, 4, K, D))
        assert torch.equal(seen[f"blocks.{i}.hook_moe_out"], io[f"{layer}.post_feedforward_layernorm_2"][1])


def test_an_in_place_edit_of_the_routing_weights_reaches_the_experts():
    toy = _toy()
    root, graph = toy.fresh()
    run_pass("hook_moe", graph, root, MOE_SPEC, toy_dims(toy.model.config, n_experts=E, top_k=K))

    def first_choice_only(t, hook):
        t[..., 1] = 0  # a view of the router's [N,K] output: the experts read the edit
    root.get_submodule("blocks.0.mlp.hook_routing_weights").add_hook(first_choice_only)
    ids = tokens()

    def drop_second(mod, args):
        x, indices, weights = args
        weights = weights.clone()
        weights[:, 1] = 0
        return x, indices, weights
    handle = toy.model.model.layers[0].experts.register_forward_pre_hook(drop_second)
    try:
        want = eager(toy.model, ids)
    finally:
        handle.remove()
    got = run(root, graph, ids)
    assert max_diff(got, want) == 0.0 and max_diff(got, eager(toy.model, ids)) > 1e-4


def test_an_moe_block_the_config_does_not_announce_is_a_count_mismatch():
    toy = _toy()
    root, graph = toy.fresh()
    err = no_match("hook_moe", graph, root, LLAMA_SPEC, toy_dims(toy.model.config, n_experts=E))  # moe_layers=()
    assert missed(err, 0, 6)


def test_a_graph_without_a_router_matches_nothing():
    toy = captured("llama")
    root, graph = toy.fresh()
    before = op_counts(graph)
    spec = replace(LLAMA_SPEC, moe_layers=(0, 1))
    err = no_match("hook_moe", graph, root, spec, toy_dims(toy.model.config, n_experts=E, top_k=K))
    assert missed(err, 12, 0)
    assert hook_nodes(graph) == [] and op_counts(graph) == before
