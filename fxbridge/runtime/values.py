"""What each node of a traced graph holds: shape (symbolic dims as strings), dtype, HF module, layer.

The captured graph carries fake values in ``node.meta["val"]`` with symbolic batch/sequence dims (``s43``), and the
pass runner records the same for every node a pass inserts (``passes/base.py``'s ``record_values``), including
``meta["fxbridge_inner_vals"]`` on a core's node: the values its inner hook points see. This module only reads
them (nothing is replayed). The input symbols are renamed ``B`` and ``S`` so shapes read like the hook contract
(``[B,S,64]``).
"""
from __future__ import annotations

import re
from typing import Any

import torch
from torch import fx

from ..tracer.graph_facts import BLOCKS, hf_path, layer_index, stack_items

_LETTER_DIMS = {"D": "d_model", "H": "n_heads", "Hkv": "n_kv_heads", "dh": "d_head", "V": "d_vocab", "F": "d_mlp",
                "Rq": "q_lora_rank", "Rkv": "kv_lora_rank", "dr": "d_rope"}


INNER_VALS = "fxbridge_inner_vals"  # on a core's node: {inner hook name: fake value it sees}


def node_values(gm: fx.GraphModule) -> dict[fx.Node, Any]:
    """Fake value of every node, from its metadata (None where the graph does not know it)."""
    return {node: node.meta.get("val") for node in gm.graph.nodes}


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


def core_hook_values(gm, node: fx.Node, vals: dict | None = None) -> dict[str, Any]:
    """Fake values the hook points inside a core (``blocks.0.attn.hook_pattern``) see, from the core node's metadata."""
    return dict(node.meta.get(INNER_VALS) or {})
