"""Make HF's in-place residual adds out of place, so a hooked (or cached) summand is never overwritten.

    y = add_(mlp_out, attn_out)        ->   y = add(mlp_out, attn_out)
Falcon's parallel blocks write ``mlp_output += attention_output``; once ``hook_mlp_out`` sits on ``mlp_output``
the in-place add would overwrite the tensor the hook (and ``run_with_cache``) was given. Only adds whose first
operand nothing reads afterwards and that is not a view are rewritten, so the values computed are unchanged.
"""
from collections import Counter

import torch

from ..tracer.graph_facts import layer_index
from .base import NoMatch, PassContext, graph_pass

aten = torch.ops.aten
_VIEWS = {aten.view.default, aten.reshape.default, aten.transpose.int, aten.permute.default, aten.select.int,
          aten.slice.Tensor, aten.expand.default, aten.unsqueeze.default, aten.alias.default}


def _safe(node, order) -> bool:
    target = node.args[0]
    if target.op != "call_function" or target.target in _VIEWS:
        return False
    return all(order[u] < order[node] for u in target.users if u is not node)


@graph_pass(expects=lambda spec, dims, per_layer: per_layer * dims["n_layers"], before=("hook_residual",))
def make_adds_out_of_place(ctx: PassContext, *, per_layer: int) -> int:
    """Replace add_ inside the decoder layers by add when nothing else reads the overwritten operand later;
    ``per_layer`` such adds in each layer."""
    order = {n: i for i, n in enumerate(ctx.graph.nodes)}
    per_layer_found: Counter[int] = Counter()
    for node in list(ctx.graph.find_nodes(op="call_function", target=aten.add_.Tensor)):
        layer = layer_index(node, ctx.spec.layers)
        if layer is None:
            continue
        if not _safe(node, order):
            raise NoMatch(ctx.spec.layer(layer), "in-place adds whose overwritten operand is read by nothing later "
                          "and is not a view", f"{node.name}, whose operand {node.args[0].name} is read later or is a view")
        node.target = aten.add.Tensor
        per_layer_found[layer] += 1
    for layer in range(ctx.dims["n_layers"]):
        if per_layer_found[layer] != per_layer:
            raise NoMatch(ctx.spec.layer(layer), f"{per_layer} in-place residual add(s)", f"{per_layer_found[layer]}")
    return sum(per_layer_found.values())
