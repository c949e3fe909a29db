"""A faster executable for the same generated forward: what fx emits, minus its Python call overhead.

fx generates one line per node: ``torch.ops.aten.linear.default(x, getattr(self.hf.model.layers, "3").mlp...)``.
Two costs there are pure interpreter overhead that HF's own eager code does not pay:
- every ATen call goes through ``OpOverload.__call__`` (a Python frame that only calls ``self._op``); the fast
  code calls ``_op`` (the C++ operator handle) directly -- the same function with the same arguments;
- every weight and submodule is fetched through a chain of ``nn.Module.__getattr__`` calls (five or six per
  weight); the fast code fetches each one with a single dict lookup in its owner's ``_parameters`` /
  ``_buffers`` / ``_modules``, resolved at the start of every forward, so a parameter replaced later
  (``load_state_dict(assign=True)``, accelerate placement) is still seen.
``gm.code`` stays the readable fx code; only the executed function differs, and it computes the same values.
"""
from __future__ import annotations

import re
from typing import Any

import torch
from torch import fx
from torch.fx.graph import _format_target

_OP_CALL = re.compile(r"\btorch\.ops\.([A-Za-z_]\w*)\.([A-Za-z_]\w*)\.([A-Za-z_]\w*)(?=\()")


def _op_handles(src: str, globals_: dict[str, Any]) -> str:
    names: dict[str, str] = {}

    def swap(match: re.Match) -> str:
        dotted = match.group(0)
        if dotted not in names:
            ns, op, overload = match.groups()
            obj = getattr(getattr(getattr(torch.ops, ns), op), overload, None)
            handle = getattr(obj, "_op", None)
            if not isinstance(obj, torch._ops.OpOverload) or handle is None:
                return dotted
            names[dotted] = f"_fxb_op_{len(names)}"
            globals_[names[dotted]] = handle
        return names[dotted]

    return _OP_CALL.sub(swap, src)


def _slot(root: torch.nn.Module, target: str):
    """(dict, key) such that dict[key] is ``root``'s attribute at dotted ``target``."""
    *path, leaf = target.split(".")
    owner = root
    for part in path:
        owner = getattr(owner, part)
    for table in ("_parameters", "_buffers", "_modules"):
        d = owner.__dict__.get(table)
        if d is not None and leaf in d:
            return d, leaf
    if leaf in owner.__dict__:
        return owner.__dict__, leaf
    return None


def slots_for(root: torch.nn.Module, targets: list[str]) -> list | None:
    """The (dict, key) slot of every target, or None when one cannot be found. Call again whenever the module
    tree under ``root`` is re-assembled (GraphModule's constructor first copies it into fresh containers)."""
    slots = [_slot(root, t) for t in targets]
    return None if any(s is None for s in slots) else slots


def build_fast_forward(gm: fx.GraphModule, python_code) -> tuple[Any, list[str]]:
    """(forward function, targets) for ``gm``: the forward reads the object at ``targets[i]`` as
    ``self._fxb_slots[i]`` (see ``slots_for``). (None, []) when the source does not look as expected."""
    src, globals_ = python_code.src, dict(python_code.globals)
    targets: list[str] = []
    for node in gm.graph.nodes:
        if node.op in ("get_attr", "call_module") and node.target not in targets:
            targets.append(node.target)
    index = {t: i for i, t in enumerate(targets)}
    # longest first: 'getattr(self.blocks, "0").attn' is a prefix of '...attn.hook_q'
    for target in sorted(targets, key=lambda t: -len(_format_target("self", t))):
        expr = re.escape(_format_target("self", target))
        src = re.sub(expr + r"(?![\w.])", f"_fxb_r[{index[target]}]", src)
    header = re.search(r"def forward\(self[^\n]*:\n", src)
    if header is None or "self." in src:
        return None, []
    src = src[:header.end()] + "    _fxb_r = [d[k] for d, k in self._fxb_slots]\n" + src[header.end():]
    src = _op_handles(src, globals_)
    from torch.fx.graph_module import _forward_from_src
    return _forward_from_src(src, globals_), targets
