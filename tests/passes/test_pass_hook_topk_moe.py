"""hook_topk_moe on a DBRX-shaped toy: router projection -> softmax -> top-k -> normalised weights in the FFN,
experts(x, indices, weights) summing [N,K,D] slots over K."""
import functools

import torch
import torch.nn.functional as F
from torch import nn

from toy import (D, DecoderLayer, captured, capture_toy, eager, hook_nodes, max_diff, missed, module_io, no_match,
                 run, run_pass, tokens, toy_dims, toy_lm, toy_spec)
from fxbridge.passes import hook_topk_moe

E, K, FE = 4, 2, 12
SPEC = toy_spec(moe_layers=(0, 1), passes=(hook_topk_moe(router="mlp.router.layer", experts="mlp.experts"),))
HOOKS = ["mlp.hook_router_logits", "mlp.hook_router_probs", "mlp.hook_expert_indices", "mlp.hook_routing_weights",
         "mlp.hook_expert_out"]


class Router(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(D, E, bias=False)

    def forward(self, h):
        return self.layer(h.view(-1, h.shape[-1]))


class Experts(nn.Module):
    def __init__(self):
        super().__init__()
        self.w_in, self.w_out = nn.Parameter(torch.randn(E, D, FE) * 0.2), nn.Parameter(torch.randn(E, FE, D) * 0.2)

    def forward(self, h, indices, weights):
        x = h.reshape(-1, D)
        hidden = F.silu(torch.einsum("nd,nkdf->nkf", x, self.w_in[indices]))
        slots = torch.einsum("nkf,nkfd->nkd", hidden, self.w_out[indices]) * weights[..., None]
        return slots.sum(dim=1).view(h.shape)


class FFN(nn.Module):
    def __init__(self):
        super().__init__()
        self.router, self.experts = Router(), Experts()

    def forward(self, h):
        probs = torch.softmax(self.router(h), dim=1)
        v, i = torch.topk(probs, K, dim=-1)
        return self.experts(h, i, v / torch.norm(v, p=1, dim=-1, keepdim=True))


@functools.cache
def _toy():
    return capture_toy(toy_lm(2, mlp=FFN))


def test_five_points_per_layer_values_as_the_toy_computes():
    toy = _toy()
    root, graph = toy.fresh()
    dims = toy_dims(toy.model.config, n_experts=E, top_k=K)
    assert run_pass("hook_topk_moe", graph, root, SPEC, dims) == 10
    assert sorted(hook_nodes(graph)) == sorted(f"blocks.{i}.{h}" for i in range(2) for h in HOOKS)
    seen = {}
    for h in HOOKS:
        root.get_submodule(f"blocks.0.{h}").add_hook(lambda t, hook: seen.__setitem__(hook.name, t.clone()))
    ids = tokens(3, 4)
    assert max_diff(run(root, graph, ids), eager(toy.model, ids)) == 0.0
    io = module_io(toy.model, ids, ["model.layers.0.mlp.router", "model.layers.0.mlp"])
    logits = io["model.layers.0.mlp.router"][1]
    probs = logits.softmax(1)
    top = torch.topk(probs, K, dim=-1)
    weights = top.values / top.values.sum(-1, keepdim=True)
    b = "blocks.0.mlp"
    assert torch.equal(seen[f"{b}.hook_router_logits"], logits.view(3, 4, E))
    assert torch.equal(seen[f"{b}.hook_router_probs"], probs.view(3, 4, E))
    assert torch.equal(seen[f"{b}.hook_expert_indices"], top.indices.view(3, 4, K))
    assert max_diff(seen[f"{b}.hook_routing_weights"], weights.view(3, 4, K)) < 1e-7
    assert max_diff(seen[f"{b}.hook_expert_out"].sum(2), io["model.layers.0.mlp"][1]) < 1e-6


def test_an_in_place_edit_of_the_routing_weights_reaches_the_experts():
    toy = _toy()
    root, graph = toy.fresh()
    run_pass("hook_topk_moe", graph, root, SPEC, toy_dims(toy.model.config, n_experts=E, top_k=K))

    def first_only(t, hook):
        t[..., 1] = 0
    root.get_submodule("blocks.1.mlp.hook_routing_weights").add_hook(first_only)
    ids = tokens()

    def drop_second(mod, args):
        h, indices, weights = args
        weights = weights.clone()
        weights[:, 1] = 0
        return h, indices, weights
    handle = toy.model.model.layers[1].mlp.experts.register_forward_pre_hook(drop_second)
    try:
        want = eager(toy.model, ids)
    finally:
        handle.remove()
    got = run(root, graph, ids)
    assert max_diff(got, want) < 1e-6 and max_diff(got, eager(toy.model, ids)) > 1e-4


def test_a_dense_model_matches_nothing_where_moe_layers_are_announced():
    toy = captured("llama")
    root, graph = toy.fresh()
    err = no_match("hook_topk_moe", graph, root, SPEC, toy_dims(toy.model.config, n_experts=E, top_k=K))
    assert missed(err, 10, 0)
    assert hook_nodes(graph) == []
