"""Hook a mixture of experts that scales each expert's INPUT by its router score (Llama 4's ``Llama4TextMoe``).

HF (N = B*S flattened tokens, E experts, top K; the experts run on every token, dense ``bmm`` over E):
    x = reshape(h, [N,D]) ; l = router(x) [N,E] ; v, idx = topk(l, K)
    s = sigmoid(scatter(full(-inf), 1, idx, v))          [N,E], 0 where not chosen
    y = experts(repeat(x, E) * s^T)                      [E*N,D] ; routed = sum(view(y, [E,N,D]), 0)
    out = shared(x) ; out.add_(routed)                   (in place into the shared expert's output)
->  l = mlp.hook_router_logits(l) ; idx = mlp.hook_expert_indices(idx)
    w = mlp.hook_routing_weights(sigmoid(v))             [N,K]: the chosen experts' scores
    s = scatter(zeros, 1, idx, w)                        (bit-identical: sigmoid(-inf) = 0)
    slots = mlp.hook_expert_out(gather(view(y,[E,N,D]) over idx))   [N,K,D]: expert(w * x) per chosen slot
    routed = sum(slots, 1) ; out = mlp.hook_shared_out(shared(x)) + routed   (out of place)
Not-chosen experts see a zero input and (no biases, act(0) * 0 = 0) output exactly 0, so summing the K chosen slots
is HF's sum over all E. Token-major hooks are seen as [B,S,...] (views); the block's output is returned as [B,S,D]
inside the MoE module, so ``hook_residual`` hooks it as ``hook_mlp_out``. Editing ``hook_routing_weights`` rescales
the experts' inputs (as HF's scores do); zeroing a slot of ``hook_expert_out`` removes that expert at that token.

The spec names the modules relative to the decoder layer (``moe``, ``router``, ``experts``, ``shared``); the MoE
layers are ``spec.moe_layers`` (the others are dense: ``hook_mlp``).
"""
from __future__ import annotations

import torch

from ..runtime.names import hook_name
from ..tracer.graph_facts import ModuleRegion, scoped_meta
from .base import NoMatch, PassContext, graph_pass
from .graph_utils import NOTHING, first_tensor, hook_viewed, output_of, single, token_dims

aten = torch.ops.aten
_TOPK = {aten.topk.default}
_SCATTER = {aten.scatter_.src, aten.scatter.src}
_SIGMOID = {aten.sigmoid.default}
_LINEAR = {aten.linear.default}
_SUMS = {aten.sum.dim_IntList}
_ADDS = {aten.add_.Tensor, aten.add.Tensor}
_SHAPE_ONLY = {aten.reshape.default, aten.view.default, aten.to.dtype}
PER_LAYER = 5


def _getitem(node, index: int, where: str):
    return single([u for u in node.users if getattr(u.target, "__name__", "") == "getitem" and u.args[1] == index],
                  f"item {index} of {node.name}", where)


def _follow(node, ops):
    """``node`` followed through its single users while they are ``ops`` (dtype casts, views)."""
    while len(node.users) == 1 and next(iter(node.users)).target in ops:
        node = next(iter(node.users))
    return node


def _call(graph, after, meta_node, scope, op, args):
    with graph.inserting_after(after):
        node = graph.call_function(op, args)
    node.meta.update(scoped_meta(meta_node, scope))
    return node


