"""Pass infrastructure: a pass is a function ``fn(ctx, **params) -> matches``; the runner checks order and counts.

Modelled on ``torch.fx.passes.infra`` and ExecuTorch's pass lists:

- a spec lists pass *objects*, configured by calling them: ``remove_eval_dropout(per_layer=2)``; an unknown or
  missing parameter is a TypeError when the spec is built (at import), as is a misspelt pass name;
- ``requires`` names passes that must have run earlier, ``before`` passes that must run later when listed; the
  runner checks both for the whole list before running anything (``check_order``);
- a pass raises ``NoMatch`` where the pattern it rewrites is absent (where it looked, what it expected, what it
  found); the runner turns that, and a match count other than ``expects``, into ``PatternNotFound``; any other
  exception is a bug and propagates with its own type and traceback, with a note naming the pass;
- the graph is linted after each pass.

To run one pass by hand (toy-graph tests): ``hook_mlp.run(PassContext(...))`` returns its match count;
``run_passes(ctx, [hook_mlp])`` also checks it (``already_run=[...]``: passes the toy graph already shows).
"""
from __future__ import annotations

import inspect
import logging
import operator
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
from torch import fx
from torch.utils._pytree import tree_leaves

from ..errors import FxBridgeError, PassOrderError, PatternNotFound

if TYPE_CHECKING:
    from ..architectures.spec import ArchSpec

log = logging.getLogger(__name__)


class NoMatch(LookupError):
    """A pass's pattern is absent: ``where`` it looked (module path, layer), what it ``expected``, what it ``found``."""

    def __init__(self, where: str, expected: str, found: str):
        self.where, self.expected, self.found = where, expected, found
        super().__init__(f"in {where}: expected {expected}, found {found}")


@dataclass
class PassContext:
    """What a pass works on: the graph, the module that will own the hook points, and the model's facts."""

    graph: fx.Graph
    root: torch.nn.Module
    spec: ArchSpec
    dims: dict[str, int]
    config: object
    current_pass: str = ""  # the running pass's name (``GraphPass.run``): what the hook points it makes record


@dataclass
class PassResult:
    """One pass's run: its name, the matches it made and expected, how long it took."""

    name: str
    matches: int
    expected: int
    seconds: float


@dataclass(frozen=True)
class GraphPass:
    """A named rewrite, the number of matches it must make (``expects(spec, dims, **params)``), and its order.

    Call a pass with keyword parameters for a configured copy: ``make_adds_out_of_place(per_layer=1)``.
    """

    name: str
    fn: Callable[..., int]
    expects: Callable[..., int]
    requires: tuple[str, ...] = ()  # passes that must have run before this one
    before: tuple[str, ...] = ()  # passes that must run after this one where both are listed
    params: tuple[tuple[str, object], ...] = ()

    def __call__(self, **params) -> GraphPass:
        known = self._parameters()
        unknown = sorted(set(params) - set(known))
        if unknown:
            raise TypeError(f"pass {self.name!r} has no parameter {', '.join(unknown)}; "
                            f"its parameters: {', '.join(known) or 'none'}")
        return replace(self, params=tuple(sorted({**dict(self.params), **params}.items())))

    def _parameters(self) -> dict[str, inspect.Parameter]:
        return {n: p for n, p in inspect.signature(self.fn).parameters.items() if p.kind is p.KEYWORD_ONLY}

    @property
    def options(self) -> dict[str, object]:
        """The parameters set on this pass."""
        return dict(self.params)

    def check_configured(self) -> None:
        """TypeError naming the parameters the pass needs and was not given."""
        missing = [n for n, p in self._parameters().items() if p.default is p.empty and n not in self.options]
        if missing:
            raise TypeError(f"pass {self.name!r} needs the parameters {', '.join(missing)}: list it configured, "
                            f"e.g. {self.name}({', '.join(f'{n}=...' for n in missing)})")

    def expected(self, spec: ArchSpec, dims: dict[str, int]) -> int:
        return self.expects(spec, dims, **self.options)

    def run(self, ctx: PassContext) -> int:
        """Rewrite ``ctx.graph``; returns the number of matches (NoMatch where the pattern is absent)."""
        self.check_configured()
        outer, ctx.current_pass = ctx.current_pass, self.name
        try:
            return self.fn(ctx, **self.options)
        finally:
            ctx.current_pass = outer


def graph_pass(expects: Callable[..., int], requires: Sequence[str] = (), before: Sequence[str] = ()):
    """Decorator turning ``fn(ctx, *, params...) -> matches`` into a GraphPass named after the function."""
    def wrap(fn):
        return GraphPass(fn.__name__, fn, expects, tuple(requires), tuple(before))
    return wrap


