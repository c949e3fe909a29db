"""Remove inference-time dropout from the decoder layers (``dropout(x, p, train=False)`` is ``x``).

    d = dropout(attn_out, p, False) ; m = resid + d     ->   m = resid + attn_out
Falcon calls ``F.dropout`` functionally (``dropout_add``), so the captured graph keeps the no-op between the
attention / MLP output and the residual add; removing it lets the residual hooks see the plain adds.
"""
import torch

from ..tracer.graph_facts import layer_index
from .base import PassContext, graph_pass

aten = torch.ops.aten


def _expected(spec, dims) -> int:
    return getattr(spec, "eval_dropouts_per_layer", 0) * dims["n_layers"]


@graph_pass(expects=_expected)
def remove_eval_dropout(ctx: PassContext) -> int:
    """Replace dropout with train=False inside the decoder layers by its input."""
    found = 0
    for node in list(ctx.graph.find_nodes(op="call_function", target=aten.dropout.default)):
        if layer_index(node, ctx.spec.layers) is not None:
            train = node.args[2] if len(node.args) > 2 else node.kwargs.get("train", True)
            if train is not False:
                raise ValueError(f"{node.name} is dropout in training mode; trace the model in eval mode")
            node.replace_all_uses_with(node.args[0])
            ctx.graph.erase_node(node)
            found += 1
    return found
