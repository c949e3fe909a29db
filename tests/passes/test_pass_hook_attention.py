"""hook_attention on toy graphs: each ``fxbridge::attention`` call becomes an AttentionCore with rot_q/rot_k/z hooks."""
import torch

from fxbridge.runtime.cores import AttentionCore
from fxbridge.runtime.names import aliases_for
from toy import (missed, GPT2_SPEC, LLAMA_SPEC, TOL, captured, delta, eager, hook_nodes, hook_points, max_diff, module_calls,
                 no_match, op_counts, run, run_pass, tokens, toy_dims, watch)

ATTENTION = "fxbridge.attention.default"


def _layer_hooks(i, rotary=True):
    return ([f"blocks.{i}.attn.hook_rot_q", f"blocks.{i}.attn.hook_rot_k"] if rotary else []) + [
        f"blocks.{i}.attn.hook_z"]


def test_replaces_each_attention_call_by_a_core_and_hooks_rot_q_rot_k_z():
    toy = captured("llama")
    root, graph = toy.fresh()
    before = op_counts(graph)
    assert before[ATTENTION] == 2 and module_calls(graph) == []
    assert run_pass("hook_attention", graph, root, LLAMA_SPEC, toy_dims(toy.model.config), toy.model.config) == 2
    # each rot hook sees [B,S,h,dh] through a transpose pair
    assert delta(before, op_counts(graph)) == {ATTENTION: -2, "aten.transpose.int": 8}
    assert sorted(hook_nodes(graph)) == sorted(_layer_hooks(0) + _layer_hooks(1))
    assert [t for t in module_calls(graph) if t.endswith(".attn")] == ["blocks.0.attn", "blocks.1.attn"]
    for i in range(2):
        core = root.get_submodule(f"blocks.{i}.attn")
        assert isinstance(core, AttentionCore) and core.layer == i and core.softcap is None
        assert core.scaling == 8 ** -0.5
    assert {f"blocks.{i}.attn.{h}" for i in range(2) for h in ("hook_attn_scores", "hook_pattern")} <= set(
        hook_points(root))
    assert aliases_for(hook_points(root)) == {f"blocks.{i}.attn.o.hook_in": f"blocks.{i}.attn.hook_z" for i in range(2)}


def test_fused_and_eager_paths_keep_the_values_and_the_hooks_see_the_toy_values():
    toy = captured("llama")
    root, graph = toy.fresh()
    run_pass("hook_attention", graph, root, LLAMA_SPEC, toy_dims(toy.model.config), toy.model.config)
    ids = tokens()
    want = eager(toy.model, ids)
    assert max_diff(run(root, graph, ids), want) < TOL  # unhooked: fused SDPA
    names = _layer_hooks(0) + ["blocks.0.attn.hook_pattern", "blocks.0.attn.hook_attn_scores"]
    seen = watch(root, names)  # a pattern hook makes the core eager
    assert max_diff(run(root, graph, ids), want) < TOL
    attn = toy.model.model.layers[0].self_attn
    attn.record = True
    try:
        eager(toy.model, ids)
    finally:
        attn.record = False
    for hook, key in (("hook_rot_q", "rot_q"), ("hook_rot_k", "rot_k"), ("hook_z", "z")):
        assert max_diff(seen[f"blocks.0.attn.{hook}"], attn.seen[key]) < TOL, hook
    q, k = attn.seen["rot_q"].transpose(1, 2), attn.seen["rot_k"].transpose(1, 2).repeat_interleave(2, dim=1)
    scores = q @ k.transpose(-1, -2) * 8 ** -0.5 + torch.full((5, 5), torch.finfo(q.dtype).min).triu(1)
    assert max_diff(seen["blocks.0.attn.hook_attn_scores"], scores) < TOL
    assert max_diff(seen["blocks.0.attn.hook_pattern"], torch.softmax(scores, dim=-1)) < TOL


def test_a_non_rotary_spec_hooks_only_z():
    toy = captured("gpt2")
    root, graph = toy.fresh()
    before = op_counts(graph)
    assert run_pass("hook_attention", graph, root, GPT2_SPEC, toy_dims(toy.model.config), toy.model.config) == 2
    assert delta(before, op_counts(graph)) == {ATTENTION: -2}
    assert hook_nodes(graph) == _layer_hooks(0, rotary=False) + _layer_hooks(1, rotary=False)
    ids = tokens()
    assert max_diff(run(root, graph, ids), eager(toy.model, ids)) < TOL


def test_the_softcap_of_the_call_goes_into_the_core_and_must_equal_the_config():
    toy = captured("gpt2")
    root, graph = toy.fresh()
    for node in graph.nodes:  # as Gemma 2 captures: the call carries the attention softcap
        if node.op == "call_function" and str(node.target) == ATTENTION:
            node.args = (*node.args[:5], 2.0, node.args[6])
    ids = tokens()
    want = run(root, graph, ids)
    assert max_diff(want, eager(toy.model, ids)) > 1e-3  # the cap bends these scores
    err = no_match("hook_attention", graph, root, GPT2_SPEC, toy_dims(toy.model.config), toy.model.config)
    assert missed(err, 2, 0) and "attn_logit_softcapping=None" in str(err)
    root, graph = toy.fresh()
    for node in graph.nodes:
        if node.op == "call_function" and str(node.target) == ATTENTION:
            node.args = (*node.args[:5], 2.0, node.args[6])
    config = type(toy.model.config)(**{**vars(toy.model.config), "attn_logit_softcapping": 2.0})
    assert run_pass("hook_attention", graph, root, GPT2_SPEC, toy_dims(config), config) == 2
    assert root.get_submodule("blocks.0.attn").softcap == 2.0
    assert max_diff(run(root, graph, ids), want) < TOL


def test_a_graph_without_attention_calls_matches_nothing():
    toy = captured("llama")
    root, graph = toy.fresh()
    dims = toy_dims(toy.model.config)
    run_pass("hook_attention", graph, root, LLAMA_SPEC, dims, toy.model.config)
    rewritten = op_counts(graph)
    assert rewritten[ATTENTION] == 0
    err = no_match("hook_attention", graph, root, LLAMA_SPEC, dims, toy.model.config)
    assert missed(err, 2, 0)
    assert op_counts(graph) == rewritten
