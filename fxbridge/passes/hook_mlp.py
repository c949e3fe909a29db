"""Hook the MLP: ``hook_pre`` (gate or input projection output), ``hook_pre_linear`` (gated: up projection
output) and ``hook_post`` (the input of the down projection).

    h = act(linear(x, W_gate)) * linear(x, W_up)      ->   h = act(hook_pre(gate)) * hook_pre_linear(up)
    y = linear(h, W_down)                             ->   y = linear(hook_post(h), W_down)

Fused gate/up (Phi-3, GLM: the spec's ``mlp_gate`` and ``mlp_in`` name the same module): one projection computes
[gate | up] and HF splits it in halves (``chunk(2, -1)``). The two halves of HF's own split are hooked -- views of
the fused output, nothing recomputed. They are found as in ``split_fused_qkv``: the shape-only code HF runs on the
fused output is evaluated on an index probe, and the nodes equal to the first / second half are the gate / up
values; the up half must be a factor of the product whose other factor is computed from the gate half (an
``[up | gate]`` layout is an error, not a silent swap).

    gu = gate_up(x) ; g, u = chunk(gu, 2)      ->   g, u = chunk(gu, 2) ; g' = hook_pre(g) ; u' = hook_pre_linear(u)

With ``post_input`` (BitNet's ``ffn_sub_norm``) ``hook_post`` is the input of that module instead of the down
projection's: the activation, before the norm that sits between it and the down projection.
"""
import torch

from ..runtime.names import hook_name
from ..tracer.graph_facts import ModuleRegion
from .base import NoMatch, PassContext, graph_pass
from .graph_utils import hook_after, output_of, single
from .split_fused_qkv import _match_region, _Probe

aten = torch.ops.aten


def _dense_layers(spec, n_layers: int) -> list[int]:
    """Layers with a dense MLP: all but those whose MLP is a mixture of experts (``spec.moe_layers``)."""
    moe = () if spec.moe_beside_mlp else set(spec.moe_layers)
    return [i for i in range(n_layers) if i not in moe]


def _expected(spec, dims, post_input=None) -> int:
    return len(_dense_layers(spec, dims["n_layers"])) * (3 if spec.mlp_gate else 2)


def _fused_halves(ctx: PassContext, fused, mlp_path: str, where: str):
    """HF's gate and up halves of the fused [gate | up] output (nodes of its own split)."""
    n = int(fused.meta["val"].shape[-1])
    probe = _Probe(ctx.root, fused)
    grid = probe.env[fused]
    halves = {"gate": grid[..., : n // 2], "up": grid[..., n // 2:]}
    matches = _match_region(fused, probe, halves, mlp_path)
    found = {role: [node for node, key in matches if key == role] for role in halves}
    if any(len(nodes) != 1 for nodes in found.values()):
        raise NoMatch(where, "HF's split of the fused output into [gate | up] halves, one node each",
                      ", ".join(f"{len(nodes)} {role} node(s)" for role, nodes in found.items()))
    stray = [u.name for u in fused.users if u not in probe.env and u not in (found["gate"][0], found["up"][0])]
    if stray:
        raise NoMatch(where, "its output read only through HF's split into halves", f"also read by {stray}")
    gate, up = found["gate"][0], found["up"][0]
    if not any(_factor_of_gate(user, up, gate, fused) for user in up.users):
        raise NoMatch(where, "the second half (up) multiplied by a function of the first half (gate): the "
                      "[gate | up] layout", "another use of the halves (an [up | gate] layout?)")
    return gate, up


def _factor_of_gate(mul, up, gate, stop) -> bool:
    """``mul`` is ``up * f(gate)`` (either order), f(gate) computed from ``gate`` (not ``gate`` itself)."""
    if mul.target != aten.mul.Tensor or up not in mul.args[:2]:
        return False
    other = mul.args[1] if mul.args[0] is up else mul.args[0]
    todo, seen = [other], set()
    while todo:
        node = todo.pop()
        if node is gate and node is not other:
            return True
        if node in seen or node is stop or not hasattr(node, "all_input_nodes"):
            continue
        seen.add(node)
        todo.extend(node.all_input_nodes)
    return False


@graph_pass(expects=_expected)
def hook_mlp(ctx: PassContext, *, post_input: str | None = None) -> int:
    """Hook the MLP's pre-activation(s) and post-activation.

    ``post_input``: the module (relative to the MLP) whose input is ``hook_post``, where that is not the down
    projection (BitNet: ``ffn_sub_norm``, a norm between the activation and the down projection).
    """
    spec, graph = ctx.spec, ctx.graph
    found = 0
    for layer in _dense_layers(spec, ctx.dims["n_layers"]):
        mlp_path = spec.mlp_path(layer)
        pre_path = spec.mlp_path(layer, spec.mlp_gate or spec.mlp_in)
        if spec.mlp_gate and spec.mlp_gate == spec.mlp_in:  # fused [gate | up]
            gate, up = _fused_halves(ctx, output_of(graph, pre_path, "the fused projection's output"), mlp_path,
                                     pre_path)
            todo = [(gate, "mlp.hook_pre", pre_path), (up, "mlp.hook_pre_linear", pre_path)]
        else:
            todo = [(output_of(graph, pre_path, "the projection's output"), "mlp.hook_pre", pre_path)]
            if spec.mlp_gate:
                in_path = spec.mlp_path(layer, spec.mlp_in)
                todo.append((output_of(graph, in_path, "the projection's output"), "mlp.hook_pre_linear", in_path))
        for out, hook, path in todo:
            hook_after(ctx, out, hook_name(hook, layer), scope=mlp_path, hf_module=path)
            found += 1
        down_path = spec.mlp_path(layer, post_input or spec.mlp_out)
        down = ModuleRegion.of(graph, down_path)
        post = single(down.inputs, "input", down_path)
        hook_after(ctx, post, hook_name("mlp.hook_post", layer), scope=mlp_path,
                   users=[u for u in post.users if u in down], hf_module=down_path)
        found += 1
    return found
