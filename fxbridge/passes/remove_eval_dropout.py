"""Remove inference-time dropout from the decoder layers (``dropout(x, p, train=False)`` is ``x``).

    d = dropout(attn_out, p, False) ; m = resid + d     ->   m = resid + attn_out
Falcon calls ``F.dropout`` functionally (``dropout_add``), so the captured graph keeps the no-op between the
attention / MLP output and the residual add; removing it lets the residual hooks see the plain adds.
"""
from collections import Counter

import torch

from ..tracer.graph_facts import layer_index
from .base import NoMatch, PassContext, graph_pass

aten = torch.ops.aten


@graph_pass(expects=lambda spec, dims, per_layer: per_layer * dims["n_layers"], before=("hook_residual",))
def remove_eval_dropout(ctx: PassContext, *, per_layer: int) -> int:
    """Replace dropout with train=False inside the decoder layers by its input; ``per_layer`` calls in each layer."""
    per_layer_found: Counter[int] = Counter()
    for node in list(ctx.graph.find_nodes(op="call_function", target=aten.dropout.default)):
        layer = layer_index(node, ctx.spec.layers)
        if layer is None:
            continue
        train = node.args[2] if len(node.args) > 2 else node.kwargs.get("train", True)
        if train is not False:
            raise ValueError(f"{node.name} is dropout in training mode; trace the model in eval mode")
        node.replace_all_uses_with(node.args[0])
        ctx.graph.erase_node(node)
        per_layer_found[layer] += 1
    for layer in range(ctx.dims["n_layers"]):
        if per_layer_found[layer] != per_layer:
            raise NoMatch(ctx.spec.layer(layer), f"{per_layer} dropout call(s) with train=False",
                          f"{per_layer_found[layer]}")
    return sum(per_layer_found.values())
