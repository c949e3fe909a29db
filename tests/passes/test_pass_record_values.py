"""The runner's invariant: every node a pass inserts carries its fake value (``meta["val"]``), and every core its
inner hook points' values, so the hook table and the exporter read the graph instead of replaying it."""
import pytest
import torch

import fxbridge as bridge
from fxbridge.runtime.values import INNER_VALS
from tiny import build, tokens


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2", "falcon_40b"])
def test_every_inserted_node_has_a_value_that_matches_what_runs(arch):
    gm = bridge.trace(build(arch), use_attn_result=True)
    missing = [n.name for n in gm.graph.nodes if n.op in ("call_function", "call_module") and "val" not in n.meta]
    assert missing == []
    metas = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            if node.target in gm.hook_dict:
                metas[node.target] = node.meta["val"]
            metas.update(node.meta.get(INNER_VALS, {}))
    assert set(metas) == set(gm.hook_dict)  # every hook point's value is known, inner ones included
    ids = tokens(2, 5)
    _, cache = gm.run_with_cache(ids)
    for name, fake in metas.items():
        real = cache[name]
        assert real.dtype == fake.dtype, name
        assert real.dim() == fake.dim(), name
        for got, want in zip(real.shape, fake.shape):
            if isinstance(want, int):  # static dims must agree; B and S are symbols
                assert got == want, name


def test_the_hook_table_runs_nothing(monkeypatch):
    gm = bridge.trace(build("llama"))
    calls = []
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", lambda *a, **k: calls.append(a))
    table = gm.hook_table()
    assert calls == [] and all(row.sizes for row in table)
