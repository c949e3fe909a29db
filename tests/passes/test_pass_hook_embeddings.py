"""hook_embeddings on toy graphs: ``hook_embed`` on the token embedding, ``hook_pos_embed`` on learned positions."""
import torch

from toy import (missed, GPT2_SPEC, LLAMA_SPEC, captured, delta, eager, hook_nodes, max_diff, no_match, op_counts, run,
                 run_pass, tokens, toy_dims, toy_spec, watch)


def test_hooks_the_token_embedding_and_keeps_the_values():
    toy = captured("llama")
    root, graph = toy.fresh()
    before = op_counts(graph)
    assert hook_nodes(graph) == []
    assert run_pass("hook_embeddings", graph, root, LLAMA_SPEC, toy_dims(toy.model.config)) == 1
    assert delta(before, op_counts(graph)) == {}  # one call_module node, no op
    assert hook_nodes(graph) == ["hook_embed"]
    seen = watch(root, ["hook_embed"])
    ids = tokens()
    assert max_diff(run(root, graph, ids), eager(toy.model, ids)) == 0.0
    assert torch.equal(seen["hook_embed"], toy.model.model.embed_tokens.weight[ids].detach())


def test_hooks_learned_positions_per_batch_row_at_any_batch_size():
    toy = captured("gpt2")
    root, graph = toy.fresh()
    before = op_counts(graph)
    assert run_pass("hook_embeddings", graph, root, GPT2_SPEC, toy_dims(toy.model.config)) == 2
    # HF's positions are [1,S,D]: the hook sees them expanded to the batch (size read off input_ids), then aliased back
    assert delta(before, op_counts(graph)) == {"aten.alias.default": 1, "aten.expand.default": 1,
                                               "aten.sym_size.int": 1}
    assert sorted(hook_nodes(graph)) == ["hook_embed", "hook_pos_embed"]
    seen = watch(root, ["hook_embed", "hook_pos_embed"])
    ids = tokens(3, 6)  # captured at batch 2, length 7
    assert max_diff(run(root, graph, ids), eager(toy.model, ids)) == 0.0
    rows = toy.model.model.embed_positions.weight[:6].detach()
    assert torch.equal(seen["hook_pos_embed"], rows.expand(3, 6, -1))
    assert torch.equal(seen["hook_embed"], toy.model.model.embed_tokens.weight[ids].detach())


def test_zeroing_the_position_hook_removes_the_positions_from_every_row():
    toy = captured("gpt2")
    root, graph = toy.fresh()
    run_pass("hook_embeddings", graph, root, GPT2_SPEC, toy_dims(toy.model.config))
    root.get_submodule("hook_pos_embed").add_hook(lambda t, hook: torch.zeros_like(t))
    ids = tokens(2, 5)
    with torch.no_grad():
        model = toy.model.model
        h = model.embed_tokens(ids)
        for layer in model.layers:  # the toy's forward without positions, by hand
            h = layer(h, torch.full((5, 5), torch.finfo(h.dtype).min).triu(1)[None, None], {})
        want = toy.model.lm_head(model.norm(h))
    assert max_diff(run(root, graph, ids), want) < 1e-6


def test_a_graph_without_the_embedding_module_matches_nothing():
    toy = captured("llama")
    root, graph = toy.fresh()
    before = op_counts(graph)
    err = no_match("hook_embeddings", graph, root, toy_spec(embed="model.wte"), toy_dims(toy.model.config))
    assert err.pass_name == "hook_embeddings" and missed(err, 1, 0)
    assert hook_nodes(graph) == [] and op_counts(graph) == before


def test_a_spec_with_positions_on_a_graph_without_them_finds_one_of_two():
    toy = captured("llama")
    root, graph = toy.fresh()
    err = no_match("hook_embeddings", graph, root, toy_spec(pos_embed="model.embed_positions"),
                   toy_dims(toy.model.config))
    assert missed(err, 2, 1)
