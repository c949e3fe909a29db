"""Writers for an ExportGraph: DOT text, JSON, GraphML (networkx), SVG/PNG (Graphviz, optional)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..errors import MissingDependency
from .graph import ExportGraph

# How each kind of box looks. Hook points stand out: amber, bold, rounded.
_STYLE = {
    "hook": 'shape=box style="rounded,filled,bold" fillcolor="#ffc34d" color="#b36b00" penwidth=2 fontsize=12',
    "core_hook": 'shape=box style="rounded,filled,bold" fillcolor="#ffc34d" color="#b36b00" penwidth=2 fontsize=12',
    "core": 'shape=box3d style=filled fillcolor="#9ecae1" fontsize=12',
    "op": 'shape=box style=filled fillcolor="#ffffff" color="#888888" fontsize=10',
    "group": 'shape=box style=filled fillcolor="#e3ecf7" color="#5a7ca8" fontsize=11',
    "param": 'shape=note style=filled fillcolor="#eeeeee" color="#aaaaaa" fontsize=9',
    "input": 'shape=invhouse style=filled fillcolor="#c7e9c0" fontsize=12',
    "output": 'shape=house style=filled fillcolor="#c7e9c0" fontsize=12',
    "external": 'shape=box style="dashed" color="#999999" fontcolor="#666666" fontsize=10',
}

_INSTALL_DOT = ("the Graphviz `dot` program is needed to render {ext} but is not on PATH. Install it "
                "(Debian/Ubuntu: `apt-get install graphviz`; macOS: `brew install graphviz`; conda: "
                "`conda install graphviz`), or export to .dot / .json / .graphml, which need no extra tools.")
_INSTALL_PY = ("the `graphviz` Python package is needed to render {ext}: `pip install 'fxbridge[render]'` "
               "(or `pip install graphviz`); .dot / .json / .graphml need no extra packages.")


def _q(text: str) -> str:
    return '"' + str(text).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def to_dot(graph: ExportGraph, title: str = "") -> str:
    """Graphviz DOT text. Cores are clusters holding their hook points; ``contains`` edges are dashed."""
    lines = ["digraph fxbridge {", "  rankdir=TB;", '  node [fontname="Helvetica"];',
             '  edge [color="#555555" arrowsize=0.6];']
    if title:
        lines.append(f"  labelloc=t; fontsize=16; label={_q(title)};")
    children: dict[str, list] = {}
    for n in graph.nodes.values():
        if n.kind == "core_hook" and n.parent in graph.nodes:
            children.setdefault(n.parent, []).append(n)
    for n in graph.nodes.values():
        if n.kind == "core_hook" and n.parent in graph.nodes:
            continue  # drawn inside its core's cluster
        if n.kind == "core":
            lines.append(f"  subgraph {_q('cluster_' + n.id)} {{")
            lines.append(f'    style="rounded,filled"; fillcolor="#deebf7"; color="#3182bd"; label={_q(n.target)};')
            lines.append(f"    {_q(n.id)} [label={_q(n.label)} {_STYLE['core']}];")
            for c in children.get(n.id, ()):
                lines.append(f"    {_q(c.id)} [label={_q(c.label)} {_STYLE['core_hook']}];")
            lines.append("  }")
            continue
        lines.append(f"  {_q(n.id)} [label={_q(n.label)} {_STYLE.get(n.kind, _STYLE['op'])}];")
    for s, t, r in graph.edges:
        attrs = ' [style=dashed arrowhead=none color="#3182bd"]' if r == "contains" else ""
        lines.append(f"  {_q(s)} -> {_q(t)}{attrs};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def to_json(graph: ExportGraph) -> str:
    return json.dumps(graph.as_dict(), indent=1)


def to_networkx(graph: ExportGraph):
    """A ``networkx.DiGraph``: node attributes as in the JSON, edge attribute ``relation``."""
    import networkx as nx

    g = nx.DiGraph(**{k: v for k, v in graph.info.items() if k != "dims"})
    for n in graph.nodes.values():
        attrs = n.as_dict()
        attrs.pop("id")
        g.add_node(n.id, **attrs)
    for s, t, r in graph.edges:
        g.add_edge(s, t, relation=r)
    return g


def write_graphml(graph: ExportGraph, path: Path) -> None:
    """GraphML wants scalar attributes: shapes become ``[B,S,64]`` strings, missing values empty strings."""
    import networkx as nx

    g = to_networkx(graph)
    for _, attrs in g.nodes(data=True):
        for key, value in list(attrs.items()):
            if isinstance(value, (list, tuple)):
                attrs[key] = "[" + ",".join(str(v) for v in value) + "]"
            elif value is None:
                attrs[key] = ""
    g.graph = {k: ("" if v is None else v) for k, v in g.graph.items()}
    nx.write_graphml(g, str(path))


RENDERED = (".svg", ".png", ".pdf")


def check_renderer(ext: str):
    """The ``graphviz`` module when ``ext`` (.svg .png .pdf) can be rendered here; else MissingDependency (cheap)."""
    try:
        import graphviz
    except ImportError as exc:
        raise MissingDependency(_INSTALL_PY.format(ext=ext)) from exc
    if shutil.which("dot") is None:
        raise MissingDependency(_INSTALL_DOT.format(ext=ext))
    return graphviz


def render(dot_text: str, path: Path, fmt: str) -> None:
    """Render DOT to ``fmt`` (svg, png, pdf) with Graphviz; MissingDependency says how to install what is missing."""
    ext = "." + fmt
    graphviz = check_renderer(ext)
    try:
        data = graphviz.Source(dot_text).pipe(format=fmt)
    except graphviz.ExecutableNotFound as exc:
        raise MissingDependency(_INSTALL_DOT.format(ext=ext)) from exc
    path.write_bytes(data)
