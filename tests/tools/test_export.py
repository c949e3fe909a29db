"""Export: every traced architecture round-trips through DOT / JSON / GraphML / networkx with every hook name."""
import json
import shutil
import sys

import networkx as nx
import pytest
import torch

import fxbridge as bridge
from fxbridge.errors import MissingDependency
from tiny import tokens


def _concrete(shape, batch, seq):
    return tuple(batch if d == "B" else seq if d == "S" else d for d in shape)


def test_exports_round_trip_with_every_hook(core_trio, tmp_path):
    _, _, gm = core_trio
    hooks = set(gm.hook_dict)
    paths = {ext: bridge.export(gm, tmp_path / f"g.{ext}") for ext in ("dot", "json", "graphml")}

    data = json.loads(paths["json"].read_text())
    assert set(data["hooks"]) == hooks
    assert {n["hook"] for n in data["nodes"] if n["hook"]} == hooks
    ids = {n["id"] for n in data["nodes"]}
    assert all(e["source"] in ids and e["target"] in ids for e in data["edges"])

    loaded = nx.read_graphml(paths["graphml"])
    assert {d.get("hook") for _, d in loaded.nodes(data=True)} - {"", None} == hooks
    assert nx.is_directed_acyclic_graph(loaded)

    dot = paths["dot"].read_text()
    assert dot.startswith("digraph")
    for name in hooks:  # each hook is a labelled box (label starts with its name)
        assert f'label="{name}\\n' in dot, name

    g = bridge.to_networkx(gm)
    assert nx.is_directed_acyclic_graph(g)
    assert {d["hook"] for _, d in g.nodes(data=True) if d["hook"]} == hooks


def test_full_view_is_the_fx_graph(core_trio):
    """One node per FX node (plus one per hook point a core fires), one data edge per use."""
    _, _, gm = core_trio
    g = bridge.to_networkx(gm)
    fx_nodes = list(gm.graph.nodes)
    data_edges = [(u, v) for u, v, r in g.edges(data="relation") if r == "data"]
    assert sum(1 for _, d in g.nodes(data=True) if d["kind"] != "core_hook") == len(fx_nodes)
    assert sorted(data_edges) == sorted((a.name, n.name) for n in fx_nodes for a in n.all_input_nodes)
    for node in fx_nodes:
        if node.op == "call_module" and node.target in gm.hook_dict:
            assert g.nodes[node.name]["hook"] == node.target
            assert g.nodes[node.name]["kind"] == "hook"


def test_exported_shapes_and_dtypes_match_the_activations(core_trio):
    """Shapes in the export (symbolic B, S) equal what each hook sees at run time."""
    _, _, gm = core_trio
    batch, seq = 3, 5
    _, cache = gm.run_with_cache(tokens(batch, seq))
    g = bridge.to_networkx(gm)
    by_hook = {d["hook"]: d for _, d in g.nodes(data=True) if d["hook"]}
    for name, act in cache.items():
        node = by_hook[name]
        assert _concrete(node["shape"], batch, seq) == tuple(act.shape), name
        assert node["dtype"] == str(act.dtype).replace("torch.", ""), name
    table = {row.name: row for row in gm.hook_table()}
    for name, act in cache.items():
        sizes = [int(d) if d.isdigit() else d for d in table[name].sizes.strip("[]").split(",")]
        assert _concrete(sizes, batch, seq) == tuple(act.shape), name
        assert table[name].dtype == str(act.dtype).replace("torch.", ""), name


def test_layer_and_collapsed_views(core_trio):
    _, _, gm = core_trio
    layer = gm.dims["n_layers"] - 1
    in_layer = {n for n in gm.hook_dict if n.startswith(f"blocks.{layer}.")}
    one = bridge.to_networkx(gm, layer=layer)
    assert nx.is_directed_acyclic_graph(one)
    assert {d["hook"] for _, d in one.nodes(data=True) if d["hook"] and d["kind"] != "external"} == in_layer
    assert all(d["layer"] == layer for _, d in one.nodes(data=True) if d["kind"] != "external")

    collapsed = bridge.to_networkx(gm, view="collapsed")
    full = bridge.to_networkx(gm)
    assert nx.is_directed_acyclic_graph(collapsed)
    assert {d["hook"] for _, d in collapsed.nodes(data=True) if d["hook"]} == set(gm.hook_dict)
    assert collapsed.number_of_nodes() < full.number_of_nodes() * 0.7
    # a collapsed box stands for ops of one HF module
    assert any(d["kind"] == "group" and d["count"] > 1 for _, d in collapsed.nodes(data=True))


