"""remove_eval_dropout on a Falcon-shaped toy: functional eval-mode dropout inside the layers is removed."""
import functools

import pytest

import torch.nn.functional as F

from fxbridge.passes import remove_eval_dropout
from toy import (missed, LLAMA_SPEC, DecoderLayer, ToyModel, capture_toy, captured, delta, eager, max_diff, no_match,
                 op_counts, run, run_pass, tokens, toy_dims, toy_lm, toy_spec)

SPEC = toy_spec(passes=(remove_eval_dropout(per_layer=2),))
DROPOUT = "aten.dropout.default"


class DropoutLayer(DecoderLayer):
    """Falcon's ``dropout_add``: F.dropout(branch, p, training=False) before each residual add."""

    def forward(self, x, mask, state):
        x = x + F.dropout(self.self_attn(self.input_layernorm(x), mask, state), p=0.1, training=False)
        return x + F.dropout(self.mlp(self.post_attention_layernorm(x)), p=0.1, training=False)


class DropoutModel(ToyModel):
    """A dropout outside the layers (on the final hidden state): not the pass's business."""

    def forward(self, input_ids):
        return F.dropout(super().forward(input_ids), p=0.1, training=False)


@functools.cache
def _toy():
    return capture_toy(toy_lm(1, layer=DropoutLayer, model_cls=DropoutModel))


def test_removes_the_dropouts_inside_the_layers_only():
    toy = _toy()
    root, graph = toy.fresh()
    before = op_counts(graph)
    assert before[DROPOUT] == 3
    assert run_pass("remove_eval_dropout", graph, root, SPEC, toy_dims(toy.model.config)) == 2
    assert delta(before, op_counts(graph)) == {DROPOUT: -2}
    (kept,) = [n for n in graph.nodes if str(n.target) == DROPOUT]
    assert [p for p, _ in kept.meta["nn_module_stack"].values()][-1] == "model"
    ids = tokens()
    assert max_diff(run(root, graph, ids), eager(toy.model, ids)) == 0.0
    # the residual adds now read the branch outputs directly, so hook_residual finds its pattern
    assert run_pass("hook_residual", graph, root, LLAMA_SPEC, toy_dims(toy.model.config)) == 5


def test_training_mode_dropout_is_refused():
    toy = _toy()
    root, graph = toy.fresh()
    node = next(n for n in graph.nodes if str(n.target) == DROPOUT)
    node.args = (node.args[0], node.args[1], True)
    with pytest.raises(ValueError, match="training mode"):  # a refusal with its own type, not a missing pattern
        run_pass("remove_eval_dropout", graph, root, SPEC, toy_dims(toy.model.config))


def test_a_graph_without_dropout_matches_nothing():
    toy = captured("llama")
    root, graph = toy.fresh()
    before = op_counts(graph)
    no_dropout = toy_spec(passes=(remove_eval_dropout(per_layer=0),))
    assert run_pass("remove_eval_dropout", graph, root, no_dropout, toy_dims(toy.model.config)) == 0
    err = no_match("remove_eval_dropout", graph, root, SPEC, toy_dims(toy.model.config))
    assert missed(err, 4, 0)
    assert op_counts(graph) == before
