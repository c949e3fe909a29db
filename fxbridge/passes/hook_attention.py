"""Replace each captured attention call by an ``AttentionCore`` module and hook its inputs and output.

    z = fxbridge.attention(q, k, v, mask, scale, cap)
->  q' = hook_rot_q(q) ; k' = hook_rot_k(k)                 (rotary models; seen as [B,S,H,dh])
    z = blocks.i.attn(q', k', v, mask)                     (fused SDPA, or eager with hook_attn_scores/pattern)
    z = hook_z(z)
"""
from ..runtime.cores import AttentionCore
from ..runtime.names import hook_name
from ..tracer.attention_op import AttentionCall
from ..tracer.graph_facts import layer_index
from .base import NoMatch, PassContext, graph_pass
from .graph_utils import SWAP_HEADS_POS, hook_after, hook_viewed, install


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
        name = f"blocks.{layer}.attn"
        core_module = AttentionCore(call.scaling, call.softcap, layer)
        for point in core_module.children():
            point.made_by, point.hf_module = ctx.current_pass, attn_path
        install(ctx.root, name, core_module)
        with graph.inserting_before(node):
            core = call.with_layer(layer).emit_core(graph, name)
        core.meta.update(node.meta)
        core.meta["fxbridge_pass"] = ctx.current_pass
        node.replace_all_uses_with(core)
        graph.erase_node(node)
        if spec.rotary and layer not in spec.nope_layers:
            for arg, hook in ((q, "attn.hook_rot_q"), (k, "attn.hook_rot_k")):
                hook_viewed(ctx, arg, hook_name(hook, layer), to_hook=SWAP_HEADS_POS[0], from_hook=SWAP_HEADS_POS[1],
                            scope=attn_path, users=[core], hf_module=attn_path)
        hook_after(ctx, core, hook_name("attn.hook_z", layer), scope=attn_path, hf_module=attn_path)
        done.append(layer)
    missing = sorted(set(range(ctx.dims["n_layers"])) - set(done))
    if missing:
        raise NoMatch(spec.layer(missing[0], spec.attn), "an attention call (fxbridge::attention)", "none")
    return len(done)
