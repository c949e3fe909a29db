"""The hook table: one row per hook point, in firing order.

Columns: name; ``shape`` in the hook contract's letters (``[B,S,H,dh]``); ``sizes``, the same shape with every
dim the model fixes filled in from the traced graph (``[B,S,4,16]``; B and S stay symbolic: the graph takes any
batch and length); ``dtype`` the activation has; the HF module it sits in; the pass that made it; the layer; and
``node``, where it fires: its own graph node, or the core node that fires it (``blocks.0.attn`` fires
``hook_attn_scores`` and ``hook_pattern``).

    print(gm.hook_table())                 # aligned text
    gm.hook_table().as_dicts()             # list of dicts (JSON-ready)
    gm.hook_table().to_markdown()          # a Markdown table
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

_COLUMNS = (("name", "hook"), ("shape", "shape"), ("sizes", "sizes"), ("dtype", "dtype"),
            ("hf_module", "HF module"), ("made_by", "pass"), ("node", "fires in"))


@dataclass(frozen=True)
class HookRow:
    name: str
    shape: str
    dtype: str
    hf_module: str
    made_by: str
    sizes: str = ""
    layer: int | None = None
    node: str = ""  # the graph node that fires it: the hook's own, or its core's (``blocks.0.attn``)

    def as_dict(self) -> dict:
        return asdict(self)


class HookTable(list):
    """A list of HookRow that prints as an aligned text table."""

    def as_dicts(self) -> list[dict]:
        return [row.as_dict() for row in self]

    def _cells(self, columns=_COLUMNS):
        return [h for _, h in columns], [[_cell(getattr(r, f)) for f, _ in columns] for r in self]

    def __str__(self) -> str:
        headers, rows = self._cells()
        widths = [max(len(x) for x in col) for col in zip(headers, *rows)]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        lines = [fmt.format(*headers).rstrip(), fmt.format(*("-" * w for w in widths)).rstrip()]
        lines += [fmt.format(*row).rstrip() for row in rows]
        return "\n".join(lines)

    def to_markdown(self) -> str:
        headers, rows = self._cells()
        lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        lines += ["| " + " | ".join(f"`{c}`" if i == 0 else c for i, c in enumerate(row)) + " |" for row in rows]
        return "\n".join(lines)


def _cell(value) -> str:
    return "" if value is None else str(value)


def hook_table(gm) -> HookTable:
    """The table for a traced module (reads the graph's fake values; runs nothing)."""
    from .values import (core_hook_values, dtype_of, layer_of, node_values, resolve_letters, shape_of,
                                 shape_str, symbol_names)
    from .hook_point import HookPoint

    vals = node_values(gm)
    names = symbol_names(gm)
    layers_path = getattr(getattr(gm, "spec", None), "layers", None)
    fired_by: dict[str, object] = {}  # hook name -> fx node that fires it
    seen: dict[str, object] = {}  # hook name -> the fake value it sees
    modules = [n for n in gm.graph.nodes if n.op == "call_module"]
    for node in modules:
        if isinstance(gm.get_submodule(node.target), HookPoint):
            fired_by.setdefault(node.target, node)
            seen[node.target] = vals.get(node)
    for node in modules:
        if not isinstance(gm.get_submodule(node.target), HookPoint):
            inner = core_hook_values(gm, node, vals)
            for name in gm.get_submodule(node.target)._modules:
                full = f"{node.target}.{name}"
                if full not in fired_by:
                    fired_by[full] = node
                    seen[full] = inner.get(full)
    fallback = _param_dtype(gm)
    rows = []
    for name, hp in gm.hook_dict.items():
        node, val = fired_by.get(name), seen.get(name)
        sizes = resolve_letters(hp.shape, getattr(gm, "dims", {}), shape_of(val, names))
        dtype = dtype_of(val) or fallback
        rows.append(HookRow(name, "[" + ",".join(hp.shape) + "]", dtype, hp.hf_module, hp.made_by,
                            sizes=shape_str(sizes), layer=layer_of(name, layers_path),
                            node="" if node is None else str(node.target)))
    return HookTable(rows)


def _param_dtype(gm) -> str:
    for p in gm.parameters():
        return str(p.dtype).replace("torch.", "")
    return "?"
