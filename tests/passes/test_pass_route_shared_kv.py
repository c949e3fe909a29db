"""route_shared_kv on toy graphs: a KV-shared layer's key alias reads the owner's keys after its hook_rot_k."""
import pytest

from fxbridge.errors import PassOrderError
from fxbridge.passes import PASSES, PassContext, run_passes
from toy import (missed, LLAMA_SPEC, TOL, captured, delta, eager, max_diff, no_match, op_counts, run, run_pass, tokens,
                 toy_dims)


def _prepared(name="shared_kv"):
    """The toy after the passes route_shared_kv needs: alias_shared_kv, hook_attention."""
    toy = captured(name)
    root, graph = toy.fresh()
    dims = toy_dims(toy.model.config, n_kv_shared_layers=int(name == "shared_kv"))
    run_pass("alias_shared_kv", graph, root, LLAMA_SPEC, dims)
    run_pass("hook_attention", graph, root, LLAMA_SPEC, toy_dims(toy.model.config), toy.model.config)
    return toy, root, graph, dims


def _alias(graph):
    (alias,) = [n for n in graph.nodes if "fxbridge_shared_kv_from" in n.meta]
    return alias


def _doubled_keys_in_eager(toy, ids):
    """HF semantics: layer 0's keys are one tensor, reused by layer 1; doubling them (RoPE is linear) doubles both."""
    k_proj = toy.model.model.layers[0].self_attn.k_proj
    handle = k_proj.register_forward_hook(lambda mod, args, out: out * 2)
    try:
        return eager(toy.model, ids)
    finally:
        handle.remove()


def test_the_alias_reads_the_owner_hooked_keys():
    toy, root, graph, dims = _prepared()
    alias = _alias(graph)
    owner = next(n for n in graph.nodes if n.op == "call_module" and n.target == "blocks.0.attn")
    raw = alias.args[0]
    assert owner.args[1] is not raw
    before = op_counts(graph)
    assert run_pass("route_shared_kv", graph, root, LLAMA_SPEC, dims) == 1
    assert delta(before, op_counts(graph)) == {}
    assert alias.args == (owner.args[1],)
    ids = tokens()
    assert max_diff(run(root, graph, ids), eager(toy.model, ids)) < TOL


@pytest.mark.parametrize("routed", [False, True])
def test_an_edit_of_the_owner_hook_rot_k_reaches_the_sharing_layer_only_once_routed(routed):
    toy, root, graph, dims = _prepared()
    if routed:
        run_pass("route_shared_kv", graph, root, LLAMA_SPEC, dims)
    root.get_submodule("blocks.0.attn.hook_rot_k").add_hook(lambda t, hook: t * 2)
    ids = tokens()
    diff = max_diff(run(root, graph, ids), _doubled_keys_in_eager(toy, ids))
    assert diff < TOL if routed else diff > 1e-3


def test_a_graph_without_shared_keys_matches_nothing():
    toy, root, graph, _ = _prepared("llama")
    before = op_counts(graph)
    err = no_match("route_shared_kv", graph, root, LLAMA_SPEC, toy_dims(toy.model.config, n_kv_shared_layers=1))
    assert missed(err, 1, 0)
    assert op_counts(graph) == before


def test_hook_attention_must_run_first():
    toy = captured("shared_kv")
    root, graph = toy.fresh()
    dims = toy_dims(toy.model.config, n_kv_shared_layers=1)
    run_pass("alias_shared_kv", graph, root, LLAMA_SPEC, dims)
    with pytest.raises(PassOrderError, match="route_shared_kv requires hook_attention"):  # checked before running
        run_passes(PassContext(graph, root, LLAMA_SPEC, dims, None), [PASSES["route_shared_kv"]],
                   already_run=["alias_shared_kv"])
