"""Hook a mixture-of-experts block: router logits, chosen experts, routing weights, per-slot expert outputs, shared
experts.

HF's MoE blocks (Mixtral, Qwen-MoE, OLMoE, DeepSeek, GLM-4-MoE, Gemma 4, ...) flatten the residual to x [N,D]
(N = B*S tokens, E experts, top K) and call an experts module ``experts(x, indices [N,K] int, weights [N,K])``
(``@use_experts_implementation``; its batched / grouped forms, the ones torch.export captures, end in
``slots.view(N, K, D).sum(1)``). Whatever the family's routing (softmax then top-k, top-k then softmax, sigmoid
with a bias and group-limited top-k, renormalised or scaled), the experts' inputs ARE the final routing:
    l = linear(x, W_router) ...routing... -> idx [N,K], w [N,K] -> experts(x, idx, w) -> slots [N,K,D] -> sum(1)
->  l = mlp.hook_router_logits(l) ; idx = mlp.hook_expert_indices(idx) ; w = mlp.hook_routing_weights(w)
    slots = mlp.hook_expert_out(slots) ; shared = mlp.hook_shared_out(gate * shared_expert(x))
Token-major tensors are seen as [B,S,...] (views: in-place edits propagate); B and S are read from the [B,S,D]
tensor the router's input was flattened from (``graph_utils.token_dims``). Optional parts: ``probs`` (the softmax / sigmoid of the logits,
``mlp.hook_router_probs``), ``shared`` (a shared expert module, its output as added: ``mlp.hook_shared_out``),
``shared_gate`` (a module whose sigmoid gates the shared expert: ``mlp.hook_shared_gate``), ``out_norm`` (Gemma 4:
a norm ending the MoE branch, ``hook_moe_out``). Module names are relative to the decoder layer; the layers are
``spec.moe_layers``.
"""
from __future__ import annotations

import torch

from ..runtime.names import hook_name
from ..tracer.graph_facts import ModuleRegion
from .base import NoMatch, PassContext, graph_pass
from .graph_utils import NOTHING, hook_after, hook_viewed, output_of, single, token_dims

aten = torch.ops.aten
_MATMULS = {aten.linear.default, aten.mm.default, aten.addmm.default, aten.matmul.default}
_SUMS = {aten.sum.dim_IntList}
_SCORES = {aten.softmax.int, aten._softmax.default, aten.sigmoid.default}
_CASTS = {aten.to.dtype, aten._to_copy.default, aten.to.dtype_layout, aten.type_as.default}


def _expected(spec, dims, *, router, experts, probs=False, shared=None, shared_gate=None, out_norm=None) -> int:
    per_layer = 4 + bool(probs) + bool(shared) + bool(shared_gate) + bool(out_norm)
    return per_layer * len(spec.moe_layers)


def _val(node):
    val = node.meta.get("val") if hasattr(node, "meta") else None
    return val if isinstance(val, torch.Tensor) else None


def _router_logits(graph, path: str, n_experts: int):
    """The router's [N,E] projection: the first matmul in the router module with E outputs."""
    region = ModuleRegion.of(graph, path)
    found = [n for n in region.nodes if n.op == "call_function" and n.target in _MATMULS
             and _val(n) is not None and _val(n).shape[-1] == n_experts]
    if not found:
        raise NoMatch(path, f"the router projection to {n_experts} experts", NOTHING if not region.nodes else
                      f"{len(region.nodes)} nodes, none a matmul with {n_experts} outputs")
    return found[0]


def _scores_of(logits, where: str):
    """softmax / sigmoid of the logits (through a dtype cast)."""
    todo = list(logits.users)
    while todo:
        node = todo.pop(0)
        if node.target in _SCORES:
            return node
        if node.target in _CASTS:
            todo.extend(node.users)
    raise NoMatch(where, "a softmax or sigmoid of the router logits", "neither")


def _routing_inputs(region: ModuleRegion, where: str):
    """(indices [N,K] int, weights [N,K] float): the tensors the experts module reads from outside, by dtype."""
    reads = {a: None for n in region.nodes for a in n.all_input_nodes if a not in region and a.op != "get_attr"}
    pairs = [n for n in reads if _val(n) is not None and _val(n).dim() == 2]
    indices = single([n for n in pairs if not _val(n).is_floating_point()],
                     "the chosen experts (an integer [N,K] input)", where)
    weights = single([n for n in pairs if _val(n).is_floating_point() and _val(n).shape == _val(indices).shape],
                     "the routing weights (a float [N,K] input)", where)
    return indices, weights


