"""Hook Gemma 4's per-layer embeddings (PLE): the per-layer input, its gate, and what it adds to the residual.

HF adds, after the MLP of layer i, a small residual branch driven by a per-layer embedding e_i [B,S,P]
(``per_layer_inputs[:, :, i]``: the token's own PLE row plus a projection of the embedding, over sqrt 2):
    g = gate(x) ; h = act(g) * e_i ; y = out_norm(per_layer_projection(h))
->  g = ple.hook_gate(g) ; h = ple.hook_gated(act(g) * ple.hook_per_layer_input(e_i))
    y = hook_ple_out(out_norm(proj(h)))
and the layer then adds y to the residual (before ``layer_scalar``). The spec names the modules (``gate``,
``act``, ``out_norm``, relative to the decoder layer).
"""
from __future__ import annotations

import torch

from ..runtime.names import hook_name
from ..tracer.graph_facts import ModuleRegion, in_module
from .base import NoMatch, PassContext, graph_pass
from .graph_utils import NOTHING, hook_after, output_of, single

aten = torch.ops.aten
_MULS = {aten.mul.Tensor}
PER_LAYER = 4


def _check_width(node, width: int, where: str, what: str) -> None:
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor) and val.shape[-1] != width:
        raise NoMatch(where, f"{what} of width {width} (config.hidden_size_per_layer_input)", f"width {val.shape[-1]}")


@graph_pass(expects=lambda spec, dims, **_: PER_LAYER * dims["n_layers"] if dims.get("d_per_layer_input") else 0)
def hook_per_layer_embeddings(ctx: PassContext, *, gate: str, act: str, out_norm: str) -> int:
    """Hook each layer's per-layer embedding, its gate, the gated input and the branch output."""
    spec, graph = ctx.spec, ctx.graph
    width = ctx.dims.get("d_per_layer_input", 0)
    found = 0
    for i in range(ctx.dims["n_layers"]):
        layer = spec.layer(i)
        gate_out = ModuleRegion.of(graph, f"{layer}.{gate}").output
        if gate_out is None:
            if width:
                raise NoMatch(f"{layer}.{gate}", "the per-layer input gate's output", NOTHING)
            continue
        _check_width(gate_out, width, f"{layer}.{gate}", "a gate output")
        activated = single([u for u in gate_out.users if in_module(u, f"{layer}.{act}")], "activation of the PLE gate",
                           f"{layer}.{act}")
        mul = single([u for u in activated.users if u.target in _MULS and in_module(u, layer)],
                     "product of the PLE gate and the per-layer input", layer)
        embed = mul.args[1] if mul.args[0] is activated else mul.args[0]
        _check_width(embed, width, layer, "a per-layer input")
        hook_after(ctx, gate_out, hook_name("ple.hook_gate", i), scope=layer, users=[activated], hf_module=layer)
        hook_after(ctx, embed, hook_name("ple.hook_per_layer_input", i), scope=layer, users=[mul], meta_from=mul,
                   hf_module=layer)
        hook_after(ctx, mul, hook_name("ple.hook_gated", i), scope=layer, hf_module=layer)
        out = output_of(graph, f"{layer}.{out_norm}", "the per-layer branch's output norm")
        hook_after(ctx, out, hook_name("hook_ple_out", i), scope=layer, hf_module=layer)
        found += PER_LAYER
    return found
