"""unflatten_token_rows on a toy whose MLP block runs on [B*S,D] rows (OPT's layer): the reshape pair goes."""
import functools

from fxbridge.passes import unflatten_token_rows
from toy import (DecoderLayer, captured, capture_toy, max_diff, missed, no_match, op_counts, run, run_pass, tokens,
                 toy_dims, toy_lm, toy_spec, eager)


class FlatMLPLayer(DecoderLayer):
    """OPT's decoder layer in miniature: the MLP half reshapes the residual to [B*S,D] and views it back."""

    def forward(self, x, mask, state):
        x = x + self.self_attn(self.input_layernorm(x), mask, state)
        shape = x.shape
        rows = x.reshape(-1, x.size(-1))
        return (rows + self.mlp(self.post_attention_layernorm(rows))).view(shape)


@functools.cache
def _toy():
    return capture_toy(toy_lm(2, layer=FlatMLPLayer))


def test_reshape_pair_removed_and_rows_keep_their_values():
    toy = _toy()
    root, graph = toy.fresh()
    before = op_counts(graph)
    assert run_pass("unflatten_token_rows", graph, root, toy_spec(passes=(unflatten_token_rows,)),
                    toy_dims(toy.model.config)) == 2
    after = op_counts(graph)
    assert before["aten.reshape.default"] - after["aten.reshape.default"] == 2  # one reshape to [B*S,D] a layer
    assert before["aten.view.default"] - after["aten.view.default"] >= 2  # ... and its view back
    ids = tokens(3, 6)
    assert max_diff(run(root, graph, ids), eager(toy.model, ids)) < 1e-6
    for node in graph.nodes:  # every node in the layers' MLP halves is [B,S,..] again
        val = node.meta.get("val")
        if node.op == "call_function" and "mlp" in str(node.meta.get("nn_module_stack", "")) and val is not None:
            assert val.dim() == 3, node.name


def test_a_layer_without_flattened_rows_matches_nothing():
    toy = captured("llama")
    root, graph = toy.fresh()
    err = no_match("unflatten_token_rows", graph, root, toy_spec(passes=(unflatten_token_rows,)),
                   toy_dims(toy.model.config))
    assert missed(err, 2, 0) and "[B*S,D]" in err.expected