@graph_pass(expects=lambda spec, dims, **_: PER_LAYER * len(spec.moe_layers), before=("hook_residual",))
def hook_scaled_input_moe(ctx: PassContext, *, moe: str, router: str, experts: str, shared: str) -> int:
    """Hook router logits, chosen experts, routing weights, per-slot expert outputs and the shared expert."""
    spec, graph = ctx.spec, ctx.graph
    found = 0
    for i in spec.moe_layers:
        moe_path, router_path = spec.layer(i, moe), spec.layer(i, router)
        experts_path, shared_path = spec.layer(i, experts), spec.layer(i, shared)
        routing = ModuleRegion.of(graph, router_path)
        if not routing.nodes:
            raise NoMatch(router_path, "the router of an MoE layer (spec.moe_layers)", NOTHING)
        b, s = token_dims(graph, first_tensor(routing.nodes), ctx.dims["d_model"], routing.path)
        tokens = ((aten.unflatten.int, (0, [b, s])), (aten.flatten.using_ints, (0, 1)))

        # router: logits -> topk -> scatter into -inf -> sigmoid
        logits = single([n for n in routing.nodes if n.target in _LINEAR], "router projection", router_path)
        topk = single([u for u in logits.users if u.target in _TOPK], "top-k of the router logits", router_path)
        values, indices = _getitem(topk, 0, router_path), _getitem(topk, 1, router_path)
        scatter = single([n for n in routing.nodes if n.target in _SCATTER and n.args[2] is indices
                          and n.args[3] is values], "scatter of the top-k logits into the expert axis", router_path)
        sigmoid = single([n for n in routing.nodes if n.target in _SIGMOID], "sigmoid of the scattered scores",
                         router_path)
        scores = _follow(sigmoid, {aten.to.dtype})
        if routing.output is not scores:
            raise NoMatch(router_path, "the router's scores (sigmoid of the scattered top-k logits) as its output",
                          f"{routing.output}")
        dtype = scores.meta["val"].dtype
        # the chosen scores, computed as HF does (in float32), then scattered onto zeros
        w = _call(graph, scores, scores, router_path, aten.to.dtype, (values, torch.float32))
        w_sig = _call(graph, w, scores, router_path, aten.sigmoid.default, (w,))
        weights = _call(graph, w_sig, scores, router_path, aten.to.dtype, (w_sig, dtype))
        zeros = _call(graph, weights, scores, router_path, aten.zeros_like.default, (logits,))
        new_scores = _call(graph, zeros, scores, router_path, aten.scatter.src, (zeros, 1, indices, weights))
        scores.replace_all_uses_with(new_scores)
        dead = [scores]
        while dead[-1] is not scatter:
            dead.append(dead[-1].args[0])
        dead.append(scatter.args[0])  # full_like(-inf)
        for node in dead:
            if node.users:
                raise NoMatch(router_path, "the scattered scores used only by the experts' input scaling",
                              f"{node.name} also read by {[u.name for u in node.users]}")
            graph.erase_node(node)

        # experts: [E*N,D] -> view [E,N,D] -> sum over E, replaced by the sum of the K chosen slots
        routed_flat = output_of(graph, experts_path, "the experts' output")
        per_expert = _follow(routed_flat, _SHAPE_ONLY)
        total = single([u for u in per_expert.users if u.target in _SUMS and list(u.args[1]) == [0]],
                       "sum over the expert axis of the experts' [E,N,D] output", moe_path)
        if per_expert.meta["val"].dim() != 3:
            raise NoMatch(moe_path, "the experts' output viewed [E,N,D]", f"{tuple(per_expert.meta['val'].shape)}")
        d = int(per_expert.meta["val"].shape[-1])
        by_token = _call(graph, per_expert, total, moe_path, aten.permute.default, (per_expert, [1, 0, 2]))
        idx = _call(graph, by_token, total, moe_path, aten.unsqueeze.default, (indices, -1))
        idx3 = _call(graph, idx, total, moe_path, aten.expand.default, (idx, [-1, -1, d]))
        slots = _call(graph, idx3, total, moe_path, aten.gather.default, (by_token, 1, idx3))
        routed = _call(graph, slots, total, moe_path, aten.sum.dim_IntList, (slots, [1]))
        total.replace_all_uses_with(routed)
        graph.erase_node(total)

        # shared expert + routed, out of place (HF adds in place into the shared output, which a cache would see)
        shared_out = output_of(graph, shared_path, "the shared expert's output")
        block = ModuleRegion.of(graph, moe_path)
        add = block.output
        if add is None or add.target not in _ADDS or add.args[0] is not shared_out or add.args[1] is not routed:
            raise NoMatch(moe_path, "the block output shared_expert(x) + routed (add_)", f"{add}")
        out = _call(graph, add, add, moe_path, aten.add.Tensor, (shared_out, routed))
        add.replace_all_uses_with(out)
        graph.erase_node(add)
        # the block's output as [B,S,D], inside the MoE module (hook_residual hooks it as hook_mlp_out)
        outside = [u for u in out.users if u not in block]
        seen = _call(graph, out, out, moe_path, aten.unflatten.int, (out, 0, [b, s]))
        for user in outside:
            user.replace_input_with(out, seen)

        for node, name, path in ((logits, "mlp.hook_router_logits", router_path),
                                 (indices, "mlp.hook_expert_indices", router_path),
                                 (weights, "mlp.hook_routing_weights", router_path),
                                 (slots, "mlp.hook_expert_out", experts_path),
                                 (shared_out, "mlp.hook_shared_out", shared_path)):
            hook_viewed(ctx, node, hook_name(name, i), to_hook=tokens[0], from_hook=tokens[1], scope=moe_path,
                        hf_module=path)
        found += PER_LAYER
    return found
