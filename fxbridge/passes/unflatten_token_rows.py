"""Undo HF's flattening of the token rows inside a decoder layer, so the hooks there see [B,S,..].

OPT runs its MLP block on ``hidden_states.reshape(-1, D)`` and views the result back to [B,S,D]:
    r = reshape(x, [-1, D]) ; ... row-wise ops on [B*S,..] ... ; y = view(out, [B, S, D])
->  ... the same ops on x [B,S,D] ... ; y = out
Every op in between works on the last dim (layer_norm, linear, activations, adds of tensors from the same
region), so it computes the same rows; the node metadata is recomputed for the new shapes. Then ``ln2``,
``mlp.hook_*`` and ``hook_mlp_out`` have TransformerLens's [B,S,..] shapes.
"""
import torch
from torch._guards import detect_fake_mode
from torch.fx.node import map_arg

from ..tracer.graph_facts import ModuleRegion
from .base import NoMatch, PassContext, graph_pass

aten = torch.ops.aten
_VIEWS = {aten.reshape.default, aten.view.default, aten._unsafe_view.default}


def _val(node):
    return node.meta.get("val") if isinstance(node, torch.fx.Node) else None


def _rank(node) -> int | None:
    val = _val(node)
    return val.dim() if isinstance(val, torch.Tensor) else None


def _restores(view, x) -> bool:
    return (view.target in _VIEWS and _rank(view) == 3 and str(tuple(_val(view).shape)) == str(tuple(_val(x).shape)))


def _unflatten_one(graph, flat) -> bool:
    """Bypass ``flat`` = reshape(x [B,S,D], [-1, D]) and the view back to x's shape; False where it is not that."""
    x = flat.args[0]
    todo, region, restore = [flat], [], []
    while todo:  # the nodes computed from the flattened rows, up to the views back
        node = todo.pop()
        for user in node.users:
            if user in region or user in restore:
                continue
            if _restores(user, x):
                restore.append(user)
            elif user.op == "call_function" and _rank(user) == 2:
                region.append(user)
                todo.append(user)
            else:
                return False
    if not restore:
        return False
    fake_mode = detect_fake_mode([_val(x)])
    flat.replace_all_uses_with(x)
    for node in graph.nodes:  # graph order: inputs before users
        if node in region:
            args = map_arg(node.args, _val)
            kwargs = map_arg(node.kwargs, _val)
            with fake_mode:
                node.meta["val"] = node.target(*args, **kwargs)
    for view in restore:
        view.replace_all_uses_with(view.args[0])
        graph.erase_node(view)
    graph.erase_node(flat)
    return True


@graph_pass(expects=lambda spec, dims: dims["n_layers"], before=("hook_mlp", "hook_norms", "hook_residual"))
def unflatten_token_rows(ctx: PassContext) -> int:
    """Remove each layer's reshape of [B,S,D] to [B*S,D] and the view back; one per layer."""
    found = 0
    for i in range(ctx.dims["n_layers"]):
        layer = ctx.spec.layer(i)
        flats = [n for n in ModuleRegion.of(ctx.graph, layer).nodes
                 if n.target in _VIEWS and _rank(n) == 2 and _rank(n.args[0]) == 3]
        done = sum(_unflatten_one(ctx.graph, n) for n in flats)
        if done != 1:
            raise NoMatch(layer, "one reshape of the token rows to [B*S,D] viewed back to [B,S,D]", f"{done}")
        found += done
    return found
