"""Hook Gemma 4's mixture-of-experts block: router logits, routing, per-slot expert outputs, block output.

HF runs the MoE next to the dense MLP on the flattened residual x [B*S,D] (N = B*S tokens, E experts, top K):
    l = router_proj(..x..) ; p = softmax(l) ; w, idx = topk(p, K) ; w = w / sum(w) * per_expert_scale[idx]
    o = experts(norm(x), idx, w) -> [N,K,D] per-slot weighted outputs -> sum over K -> out_norm
->  l = moe.hook_router_logits(l) ; p = moe.hook_expert_weights(p) ; idx = moe.hook_expert_indices(idx)
    w = moe.hook_routing_weights(w) ; slots = moe.hook_expert_out(slots) ; y = hook_moe_out(norm(...))
Token-major tensors are seen as [B,S,...] (views: in-place edits propagate). The per-slot outputs are found
in HF's batched / grouped experts implementations (``view(N, K, D).sum(1)``), the ones torch.export captures.
The spec names the modules (``router``, ``router_proj``, ``experts``, ``out_norm``, relative to the decoder layer).
"""
from __future__ import annotations

import torch

from ..runtime.names import hook_name
from ..tracer.graph_facts import ModuleRegion, scoped_meta
from .base import NoMatch, PassContext, graph_pass
from .graph_utils import NOTHING, hook_after, hook_viewed, output_of, single

aten = torch.ops.aten
_SOFTMAX = {aten.softmax.int, aten._softmax.default}
_TOPK = {aten.topk.default}
_SUMS = {aten.sum.dim_IntList}
PER_LAYER = 6


def _rank(node) -> int:
    val = node.meta.get("val")
    return val.dim() if isinstance(val, torch.Tensor) else -1


def _getitem(node, index: int, where: str):
    return single([u for u in node.users if u.target.__name__ == "getitem" and u.args[1] == index],
                  f"item {index} of {node.name}", where)


def _batch_seq(graph, router_path: str):
    """Symbolic B and S of the token ids (HF flattens the [B,S,D] residual into the router's [B*S,D] input)."""
    flat = single(ModuleRegion.of(graph, router_path).inputs, "input", router_path)
    ids = single(graph.find_nodes(op="placeholder", target="input_ids"), "input_ids placeholder", "the graph")
    with graph.inserting_before(flat):
        b = graph.call_function(aten.sym_size.int, (ids, 0))
        s = graph.call_function(aten.sym_size.int, (ids, 1))
    for n in (b, s):
        n.meta.update(scoped_meta(flat, None))
    return b, s


@graph_pass(expects=lambda spec, dims, **_: PER_LAYER * dims["n_layers"] if dims.get("n_experts") else 0)
def hook_moe(ctx: PassContext, *, router: str, router_proj: str, experts: str, out_norm: str) -> int:
    """Hook router logits, expert probabilities, chosen experts, routing weights, slot outputs, MoE output."""
    spec, graph = ctx.spec, ctx.graph
    found = 0
    for i in range(ctx.dims["n_layers"]):
        layer, proj = spec.layer(i), spec.layer(i, router_proj)
        router_path, experts_path = spec.layer(i, router), spec.layer(i, experts)
        logits = ModuleRegion.of(graph, proj).output
        if logits is None:
            if ctx.dims.get("n_experts"):
                raise NoMatch(proj, "the router logits (the router projection's output)", NOTHING)
            continue
        b, s = _batch_seq(graph, router_path)
        tokens = ((aten.unflatten.int, (0, [b, s])), (aten.flatten.using_ints, (0, 1)))
        probs = single([u for u in logits.users if u.target in _SOFTMAX], "softmax of the router logits", router_path)
        indices = _getitem(single([u for u in probs.users if u.target in _TOPK], "top-k", router_path), 1, router_path)
        routing, expert_region = ModuleRegion.of(graph, router_path), ModuleRegion.of(graph, experts_path)
        weights = single([n for n in expert_region.inputs if n in routing], "routing weights read from the router",
                         experts_path)
        slots = single([n for n in expert_region.nodes if _rank(n) == 3
                        and any(u.target in _SUMS and u.args[1] == [1] for u in n.users)],
                       "per-slot output [N,K,D] summed over K", experts_path)
        for node, name, path in ((logits, "mlp.hook_router_logits", proj),
                                 (probs, "mlp.hook_router_probs", router_path),
                                 (indices, "mlp.hook_expert_indices", router_path),
                                 (weights, "mlp.hook_routing_weights", router_path),
                                 (slots, "mlp.hook_expert_out", experts_path)):
            hook_viewed(ctx, node, hook_name(name, i), to_hook=tokens[0], from_hook=tokens[1], scope=layer,
                        hf_module=path)
        out = output_of(graph, spec.layer(i, out_norm), "the MoE block's output norm")
        hook_after(ctx, out, hook_name("hook_moe_out", i), scope=layer, hf_module=layer)
        found += PER_LAYER
    return found
