"""hook_unembed on toy graphs: the lm_head output (pre-softcap logits)."""
import torch

from fxbridge.runtime.names import aliases_for
from toy import (missed, LLAMA_SPEC, captured, delta, eager, hook_nodes, max_diff, module_io, no_match, op_counts, run,
                 run_pass, tokens, toy_dims, toy_spec, watch, hook_points)


def test_hooks_the_lm_head_output():
    toy = captured("llama")
    root, graph = toy.fresh()
    before = op_counts(graph)
    assert run_pass("hook_unembed", graph, root, LLAMA_SPEC, toy_dims(toy.model.config)) == 1
    assert delta(before, op_counts(graph)) == {}
    assert hook_nodes(graph) == ["hook_unembed"]
    assert graph.output_node().args[0].target == "hook_unembed"
    assert aliases_for(hook_points(root)) == {"unembed.hook_out": "hook_unembed"}
    seen = watch(root, ["hook_unembed"])
    ids = tokens()
    assert max_diff(run(root, graph, ids), eager(toy.model, ids)) == 0.0
    assert torch.equal(seen["hook_unembed"], module_io(toy.model, ids, ["lm_head"])["lm_head"][1])


def test_a_returned_tensor_replaces_the_logits():
    toy = captured("llama")
    root, graph = toy.fresh()
    run_pass("hook_unembed", graph, root, LLAMA_SPEC, toy_dims(toy.model.config))
    root.get_submodule("hook_unembed").add_hook(lambda t, hook: t.flip(-1))
    ids = tokens()
    assert torch.equal(run(root, graph, ids), eager(toy.model, ids).flip(-1))


def test_a_graph_without_the_unembedding_module_matches_nothing():
    toy = captured("llama")
    root, graph = toy.fresh()
    before = op_counts(graph)
    err = no_match("hook_unembed", graph, root, toy_spec(unembed="embed_out"), toy_dims(toy.model.config))
    assert missed(err, 1, 0)
    assert hook_nodes(graph) == [] and op_counts(graph) == before
