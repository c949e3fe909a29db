"""HookedGraphModule: the traced GraphModule with TransformerLens's hook API.

Lifetimes: the module holds the HF model under ``hf`` (parameters shared, never copied) and its hook points
under TransformerLens names (``blocks.3.attn.hook_z``). Hooks attached with ``add_hook`` stay until
``reset_hooks``; hooks passed to ``run_with_hooks`` / ``hooks()`` / ``run_with_cache`` are removed when the call
ends, also when a hook raises. ``stop_at_layer=k`` runs a copy of the graph cut at ``blocks.k.hook_resid_pre``
(built once per k and kept), sharing the same hook points and weights.

What the capture fixed, and what it did not:
- The graph is a capture of inference at trace time. Torch module hooks added to the HF model after ``trace()``
  never reach it (use fxbridge's hooks), dropout is gone (``gm.train()`` changes nothing), and the floating dtype
  is baked into its casts: ``gm.to(dtype)`` / ``gm.half()`` raise ``UsageError`` (trace the converted model again)
  instead of silently mixing precisions. Device moves (``gm.to("cuda")``) are fine.
- Pickling (``torch.save(gm)``) stores the HF model and the trace options; loading traces it again, so what comes
  back is a fresh hookable module with the same outputs. Attached hooks are not saved.
- Thread safety: hooks are module state, as in TransformerLens. Plain concurrent calls without hooks are safe;
  a temporary hook attached by one thread (``run_with_hooks``, ``hooks()``, ``run_with_cache``) is seen by every
  other thread's calls while it is attached. Give each thread its own module (``copy.deepcopy(gm)``) to isolate them.
"""
from __future__ import annotations

import contextlib
import copy
import operator
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import fx

from ..errors import UsageError, unknown_hook_error
from ..tracer.graph_facts import hf_path
from .cache import ActivationCache
from .fast_forward import build_fast_forward, slots_for
from .hook_point import HookHandle, HookPoint
from .names import aliases_for, hook_name, shape_of
from .sae import SAEMixin
from .tokens import TokensMixin
from .weights import WeightsMixin

NameOrFilter = "str | Callable[[str], bool]"


