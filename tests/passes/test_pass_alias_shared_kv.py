"""alias_shared_kv on toy graphs: a KV-shared layer reads the reused keys through an alias made in that layer."""
from fxbridge.tracer.graph_facts import module_stack
from fxbridge.passes import NoMatch
from toy import (missed, LLAMA_SPEC, captured, delta, eager, max_diff, no_match, op_counts, run, run_pass, tokens, toy_dims)

ATTENTION = "fxbridge.attention.default"


def _calls(graph):
    return [n for n in graph.nodes if n.op == "call_function" and str(n.target) == ATTENTION]


def test_the_sharing_layer_reads_the_owner_keys_through_a_local_alias():
    toy = captured("shared_kv")  # layer 1 reuses layer 0's keys and values
    root, graph = toy.fresh()
    dims = toy_dims(toy.model.config, n_kv_shared_layers=1)
    owner, reader = _calls(graph)
    k0, v0 = owner.args[1], owner.args[2]
    assert reader.args[1] is k0 and reader.args[2] is v0  # the premise: layer 1 reads layer 0's tensors
    before = op_counts(graph)
    assert run_pass("alias_shared_kv", graph, root, LLAMA_SPEC, dims) == 1
    assert delta(before, op_counts(graph)) == {"aten.alias.default": 1}
    alias = reader.args[1]
    assert str(alias.target) == "aten.alias.default" and alias.args == (k0,)
    assert alias.meta["fxbridge_shared_kv_from"] == 0
    assert module_stack(alias)[-1] == "model.layers.1.self_attn"
    assert reader.args[2] is v0 and owner.args[1] is k0  # values and the owner's own keys are untouched
    ids = tokens()
    assert max_diff(run(root, graph, ids), eager(toy.model, ids)) == 0.0


def test_keys_and_values_from_different_layers_are_refused():
    toy = captured("shared_kv")
    root, graph = toy.fresh()
    _, reader = _calls(graph)
    reader.args = (reader.args[0], reader.args[1], reader.args[0], *reader.args[3:])  # v from layer 1 itself
    err = no_match("alias_shared_kv", graph, root, LLAMA_SPEC, toy_dims(toy.model.config, n_kv_shared_layers=1))
    assert isinstance(err.__cause__, NoMatch) and "keys of layer 0 and values of layer 1" in str(err)


def test_layers_reading_their_own_keys_match_nothing():
    toy = captured("llama")
    root, graph = toy.fresh()
    before = op_counts(graph)
    assert run_pass("alias_shared_kv", graph, root, LLAMA_SPEC, toy_dims(toy.model.config)) == 0
    assert op_counts(graph) == before
    err = no_match("alias_shared_kv", graph, root, LLAMA_SPEC, toy_dims(toy.model.config, n_kv_shared_layers=1))
    assert missed(err, 1, 0)
    assert op_counts(graph) == before
