"""Routed-MoE families (architectures/moe.py, and Gemma 4's MoE branch): where the routing hooks sit and what they hold.

Oracles: HF's own modules (the router's output and the experts module's inputs, recorded with forward hooks on the
eager reference) and each expert computed by hand from HF's expert weights
(``down_proj[e] @ (act(gate) * up)`` with ``gate_up_proj[e] = [gate; up]``).
"""
import pytest
import torch

from conftest import arch_params, traced
from tiny import forward_hooks, tokens

TOL = 1e-5
# one family per routing convention in make test (softmax top-k renormalised, shared expert with a sigmoid gate,
# dense first layer + group-limited sigmoid routing + shared experts); the rest with -m slow
FAST = ("mixtral", "qwen2_moe", "glm4_moe")
ALL = ("mixtral", "qwen3_moe", "olmoe", "flex_olmo", "minimax_m2", "phimoe", "qwen2_moe", "ernie4_5_moe", "glm4_moe",
       "granitemoe")


def _params():
    return [p if p.values[0] in FAST else pytest.param(*p.values, marks=(*p.marks, pytest.mark.slow))
            for p in arch_params(ALL)]


def _block(layer):
    return layer.mlp if hasattr(layer, "mlp") else layer.block_sparse_moe  # GraniteMoE's name for it


def _moe_layers(model):
    return [i for i, layer in enumerate(model.model.layers) if hasattr(_block(layer), "experts")]


def _record(ref, ids, layer):
    """HF's router output, the experts module's (x, indices, weights) inputs and output, the block's output."""
    block = _block(ref.model.layers[layer])
    seen = {}
    router = getattr(block, "gate", None) if hasattr(block, "gate") else block.router
    with forward_hooks((router, lambda m, a, out: seen.__setitem__("router", out)),
                       (block.experts, lambda m, a, out: seen.__setitem__("experts", (a, out))),
                       (block, lambda m, a, out: seen.__setitem__("block", out))), torch.no_grad():
        logits = ref(ids).logits
    return logits, seen


def _logits_of(router_out, model):
    """The router's logits among its outputs (their order differs between families and transformers versions): the
    float tensor over all experts."""
    n_experts = _block(model.model.layers[_moe_layers(model)[0]]).experts.gate_up_proj.shape[0]
    outs = router_out if isinstance(router_out, tuple) else (router_out,)
    (logits,) = [t for t in outs if t.is_floating_point() and t.shape[-1] == n_experts][:1]
    return logits


def _expert_by_hand(experts, e: int, x: torch.Tensor) -> torch.Tensor:
    """Expert e on tokens x [..., D] from HF's weights: gate_up_proj[e] = [gate; up] (F each), down_proj[e]."""
    gate, up = (x @ experts.gate_up_proj[e].T).chunk(2, dim=-1)
    return (experts.act_fn(gate) * up) @ experts.down_proj[e].T


@pytest.mark.parametrize("arch", _params())
def test_routing_hooks_hold_what_hf_routes_and_the_slots_are_the_experts_by_hand(arch):
    model, ref, gm = traced(arch)
    ids = tokens(2, 5)
    B, S = ids.shape
    for i in _moe_layers(model):
        _, seen = _record(ref, ids, i)
        (x, indices, weights), routed = seen["experts"]
        router_logits = _logits_of(seen["router"], model)
        with torch.no_grad():
            _, cache = gm.run_with_cache(ids, names_filter=lambda n, i=i: n.startswith(f"blocks.{i}.mlp.hook_")
                                         or n == f"blocks.{i}.hook_mlp_out")
        b = f"blocks.{i}.mlp"
        assert (cache[f"{b}.hook_router_logits"] - router_logits.view(B, S, -1)).abs().max() < TOL
        assert torch.equal(cache[f"{b}.hook_expert_indices"], indices.view(B, S, -1))
        assert (cache[f"{b}.hook_routing_weights"] - weights.view(B, S, -1)).abs().max() < TOL
        slots = cache[f"{b}.hook_expert_out"]
        experts = _block(ref.model.layers[i]).experts
        with torch.no_grad():
            by_hand = torch.stack([torch.stack([weights[n, k] * _expert_by_hand(experts, int(indices[n, k]), x[n])
                                                for k in range(indices.shape[1])]) for n in range(x.shape[0])])
        assert slots.shape == (B, S, indices.shape[1], gm.dims["d_model"])
        assert (slots - by_hand.view(B, S, indices.shape[1], -1)).abs().max() < TOL
        # the slots add up to the routed output; routed + shared is the block's output
        assert (slots.sum(2) - routed.view(B, S, -1)).abs().max() < TOL
        shared = cache.get(f"{b}.hook_shared_out") if f"{b}.hook_shared_out" in gm.hook_dict else 0
        block_out = seen["block"][0] if isinstance(seen["block"], tuple) else seen["block"]
        assert (slots.sum(2) + shared - block_out.view(B, S, -1)).abs().max() < TOL


