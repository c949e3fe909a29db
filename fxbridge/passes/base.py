"""Pass infrastructure: a pass is a function ``ctx -> matches``; the manager checks matches against the spec.

Modelled on ``torch.fx.passes.infra``: each pass is small, a failure is re-raised naming the pass and the
passes run before it, and the graph is linted after each pass.
"""
from __future__ import annotations

import logging
import operator
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import fx
from torch.utils._pytree import tree_leaves

from ..errors import FxBridgeError, PatternNotFound

log = logging.getLogger(__name__)


@dataclass
class PassContext:
    """What a pass works on: the graph, the module that will own the hook points, and the model's facts."""

    graph: fx.Graph
    root: torch.nn.Module
    spec: object
    dims: dict[str, int]
    config: object
    aliases: dict[str, str] = field(default_factory=dict)


@dataclass
class PassResult:
    name: str
    matches: int
    expected: int
    seconds: float


@dataclass(frozen=True)
class GraphPass:
    """A named rewrite and the number of matches it must find for a given spec and dims."""

    name: str
    run: Callable[[PassContext], int]
    expects: Callable[[object, dict], int]
    doc: str = ""


def graph_pass(expects: Callable[[object, dict], int]):
    """Decorator turning ``fn(ctx) -> matches`` into a GraphPass named after the function."""
    def wrap(fn):
        return GraphPass(fn.__name__, fn, expects, (fn.__doc__ or "").strip().splitlines()[0])
    return wrap


def per_layer(spec, dims) -> int:
    return dims["n_layers"]


def run_passes(ctx: PassContext, passes: list[GraphPass], progress=None) -> list[PassResult]:
    results: list[PassResult] = []
    for p in passes:
        start = time.perf_counter()
        expected = p.expects(ctx.spec, ctx.dims)
        try:
            found = p.run(ctx)
        except FxBridgeError:
            raise
        except Exception as exc:
            raise PatternNotFound(p.name, expected, 0, f"{type(exc).__name__}: {exc}",
                                  [r.name for r in results]) from exc
        if found != expected:
            raise PatternNotFound(p.name, expected, found, before=[r.name for r in results])
        ctx.graph.lint()
        record_values(ctx.graph, ctx.root)
        results.append(PassResult(p.name, found, expected, time.perf_counter() - start))
        log.debug("pass %s: %d matches", p.name, found)
        if progress:
            progress(f"  pass {p.name}: {found} matches")
    return results


def record_values(graph: fx.Graph, root: torch.nn.Module) -> int:
    """Give every node a pass inserted its fake value (``meta["val"]``), as the capture gave every captured node.

    Inductor's invariant (``fx_passes/README.md``): passes keep ``meta["val"]`` consistent, so the hook table and
    the exporter read shapes and dtypes from the graph instead of replaying it. Hook points are identities; a core
    states its output and the values its inner hook points see (``fake_values``, stored in
    ``meta["fxbridge_inner_vals"]``); a view or slice a pass spliced in runs on the fake inputs (no real weight is
    read). Returns how many nodes got a value.
    """
    from ..runtime.hook_point import HookPoint
    from ..runtime.values import INNER_VALS

    done = 0
    for node in graph.nodes:
        if node.op not in ("call_function", "call_module"):
            continue
        module = root.get_submodule(node.target) if node.op == "call_module" else None
        is_core = module is not None and hasattr(module, "fake_values")
        if "val" in node.meta and not (is_core and INNER_VALS not in node.meta):
            continue
        for arg in node.all_input_nodes:
            if arg.op == "get_attr" and "val" not in arg.meta:
                _fake_attr(arg, root, graph)
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: n.meta.get("val"))
        if any(n.meta.get("val") is None for n in node.all_input_nodes):
            continue  # an input the graph does not know (a non-tensor constant): leave it unknown
        if isinstance(module, HookPoint):
            node.meta["val"] = args[0]
        elif is_core:
            out, inner = module.fake_values(*args, **kwargs)
            node.meta.setdefault("val", out)
            node.meta[INNER_VALS] = {f"{node.target}.{name}": val for name, val in inner.items()}
        elif node.op == "call_function":
            fakes = [a for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
            mode = torch._guards.detect_fake_mode(fakes) if fakes else None
            if mode is None:
                continue
            try:
                with mode:
                    node.meta["val"] = node.target(*args, **kwargs)
            except Exception as exc:  # an op fake tensors cannot run: its shape stays unknown (a picture only)
                log.debug("no fake value for %s: %s", node.name, exc)
                continue
        done += 1
    return done


def _fake_attr(node: fx.Node, root: torch.nn.Module, graph: fx.Graph) -> None:
    """A fake of the weight a ``get_attr`` node reads (a pass added it, e.g. W_O viewed per head), in the graph's
    fake mode; the weight itself is not read."""
    try:
        tensor = operator.attrgetter(node.target)(root)
    except AttributeError:
        return
    mode = next((torch._guards.detect_fake_mode([n.meta["val"]]) for n in graph.nodes
                 if isinstance(n.meta.get("val"), torch.Tensor)), None)
    if isinstance(tensor, torch.Tensor) and mode is not None:
        node.meta["val"] = mode.from_tensor(tensor, static_shapes=True)