class HookedGraphModule(TokensMixin, WeightsMixin, SAEMixin, fx.GraphModule):
    """``gm(input_ids, attention_mask=None, stop_at_layer=None) -> logits`` plus the hook API (HOOKS.md)."""

    def __init__(self, root: torch.nn.Module, graph: fx.Graph, *, spec, dims: dict[str, int],
                 report=None, options: dict | None = None,
                 traced_dtype: torch.dtype | None = None, traced_on_meta: bool = False):
        super().__init__(root, graph, class_name="HookedGraphModule")
        self.training = False  # an inference capture (the HF model's own mode is the caller's)
        # GraphModule copies only the attributes the graph references, into fresh containers; put the real
        # module trees back so `gm.hf` is the HF model and every hook point (also those inside cores) is here.
        for name, child in root.named_children():
            setattr(self, name, child)
        if getattr(self, "_fxb_slots", None) is not None:  # point the fast forward at the real modules
            self._fxb_slots = slots_for(self, self._fxb_targets)
            if self._fxb_slots is None:
                type(self)._graph_forward = type(self)._fx_forward
        self.spec = spec
        self.dims = dict(dims)
        self.report = report
        self._truncated: dict[int, fx.GraphModule] = {}
        self._fxb_options = dict(options or {})  # the trace() options, to trace again on unpickling
        self._fxb_dtype = traced_dtype
        self._fxb_meta = traced_on_meta
        self._index_hooks()

    # ----------------------------------------------------------------------------------------------- forward
    def recompile(self):
        result = super().recompile()
        cls = type(self)  # GraphModule gives every instance its own class; keep the generated code as _graph_forward
        cls._fx_forward = cls.forward
        fast, self._fxb_targets = build_fast_forward(self, result)
        self._fxb_slots = slots_for(self, self._fxb_targets) if fast else None
        # same code, less interpreter overhead (fast_forward.py)
        cls._graph_forward = fast if self._fxb_slots is not None else cls._fx_forward
        cls.forward = HookedGraphModule._forward
        _quiet_errors(cls)
        return result

    def _forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                 stop_at_layer: int | None = None, **unsupported) -> torch.Tensor:
        if unsupported:
            raise TypeError(f"the traced module takes input_ids, attention_mask and stop_at_layer; it does not take "
                            f"{', '.join(sorted(unsupported))} (HF forward arguments the capture does not cover)")
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(f"input_ids must be a tensor of token ids [batch, pos], got {type(input_ids).__name__}")
        if self._fxb_meta and input_ids.device.type != "meta":
            raise UsageError(
                f"this module was traced on the meta device and runs only on meta tensors (got input_ids on "
                f"{input_ids.device}); its graph holds meta-device constants. Materialise the HF model's weights "
                "(e.g. to_empty + load_state_dict) and trace it again on its real device.")
        if input_ids.dim() == 1:
            input_ids = input_ids.unsqueeze(0)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        elif attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, "
                             f"input_ids {tuple(input_ids.shape)}; they must match")
        if stop_at_layer is None:
            if torch.compiler.is_compiling():  # let dynamo see fx's plain code
                return self._fx_forward(input_ids, attention_mask)
            return self._graph_forward(input_ids, attention_mask)
        return self._truncated_module(stop_at_layer)(input_ids, attention_mask)

    # ------------------------------------------------------------------------------------------------ state
    def _apply(self, fn, recurse=True):
        """Refuse a floating-dtype change (``to(float64)``, ``half()``, ``bfloat16()``) before any weight moves: the
        capture baked the traced dtype into its casts (RMSNorm's ``to(input_dtype)``, the softmax's dtype), so the
        converted module would silently compute in a mix of both."""
        dtype = getattr(self, "_fxb_dtype", None)
        if dtype is not None:
            probe = fn(torch.empty(0, dtype=dtype))
            if isinstance(probe, torch.Tensor) and probe.dtype != dtype:
                raise UsageError(
                    f"this module was traced in {dtype}; converting it to {probe.dtype} would keep the {dtype} casts "
                    f"the capture baked into the graph. Convert the HF model and trace again: "
                    f"gm = fxbridge.trace(gm.hf.to({probe.dtype})).")
        return super()._apply(fn, recurse)

    def train(self, mode: bool = True):
        """Sets the HF model's mode (it is the caller's model); the traced graph is an inference capture and has no
        dropout, so its outputs do not change (a warning says so)."""
        if mode:
            warnings.warn("the traced graph is an inference capture (dropout removed); gm.train() sets the HF "
                          "model's mode but does not change gm's outputs", stacklevel=2)
        result = super().train(mode)
        self.training = False
        return result

    def __reduce__(self):
        """Pickle as (HF model, trace options): unpickling traces again and gives a fresh hookable module."""
        if any(hp.has_hooks for hp in self.hook_dict.values()):
            warnings.warn("hooks attached to the traced module are not saved with it", stacklevel=2)
        return (_retrace, (self.hf, self._fxb_options))

    def __deepcopy__(self, memo):
        """An independent traced module: the HF model (weights included), hook points and attached hooks copied."""
        root = torch.nn.Module()
        for name, child in self.named_children():
            root.add_module(name, copy.deepcopy(child, memo))
        for name, buf in self.named_buffers(recurse=False):
            root.register_buffer(name, copy.deepcopy(buf, memo), persistent=False)
        for node in self.graph.nodes:  # non-tensor constants the graph reads from the root
            if node.op == "get_attr" and "." not in node.target and not hasattr(root, node.target):
                setattr(root, node.target, copy.deepcopy(getattr(self, node.target), memo))
        return HookedGraphModule(root, copy.deepcopy(self.graph, memo), spec=self.spec, dims=self.dims,
                                 report=self.report, options=self._fxb_options,
                                 traced_dtype=self._fxb_dtype, traced_on_meta=self._fxb_meta)

    def _truncated_module(self, layer: int) -> fx.GraphModule:
        n = self.dims["n_layers"]
        try:
            if isinstance(layer, bool):  # True == 1 would also poison the cache below
                raise TypeError
            layer = operator.index(layer)  # ints, numpy ints, 0-d integer tensors; not 1.0, 0.5 or "1"
        except TypeError:
            raise TypeError(f"stop_at_layer must be an int layer index (or None), got {type(layer).__name__} "
                            f"{layer!r}") from None
        if layer < 0:
            layer += n
        if not 0 <= layer < n:
            raise ValueError(f"stop_at_layer must be in [-{n}, {n}), got {layer}")
        if layer not in self._truncated:
            self._truncated[layer] = truncate_at(self, hook_name("hook_resid_pre", layer))
        return self._truncated[layer]

    # ------------------------------------------------------------------------------------------------- hooks
    def _index_hooks(self) -> None:
        points = {name: m for name, m in self.named_modules() if isinstance(m, HookPoint) and hf_path(name) is None}
        # hook_dict lists the points in the order they fire: graph order, a core's points at the core's node
        children: dict[str, list[str]] = {}
        for name in points:
            children.setdefault(name.rpartition(".")[0], []).append(name)
        ordered: dict[str, HookPoint] = {}
        for node in self.graph.nodes:
            if node.op == "call_module":
                for name in [node.target] if node.target in points else children.get(node.target, ()):
                    ordered.setdefault(name, points[name])
        ordered.update({name: hp for name, hp in points.items() if name not in ordered})
        self.hook_dict: dict[str, HookPoint] = ordered
        for name, module in ordered.items():
            module.name = name
            module.shape = shape_of(name) or module.shape  # from names.py (cores' inner points too)
        self.aliases = aliases_for(ordered)  # TransformerBridge spellings, from the hook table

    def hook_table(self):
        """One row per hook point: name, symbolic shape, dtype, HF module, pass; ``print()`` it for a table."""
        from .table import hook_table
        return hook_table(self)

    @property
    def mod_dict(self) -> dict[str, torch.nn.Module]:
        return dict(self.named_modules())

    def resolve(self, name: str) -> str:
        """Canonical hook name for a name or a TransformerBridge-style alias; KeyError with close matches."""
        if name in self.hook_dict:
            return name
        if name in self.aliases:
            return self.aliases[name]
        raise unknown_hook_error(name, [*self.hook_dict, *self.aliases])

    def _select(self, name_or_filter) -> list[HookPoint]:
        if isinstance(name_or_filter, str):
            return [self.hook_dict[self.resolve(name_or_filter)]]
        if callable(name_or_filter):
            return [hp for name, hp in self.hook_dict.items() if name_or_filter(name)]
        raise TypeError(f"a hook target is a name or a filter function, got {type(name_or_filter).__name__}")

    def add_hook(self, name: "NameOrFilter", hook: Callable, dir: str = "fwd", is_permanent: bool = False,
                 prepend: bool = False) -> list[HookHandle]:
        """Attach ``hook(tensor, hook=HookPoint)`` to one hook point or to every name a filter accepts."""
        return [hp.add_hook(hook, dir=dir, is_permanent=is_permanent, prepend=prepend) for hp in self._select(name)]

    def reset_hooks(self, including_permanent: bool = False, direction: str = "both") -> None:
        for hp in self.hook_dict.values():
            hp.remove_hooks(direction, including_permanent=including_permanent)

    @contextlib.contextmanager
    def hooks(self, fwd_hooks: Iterable = (), bwd_hooks: Iterable = (), reset_hooks_end: bool = True):
        """Attach hooks for the ``with`` block; they are removed at its end, also when something raises."""
        handles: list[HookHandle] = []
        try:
            for name, fn in fwd_hooks:
                handles += self.add_hook(name, fn, dir="fwd")
            for name, fn in bwd_hooks:
                handles += self.add_hook(name, fn, dir="bwd")
            yield self
        finally:
            if reset_hooks_end:
                for handle in handles:
                    handle.remove()

    def run_with_hooks(self, *args, fwd_hooks: Sequence = (), bwd_hooks: Sequence = (), reset_hooks_end: bool = True,
                       clear_contexts: bool = False, **kwargs) -> Any:
        """Forward with temporary hooks. Backward hooks attached here still run in a later ``.backward()``."""
        with self.hooks(fwd_hooks, bwd_hooks, reset_hooks_end):
            return self(*args, **kwargs)

    def run_with_cache(self, *args, names_filter=None, device=None, remove_batch_dim: bool = False,
                       incl_bwd: bool = False, return_cache_object: bool = True, **kwargs):
        """Forward, storing the activation of every hook point ``names_filter`` selects (one entry each)."""
        names = self._cache_names(names_filter)
        store: dict[str, torch.Tensor] = {}

        def make_saver(key: str, prefix: str = ""):
            def save(tensor, hook):
                t = tensor.detach()
                if device is not None:
                    t = t.to(device)
                store[prefix + key] = t[0] if remove_batch_dim else t
            return save

        fwd = [(name, make_saver(name)) for name in names]
        bwd = [(name, make_saver(name + "_grad")) for name in names] if incl_bwd else []
        with self.hooks(fwd, bwd, reset_hooks_end=True):
            out = self(*args, **kwargs)
        if not return_cache_object:
            return out, store
        return out, ActivationCache(store, self.dims["n_layers"], has_batch_dim=not remove_batch_dim,
                                    aliases=self.aliases, model=self)

    def _cache_names(self, names_filter) -> list[str]:
        if names_filter is None:
            return list(self.hook_dict)
        if isinstance(names_filter, str):
            return [self.resolve(names_filter)]
        if callable(names_filter):
            return [name for name in self.hook_dict if names_filter(name)]
        return list(dict.fromkeys(self.resolve(name) for name in names_filter))


def truncate_at(gm: fx.GraphModule, hook_name: str) -> fx.GraphModule:
    """A GraphModule sharing gm's modules whose output is the output of the hook node ``hook_name``."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in gm.graph.nodes:
        if node.op == "output":
            raise KeyError(f"{hook_name!r} is not a node of the graph")
        env[node] = graph.node_copy(node, lambda n: env[n])
        if node.op == "call_module" and node.target == hook_name:
            graph.output(env[node])
            break
    truncated = fx.GraphModule(gm, graph, class_name="TruncatedGraphModule")
    for name, child in gm.named_children():
        setattr(truncated, name, child)
    truncated.graph.eliminate_dead_code()
    truncated.recompile()
    _quiet_errors(type(truncated))
    return truncated


def _quiet_errors(cls) -> None:
    """Plain ``nn.Module`` calls: fx's wrapper prints ~25 lines of generated code to stderr for every exception
    raised inside the graph, even one the caller catches. The traceback already names the failing line."""
    cls.__call__ = torch.nn.Module.__call__


def _retrace(hf_model, options: dict):
    from ..pipeline import trace
    return trace(hf_model, **options)
