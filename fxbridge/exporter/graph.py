"""The exported picture of a traced module: nodes with what they hold, edges, and three views.

- ``full``: every FX node (inputs, parameters, ops, hook points, cores, output). A core (``blocks.0.attn``, an
  ``AttentionCore``) is one ``call_module`` node whose hook points are its children; each becomes a ``core_hook``
  sub-node joined to its core by a ``contains`` edge, so every name in ``gm.hook_dict`` is in the picture.
- ``layer=i``: the nodes of decoder layer i, plus the values flowing in and out of it as ``external`` nodes.
- ``collapsed``: one box per HF module (a contiguous run of its ops) and one per hook point; parameters are
  folded into their module's box. Runs are split where merging would create a cycle, so it stays a DAG.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import fx

from ..errors import UsageError
from ..runtime.hook_point import HookPoint
from ..tracer.graph_facts import hf_path
from ..runtime.values import (core_hook_values, dtype_of, layer_of, module_of, node_values, resolve_letters, shape_of, shape_str,
                     symbol_names)

VIEWS = ("full", "layer", "collapsed")


@dataclass
class GNode:
    """One box of the picture. ``kind``: input, param, op, hook, core, core_hook, output, group, external."""

    id: str
    kind: str
    label: str
    op: str = ""
    target: str = ""
    module: str = ""
    module_class: str = ""
    shape: list | None = None
    dtype: str = ""
    hook: str = ""
    made_by: str = ""
    layer: int | None = None
    parent: str = ""  # the core a core_hook belongs to
    count: int = 1  # FX nodes behind a collapsed box

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class ExportGraph:
    nodes: dict[str, GNode]
    edges: list[tuple[str, str, str]]  # (source, target, relation: "data" | "contains")
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def hooks(self) -> list[str]:
        return [n.hook for n in self.nodes.values() if n.hook and n.kind in ("hook", "core_hook")]

    def as_dict(self) -> dict:
        return {"format": "fxbridge-graph", "version": 1, **self.info, "hooks": self.hooks,
                "nodes": [n.as_dict() for n in self.nodes.values()],
                "edges": [{"source": s, "target": t, "relation": r} for s, t, r in self.edges]}


def check_layer(layer: int, n_layers: int) -> int:
    """``layer`` as an index in ``[0, n_layers)`` (negative counts from the end); ``UsageError`` if out of range."""
    index = layer + n_layers if layer < 0 else layer
    if not 0 <= index < n_layers:
        raise UsageError(f"layer must be in [0, {n_layers}), got {layer}")
    return index


def build_graph(gm: fx.GraphModule, view: str = "full", layer: int | None = None) -> ExportGraph:
    """The picture of ``gm`` in one of ``VIEWS``; ``layer`` restricts any view to one decoder layer."""
    if view not in VIEWS:
        raise UsageError(f"unknown view {view!r}; choose one of {', '.join(VIEWS)}")
    if view == "layer" and layer is None:
        raise UsageError("view='layer' needs layer=N (the decoder layer to show)")
    n_layers = getattr(gm, "dims", {}).get("n_layers")
    if layer is not None and n_layers is not None:
        layer = check_layer(layer, n_layers)
    graph = _fine_graph(gm)
    if layer is not None:
        graph = _only_layer(graph, layer)
    if view == "collapsed":
        graph = _collapse(graph)
    spec = getattr(gm, "spec", None)
    graph.info = {"model_type": getattr(spec, "model_type", ""), "view": view, "layer": layer,
                  "dims": dict(getattr(gm, "dims", {}))}
    return graph


# ------------------------------------------------------------------------------------------------ full graph
def _fine_graph(gm: fx.GraphModule) -> ExportGraph:
    vals = node_values(gm)
    names = symbol_names(gm)
    dims = dict(getattr(gm, "dims", {}))
    layers_path = getattr(getattr(gm, "spec", None), "layers", None)
    nodes: dict[str, GNode] = {}
    edges: list[tuple[str, str, str]] = []
    called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    for node in gm.graph.nodes:
        g = _gnode(gm, node, vals.get(node), names, layers_path)
        nodes[g.id] = g
        edges += [(arg.name, node.name, "data") for arg in node.all_input_nodes]
        if g.kind == "core":
            for sub in _core_hooks(gm, node, g, dims, called, vals, names):
                nodes[sub.id] = sub
                edges.append((g.id, sub.id, "contains"))
    return ExportGraph(nodes, edges)


def _gnode(gm, node: fx.Node, val, names, layers_path) -> GNode:
    module, cls = module_of(node)
    shape = shape_of(val, names)
    g = GNode(id=node.name, kind="op", label="", op=node.op, target=_target_str(node.target), module=module,
              module_class=cls, shape=shape, dtype=dtype_of(val), made_by=node.meta.get("fxbridge_pass", ""))
    sub = gm.get_submodule(node.target) if node.op == "call_module" else None
    if isinstance(sub, HookPoint):
        g.kind, g.hook = "hook", sub.name or node.target
        g.made_by = g.made_by or sub.made_by
        g.module = sub.hf_module or module
        g.label = g.hook
    elif node.op == "call_module":
        g.kind, g.module_class = "core", type(sub).__name__
        g.label = f"{node.target}\n{type(sub).__name__}"
    elif node.op == "placeholder":
        g.kind, g.label = "input", node.name
    elif node.op == "output":
        g.kind, g.label = "output", "output (logits)"
    elif node.op == "get_attr":
        g.kind, g.label = "param", hf_path(g.target) or g.target
    else:
        g.label = g.target.replace("aten.", "").replace(".default", "")
    if shape is not None and g.kind != "output":
        g.label += f"\n{shape_str(shape)}"
    key = g.hook or (node.target if node.op == "call_module" else "") or g.module or g.target
    g.layer = layer_of(key, layers_path)
    if g.layer is None and g.module:
        g.layer = layer_of(g.module, layers_path)
    return g


def _core_hooks(gm, node: fx.Node, core: GNode, dims: dict, called: set, vals: dict, names: dict) -> list[GNode]:
    """The hook points a core fires itself (its children that have no call_module node of their own)."""
    seen = core_hook_values(gm, node, vals)
    out = []
    for name, point in gm.get_submodule(node.target).named_children():
        if not isinstance(point, HookPoint) or f"{node.target}.{name}" in called:
            continue
        full = point.name or f"{node.target}.{name}"
        val = seen.get(f"{node.target}.{name}")
        shape = resolve_letters(point.shape, dims, shape_of(val, names))
        out.append(GNode(id=f"{node.name}::{name}", kind="core_hook", label=f"{full}\n{shape_str(shape)}",
                         op="hook_point", target=full, module=point.hf_module or core.module,
                         module_class=core.module_class, shape=shape, dtype=dtype_of(val) or core.dtype, hook=full,
                         made_by=point.made_by or core.made_by, layer=core.layer, parent=core.id))
    return out


def _target_str(target) -> str:
    if isinstance(target, str):
        return target
    name = str(target)
    return name if "." in name else getattr(target, "__name__", name)


# ------------------------------------------------------------------------------------------------ one layer
def _only_layer(graph: ExportGraph, layer: int) -> ExportGraph:
    keep = {i for i, n in graph.nodes.items() if n.layer == layer}
    nodes = {i: n for i, n in graph.nodes.items() if i in keep}
    edges = []
    for s, t, r in graph.edges:
        if s in keep and t in keep:
            edges.append((s, t, r))
        elif (s in keep) != (t in keep) and r == "data":
            other = graph.nodes[t if s in keep else s]
            if other.kind == "param" or other.dtype == "symint":
                continue  # shared weights (tied) and batch/seq sizes stay out of the picture
            if other.id not in nodes:
                ext = GNode(**{**other.as_dict(), "kind": "external"})
                ext.label = ("from " if s not in keep else "to ") + other.label
                nodes[other.id] = ext
            edges.append((s, t, r))
    return ExportGraph(nodes, edges)


# ------------------------------------------------------------------------------------------------ collapsed
def _collapse(graph: ExportGraph) -> ExportGraph:
    """One box per contiguous run of an HF module's ops; hooks, cores, inputs and output keep their own.

    Batch/sequence-size plumbing (SymInt nodes) is left out: it ties every module to every other and says nothing.
    """
    sizes = {i for i, n in graph.nodes.items() if n.dtype == "symint"}
    graph = ExportGraph({i: n for i, n in graph.nodes.items() if i not in sizes},
                        [e for e in graph.edges if e[0] not in sizes and e[1] not in sizes], graph.info)
    group = _initial_groups(graph)
    succ: dict[str, list[str]] = defaultdict(list)
    for s, t, _ in graph.edges:
        succ[s].append(t)
    while True:
        cycle_members = _groups_on_cycles(graph, group)
        if not cycle_members:
            break
        for g in cycle_members:
            _split_reentered(g, group, succ)
    folded = _fold_adaptors(graph, group)
    if _groups_on_cycles(graph, folded):  # cannot happen (each fold contracts a sole edge); keep the safe picture
        folded = group
    return _quotient(graph, folded)


_ADAPTORS = ("aten.unflatten.", "aten.flatten.", "aten.transpose.", "aten.alias.")


def _fold_adaptors(graph: ExportGraph, group: dict[str, str]) -> dict[str, str]:
    """Fold the lone view op a pass put before or after a hook point (to show it per head) into the hook's box."""
    succ: dict[str, set] = defaultdict(set)
    pred: dict[str, set] = defaultdict(set)
    size: dict[str, int] = defaultdict(int)
    for node_id, g in group.items():
        size[g] += 1
    for s, t, r in graph.edges:
        a, b = group[s], group[t]
        if r == "data" and a != b:
            succ[a].add(b)
            pred[b].add(a)
    out = dict(group)
    for node_id, g in group.items():
        n = graph.nodes[node_id]
        if size[g] != 1 or n.kind != "op" or not n.target.startswith(_ADAPTORS):
            continue
        for side in (succ[g], pred[g]):
            if len(side) == 1:
                (other,) = side
                if graph.nodes[other].kind == "hook":
                    out[node_id] = other
                    break
    return out


