"""Give each KV-shared layer its own alias of the keys it reuses, so its attention hooks live in that layer.

Gemma 4's last ``num_kv_shared_layers`` layers compute no keys or values: their attention call reads the
tensors of an earlier layer of the same type. ``hook_attention`` hooks the keys an attention call reads
inside the calling layer's module, so the reused key first gets a local alias there:
    z_L = attention(q_L, k_S, v_S)      ->    k_L = alias(k_S)  (in layer L) ;  z_L = attention(q_L, k_L, v_S)
``route_shared_kv`` later makes the alias read layer S's hooked key. Values need no alias (no hook reads them).
"""
from __future__ import annotations

import torch

from .base import PassContext, graph_pass
from .graph_utils import stack_paths

ATTENTION_OP = torch.ops.fxbridge.attention.default
aten = torch.ops.aten


def layer_of(node, spec) -> int | None:
    """The decoder layer a node was computed in, from its module stack; None outside the layers."""
    prefix = spec.layers + "."
    for path in stack_paths(node):
        if path.startswith(prefix) and path[len(prefix):].split(".")[0].isdigit():
            return int(path[len(prefix):].split(".")[0])
    return None


@graph_pass(expects=lambda spec, dims: dims.get("n_kv_shared_layers", 0))
def alias_shared_kv(ctx: PassContext) -> int:
    """Alias reused keys inside the KV-shared layer that reads them."""
    graph, spec = ctx.graph, ctx.spec
    found = 0
    for node in [n for n in graph.nodes if n.op == "call_function" and n.target == ATTENTION_OP]:
        q, k, v = node.args[:3]
        reader, owner = layer_of(node, spec), layer_of(k, spec)
        if owner == reader:
            continue
        if owner is None or owner > reader or layer_of(v, spec) != owner:
            raise ValueError(f"attention of layer {reader} reads keys of layer {owner} and values of layer "
                             f"{layer_of(v, spec)}; expected both from one earlier layer")
        with graph.inserting_before(node):
            alias = graph.call_function(aten.alias.default, (k,))
        alias.meta.update({key: node.meta[key] for key in ("nn_module_stack",) if key in node.meta})
        alias.meta["val"] = k.meta.get("val")
        alias.meta["fxbridge_shared_kv_from"] = owner
        node.replace_input_with(k, alias)
        found += 1
    return found
