"""Hook a softmax top-k mixture of experts whose experts module takes (hidden, indices, weights) (DBRX).

HF (N = B*S flattened tokens, E experts, top K):
    l = router_proj(x) [N,E] ; p = softmax(l) ; v, idx = topk(p, K) ; w = normalise(v)     (the family's)
    y = experts(x, idx, w): per slot w[n,k] * expert_idx[n,k](x[n]) -> [N,K,D] -> sum over K
->  l = mlp.hook_router_logits(l) ; p = mlp.hook_router_probs(p) ; idx = mlp.hook_expert_indices(idx)
    w = mlp.hook_routing_weights(w) ; slots = mlp.hook_expert_out(slots)
Token-major tensors are seen as [B,S,...] (views: in-place edits propagate). The routing weights are the experts
module's floating-point input computed from the top-k values (after the family's normalisation); the per-slot
outputs are the [N,K,D] value the experts module sums over K (HF's grouped / batched experts implementations, or
a family's capture-time forward written that way: ``ArchSpec.capture_forwards``). ``hook_mlp_out`` is left to
``hook_residual`` (the MoE block's output). The spec names the router projection and the experts module (relative
to the decoder layer); the MoE layers are ``spec.moe_layers``.
"""
from __future__ import annotations

import torch

from ..runtime.names import hook_name
from ..tracer.graph_facts import ModuleRegion, scoped_meta
from .base import NoMatch, PassContext, graph_pass
from .graph_utils import NOTHING, hook_viewed, single

aten = torch.ops.aten
_SOFTMAX = {aten.softmax.int, aten._softmax.default}
_TOPK = {aten.topk.default}
_SUMS = {aten.sum.dim_IntList}


def _getitem(node, index: int, where: str):
    return single([u for u in node.users if getattr(u.target, "__name__", "") == "getitem" and u.args[1] == index],
                  f"item {index} of {node.name}", where)


def _depends_on(node, target, stop: set) -> bool:
    todo, seen = [node], set()
    while todo:
        n = todo.pop()
        if n is target:
            return True
        if n in seen or n in stop:
            continue
        seen.add(n)
        todo.extend(n.all_input_nodes)
    return False


def _batch_seq(graph, before):
    ids = single(graph.find_nodes(op="placeholder", target="input_ids"), "input_ids placeholder", "the graph")
    with graph.inserting_before(before):
        b = graph.call_function(aten.sym_size.int, (ids, 0))
        s = graph.call_function(aten.sym_size.int, (ids, 1))
    for n in (b, s):
        n.meta.update(scoped_meta(before, None))
    return b, s


def _per_layer(probs: bool) -> int:
    return 5 if probs else 4


@graph_pass(expects=lambda spec, dims, probs=True, **_: _per_layer(probs) * len(spec.moe_layers),
            before=("hook_residual",))
def hook_topk_moe(ctx: PassContext, *, router: str, experts: str, probs: bool = True) -> int:
    """Hook router logits, router probabilities (``probs``: top-k reads a softmax of the logits), chosen experts,
    routing weights and per-slot expert outputs."""
    spec, graph = ctx.spec, ctx.graph
    found = 0
    for i in spec.moe_layers:
        proj, experts_path = spec.layer(i, router), spec.layer(i, experts)
        region = ModuleRegion.of(graph, proj)
        logits = region.output
        if logits is None:
            raise NoMatch(proj, "the router projection of an MoE layer (spec.moe_layers)", NOTHING)
        b, s = _batch_seq(graph, region.nodes[0])
        tokens = ((aten.unflatten.int, (0, [b, s])), (aten.flatten.using_ints, (0, 1)))
        chosen_from = logits
        if probs:
            chosen_from = single([u for u in logits.users if u.target in _SOFTMAX], "softmax of the router logits",
                                 proj)
        topk = single([u for u in chosen_from.users if u.target in _TOPK],
                      f"top-k of the router {'probabilities' if probs else 'logits'}", proj)
        values, indices = _getitem(topk, 0, proj), _getitem(topk, 1, proj)
        expert_region = ModuleRegion.of(graph, experts_path)
        if not any(u in expert_region for u in indices.users):
            raise NoMatch(experts_path, "the top-k indices read by the experts", f"read by {list(indices.users)}")
        weights = single([n for n in expert_region.inputs if n is not indices and n.meta["val"].is_floating_point()
                          and _depends_on(n, values, {logits})],
                         "routing weights computed from the top-k values", experts_path)
        slots = single([n for n in expert_region.nodes if isinstance(n.meta.get("val"), torch.Tensor)
                        and n.meta["val"].dim() == 3 and int(n.meta["val"].shape[1]) == ctx.dims["top_k"]
                        and any(u.target in _SUMS and list(u.args[1]) == [1] for u in n.users)],
                       "per-slot output [N,K,D] summed over K", experts_path)
        todo = [(logits, "mlp.hook_router_logits", proj)]
        if probs:
            todo.append((chosen_from, "mlp.hook_router_probs", proj))
        todo += [(indices, "mlp.hook_expert_indices", proj), (weights, "mlp.hook_routing_weights", proj),
                 (slots, "mlp.hook_expert_out", experts_path)]
        layer = spec.layer(i)
        for node, name, path in todo:
            hook_viewed(ctx, node, hook_name(name, i), to_hook=tokens[0], from_hook=tokens[1], scope=layer,
                        hf_module=path)
        found += len(todo)
    return found
