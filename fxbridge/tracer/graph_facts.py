"""How fxbridge talks about a captured graph: the one place that reads module paths and layer indices.

- ``HF_ROOT``: the traced module holds the HF model under this attribute, so a parameter's ``get_attr`` target is
  ``hf_target("model.layers.0.mlp.up_proj.weight")`` and ``hf_path(target)`` gives the HF path back.
- ``module_stack(node)``: the HF module paths a node was computed in (``node.meta["nn_module_stack"]``), outermost
  first; ``layer_index(node_or_path, "model.layers")`` the decoder layer (also for hook names: prefix ``BLOCKS``).
- ``ModuleRegion.of(graph, path)``: the nodes one HF module computed, what they read from outside and the value
  they hand on (torch's ``SourcePartition``), from an index kept on the graph and updated incrementally.

The attention call has its own view, ``AttentionCall``, next to its op in ``attention_op.py``.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field

import torch
from torch import fx

HF_ROOT = "hf"  # attribute under which the traced module holds the HF model
BLOCKS = "blocks"  # prefix of the per-layer hook names (``blocks.3.attn.hook_q``)
_STACK = "nn_module_stack"


def hf_target(path: str) -> str:
    """The dotted target, under the traced module, of HF path ``path`` (``''``: the HF model itself)."""
    return f"{HF_ROOT}.{path}" if path else HF_ROOT


def hf_path(target: str) -> str | None:
    """The HF path of a target under the traced module (``hf.model.norm.weight`` -> ``model.norm.weight``);
    None for a target outside the HF model (hook points, cores, lifted constants)."""
    if target == HF_ROOT:
        return ""
    return target[len(HF_ROOT) + 1:] if target.startswith(HF_ROOT + ".") else None


def stack_items(node: fx.Node) -> list[tuple[str, object]]:
    """(path, module class) of the HF modules a node was computed in, outermost first."""
    stack = node.meta.get(_STACK) or {}
    return [(path, cls) for path, cls in stack.values() if not path.startswith("_empty")]


def module_stack(node: fx.Node) -> list[str]:
    """The HF module paths a node was computed in, outermost first ("model", "model.layers.0", ...)."""
    return [path for path, _ in stack_items(node)]


def in_module(node: fx.Node, path: str) -> bool:
    return path in module_stack(node)


def scoped_meta(node: fx.Node, scope: str | None) -> dict:
    """Meta for a node spliced next to ``node``: its module stack cut after ``scope`` ('' = top level, None = all)."""
    stack = node.meta.get(_STACK) or {}
    if scope is None:
        return {_STACK: dict(stack)}
    kept = {}
    if scope:
        for key, (path, cls) in stack.items():
            kept[key] = (path, cls)
            if path == scope:
                break
        else:
            raise ValueError(f"module {scope!r} is not on the stack of node {node.name}")
    return {_STACK: kept}


def _index_after(path: str, prefix: str) -> int | None:
    """``3`` for ``path`` = ``prefix.3`` or ``prefix.3.<anything>``; None otherwise."""
    if not path.startswith(prefix + "."):
        return None
    head = path[len(prefix) + 1:].split(".", 1)[0]
    return int(head) if head.isdigit() else None


def layer_index(where: fx.Node | str, layers_path: str | None) -> int | None:
    """The decoder layer of a node (its module stack; a parameter: its HF path) or of a dotted path or hook name
    (``layer_index("blocks.3.hook_resid_pre", BLOCKS)``, ``layer_index("model.layers.3.mlp", "model.layers")``)."""
    if not layers_path:
        return None
    if isinstance(where, str):
        paths = [where]
    elif where.op == "get_attr":
        paths = [hf_path(str(where.target)) or ""]
    else:
        paths = module_stack(where)
    for path in paths:
        index = _index_after(path, layers_path)
        if index is not None:
            return index
    return None


def relayer(path: str, layers_path: str, old: int, new: int) -> str:
    """``path`` inside layer ``old`` of ``layers_path`` moved to layer ``new``; other paths unchanged."""
    head = f"{layers_path}.{old}"
    if path == head or path.startswith(head + "."):
        return f"{layers_path}.{new}{path[len(head):]}"
    return path


def relayer_meta(meta: dict, layers_path: str, old: int, new: int) -> dict:
    """A copy of a node's meta whose module stack is moved from layer ``old`` to layer ``new``."""
    out = dict(meta)
    if meta.get(_STACK):
        out[_STACK] = {key: (relayer(path, layers_path, old, new), cls) for key, (path, cls) in meta[_STACK].items()}
    return out


