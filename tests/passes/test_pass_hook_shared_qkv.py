"""hook_shared_qkv on a Gemma-4-shaped toy: per-layer head sizes, k = v layers, and a KV-shared layer.

Layer 0: q/k/v projections (H=4, Hkv=2, dh=8). Layer 1: no v projection, values are the k projection through
``v_norm`` (Hkv=1, dh=16). Layer 2: no k/v projections, it reuses layer 0's keys and values.
"""
import functools
from types import SimpleNamespace

import torch

from fxbridge.passes import NoMatch
from fxbridge.runtime.names import aliases_for
from toy import (missed, LLAMA_SPEC, TOL, capture_toy, delta, eager, hook_nodes, max_diff, no_match, op_counts, run, run_pass,
                 tokens, toy_config, toy_dims, toy_lm, toy_spec, hook_points)

HEADS = [(4, 2, 8), (4, 1, 16), (4, 2, 8)]
LAYER_KW = [{}, {"heads": HEADS[1], "k_eq_v": True}, {"kv_from": 0}]
HOOKS = ["blocks.0.attn.hook_q", "blocks.0.attn.hook_k", "blocks.0.attn.hook_v",
         "blocks.1.attn.hook_q", "blocks.1.attn.hook_k", "blocks.1.attn.hook_v", "blocks.2.attn.hook_q"]


def _config(heads=HEADS):
    per_layer = [SimpleNamespace(num_attention_heads=h, num_key_value_heads=g, head_dim=d) for h, g, d in heads]
    return toy_config(3, per_layer_config=per_layer)


@functools.cache
def _toy():
    return capture_toy(toy_lm(config=_config(), norms=True, per_layer=lambda i: LAYER_KW[i]))


def _dims(toy):
    return toy_dims(toy.model.config, n_kv_shared_layers=1)


def _toy_qkv(toy, ids):
    """What each layer's own code computed: (q, k, v) per-head views of the projections (None where absent)."""
    attns = [layer.self_attn for layer in toy.model.model.layers]
    for attn in attns:
        attn.record, attn.seen = True, {}
    try:
        eager(toy.model, ids)
    finally:
        for attn in attns:
            attn.record = False
    return [attn.seen for attn in attns]


def test_hooks_q_on_every_layer_and_k_v_where_the_layer_computes_them():
    toy = _toy()
    root, graph = toy.fresh()
    before = op_counts(graph)
    assert run_pass("hook_shared_qkv", graph, root, LLAMA_SPEC, _dims(toy), toy.model.config) == 7
    assert delta(before, op_counts(graph)) == {}
    assert hook_nodes(graph) == HOOKS
    assert aliases_for(hook_points(root)) == {h.replace("hook_", "") + ".hook_out": h for h in HOOKS}
    seen = {}
    for name in HOOKS:
        root.get_submodule(name).add_hook(lambda t, hook: seen.__setitem__(hook.name, t.clone()))
    ids = tokens()
    assert max_diff(run(root, graph, ids), eager(toy.model, ids)) == 0.0
    own = _toy_qkv(toy, ids)
    for name in HOOKS:
        layer, role = int(name.split(".")[1]), name[-1]
        assert torch.equal(seen[name], own[layer][role]), name
    assert seen["blocks.1.attn.hook_k"].shape == (2, 5, 1, 16)
    assert torch.equal(seen["blocks.1.attn.hook_v"], seen["blocks.1.attn.hook_k"])  # k = v


def _edited_in_eager(toy, ids, module, hook):
    handle = getattr(toy.model.model.layers[1].self_attn, module).register_forward_pre_hook(hook) \
        if module == "v_norm" else toy.model.model.layers[1].self_attn.k_proj.register_forward_hook(hook)
    try:
        return eager(toy.model, ids)
    finally:
        handle.remove()


def test_on_a_k_eq_v_layer_hook_v_edits_the_values_only_and_hook_k_both():
    toy = _toy()
    ids = tokens()
    root, graph = toy.fresh()
    run_pass("hook_shared_qkv", graph, root, LLAMA_SPEC, _dims(toy), toy.model.config)

    def zero(t, hook):
        t.zero_()  # in place, on storage the key path shares: it must fire after the keys were read
    root.get_submodule("blocks.1.attn.hook_v").add_hook(zero)
    want = _edited_in_eager(toy, ids, "v_norm", lambda mod, args: (torch.zeros_like(args[0]),))
    got = run(root, graph, ids)
    assert max_diff(got, want) < TOL and max_diff(got, eager(toy.model, ids)) > 1e-3
    root, graph = toy.fresh()
    run_pass("hook_shared_qkv", graph, root, LLAMA_SPEC, _dims(toy), toy.model.config)
    root.get_submodule("blocks.1.attn.hook_k").add_hook(lambda t, hook: t * 2)
    want = _edited_in_eager(toy, ids, "k_proj", lambda mod, args, out: out * 2)
    assert max_diff(run(root, graph, ids), want) < TOL


def test_head_sizes_unlike_the_config_are_refused():
    toy = _toy()
    root, graph = toy.fresh()
    config = _config([HEADS[0], (4, 1, 8), HEADS[2]])
    err = no_match("hook_shared_qkv", graph, root, LLAMA_SPEC, _dims(toy), config)
    assert isinstance(err.__cause__, NoMatch)
    assert err.where == "model.layers.1.self_attn.q_proj" and "(4, 8) heads x head size" in err.expected
    assert "(4, 16)" in err.found


def test_a_spec_naming_other_projections_matches_nothing():
    toy = _toy()
    root, graph = toy.fresh()
    before = op_counts(graph)
    err = no_match("hook_shared_qkv", graph, root, toy_spec(q="query", k="key", v="value"), _dims(toy),
                   toy.model.config)
    assert missed(err, 7, 0)
    assert hook_nodes(graph) == [] and op_counts(graph) == before
