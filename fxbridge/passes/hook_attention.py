"""Replace each captured attention call by an ``AttentionCore`` module and hook its inputs and output.

    z = fxbridge.attention(q, k, v, mask, scale, cap[, sinks])
->  q' = hook_rot_q(q) ; k' = hook_rot_k(k)                 (rotary layers; seen as [B,S,H,dh])
    z = blocks.i.attn(q', k', v, mask[, sinks])            (fused SDPA, or eager with hook_attn_scores/pattern;
                                                            with sinks always eager, + hook_sink_logits [H])
    z = hook_z(z)

Rotary hooks go on the layers whose queries are rotated: a spec with ``rotary=True`` can have NoPE layers
(SmolLM3's ``no_rope_layers``), which get no ``hook_rot_q``/``hook_rot_k``. A layer rotates when the query
reaching the call is computed, inside the attention module, from a per-position tensor that is not the query
projection's output and varies along the head dimension (the rotary cos/sin); read from the graph, not from a
config list.
"""
import torch

from ..runtime.cores import AttentionCore
from ..runtime.names import hook_name
from ..tracer.attention_op import AttentionCall
from ..tracer.graph_facts import ModuleRegion, layer_index
from .base import NoMatch, PassContext, graph_pass
from .graph_utils import SWAP_HEADS_POS, hook_after, hook_viewed, install

aten = torch.ops.aten


def _layer_of(call: AttentionCall, layers: str) -> int:
    """The decoder layer an attention call sits in, from its module stack (HF's layer_idx is not relied on)."""
    layer = layer_index(call.node, layers)
    if layer is None:
        raise NoMatch(f"attention call {call.node.name} (layer_idx={call.layer_idx})", f"a call inside {layers}.*",
                      "a call outside the decoder layers")
    return layer


def _check_softcap(softcap, config, where: str) -> None:
    expected = getattr(config, "attn_logit_softcapping", None)
    if softcap is not None and (expected is None or abs(float(expected) - softcap) > 1e-6 * abs(softcap)):
        raise NoMatch(where, f"the softcap config.attn_logit_softcapping={expected}", f"softcap {softcap}")


_PROJECTIONS = {aten.linear.default, aten.addmm.default, aten.mm.default, aten.matmul.default, aten.bmm.default}


def _is_rotated(q, region: ModuleRegion) -> bool:
    """Whether the query reaching the attention call is rotated: computed, inside the attention module, from a
    per-position tensor (a value with a symbolic dimension: cos/sin, positions) that does not come from the query
    projection and varies along the head dimension (its last dim a fixed size > 1: cos/sin, complex frequencies).
    Norm weights have fixed shapes; the projection's own path is not per-position; a per-position scale of the
    whole head (Llama 4's attention temperature tuning on NoPE layers, [1,S,1,1] from an arange over S) rotates
    nothing."""
    def per_position(node) -> bool:
        val = node.meta.get("val")
        return (isinstance(val, torch.Tensor) and val.dim() > 0 and any(isinstance(d, torch.SymInt) for d in val.shape)
                and not isinstance(val.shape[-1], torch.SymInt) and int(val.shape[-1]) > 1)

    from_proj: dict = {}

    def computed_from_projection(node) -> bool:
        if node not in from_proj:
            from_proj[node] = False
            from_proj[node] = node in region and (node.target in _PROJECTIONS or any(
                computed_from_projection(a) for a in node.all_input_nodes))
        return from_proj[node]

    seen, todo = set(), [q]
    while todo:
        node = todo.pop()
        if node in seen or node.op == "get_attr":
            continue
        seen.add(node)
        if not computed_from_projection(node) and per_position(node):
            return True
        if node in region and node.target not in _PROJECTIONS:
            todo.extend(node.all_input_nodes)
    return False


@graph_pass(expects=lambda spec, dims: dims["n_layers"])
def hook_attention(ctx: PassContext) -> int:
    """Turn fxbridge.attention nodes into AttentionCore modules with rot_q/rot_k/z hooks."""
    spec, graph = ctx.spec, ctx.graph
    done: list[int] = []
    for call in AttentionCall.find(graph):
        node, q, k = call.node, call.q, call.k
        layer = _layer_of(call, spec.layers)
        attn_path = spec.layer(layer, spec.attn)
        _check_softcap(call.softcap, ctx.config, attn_path)
        rotated = spec.rotary and _is_rotated(q, ModuleRegion.of(graph, attn_path))
        name = f"blocks.{layer}.attn"
        core_module = AttentionCore(call.scaling, call.softcap, layer, sinks=call.sinks is not None)
        for point in core_module.children():
            point.made_by, point.hf_module = ctx.current_pass, attn_path
        install(ctx.root, name, core_module)
        with graph.inserting_before(node):
            core = call.with_layer(layer).emit_core(graph, name)
        core.meta.update(node.meta)
        core.meta["fxbridge_pass"] = ctx.current_pass
        node.replace_all_uses_with(core)
        graph.erase_node(node)
        if rotated:
            for arg, hook in ((q, "attn.hook_rot_q"), (k, "attn.hook_rot_k")):
                hook_viewed(ctx, arg, hook_name(hook, layer), to_hook=SWAP_HEADS_POS[0], from_hook=SWAP_HEADS_POS[1],
                            scope=attn_path, users=[core], hf_module=attn_path)
        hook_after(ctx, core, hook_name("attn.hook_z", layer), scope=attn_path, hf_module=attn_path)
        done.append(layer)
    missing = sorted(set(range(ctx.dims["n_layers"])) - set(done))
    if missing:
        raise NoMatch(spec.layer(missing[0], spec.attn), "an attention call (fxbridge::attention)", "none")
    return len(done)
