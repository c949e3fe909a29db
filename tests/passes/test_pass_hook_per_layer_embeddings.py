"""hook_per_layer_embeddings on a Gemma-4-shaped toy: each layer's per-layer input, gate, gated input, branch output."""
import functools

import torch
from torch import nn

from fxbridge.passes import NoMatch
from toy import (missed, D, LLAMA_SPEC, DecoderLayer, RMSNorm, ToyModel, capture_toy, captured, delta, eager, hook_nodes,
                 max_diff, module_io, no_match, op_counts, run, run_pass, tokens, toy_dims, toy_lm)

P = 6  # per-layer embedding width
HOOKS = ["ple.hook_gate", "ple.hook_per_layer_input", "ple.hook_gated", "hook_ple_out"]


class PLEModel(ToyModel):
    """Gemma 4's model: a per-layer embedding table [V, L*P], each layer gets its [B,S,P] slice."""

    def __init__(self, config, layers, **kw):
        super().__init__(config, layers, **kw)
        self.embed_tokens_per_layer = nn.Embedding(config.vocab_size, len(layers) * P)

    def prepare(self, state):
        ids = state["input_ids"]
        state["per_layer_inputs"] = self.embed_tokens_per_layer(ids).view(*ids.shape, len(self.layers), P)


class PLELayer(DecoderLayer):
    """After the MLP: gate(x) -> act -> * per-layer input -> projection -> norm, added to the residual."""

    def __init__(self, config, i, **kw):
        super().__init__(config, i, **kw)
        self.layer_idx = i
        self.per_layer_input_gate, self.act_fn = nn.Linear(D, P, bias=False), nn.GELU(approximate="tanh")
        self.per_layer_projection, self.post_per_layer_input_norm = nn.Linear(P, D, bias=False), RMSNorm()

    def forward(self, x, mask, state):
        x = super().forward(x, mask, state)
        gated = self.act_fn(self.per_layer_input_gate(x)) * state["per_layer_inputs"][:, :, self.layer_idx]
        return x + self.post_per_layer_input_norm(self.per_layer_projection(gated))


@functools.cache
def _toy():
    return capture_toy(toy_lm(2, layer=PLELayer, model_cls=PLEModel))


def _names():
    return [f"blocks.{i}.{h}" for i in range(2) for h in HOOKS]


def test_hooks_four_points_per_layer_with_the_toy_values():
    toy = _toy()
    root, graph = toy.fresh()
    before = op_counts(graph)
    assert run_pass("hook_per_layer_embeddings", graph, root, LLAMA_SPEC,
                    toy_dims(toy.model.config, d_per_layer_input=P)) == 8
    assert delta(before, op_counts(graph)) == {}
    assert sorted(hook_nodes(graph)) == sorted(_names())
    seen = {}
    for name in _names():
        root.get_submodule(name).add_hook(lambda t, hook: seen.__setitem__(hook.name, t.clone()))
    ids = tokens()
    assert max_diff(run(root, graph, ids), eager(toy.model, ids)) == 0.0
    table = toy.model.model.embed_tokens_per_layer.weight.detach()[ids].view(2, 5, 2, P)
    for i in range(2):
        layer = f"model.layers.{i}"
        io = module_io(toy.model, ids, [f"{layer}.per_layer_input_gate", f"{layer}.post_per_layer_input_norm"])
        gate = io[f"{layer}.per_layer_input_gate"][1]
        assert torch.equal(seen[f"blocks.{i}.ple.hook_per_layer_input"], table[:, :, i])
        assert torch.equal(seen[f"blocks.{i}.ple.hook_gate"], gate)
        assert max_diff(seen[f"blocks.{i}.ple.hook_gated"],
                        torch.nn.functional.gelu(gate, approximate="tanh") * table[:, :, i]) == 0.0
        assert torch.equal(seen[f"blocks.{i}.hook_ple_out"], io[f"{layer}.post_per_layer_input_norm"][1])


def test_zeroing_the_per_layer_input_removes_the_branch():
    toy = _toy()
    root, graph = toy.fresh()
    run_pass("hook_per_layer_embeddings", graph, root, LLAMA_SPEC, toy_dims(toy.model.config, d_per_layer_input=P))
    root.get_submodule("blocks.0.ple.hook_per_layer_input").add_hook(lambda t, hook: torch.zeros_like(t))
    ids = tokens()
    norm = toy.model.model.layers[0].post_per_layer_input_norm
    handle = norm.register_forward_hook(lambda mod, args, out: out * 0)  # branch of zeros: RMSNorm(0) = 0
    try:
        want = eager(toy.model, ids)
    finally:
        handle.remove()
    assert max_diff(run(root, graph, ids), want) == 0.0


def test_a_per_layer_width_unlike_the_config_is_refused():
    toy = _toy()
    root, graph = toy.fresh()
    err = no_match("hook_per_layer_embeddings", graph, root, LLAMA_SPEC,
                   toy_dims(toy.model.config, d_per_layer_input=P + 1))
    assert isinstance(err.__cause__, NoMatch) and f"width {P}" in str(err)


def test_a_graph_without_per_layer_embeddings_matches_nothing():
    toy = captured("llama")
    root, graph = toy.fresh()
    before = op_counts(graph)
    assert run_pass("hook_per_layer_embeddings", graph, root, LLAMA_SPEC, toy_dims(toy.model.config)) == 0
    err = no_match("hook_per_layer_embeddings", graph, root, LLAMA_SPEC,
                   toy_dims(toy.model.config, d_per_layer_input=P))
    assert missed(err, 8, 0)
    assert hook_nodes(graph) == [] and op_counts(graph) == before
