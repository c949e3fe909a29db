"""Make HF's in-place residual adds out of place, so a hooked (or cached) summand is never overwritten.

    y = add_(mlp_out, attn_out)        ->   y = add(mlp_out, attn_out)
Falcon's parallel blocks write ``mlp_output += attention_output``; once ``hook_mlp_out`` sits on ``mlp_output``
the in-place add would overwrite the tensor the hook (and ``run_with_cache``) was given. Only adds whose first
operand nothing reads afterwards and that is not a view are rewritten, so the values computed are unchanged.
"""
import torch

from ..tracer.graph_facts import layer_index
from .base import PassContext, graph_pass

aten = torch.ops.aten
_VIEWS = {aten.view.default, aten.reshape.default, aten.transpose.int, aten.permute.default, aten.select.int,
          aten.slice.Tensor, aten.expand.default, aten.unsqueeze.default, aten.alias.default}


def _expected(spec, dims) -> int:
    return getattr(spec, "inplace_adds_per_layer", 0) * dims["n_layers"]


def _safe(node, order) -> bool:
    target = node.args[0]
    if target.op != "call_function" or target.target in _VIEWS:
        return False
    return all(order[u] < order[node] for u in target.users if u is not node)


@graph_pass(expects=_expected)
def make_adds_out_of_place(ctx: PassContext) -> int:
    """Replace add_ inside the decoder layers by add when nothing else reads the overwritten operand later."""
    order = {n: i for i, n in enumerate(ctx.graph.nodes)}
    found = 0
    for node in list(ctx.graph.nodes):
        if node.op != "call_function" or node.target != aten.add_.Tensor:
            continue
        if layer_index(node, ctx.spec.layers) is None:
            continue
        if not _safe(node, order):
            raise ValueError(f"{node.name}: the in-place add's operand {node.args[0].name} is read later or is a "
                             "view; cannot make it out of place")
        node.target = aten.add.Tensor
        found += 1
    return found
