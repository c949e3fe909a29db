"""Make KV-shared layers read the keys of the layer they share, as that layer's ``hook_rot_k`` left them.

After ``alias_shared_kv`` and ``hook_attention`` a shared layer L reads the raw key of layer S:
    k_S -> hook_rot_k[S] -> attn[S]           k_S -> hook_rot_k[S] -> attn[S]
    k_S -> alias -> hook_rot_k[L] -> attn[L]  ->   `-> alias -> hook_rot_k[L] -> attn[L]
so an edit of ``blocks.S.attn.hook_rot_k`` reaches every layer that reuses those keys (as in HF, where they are
one tensor), and ``blocks.L.attn.hook_rot_k`` edits the keys of layer L alone. ``hook_k`` / ``hook_v`` of S are
upstream of both and reach them already.
"""
from __future__ import annotations

from ..tracer.attention_op import AttentionCall
from .base import NoMatch, PassContext, graph_pass


def _cores(graph) -> dict[int, AttentionCall]:
    """layer -> the AttentionCore call of that layer."""
    calls = (AttentionCall.of(n) for n in graph.find_nodes(op="call_module") if AttentionCall.is_core(n))
    return {call.layer_idx: call for call in calls}


@graph_pass(expects=lambda spec, dims: dims.get("n_kv_shared_layers", 0),
            requires=("alias_shared_kv", "hook_attention"))
def route_shared_kv(ctx: PassContext) -> int:
    """Route each KV-shared layer's key alias through the owner layer's hook_rot_k."""
    graph = ctx.graph
    cores = _cores(graph)
    found = 0
    for alias in [n for n in graph.nodes if "fxbridge_shared_kv_from" in n.meta]:
        owner = cores[alias.meta["fxbridge_shared_kv_from"]]
        raw = alias.args[0]
        hooked = owner.k  # the owner's key after its hook_rot_k
        if hooked is raw or hooked.op != "call_function":
            raise NoMatch(ctx.spec.layer(owner.layer_idx, ctx.spec.attn), "its key read through hook_rot_k",
                          "the raw key")
        alias.replace_input_with(raw, hooked)
        found += 1
    return found