def _slots(region: ModuleRegion, where: str):
    return single([n for n in region.nodes if _val(n) is not None and _val(n).dim() == 3
                   and any(u.target in _SUMS and list(u.args[1]) == [1] for u in n.users)],
                  "per-slot outputs [N,K,D] summed over K", where)


def _gated(graph, shared_out, gate_path: str, where: str):
    """(sigmoid(gate(x)), sigmoid(gate(x)) * shared_out) for a shared expert scaled by a sigmoid gate."""
    gate = output_of(graph, gate_path, "the shared expert gate's output")
    sig = single([u for u in gate.users if u.target == aten.sigmoid.default], "sigmoid of the shared gate", gate_path)
    product = single([u for u in sig.users if u.target == aten.mul.Tensor and shared_out in u.args],
                     "the gate times the shared expert's output", where)
    return sig, product


def _hook_tokens(ctx, node, name: str, rank: int, flat_in, scope: str, hf_module: str, cache: dict) -> None:
    """Hook a token-major tensor as [B,S,...] (``rank`` dims): a flat [N,...] one through an unflatten view."""
    if _val(node) is None or _val(node).dim() == rank:
        hook_after(ctx, node, name, scope=scope, hf_module=hf_module)
        return
    if "bs" not in cache:
        cache["bs"] = token_dims(ctx.graph, flat_in, ctx.dims["d_model"], hf_module)
    b, s = cache["bs"]
    hook_viewed(ctx, node, name, to_hook=(aten.unflatten.int, (0, [b, s])), from_hook=(aten.flatten.using_ints, (0, 1)),
                scope=scope, hf_module=hf_module)


@graph_pass(expects=_expected)
def hook_moe(ctx: PassContext, *, router: str, experts: str, probs: bool = False, shared: str | None = None,
             shared_gate: str | None = None, out_norm: str | None = None) -> int:
    """Hook router logits, chosen experts, routing weights and slot outputs (and the optional parts) per MoE layer.

    ``router``: the module computing the router logits; ``experts``: the experts module (HF's fused experts);
    ``shared`` / ``shared_gate`` / ``out_norm``: see the module docstring. Paths are relative to the decoder layer.
    """
    spec, graph, dims = ctx.spec, ctx.graph, ctx.dims
    found = 0
    for i in range(dims["n_layers"]):
        layer, router_path, experts_path = spec.layer(i), spec.layer(i, router), spec.layer(i, experts)
        if i not in spec.moe_layers and not ModuleRegion.of(graph, experts_path).nodes:
            continue  # a dense layer (an MoE layer the spec does not list is hooked, and the count says so)
        logits = _router_logits(graph, router_path, dims.get("n_experts", 0))
        flat_in = logits.args[0] if logits.target != aten.addmm.default else logits.args[1]
        region = ModuleRegion.of(graph, experts_path)
        if not region.nodes:
            raise NoMatch(experts_path, "the experts module's computation", NOTHING)
        indices, weights = _routing_inputs(region, experts_path)
        todo = [(logits, "mlp.hook_router_logits", router_path)]
        if probs:
            todo.append((_scores_of(logits, router_path), "mlp.hook_router_probs", router_path))
        todo += [(indices, "mlp.hook_expert_indices", router_path), (weights, "mlp.hook_routing_weights", router_path),
                 (_slots(region, experts_path), "mlp.hook_expert_out", experts_path)]
        if shared:
            shared_path = spec.layer(i, shared)
            out = output_of(graph, shared_path, "the shared expert's output")
            if shared_gate:
                sig, out = _gated(graph, out, spec.layer(i, shared_gate), shared_path)
                todo.append((sig, "mlp.hook_shared_gate", spec.layer(i, shared_gate)))
            todo.append((out, "mlp.hook_shared_out", shared_path))
        cache: dict = {}
        for node, name, path in todo:
            rank = 4 if name == "mlp.hook_expert_out" else 3
            _hook_tokens(ctx, node, hook_name(name, i), rank, flat_in, layer, path, cache)
            found += 1
        if out_norm:
            out = output_of(graph, spec.layer(i, out_norm), "the MoE block's output norm")
            hook_after(ctx, out, hook_name("hook_moe_out", i), scope=layer, hf_module=layer)
            found += 1
    return found
