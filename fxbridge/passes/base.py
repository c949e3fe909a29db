"""Pass infrastructure: a pass is a function ``ctx -> matches``; the manager checks matches against the spec.

Modelled on ``torch.fx.passes.infra``: each pass is small, a failure is re-raised naming the pass and the
passes run before it, and the graph is linted after each pass.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import fx

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
        results.append(PassResult(p.name, found, expected, time.perf_counter() - start))
        log.debug("pass %s: %d matches", p.name, found)
        if progress:
            progress(f"  pass {p.name}: {found} matches")
    return results