@pytest.mark.parametrize("arch", _params())
def test_zeroing_one_slot_removes_that_experts_contribution_at_that_token_only(arch):
    model, ref, gm = traced(arch)
    ids = tokens(2, 5)
    i = _moe_layers(model)[-1]
    _, seen = _record(ref, ids, i)
    (x, indices, weights), _ = seen["experts"]
    token, slot = 6, 1  # batch row 1, position 1 (flattened token 6), the second choice
    e, w = int(indices[token, slot]), weights[token, slot]
    experts = _block(ref.model.layers[i]).experts
    with torch.no_grad():
        contribution = w * _expert_by_hand(experts, e, x[token])

    def remove(mod, args, out):  # on the block's output, before any multiplier HF applies to it (GraniteMoE)
        out = out.clone()
        out.view(-1, out.shape[-1])[token] -= contribution
        return out
    with forward_hooks((_block(ref.model.layers[i]), remove)), torch.no_grad():
        want = ref(ids).logits

    def zero(t, hook):
        t[1, 1, slot] = 0
    with torch.no_grad():
        got = gm.run_with_hooks(ids, fwd_hooks=[(f"blocks.{i}.mlp.hook_routing_weights", zero)])
        plain = gm(ids)
    assert (got - want).abs().max() < TOL * 10 and (got - plain).abs().max() > 1e-4
    # only that token and the ones after it (through attention) change: earlier positions are untouched
    assert (got[1, :1] - plain[1, :1]).abs().max() < TOL and torch.equal(got[0], plain[0])


@pytest.mark.parametrize("arch", arch_params(["qwen2_moe"]))
def test_the_shared_expert_gate_is_the_sigmoid_of_hfs_gate_and_scales_the_shared_expert(arch):
    model, ref, gm = traced(arch)
    ids = tokens(2, 5)
    block = ref.model.layers[1].mlp
    seen = {}
    with forward_hooks((block.shared_expert_gate, lambda m, a, out: seen.__setitem__("gate", out)),
                       (block.shared_expert, lambda m, a, out: seen.__setitem__("shared", out))), torch.no_grad():
        ref(ids)
    with torch.no_grad():
        _, cache = gm.run_with_cache(ids, names_filter=["blocks.1.mlp.hook_shared_gate", "blocks.1.mlp.hook_shared_out"])
    gate = torch.sigmoid(seen["gate"]).view(2, 5, 1)
    assert (cache["blocks.1.mlp.hook_shared_gate"] - gate).abs().max() < TOL
    assert (cache["blocks.1.mlp.hook_shared_out"] - gate * seen["shared"].view(2, 5, -1)).abs().max() < TOL


@pytest.mark.parametrize("arch", arch_params(["glm4_moe", "qwen3_moe"]))
def test_dense_layers_keep_the_mlp_hooks_and_moe_layers_have_none_of_them(arch):
    model, _, gm = traced(arch)
    moe = _moe_layers(model)
    for i in range(model.config.num_hidden_layers):
        assert (f"blocks.{i}.mlp.hook_post" in gm.hook_dict) == (i not in moe)
        assert (f"blocks.{i}.mlp.hook_router_logits" in gm.hook_dict) == (i in moe)
    assert 0 < len(moe) < model.config.num_hidden_layers
