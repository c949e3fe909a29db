"""Hook the MLP: ``hook_pre`` (gate or input projection output), ``hook_pre_linear`` (gated: up projection
output) and ``hook_post`` (the input of the down projection).

    h = act(linear(x, W_gate)) * linear(x, W_up)      ->   h = act(hook_pre(gate)) * hook_pre_linear(up)
    y = linear(h, W_down)                             ->   y = linear(hook_post(h), W_down)
With ``post_input`` (BitNet's ``ffn_sub_norm``) ``hook_post`` is the input of that module instead of the down
projection's: the activation, before the norm that sits between it and the down projection.
"""
from ..runtime.names import hook_name
from ..tracer.graph_facts import ModuleRegion
from .base import PassContext, graph_pass
from .graph_utils import hook_after, output_of, single


def _expected(spec, dims, post_input=None) -> int:
    return dims["n_layers"] * (3 if spec.mlp_gate else 2)


@graph_pass(expects=_expected)
def hook_mlp(ctx: PassContext, *, post_input: str | None = None) -> int:
    """Hook the MLP's pre-activation(s) and post-activation.

    ``post_input``: the module (relative to the MLP) whose input is ``hook_post``, where that is not the down
    projection (BitNet: ``ffn_sub_norm``, a norm between the activation and the down projection).
    """
    spec, graph = ctx.spec, ctx.graph
    found = 0
    for layer in range(ctx.dims["n_layers"]):
        mlp_path = spec.layer(layer, spec.mlp)
        pre_path = spec.layer(layer, f"{spec.mlp}.{spec.mlp_gate or spec.mlp_in}")
        todo = [(pre_path, "mlp.hook_pre")]
        if spec.mlp_gate:
            todo.append((spec.layer(layer, f"{spec.mlp}.{spec.mlp_in}"), "mlp.hook_pre_linear"))
        for path, hook in todo:
            out = output_of(graph, path, "the projection's output")
            hook_after(ctx, out, hook_name(hook, layer), scope=mlp_path, hf_module=path)
            found += 1
        down_path = spec.layer(layer, f"{spec.mlp}.{post_input or spec.mlp_out}")
        down = ModuleRegion.of(graph, down_path)
        post = single(down.inputs, "input", down_path)
        hook_after(ctx, post, hook_name("mlp.hook_post", layer), scope=mlp_path,
                   users=[u for u in post.users if u in down], hf_module=down_path)
        found += 1
    return found