def test_hook_table_lists_every_hook_in_firing_order():
    from conftest import traced
    _, _, gm = traced("llama")
    table = gm.hook_table()
    assert [r.name for r in table] == list(gm.hook_dict)
    rows = {r["name"]: r for r in table.as_dicts()}
    assert rows["blocks.1.attn.hook_k"]["sizes"] == "[B,S,2,16]"  # Hkv=2, d_head=16 in tiny.py
    assert rows["blocks.1.attn.hook_k"]["shape"] == "[B,S,Hkv,dh]"
    assert rows["blocks.1.attn.hook_pattern"]["node"] == "blocks.1.attn"  # fired inside the attention core
    assert rows["blocks.1.attn.hook_pattern"]["made_by"] == "hook_attention"
    assert rows["blocks.1.attn.hook_k"]["hf_module"] == "model.layers.1.self_attn.k_proj"
    assert rows["blocks.1.attn.hook_k"]["layer"] == 1
    text = str(table)
    assert text.splitlines()[0].split() == ["hook", "shape", "sizes", "dtype", "HF", "module", "pass", "fires", "in"]
    assert len(text.splitlines()) == len(table) + 2
    assert table.to_markdown().count("\n") == len(table) + 1


def test_hook_table_reports_the_dtype_each_hook_sees():
    """bf16 Llama: RMSNorm computes in fp32 (HF upcasts), the rest in bf16."""
    from tiny import build
    model = build("llama").to(torch.bfloat16)
    gm = bridge.trace(model)
    _, cache = gm.run_with_cache(tokens(1, 4))
    for row in gm.hook_table():
        assert row.dtype == str(cache[row.name].dtype).replace("torch.", ""), row.name
    assert {r.dtype for r in gm.hook_table()} == {"float32", "bfloat16"}


_HAVE_DOT = shutil.which("dot") is not None
try:
    import graphviz  # noqa: F401
    _HAVE_GRAPHVIZ = True
except ImportError:
    _HAVE_GRAPHVIZ = False


@pytest.mark.skipif(not (_HAVE_DOT and _HAVE_GRAPHVIZ), reason="needs Graphviz: the dot program and `pip install graphviz`")
def test_render_svg_and_png(tmp_path):
    from conftest import traced
    _, _, gm = traced("llama")
    svg = bridge.export(gm, tmp_path / "layer.svg", layer=1)
    text = svg.read_text()
    assert "<svg" in text and "blocks.1.attn.hook_pattern" in text
    png = bridge.export(gm, tmp_path / "collapsed.png", view="collapsed", layer=0)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_render_without_graphviz_says_how_to_install(tmp_path, monkeypatch):
    from conftest import traced
    _, _, gm = traced("llama")
    monkeypatch.setenv("PATH", str(tmp_path))  # no `dot` here
    if _HAVE_GRAPHVIZ:
        with pytest.raises(MissingDependency, match="apt-get install graphviz"):
            bridge.export(gm, tmp_path / "x.svg", layer=0)
    monkeypatch.setitem(sys.modules, "graphviz", None)  # the Python package missing
    with pytest.raises(MissingDependency, match=r"fxbridge\[render\]"):
        bridge.export(gm, tmp_path / "x.png", layer=0)
    assert not (tmp_path / "x.svg").exists() and not (tmp_path / "x.png").exists()
    bridge.export(gm, tmp_path / "x.dot", layer=0)  # needs nothing


def test_export_rejects_unknown_extension_and_bad_layer(tmp_path):
    from conftest import traced
    _, _, gm = traced("llama")
    with pytest.raises(ValueError, match=r"\.graphml"):
        bridge.export(gm, tmp_path / "x.txt")
    with pytest.raises(ValueError, match="layer must be in"):
        bridge.export(gm, tmp_path / "x.json", layer=99)
    with pytest.raises(ValueError, match="needs layer"):
        bridge.export(gm, tmp_path / "x.json", view="layer")
