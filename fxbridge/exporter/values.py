"""What each node of a traced graph holds: shape (symbolic dims as strings), dtype, HF module, layer.

The captured graph carries fake values in ``node.meta["val"]`` with symbolic batch/sequence dims (``s43``).
Nodes the passes spliced in (hook points, their views) have none; their values are inferred here by running the
node's op on the fake inputs (hook points are identities), without touching real weights. The input symbols are
renamed ``B`` and ``S`` so shapes read like the hook contract (``[B,S,64]``).
"""
from __future__ import annotations

import re
from typing import Any

import torch
from torch import fx

from ..runtime.hook_point import HookPoint
from ..tracer.graph_facts import BLOCKS, hf_path, layer_index, stack_items

_CORE_RUNS_ATTR = "_fxbridge_core_runs"  # on the graph: {node name: (out, seen)}; never a global table (leak)
_LETTER_DIMS = {"D": "d_model", "H": "n_heads", "Hkv": "n_kv_heads", "dh": "d_head", "V": "d_vocab", "F": "d_mlp"}


def node_values(gm: fx.GraphModule) -> dict[fx.Node, Any]:
    """Fake value of every node (None where it cannot be known), inferring those the passes added."""
    vals: dict[fx.Node, Any] = {}
    for node in gm.graph.nodes:
        val = node.meta.get("val")
        if val is None:
            val = _infer(gm, node, vals)
        vals[node] = val
    return vals


def _infer(gm, node: fx.Node, vals: dict) -> Any:
    if node.op == "call_module":
        module = _submodule(gm, node.target)
        if isinstance(module, HookPoint) and node.args:
            return vals.get(node.args[0])  # identity
        return _run_core(gm, node, vals)[0] if module is not None else None
    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
        return None
    args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: vals.get(n))
    fakes = _tensors((args, kwargs))
    if not fakes or any(vals.get(n) is None for n in node.all_input_nodes):
        return None
    mode = torch._guards.detect_fake_mode(fakes)
    if mode is None:
        return None
    try:
        with mode:
            return node.target(*args, **kwargs)
    except Exception:  # an op we cannot replay on fakes: the shape stays unknown, which is fine for a picture
        return None


def _flat(tree) -> list:
    out: list = []
    fx.node.map_aggregate(tree, lambda v: out.append(v) or v)
    return out


def _tensors(tree) -> list[torch.Tensor]:
    return [v for v in _flat(tree) if isinstance(v, torch.Tensor)]


def _submodule(gm, target: str):
    try:
        return gm.get_submodule(target)
    except AttributeError:
        return None


def symbol_names(gm: fx.GraphModule) -> dict[str, str]:
    """Map the symbols of the input's dims to ``B`` and ``S`` (e.g. ``{"s43": "B", "s53": "S"}``)."""
    names: dict[str, str] = {}
    for node in gm.graph.nodes:
        if node.op == "placeholder" and isinstance(node.meta.get("val"), torch.Tensor):
            for dim, letter in zip(node.meta["val"].shape, ("B", "S")):
                if isinstance(dim, torch.SymInt):
                    names.setdefault(str(dim.node.expr), letter)
            break
    return names


def format_dim(dim, names: dict[str, str]) -> int | str:
    """An int for a static dim, a string for a symbolic one (``"S"``, ``"S + 1"``)."""
    if isinstance(dim, torch.SymInt):
        expr = dim.node.expr
        if getattr(expr, "is_number", False):
            return int(expr)
        return re.sub(r"\b[su]\d+\b", lambda m: names.get(m.group(0), m.group(0)), str(expr))
    return int(dim)


def shape_of(val, names: dict[str, str]) -> list | None:
    if isinstance(val, torch.Tensor):
        return [format_dim(d, names) for d in val.shape]
    return None


def dtype_of(val) -> str:
    if isinstance(val, torch.Tensor):
        return str(val.dtype).replace("torch.", "")
    if isinstance(val, torch.SymInt):
        return "symint"
    return ""


def shape_str(shape) -> str:
    return "" if shape is None else "[" + ",".join(str(d) for d in shape) + "]"


def resolve_letters(letters, dims: dict, observed: list | None = None) -> list:
    """Concrete sizes for a hook's symbolic shape (``("B","S","H","dh")`` -> ``["B","S",4,16]``).

    ``observed`` (the fake value's shape, where known) wins over what ``dims`` says.
    """
    if observed is not None and len(observed) == len(letters):
        return list(observed)
    out: list = []
    for letter in letters:
        key = _LETTER_DIMS.get(letter)
        if letter.isdigit():
            out.append(int(letter))
        elif key and key in dims:
            out.append(int(dims[key]))
        else:
            out.append(letter)
    return out


def module_of(node: fx.Node) -> tuple[str, str]:
    """(innermost HF module path, its class name) a node came from; ('', '') for the top level."""
    if node.op == "get_attr":
        target = str(node.target)
        path = hf_path(target)
        return (target if path is None else path).rpartition(".")[0], ""
    items = stack_items(node)
    if not items:
        return "", ""
    path, cls = items[-1]
    return path, getattr(cls, "__name__", None) or str(cls).rsplit(".", 1)[-1].strip("'>")


def layer_of(name_or_path: str, layers_path: str | None) -> int | None:
    """The decoder-layer index of a hook name (``blocks.3.``) or HF module path (``model.layers.3.``)."""
    layer = layer_index(name_or_path, BLOCKS)
    return layer if layer is not None else layer_index(name_or_path, layers_path)


def core_hook_values(gm, node: fx.Node, vals: dict) -> dict[str, Any]:
    """Fake values the hook points inside a core (``blocks.0.attn.hook_pattern``) see, by running the core on fakes."""
    return _run_core(gm, node, vals)[1]


def _run_core(gm, node: fx.Node, vals: dict) -> tuple[Any, dict[str, Any]]:
    """Run a core module on the fake values of its inputs: (output, {inner hook name: value it sees}).

    Recording hooks are attached for the run and removed after it. A core whose hook points already have hooks
    attached is not run (the user's functions must not see fake tensors): (None, {}).
    """
    per_graph = gm.graph.__dict__.setdefault(_CORE_RUNS_ATTR, {})
    if node.name in per_graph:  # the graph is fixed after trace; replaying a core on fakes costs ~10-100 ms
        return per_graph[node.name]
    core = gm.get_submodule(node.target)
    points = {f"{node.target}.{n}": p for n, p in core.named_children() if isinstance(p, HookPoint)}
    if any(p.has_hooks for p in points.values()):
        return None, {}
    args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: vals.get(n))
    mode = torch._guards.detect_fake_mode(_tensors((args, kwargs)))
    if mode is None or any(vals.get(n) is None for n in node.all_input_nodes):
        return None, {}
    seen: dict[str, Any] = {}
    handles = [p.add_hook(lambda t, hook, name=name: seen.setdefault(name, t)) for name, p in points.items()]
    try:
        with mode, torch.no_grad():
            out = core(*args, **kwargs)
    except Exception:  # a core we cannot replay on fakes: its hooks keep their contract shapes only
        return None, {}
    finally:
        for h in handles:
            h.remove()
    per_graph[node.name] = (out, seen)
    return out, seen
