"""hook_qkv on toy graphs: separate q/k/v projection outputs hooked per head through a view."""
import torch

from fxbridge.runtime.names import aliases_for
from toy import (missed, LLAMA_SPEC, captured, delta, eager, hook_nodes, max_diff, module_io, no_match, op_counts, run,
                 run_pass, tokens, toy_dims, toy_spec, watch, hook_points)

QKV = [f"blocks.{i}.attn.hook_{r}" for i in range(2) for r in "qkv"]


def test_hooks_q_k_v_of_every_layer_as_views():
    toy = captured("llama")
    root, graph = toy.fresh()
    before = op_counts(graph)
    assert run_pass("hook_qkv", graph, root, LLAMA_SPEC, toy_dims(toy.model.config)) == 6
    assert delta(before, op_counts(graph)) == {"aten.flatten.using_ints": 6, "aten.unflatten.int": 6}
    assert hook_nodes(graph) == QKV
    aliases = aliases_for(hook_points(root))  # the contract's aliases of the points the pass made
    assert aliases == {f"blocks.{i}.attn.{r}.hook_out": f"blocks.{i}.attn.hook_{r}" for i in range(2) for r in "qkv"}


def test_the_hooks_see_the_projection_outputs_per_head_and_the_output_is_unchanged():
    toy = captured("llama")
    root, graph = toy.fresh()
    run_pass("hook_qkv", graph, root, LLAMA_SPEC, toy_dims(toy.model.config))
    seen = watch(root, QKV)
    ids = tokens()
    assert max_diff(run(root, graph, ids), eager(toy.model, ids)) == 0.0
    paths = [f"model.layers.{i}.self_attn.{r}_proj" for i in range(2) for r in "qkv"]
    io = module_io(toy.model, ids, paths)
    for name, path in zip(QKV, paths):
        out = io[path][1]
        assert seen[name].shape == (2, 5, 4 if name.endswith("q") else 2, 8), name
        assert torch.equal(seen[name], out.reshape(2, 5, -1, 8)), name


def test_an_in_place_edit_of_hook_v_reaches_the_attention():
    toy = captured("llama")
    root, graph = toy.fresh()
    run_pass("hook_qkv", graph, root, LLAMA_SPEC, toy_dims(toy.model.config))

    def zero_kv_head_1(t, hook):
        t[:, :, 1].zero_()  # in place, returns None
    root.get_submodule("blocks.0.attn.hook_v").add_hook(zero_kv_head_1)
    ids = tokens()

    def zero_head(mod, args, out):
        out = out.clone()
        out[..., 8:16] = 0
        return out
    handle = toy.model.model.layers[0].self_attn.v_proj.register_forward_hook(zero_head)
    try:
        want = eager(toy.model, ids)
    finally:
        handle.remove()
    got = run(root, graph, ids)
    assert max_diff(got, want) < 1e-6 and max_diff(got, eager(toy.model, ids)) > 1e-3


def test_a_spec_naming_other_projections_matches_nothing():
    toy = captured("llama")
    root, graph = toy.fresh()
    before = op_counts(graph)
    dims = toy_dims(toy.model.config)
    err = no_match("hook_qkv", graph, root, toy_spec(q="query", k="key", v="value"), dims)
    assert missed(err, 6, 0)
    assert hook_nodes(graph) == [] and op_counts(graph) == before


def test_a_missing_projection_is_a_count_mismatch():
    toy = captured("llama")
    root, graph = toy.fresh()
    err = no_match("hook_qkv", graph, root, toy_spec(k="key"), toy_dims(toy.model.config))
    assert missed(err, 6, 4)
