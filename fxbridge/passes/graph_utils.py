"""Helpers the passes share: splice hook nodes into the graph.

A hook point's shape comes from the hook contract (``fxbridge/runtime/names.py``) and its maker from the running
pass (``ctx.current_pass``); passes build the names with ``names.hook_name``.

Nodes are found by meaning -- the HF module they came from (``tracer/graph_facts.py``: ``ModuleRegion``,
``module_stack``, ``layer_index``) and use-def edges -- never by generated node names or positions (STYLE.md).
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import fx

from ..runtime.hook_point import HookPoint
from ..runtime.names import shape_of
from ..tracer.graph_facts import ModuleRegion, scoped_meta
from .base import NoMatch, PassContext

aten = torch.ops.aten


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


def _mark_hook(node: fx.Node, name: str, made_by: str, source: fx.Node) -> None:
    node.meta["fxbridge_hook"] = name
    node.meta["fxbridge_pass"] = made_by
    node.meta["fxbridge_source"] = source.name
    val = source.meta.get("val")
    if isinstance(val, torch.Tensor):
        node.meta["fxbridge_dtype"] = str(val.dtype).replace("torch.", "")


def add_hook_point(root, name: str, made_by: str, hf_module: str, shape: tuple[str, ...] | None = None) -> HookPoint:
    """Install hook point ``name``; its shape is the hook contract's (``names.shape_of``), ``shape`` only for a name
    the table lacks."""
    table = shape_of(name)
    if table is not None and shape is not None and tuple(shape) != table:
        raise ValueError(f"hook point {name!r} has shape {table} in the hook table (fxbridge/runtime/names.py), "
                         f"not {tuple(shape)}")
    shape = table or shape
    if shape is None:
        raise ValueError(f"hook point {name!r} is not in the hook table (fxbridge/runtime/names.py): give its "
                         "symbolic shape with shape=")
    point = HookPoint(name=name, shape=shape, made_by=made_by, hf_module=hf_module)
    install(root, name, point)
    return point


def hook_after(ctx: PassContext, node: fx.Node, name: str, *, scope: str | None,
               users: Iterable[fx.Node] | None = None, hf_module: str = "", meta_from: fx.Node | None = None,
               shape: tuple[str, ...] | None = None) -> fx.Node:
    """Insert hook point ``name`` on ``node``'s output; ``users`` (default: all) now read the hooked value.

    The hook node sits in module ``scope`` of the stack of ``meta_from`` (default: ``node``); the running pass
    (``ctx.current_pass``) is recorded as the point's maker.
    """
    graph = ctx.graph
    targets = list(node.users) if users is None else list(users)
    add_hook_point(ctx.root, name, ctx.current_pass, hf_module, shape)
    with graph.inserting_after(node):
        hook = graph.call_module(name, (node,))
    hook.meta.update(scoped_meta(meta_from or node, scope))
    _mark_hook(hook, name, ctx.current_pass, node)
    for user in targets:
        user.replace_input_with(node, hook)
    return hook


def hook_viewed(ctx: PassContext, node: fx.Node, name: str, *, to_hook, from_hook, scope: str | None,
                users: Iterable[fx.Node] | None = None, hf_module: str = "",
                shape: tuple[str, ...] | None = None) -> fx.Node:
    """Hook ``node`` seen through a view: ``to_hook(node)`` is hooked, ``from_hook(hooked)`` replaces node.

    ``to_hook`` / ``from_hook`` are ``(op, args_after_input)`` pairs, e.g. ``(aten.unflatten.int, (-1, (H, dh)))``.
    The views share storage, so in-place edits in the hook propagate; a returned tensor replaces the value.
    """
    graph = ctx.graph
    targets = list(node.users) if users is None else list(users)
    add_hook_point(ctx.root, name, ctx.current_pass, hf_module, shape)
    meta = scoped_meta(node, scope)
    with graph.inserting_after(node):
        viewed = graph.call_function(to_hook[0], (node, *to_hook[1]))
    with graph.inserting_after(viewed):
        hook = graph.call_module(name, (viewed,))
    with graph.inserting_after(hook):
        back = graph.call_function(from_hook[0], (hook, *from_hook[1]))
    for n in (viewed, hook, back):
        n.meta.update(meta)
    _mark_hook(hook, name, ctx.current_pass, node)
    for user in targets:
        user.replace_input_with(node, back)
    return hook


def heads_view(n_heads: int, d_head: int):
    """[.., n_heads*d_head] <-> [.., n_heads, d_head] view pair for ``hook_viewed``."""
    return (aten.unflatten.int, (-1, [n_heads, d_head])), (aten.flatten.using_ints, (-2, -1))


SWAP_HEADS_POS = ((aten.transpose.int, (1, 2)), (aten.transpose.int, (1, 2)))  # [B,H,S,d] <-> [B,S,H,d]


def single(items, what: str, where: str):
    """The one item of ``items``, or NoMatch: in ``where``, expected one ``what``."""
    if len(items) != 1:
        raise NoMatch(where, f"one {what}", f"{len(items)}")
    return items[0]


NOTHING = "no node computed in that module"


def output_of(graph: fx.Graph, path: str, what: str) -> fx.Node:
    """The value HF module ``path`` returns, or NoMatch: in ``path``, expected ``what``."""
    out = ModuleRegion.of(graph, path).output
    if out is None:
        raise NoMatch(path, what, NOTHING)
    return out


def first_tensor(nodes) -> fx.Node | None:
    """The first of ``nodes`` computing a tensor (not size arithmetic, which stitching may share between layers)."""
    return next((n for n in nodes if isinstance(n.meta.get("val"), torch.Tensor)), None)


def token_dims(graph: fx.Graph, start: fx.Node, d_model: int, where: str) -> tuple[fx.Node, fx.Node]:
    """B and S as graph values, for seeing HF's flattened [B*S, ...] token rows as [B,S,...]: the symbolic sizes of
    the nearest [B,S,D] tensor up the use-def edges from ``start`` (``start`` included; every [B,S,D] tensor of a
    forward has the same B and S), inserted right after it. Read off the residual, not the token ids, so a forward
    from ``inputs_embeds`` has them too."""
    todo, seen = [start], set()
    while todo:
        node = todo.pop(0)
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor) and val.dim() == 3 and val.shape[-1] == d_model:
            with graph.inserting_after(node):
                s = graph.call_function(aten.sym_size.int, (node, 1))
            with graph.inserting_after(node):
                b = graph.call_function(aten.sym_size.int, (node, 0))
            for n in (b, s):
                n.meta.update(scoped_meta(node, None))
            return b, s
        if node in seen or node.op != "call_function":
            continue
        seen.add(node)
        todo.extend(node.all_input_nodes)
    raise NoMatch(where, "a [B,S,D] tensor the token rows are computed from", NOTHING)