class _ModuleIndex:
    """path -> the call_function/call_module nodes computed inside it, in graph order, kept up to date cheaply.

    Built with one scan of the graph; afterwards a lookup only picks up nodes created since (found by the
    count of names fx has handed out, which never shrinks) and drops erased ones, so the per-layer lookups
    of the passes cost O(new nodes) instead of O(graph) each: tracing stays about flat in depth.
    """

    def __init__(self):
        self.known: set[fx.Node] = set()
        self.by_path: dict[str, list[fx.Node]] = {}
        self.n_names = -1

    def refresh(self, graph: fx.Graph) -> None:
        n_names = len(graph._graph_namespace._used_names)
        if n_names == self.n_names:
            return
        fresh = self.n_names >= 0
        for n in graph.nodes:
            if n in self.known:
                continue
            self.known.add(n)
            if n.op == "call_function" or n.op == "call_module":
                for path in module_stack(n):
                    nodes = self.by_path.setdefault(path, [])
                    if fresh and nodes and n < nodes[-1]:
                        bisect.insort(nodes, n)  # fx nodes order by position in the graph
                    else:
                        nodes.append(n)
        self.n_names = n_names

    def nodes(self, graph: fx.Graph, path: str) -> list[fx.Node]:
        self.refresh(graph)
        nodes = self.by_path.get(path, [])
        if any(n._erased for n in nodes):
            nodes[:] = [n for n in nodes if not n._erased]
        return list(nodes)


_INDEX_ATTR = "_fxbridge_module_index"


def _module_nodes(graph: fx.Graph, path: str) -> list[fx.Node]:
    """The nodes HF module ``path`` computed, in graph order.

    The index lives on the graph itself (never in a module-level table): it holds the graph's nodes, and each node
    holds its graph, so a global map keyed by the graph would keep every traced graph -- and through its owning
    module the HF weights -- alive forever. On the graph, the cycle dies with the graph.
    """
    index = graph.__dict__.get(_INDEX_ATTR)
    if index is None:
        index = _ModuleIndex()
        setattr(graph, _INDEX_ATTR, index)
    return index.nodes(graph, path)


def _is_float_tensor(node: fx.Node) -> bool:
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return val.is_floating_point()
    return node.meta.get("fxbridge_hook") is not None  # hook nodes carry no fake value


@dataclass(frozen=True)
class ModuleRegion:
    """What HF module ``path`` computed, as the graph is now (take a new region after rewriting it).

    ``nodes``: its call nodes in graph order; ``inputs``: tensor values computed outside it (not parameters) that
    they read, in graph order; ``output``: the value it returns, its last node that a node outside it uses (None
    when the module computed nothing here).
    """

    path: str
    nodes: tuple[fx.Node, ...]
    inputs: tuple[fx.Node, ...]
    output: fx.Node | None
    _members: frozenset = field(default=frozenset(), repr=False, compare=False)

    @classmethod
    def of(cls, graph: fx.Graph, path: str) -> ModuleRegion:
        nodes = _module_nodes(graph, path)
        inside = set(nodes)
        outputs = [n for n in nodes if any(u not in inside for u in n.users)]
        inputs: dict[fx.Node, None] = {}
        for n in nodes:
            for arg in n.all_input_nodes:
                if arg not in inside and arg.op != "get_attr" and _is_float_tensor(arg):
                    inputs[arg] = None
        return cls(path, tuple(nodes), tuple(inputs), outputs[-1] if outputs else None, frozenset(inside))

    def __contains__(self, node: fx.Node) -> bool:
        return node in self._members
