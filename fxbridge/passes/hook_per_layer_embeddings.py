"""Hook Gemma 4's per-layer embeddings (PLE): the per-layer input, its gate, and what it adds to the residual.

HF adds, after the MLP of layer i, a small residual branch driven by a per-layer embedding e_i [B,S,P]
(``per_layer_inputs[:, :, i]``: the token's own PLE row plus a projection of the embedding, over sqrt 2):
    g = per_layer_input_gate(x) ; h = act(g) * e_i ; y = post_per_layer_input_norm(per_layer_projection(h))
->  g = ple.hook_gate(g) ; h = ple.hook_gated(act(g) * ple.hook_per_layer_input(e_i))
    y = hook_ple_out(norm(proj(h)))
and the layer then adds y to the residual (before ``layer_scalar``).
"""
from __future__ import annotations

import torch

from ..tracer.graph_facts import ModuleRegion, in_module
from .base import PassContext, graph_pass
from .graph_utils import hook_after, single

aten = torch.ops.aten
_MULS = {aten.mul.Tensor}
PER_LAYER = 4


def _check_width(node, width: int, what: str) -> None:
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor) and val.shape[-1] != width:
        raise ValueError(f"{what} has width {val.shape[-1]}, config.hidden_size_per_layer_input is {width}")


@graph_pass(expects=lambda spec, dims: PER_LAYER * dims["n_layers"] if dims.get("d_per_layer_input") else 0)
def hook_per_layer_embeddings(ctx: PassContext) -> int:
    """Hook each layer's per-layer embedding, its gate, the gated input and the branch output."""
    spec, graph, root = ctx.spec, ctx.graph, ctx.root
    width = ctx.dims.get("d_per_layer_input", 0)
    found = 0
    for i in range(ctx.dims["n_layers"]):
        layer = spec.layer(i)
        gate = ModuleRegion.of(graph, f"{layer}.per_layer_input_gate").output
        if gate is None:
            continue
        _check_width(gate, width, f"{layer}.per_layer_input_gate")
        act = single([u for u in gate.users if in_module(u, f"{layer}.act_fn")], f"activation of {layer} PLE gate")
        mul = single([u for u in act.users if u.target in _MULS and in_module(u, layer)],
                     f"product of the PLE gate and the per-layer input in {layer}")
        embed = mul.args[1] if mul.args[0] is act else mul.args[0]
        _check_width(embed, width, f"per-layer input of {layer}")
        blk, common = f"blocks.{i}", dict(made_by="hook_per_layer_embeddings", hf_module=layer)
        hook_after(graph, root, gate, f"{blk}.ple.hook_gate", shape=("B", "S", "P"), scope=layer, users=[act], **common)
        hook_after(graph, root, embed, f"{blk}.ple.hook_per_layer_input", shape=("B", "S", "P"), scope=layer,
                   users=[mul], meta_from=mul, **common)
        hook_after(graph, root, mul, f"{blk}.ple.hook_gated", shape=("B", "S", "P"), scope=layer, **common)
        out = ModuleRegion.of(graph, f"{layer}.post_per_layer_input_norm").output
        hook_after(graph, root, out, f"{blk}.hook_ple_out", shape=("B", "S", "D"), scope=layer, **common)
        found += PER_LAYER
    return found
