"""Hook the MLP: ``hook_pre`` (gate or input projection output), ``hook_pre_linear`` (gated: up projection
output) and ``hook_post`` (the input of the down projection).

    h = act(linear(x, W_gate)) * linear(x, W_up)      ->   h = act(hook_pre(gate)) * hook_pre_linear(up)
    y = linear(h, W_down)                             ->   y = linear(hook_post(h), W_down)
"""
from ..runtime.names import hook_name
from ..tracer.graph_facts import ModuleRegion
from .base import PassContext, graph_pass
from .graph_utils import hook_after, output_of, single


def _expected(spec, dims) -> int:
    return dims["n_layers"] * (3 if spec.mlp_gate else 2)


@graph_pass(expects=_expected)
def hook_mlp(ctx: PassContext) -> int:
    """Hook the MLP's pre-activation(s) and post-activation."""
    spec, graph = ctx.spec, ctx.graph
    found = 0
    for layer in range(ctx.dims["n_layers"]):
        mlp_path = spec.mlp_path(layer)
        pre_path = spec.mlp_path(layer, spec.mlp_gate or spec.mlp_in)
        todo = [(pre_path, "mlp.hook_pre")]
        if spec.mlp_gate:
            todo.append((spec.mlp_path(layer, spec.mlp_in), "mlp.hook_pre_linear"))
        for path, hook in todo:
            out = output_of(graph, path, "the projection's output")
            hook_after(ctx, out, hook_name(hook, layer), scope=mlp_path, hf_module=path)
            found += 1
        down_path = spec.mlp_path(layer, spec.mlp_out)
        down = ModuleRegion.of(graph, down_path)
        post = single(down.inputs, "input", down_path)
        hook_after(ctx, post, hook_name("mlp.hook_post", layer), scope=mlp_path,
                   users=[u for u in post.users if u in down], hf_module=down_path)
        found += 1
    return found
