"""Look inside a traced module: ``fxbridge.export(gm, "model.svg")`` and ``fxbridge.to_networkx(gm)``.

The format follows the file's extension: ``.dot`` (always), ``.json`` (nodes with op, target, HF module, shape
with symbolic dims as strings, dtype, hook name, the pass that made it; and edges), ``.graphml`` (networkx),
``.svg`` / ``.png`` / ``.pdf`` (rendered by Graphviz: ``pip install 'fxbridge[render]'`` plus the ``dot`` program).
Views: ``full`` (every node), ``layer`` (``layer=3``: one decoder layer and what flows in and out),
``collapsed`` (one box per HF module run and per hook point). Hook points are amber boxes; the hook points
inside a core (``blocks.0.attn`` holds ``hook_attn_scores`` and ``hook_pattern``) are drawn inside it.
"""
from __future__ import annotations

from pathlib import Path

from torch import fx

from ..errors import NotTracedError, UsageError
from .graph import VIEWS, ExportGraph, GNode, build_graph, check_layer
from .writers import RENDERED, check_renderer, render, to_dot, to_json, write_graphml
from .writers import to_networkx as _graph_to_networkx

FORMATS = (".dot", ".gv", ".json", ".graphml", ".svg", ".png", ".pdf")


def _check_traced(gm) -> None:
    if not isinstance(gm, fx.GraphModule):
        hint = " (a Hugging Face model: trace it first, `gm = fxbridge.trace(model)`)" \
            if hasattr(gm, "config") else ""
        raise NotTracedError(
            f"export needs the module fxbridge.trace returns (a torch.fx GraphModule), got "
            f"{type(gm).__name__}{hint}.")


def graph_of(gm, *, view: str = "full", layer: int | None = None) -> ExportGraph:
    """The ExportGraph of ``gm`` in a view (what every format is written from)."""
    _check_traced(gm)
    if layer is not None and view == "full":
        view = "layer"
    return build_graph(gm, view=view, layer=layer)


def to_networkx(gm, *, view: str = "full", layer: int | None = None):
    """``gm`` as a ``networkx.DiGraph`` (node ids: FX node names; attributes as in the JSON export)."""
    return _graph_to_networkx(graph_of(gm, view=view, layer=layer))


def export(gm, path, *, view: str = "full", layer: int | None = None, title: str | None = None) -> Path:
    """Write a picture or data file of ``gm`` to ``path``; the extension picks the format. Returns the path.

    ``layer=N`` shows decoder layer N (with ``view="full"`` this is the ``layer`` view); ``view="collapsed"``
    shows one box per HF module and hook point. Raises ``NotTracedError`` for a module ``trace`` did not make,
    ``MissingDependency`` naming how to install Graphviz when rendering SVG/PNG without it.
    """
    path = Path(path)
    ext = path.suffix.lower()
    if ext not in FORMATS:
        raise UsageError(f"cannot export to {path.name!r}: unknown extension {ext or '(none)'!r}; "
                         f"use one of {', '.join(FORMATS)}")
    graph = graph_of(gm, view=view, layer=layer)
    if title is None:
        model_type = graph.info.get("model_type") or type(gm).__name__
        where = f"layer {graph.info['layer']}" if graph.info.get("layer") is not None else "all layers"
        title = f"{model_type} ({where}, {graph.info['view']} view)"
    path.parent.mkdir(parents=True, exist_ok=True)
    if ext == ".json":
        path.write_text(to_json(graph))
    elif ext == ".graphml":
        write_graphml(graph, path)
    elif ext in (".dot", ".gv"):
        path.write_text(to_dot(graph, title))
    else:
        render(to_dot(graph, title), path, ext[1:])
    return path


__all__ = ["ExportGraph", "FORMATS", "GNode", "RENDERED", "VIEWS", "build_graph", "check_layer", "check_renderer",
           "export", "graph_of", "to_networkx"]
