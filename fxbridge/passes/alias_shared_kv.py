"""Give each KV-shared layer its own alias of the keys it reuses, so its attention hooks live in that layer.

Gemma 4's last ``num_kv_shared_layers`` layers compute no keys or values: their attention call reads the
tensors of an earlier layer of the same type. ``hook_attention`` hooks the keys an attention call reads
inside the calling layer's module, so the reused key first gets a local alias there:
    z_L = attention(q_L, k_S, v_S)      ->    k_L = alias(k_S)  (in layer L) ;  z_L = attention(q_L, k_L, v_S)
``route_shared_kv`` later makes the alias read layer S's hooked key. Values need no alias (no hook reads them).
"""
from __future__ import annotations

import torch

from ..tracer.attention_op import AttentionCall
from ..tracer.graph_facts import layer_index, scoped_meta
from .base import NoMatch, PassContext, graph_pass

aten = torch.ops.aten
# Moves a reading layer may apply to the reused tensors (transformers 5.17 writes ``key_states.to(q.device)``).
_MOVES = {aten.to.dtype_layout, aten.to.device, aten._to_copy.default, aten.alias.default}


def _reused(node, layers: str, reader: int):
    """The tensor a layer reads, looking through device moves made inside that reading layer."""
    while node.op == "call_function" and node.target in _MOVES and layer_index(node, layers) == reader:
        node = node.args[0]
    return node


@graph_pass(expects=lambda spec, dims: dims.get("n_kv_shared_layers", 0), before=("hook_attention",))
def alias_shared_kv(ctx: PassContext) -> int:
    """Alias reused keys inside the KV-shared layer that reads them."""
    graph, layers = ctx.graph, ctx.spec.layers
    readers = []
    for call in AttentionCall.find(graph):
        node, read_k, read_v = call.node, call.k, call.v
        reader = layer_index(node, layers)
        k, v = _reused(read_k, layers, reader), _reused(read_v, layers, reader)
        owner = layer_index(k, layers)
        if owner == reader:
            continue
        if owner is None or owner > reader or layer_index(v, layers) != owner:
            raise NoMatch(ctx.spec.layer(reader, ctx.spec.attn), "keys and values both from one earlier layer",
                          f"keys of layer {owner} and values of layer {layer_index(v, layers)}")
        with graph.inserting_before(node):
            alias = graph.call_function(aten.alias.default, (k,))
        alias.meta.update(scoped_meta(node, None))
        alias.meta["val"] = k.meta.get("val")
        alias.meta["fxbridge_shared_kv_from"] = owner
        node.args = call.replace(k=alias, v=v).args
        for moved in {read_k, read_v} - {k, v}:  # same-device moves now unused
            if not moved.users:
                graph.erase_node(moved)
        readers.append(reader)
    shared = ctx.dims.get("n_kv_shared_layers", 0)
    if len(readers) != shared:
        raise NoMatch(f"the attention calls of {layers}.*", f"{shared} layer(s) reading an earlier layer's keys and "
                      "values (config.num_kv_shared_layers)", f"{len(readers)}: layers {readers}")
    return len(readers)