def _split_reentered(g: str, group: dict[str, str], succ: dict[str, list[str]]) -> None:
    """Split group g into the ops reached by a path that leaves g and comes back ("late") and the rest.

    A quotient cycle through g means such a path exists, so both parts are non-empty; repeating this until the
    quotient is acyclic terminates (groups only shrink) and keeps runs whole wherever that is possible.
    """
    members = [n for n, h in group.items() if h == g]
    inside = set(members)
    stack = [t for n in members for t in succ[n] if t not in inside]
    seen: set[str] = set()
    late: list[str] = []
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n in inside:
            late.append(n)
        stack.extend(succ[n])
    if not late or len(late) == len(members):  # cannot happen for a group on a cycle; be safe: split fully
        for n in members:
            group[n] = n
        return
    new_id = min(late)
    for n in late:
        group[n] = new_id
    if g in late:  # the group id must stay with an early member
        early = [n for n in members if n not in set(late)]
        for n in early:
            group[n] = early[0]


def _groupable(n: GNode) -> bool:
    return n.kind in ("op", "param")


def _initial_groups(graph: ExportGraph) -> dict[str, str]:
    parent = {i: i for i in graph.nodes}

    def find(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for s, t, r in graph.edges:
        a, b = graph.nodes[s], graph.nodes[t]
        if r == "data" and _groupable(a) and _groupable(b) and a.module == b.module and a.kind == b.kind == "op":
            parent[find(s)] = find(t)
    # a parameter joins its consumer's group when it has one consumer, an op of its own module (tied weights don't)
    consumers: dict[str, list[str]] = defaultdict(list)
    for s, t, r in graph.edges:
        consumers[s].append(t)
    for s, n in graph.nodes.items():
        if n.kind == "param" and len(consumers[s]) == 1:
            b = graph.nodes[consumers[s][0]]
            if b.kind == "op" and b.module.startswith(n.module):
                parent[find(s)] = find(b.id)
    return {i: find(i) for i in graph.nodes}


def _groups_on_cycles(graph: ExportGraph, group: dict[str, str]) -> set[str]:
    import networkx as nx

    q = nx.DiGraph()
    q.add_nodes_from(set(group.values()))
    q.add_edges_from((group[s], group[t]) for s, t, _ in graph.edges if group[s] != group[t])
    members: set[str] = set()
    for scc in nx.strongly_connected_components(q):
        if len(scc) > 1:
            members |= scc
    return members


def _quotient(graph: ExportGraph, group: dict[str, str]) -> ExportGraph:
    members: dict[str, list[GNode]] = defaultdict(list)
    for node_id, g in group.items():
        members[g].append(graph.nodes[node_id])
    order = {node_id: k for k, node_id in enumerate(graph.nodes)}
    ids: dict[str, str] = {}
    nodes: dict[str, GNode] = {}
    for g, items in sorted(members.items(), key=lambda kv: min(order[n.id] for n in kv[1])):
        items.sort(key=lambda n: order[n.id])
        hooks = [n for n in items if n.kind == "hook"]
        if hooks or (len(items) == 1 and items[0].kind != "op") or all(n.kind == "param" for n in items):
            keep = hooks[0] if hooks else items[0]
            if len(items) > 1:
                keep = GNode(**{**keep.as_dict(), "count": len(items)})
            nodes[keep.id] = keep
            ids[g] = keep.id
            continue
        nodes_g = _group_node(items, graph, set(n.id for n in items))
        ids[g] = nodes_g.id
        nodes[nodes_g.id] = nodes_g
    edges: dict[tuple[str, str, str], None] = {}
    for s, t, r in graph.edges:
        a, b = ids[group[s]], ids[group[t]]
        if a != b:
            edges[(a, b, r)] = None
    return ExportGraph(nodes, list(edges))


def _group_node(items: list[GNode], graph: ExportGraph, inside: set[str]) -> GNode:
    ops = [n for n in items if n.kind == "op"]
    params = [n for n in items if n.kind == "param"]
    head = ops[-1] if ops else items[-1]
    # the value the run hands on: its last op that feeds something outside it
    feeding = {s for s, t, _ in graph.edges if s in inside and t not in inside}
    out = next((n for n in reversed(ops) if n.id in feeding), head)
    module = head.module or "(top level)"
    label = f"{module}" + (f"\n{head.module_class}" if head.module_class else "")
    label += f"\n{len(ops)} op{'s' if len(ops) != 1 else ''}"
    if params:
        label += f", {len(params)} param{'s' if len(params) != 1 else ''}"
    if out.shape is not None:
        label += f" -> {shape_str(out.shape)}"
    return GNode(id=f"group:{items[0].id}", kind="group", label=label, op="group",
                 target=", ".join(n.target for n in ops[:8]) + (" ..." if len(ops) > 8 else ""),
                 module=head.module, module_class=head.module_class, shape=out.shape, dtype=out.dtype,
                 layer=head.layer, count=len(items))