def check_order(passes: Sequence[GraphPass], already_run: Sequence[str] = ()) -> None:
    """PassOrderError naming every ``requires`` / ``before`` constraint the list breaks (``already_run``: passes
    that rewrote the graph before this list)."""
    names = [p.name for p in passes]
    problems = []
    for i, p in enumerate(passes):
        for need in p.requires:
            if need in already_run:
                continue
            if need not in names:
                problems.append(f"{p.name} requires {need}, which is not in the list")
            elif names.index(need) > i:
                problems.append(f"{p.name} requires {need} to run before it, but {need} runs after it")
        problems += [f"{p.name} must run before {later}, but {later} runs first"
                     for later in p.before if later in names[:i]]
    if problems:
        raise PassOrderError(problems, names)


def run_passes(ctx: PassContext, passes: Sequence[GraphPass], progress=None,
               already_run: Sequence[str] = ()) -> list[PassResult]:
    """Run ``passes`` in order on ``ctx``: the order is checked first, then each pass's matches after it runs.

    ``already_run``: names of passes whose rewrites ``ctx.graph`` already holds (they count for ``requires``).
    """
    check_order(passes, already_run)
    results: list[PassResult] = []
    for p in passes:
        start = time.perf_counter()
        expected = p.expected(ctx.spec, ctx.dims)
        before = [*already_run, *(r.name for r in results)]
        try:
            found = p.run(ctx)
        except NoMatch as miss:
            raise PatternNotFound(p.name, miss.where, miss.expected, miss.found, before) from miss
        except FxBridgeError:
            raise
        except Exception as exc:  # a bug, not a missing pattern: keep its type and traceback
            exc.add_note(f"raised in fxbridge pass {p.name!r} (passes run before it: {', '.join(before) or 'none'})")
            raise
        if found != expected:
            raise PatternNotFound(p.name, f"the graph of {ctx.spec.family}", f"{expected} match(es)", str(found),
                                  before)
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
    memo: dict = {}  # the decoder layers repeat: one fake run per distinct (op, input shapes, arguments)
    for node in graph.nodes:
        if node.op not in ("call_function", "call_module"):
            continue
        if "val" in node.meta and (node.op == "call_function" or INNER_VALS in node.meta
                                   or node.meta.get("fxbridge_hook")):
            continue
        module = root.get_submodule(node.target) if node.op == "call_module" else None
        is_core = module is not None and hasattr(module, "fake_values")
        if "val" in node.meta and not is_core:
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
            key = (type(module), tuple(module._modules), _signature((args, kwargs)))
            if key not in memo:
                memo[key] = module.fake_values(*args, **kwargs)
            out, inner = memo[key]
            node.meta.setdefault("val", out)
            node.meta[INNER_VALS] = {f"{node.target}.{name}": val for name, val in inner.items()}
        elif node.op == "call_function":
            key = (node.target, _signature((args, kwargs)))
            if key not in memo:
                memo[key] = _run_on_fakes(node, args, kwargs)
            if memo[key] is None:
                continue
            node.meta["val"] = memo[key]
        done += 1
    return done


def _signature(tree) -> tuple:
    """What a fake run depends on: each tensor's shape (symbols by name), dtype and device; other values as such."""
    return tuple((tuple(str(d) for d in leaf.shape), leaf.dtype, str(leaf.device))
                 if isinstance(leaf, torch.Tensor) else repr(leaf) for leaf in tree_leaves(tree))


def _run_on_fakes(node: fx.Node, args, kwargs):
    fakes = [a for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
    mode = torch._guards.detect_fake_mode(fakes) if fakes else None
    if mode is None:
        return None
    try:
        with mode:
            return node.target(*args, **kwargs)
    except Exception as exc:  # an op fake tensors cannot run: its shape stays unknown (a picture only)
        log.debug("no fake value for %s: %s", node.name, exc)
        return None


def _fake_attr(node: fx.Node, root: torch.nn.Module, graph: fx.Graph) -> None:
    """A fake of the weight a ``get_attr`` node reads (a pass added it, e.g. W_O viewed per head), in the graph's
    fake mode; the weight itself is not read."""
    try:
        tensor = operator.attrgetter(node.target)(root)
    except AttributeError:
        return
    mode = next((torch._guards.detect_fake_mode([n.meta["val"]]) for n in graph.nodes
                 if isinstance(n.meta.get("val"), torch.Tensor)), None)  # the first node with a value: the inputs
    if isinstance(tensor, torch.Tensor) and mode is not None:
        node.meta["val"] = mode.from_tensor(tensor, static_shapes=True)
