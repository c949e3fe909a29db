"""Helpers the passes share: find nodes by the HF module they came from, and splice hook nodes into the graph.

Every lookup goes by meaning -- the module path in ``node.meta["nn_module_stack"]`` and use-def edges -- never
by generated node names or positions (STYLE.md).
"""
from __future__ import annotations

import bisect
from collections.abc import Iterable

import torch
from torch import fx

from ..runtime.hook_point import HookPoint

aten = torch.ops.aten


def stack_paths(node: fx.Node) -> list[str]:
    """The HF module paths a node sits in, outermost first ("model", "model.layers.0", ...)."""
    stack = node.meta.get("nn_module_stack") or {}
    return [path for path, _ in stack.values() if not path.startswith("_empty")]


def in_module(node: fx.Node, path: str) -> bool:
    return path in stack_paths(node)


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
                for path in stack_paths(n):
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


def module_nodes(graph: fx.Graph, path: str) -> list[fx.Node]:
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


def module_output(graph: fx.Graph, path: str) -> fx.Node | None:
    """The value module ``path`` returns: its last node in graph order that a node outside it uses."""
    nodes = module_nodes(graph, path)
    inside = set(nodes)
    outputs = [n for n in nodes if any(u not in inside for u in n.users)]
    return outputs[-1] if outputs else None


def module_inputs(graph: fx.Graph, path: str) -> list[fx.Node]:
    """Tensor values computed outside module ``path`` (not parameters) that its nodes read, in graph order."""
    nodes = module_nodes(graph, path)
    inside = set(nodes)
    found: dict[fx.Node, None] = {}
    for n in nodes:
        for arg in n.all_input_nodes:
            if arg not in inside and arg.op not in ("get_attr",) and _is_float_tensor(arg):
                found[arg] = None
    return list(found)


def _is_float_tensor(node: fx.Node) -> bool:
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return val.is_floating_point()
    return node.meta.get("fxbridge_hook") is not None  # hook nodes carry no fake value


def scoped_meta(node: fx.Node, scope: str | None) -> dict:
    """Meta for a node spliced next to ``node``: its module stack cut after ``scope`` ('' = top level)."""
    stack = node.meta.get("nn_module_stack") or {}
    if scope is None:
        return {"nn_module_stack": dict(stack)}
    kept = {}
    if scope:
        for key, (path, cls) in stack.items():
            kept[key] = (path, cls)
            if path == scope:
                break
        else:
            raise ValueError(f"module {scope!r} is not on the stack of node {node.name}")
    return {"nn_module_stack": kept}


def install(root: torch.nn.Module, target: str, module: torch.nn.Module) -> None:
    """Put ``module`` at dotted ``target`` under root, creating plain containers (and keeping their children)."""
    *parents, leaf = target.split(".")
    owner = root
    for part in parents:
        child = getattr(owner, part, None) if part in owner._modules else None
        if child is None:
            child = torch.nn.Module()
            owner.add_module(part, child)
        owner = child
    old = owner._modules.get(leaf)
    if old is not None and type(old) is torch.nn.Module:
        for name, grandchild in old.named_children():
            module.add_module(name, grandchild)
    elif old is not None:
        raise ValueError(f"{target!r} is already installed as {type(old).__name__}")
    owner.add_module(leaf, module)


def _mark_hook(node: fx.Node, name: str, made_by: str, source: fx.Node, layout: str = "") -> None:
    node.meta["fxbridge_hook"] = name
    node.meta["fxbridge_pass"] = made_by
    node.meta["fxbridge_source"] = source.name
    val = source.meta.get("val")
    if isinstance(val, torch.Tensor):
        node.meta["fxbridge_dtype"] = str(val.dtype).replace("torch.", "")


def add_hook_point(root, name: str, shape: tuple[str, ...], made_by: str, hf_module: str) -> HookPoint:
    point = HookPoint(name=name, shape=shape, made_by=made_by, hf_module=hf_module)
    install(root, name, point)
    return point


def hook_after(graph: fx.Graph, root, node: fx.Node, name: str, *, shape: tuple[str, ...], made_by: str,
               scope: str | None, users: Iterable[fx.Node] | None = None, hf_module: str = "",
               meta_from: fx.Node | None = None) -> fx.Node:
    """Insert hook point ``name`` on ``node``'s output; ``users`` (default: all) now read the hooked value.

    The hook node sits in module ``scope`` of the stack of ``meta_from`` (default: ``node``).
    """
    targets = list(node.users) if users is None else list(users)
    add_hook_point(root, name, shape, made_by, hf_module)
    with graph.inserting_after(node):
        hook = graph.call_module(name, (node,))
    hook.meta.update(scoped_meta(meta_from or node, scope))
    _mark_hook(hook, name, made_by, node)
    for user in targets:
        user.replace_input_with(node, hook)
    return hook


def hook_viewed(graph: fx.Graph, root, node: fx.Node, name: str, *, to_hook, from_hook, shape, made_by: str,
                scope: str | None, users: Iterable[fx.Node] | None = None, hf_module: str = "") -> fx.Node:
    """Hook ``node`` seen through a view: ``to_hook(node)`` is hooked, ``from_hook(hooked)`` replaces node.

    ``to_hook`` / ``from_hook`` are ``(op, args_after_input)`` pairs, e.g. ``(aten.unflatten.int, (-1, (H, dh)))``.
    The views share storage, so in-place edits in the hook propagate; a returned tensor replaces the value.
    """
    targets = list(node.users) if users is None else list(users)
    add_hook_point(root, name, shape, made_by, hf_module)
    meta = scoped_meta(node, scope)
    with graph.inserting_after(node):
        viewed = graph.call_function(to_hook[0], (node, *to_hook[1]))
    with graph.inserting_after(viewed):
        hook = graph.call_module(name, (viewed,))
    with graph.inserting_after(hook):
        back = graph.call_function(from_hook[0], (hook, *from_hook[1]))
    for n in (viewed, hook, back):
        n.meta.update(meta)
    _mark_hook(hook, name, made_by, node)
    for user in targets:
        user.replace_input_with(node, back)
    return hook


def heads_view(n_heads: int, d_head: int):
    """[.., n_heads*d_head] <-> [.., n_heads, d_head] view pair for ``hook_viewed``."""
    return (aten.unflatten.int, (-1, [n_heads, d_head])), (aten.flatten.using_ints, (-2, -1))


SWAP_HEADS_POS = ((aten.transpose.int, (1, 2)), (aten.transpose.int, (1, 2)))  # [B,H,S,d] <-> [B,S,H,d]


def users_in(node: fx.Node, path: str) -> list[fx.Node]:
    return [u for u in node.users if in_module(u, path)]


def single(items: list, what: str):
    if len(items) != 1:
        raise LookupError(f"expected one {what}, found {len(items)}")
    return items[0]
