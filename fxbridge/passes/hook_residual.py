"""Hook the residual stream of every decoder layer.

    x = <previous layer or embeddings>            x' = hook_resid_pre(x)          (only the layer's reads)
    a = attn(ln1(x)) ; m = x + a                   a' = hook_attn_out(a) ; m' = hook_resid_mid(x' + a')
    f = mlp(ln2(m)) ; y = m + f              ->    f' = hook_mlp_out(f) ; y' = hook_resid_post(m' + f')
Sandwich- and post-norm models hook the post-norm outputs as attn_out / mlp_out; parallel blocks have no resid_mid.
A branch scaled by a constant before the add (Granite's ``residual + h * residual_multiplier``) is hooked after the
scaling: ``hook_attn_out`` / ``hook_mlp_out`` are what is added to the residual. Blocks without a pre-attention norm
(OLMo 2's post-norm-only layers, ``spec.ln1 = None``) find resid_pre as the residual operand of attn_out's add.
"""
import torch
from torch import fx

from ..runtime.names import hook_name
from ..tracer.graph_facts import ModuleRegion, module_stack
from .base import PassContext, graph_pass
from .graph_utils import hook_after, output_of, single

aten = torch.ops.aten
_ADDS = {aten.add.Tensor}
_SCALINGS = {aten.mul.Tensor, aten.div.Tensor}  # by a Python scalar: a branch multiplier


def _hooks_per_layer(spec) -> int:
    return 4 + (not spec.parallel)


def _parent_scope(node, path: str) -> str:
    paths = module_stack(node)
    idx = paths.index(path)
    return paths[idx - 1] if idx > 0 else ""


def _scales(user: fx.Node, node: fx.Node) -> bool:
    """Whether ``user`` is ``node * c``, ``c * node`` or ``node / c`` for a Python scalar ``c``."""
    if user.target not in _SCALINGS or len(user.args) != 2:
        return False
    a, b = user.args
    return (a is node and isinstance(b, (int, float))) or (
        user.target is aten.mul.Tensor and b is node and isinstance(a, (int, float)))


def _scaled(node: fx.Node) -> fx.Node:
    """``node`` followed through elementwise multiplications / divisions by Python scalars (its only users)."""
    while len(node.users) == 1 and _scales(user := next(iter(node.users)), node):
        node = user
    return node


def _layer_input(ctx, i: int, inside: ModuleRegion, attn_out: fx.Node) -> fx.Node:
    """The residual stream entering layer i: ln1's input from outside the layer; where there is no ln1 (OLMo 2
    post-norm blocks) or ln1 reads a value made inside the layer (post-LN blocks: OpenAI GPT, OPT-350m), the
    operand of attn_out's residual add that comes from outside the layer."""
    spec, graph, layer = ctx.spec, ctx.graph, ctx.spec.layer(i)
    if spec.ln1 is not None:
        ln1 = spec.layer(i, spec.ln1)
        region = ModuleRegion.of(graph, ln1)
        outside = [n for n in region.inputs if n not in inside]
        if outside or not region.nodes:  # no ln1 there: the spec names another module
            return single(outside, f"input from outside {layer} (the residual stream)", ln1)
    adds = [u for u in attn_out.users if u.target in _ADDS]
    return single([a for u in adds for a in u.args if isinstance(a, fx.Node) and a is not attn_out
                   and a not in inside], "residual operand from outside the layer of the attention output's add",
                  layer)


@graph_pass(expects=lambda spec, dims: _hooks_per_layer(spec) * dims["n_layers"])
def hook_residual(ctx: PassContext) -> int:
    """Hook resid_pre, attn_out, resid_mid, mlp_out and resid_post of each layer."""
    spec, graph = ctx.spec, ctx.graph
    found = 0
    for i in range(ctx.dims["n_layers"]):
        layer = spec.layer(i)
        inside = ModuleRegion.of(graph, layer)
        attn_out = _scaled(output_of(graph, spec.layer(i, spec.ln1_post or spec.attn_out_at or spec.attn),
                                     "the attention block's output"))
        # the MLP block's output: the MLP module's, or its down projection's where it sits on the layer (OPT)
        mlp_out = _scaled(output_of(graph, spec.layer(i, spec.ln2_post or spec.mlp_out_at or spec.mlp or spec.mlp_out),
                                    "the MLP block's output"))
        x_in = _layer_input(ctx, i, inside, attn_out)
        out = output_of(graph, layer, "the decoder layer's output")
        readers = [u for u in x_in.users if u in inside]
        hook_after(ctx, x_in, hook_name("hook_resid_pre", i), scope=layer, users=readers, meta_from=readers[0],
                   hf_module=layer)
        graph_node = hook_after(ctx, attn_out, hook_name("hook_attn_out", i), scope=layer, hf_module=layer)
        found += 2
        if not spec.parallel:
            mid = single([u for u in graph_node.users if u.target in _ADDS], "residual add of hook_attn_out", layer)
            hook_after(ctx, mid, hook_name("hook_resid_mid", i), scope=layer, hf_module=layer)
            found += 1
        hook_after(ctx, mlp_out, hook_name("hook_mlp_out", i), scope=layer, hf_module=layer)
        hook_after(ctx, out, hook_name("hook_resid_post", i), scope=_parent_scope(out, layer), hf_module=layer)
        found += 2
    return found
