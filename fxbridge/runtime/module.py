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
- Pickling (``torch.save(gm)``) stores the HF model, the trace options and the tokenizer; loading traces it again,
  so what comes back is a fresh hookable module with the same outputs. Attached hooks are not saved.
- Thread safety: hooks are module state, as in TransformerLens. Plain concurrent calls without hooks are safe;
  a temporary hook attached by one thread (``run_with_hooks``, ``hooks()``, ``run_with_cache``) is seen by every
  other thread's calls while it is attached. Give each thread its own module (``copy.deepcopy(gm)``) to isolate them.
"""
from __future__ import annotations

import contextlib
import copy
import warnings
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import fx

from ..errors import UsageError, unknown_hook_error
from ..tracer.graph_facts import hf_path
from .cache import ActivationCache, slice_dim
from .fast_forward import build_fast_forward, slots_for
from .forward import (check_input_ids, counted_positions, check_mask, check_positions, check_return_type, layer_index, model_output,
                      positions_from_mask, reads_tokens, start_graph, unsupported_arguments)
from .generate import GenerateMixin
from .hook_point import HookHandle, HookPoint
from .names import aliases_for, hook_name, shape_of
from .sae import SAEMixin
from .tokens import TokensMixin
from .weights import WeightsMixin

NameOrFilter = "str | Callable[[str], bool]"


class HookedGraphModule(TokensMixin, WeightsMixin, SAEMixin, GenerateMixin, fx.GraphModule):
    """``gm(input_ids, attention_mask=None, stop_at_layer=None) -> logits`` plus the hook API (HOOKS.md)."""

    def __init__(self, root: torch.nn.Module, graph: fx.Graph, *, spec, dims: dict[str, int],
                 report=None, options: dict | None = None,
                 traced_dtype: torch.dtype | None = None, traced_on_meta: bool = False,
                 default_positions: str | None = None):
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
        self._fxb_inputs = tuple(n.name for n in self.graph.nodes if n.op == "placeholder")
        # what HF uses for positions when given none ("arange" / "mask", see tracer.capture.probe_default_positions)
        self._fxb_positions = default_positions or "arange"
        self._index_hooks()
        self._bind_norms()

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

    def _forward(self, input=None, return_type: str | None = "logits", loss_per_token: bool = False,
                 prepend_bos: bool | None = None, padding_side: str | None = None, *, start_at_layer: int | None = None,
                 tokens: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                 position_ids: torch.Tensor | None = None, stop_at_layer: int | None = None, **unsupported):
        """TransformerLens's forward: ``gm(input, return_type="logits", ...)``; see ``runtime/forward.py``."""
        if "input_ids" in unsupported and input is None:  # HF's spelling of the first argument
            input = unsupported.pop("input_ids")
        if unsupported:
            unsupported_arguments(unsupported)
        check_return_type(return_type)
        if start_at_layer is not None:
            return self._forward_from_layer(input, start_at_layer, return_type=return_type,
                                            loss_per_token=loss_per_token, tokens=tokens,
                                            attention_mask=attention_mask, position_ids=position_ids,
                                            stop_at_layer=stop_at_layer)
        ids, attention_mask, position_ids = self._model_inputs(input, prepend_bos, padding_side, attention_mask,
                                                               position_ids)
        if stop_at_layer is not None:
            return self._truncated_module(stop_at_layer)(*self._graph_args(ids, attention_mask, position_ids))
        if torch.compiler.is_compiling():  # let dynamo see fx's plain code
            logits = self._fx_forward(*self._graph_args(ids, attention_mask, position_ids))
        else:
            logits = self._graph_forward(*self._graph_args(ids, attention_mask, position_ids))
        return model_output(logits, ids, attention_mask, return_type, loss_per_token)

    def _model_inputs(self, input, prepend_bos, padding_side, attention_mask, position_ids):
        """(input_ids, attention_mask, position_ids) for the graph from a forward's arguments (TL's rules, HF's
        defaults): strings are tokenized (a padded batch gets its mask and mask-derived positions); tokens run as
        given with HF's defaults (all-ones mask, ``arange`` positions) unless the caller passes a mask / positions."""
        derived_positions = False
        if isinstance(input, str) or (isinstance(input, (list, tuple)) and input and isinstance(input[0], str)):
            input, mask = self._tokenize_input(input, prepend_bos=prepend_bos, padding_side=padding_side)
            if attention_mask is None and mask is not None:
                attention_mask, derived_positions = mask, True
        ids = check_input_ids(input)
        if self._fxb_meta and ids.device.type != "meta":
            raise UsageError(
                f"this module was traced on the meta device and runs only on meta tensors (got input_ids on "
                f"{ids.device}); its graph holds meta-device constants. Materialise the HF model's weights "
                "(e.g. to_empty + load_state_dict) and trace it again on its real device.")
        if ids.dim() == 1:
            ids = ids.unsqueeze(0)
        if attention_mask is None:
            attention_mask = torch.ones_like(ids)
        else:
            attention_mask = check_mask(attention_mask, ids)
        if position_ids is not None or derived_positions:
            if "position_ids" not in self._fxb_inputs:
                if position_ids is not None:
                    raise UsageError(self._no_positions_reason())
            elif position_ids is None:
                position_ids = positions_from_mask(attention_mask)
            else:
                position_ids = check_positions(position_ids, ids)
        return ids, attention_mask, position_ids

    def _graph_args(self, ids, attention_mask, position_ids) -> tuple:
        if "position_ids" not in self._fxb_inputs:
            return ids, attention_mask
        if position_ids is None:  # HF's default: 0..S-1 in every row (OPT: counted over the mask)
            position_ids = (counted_positions(attention_mask) if self._fxb_positions == "mask"
                            else torch.arange(ids.shape[1], device=ids.device).expand(ids.shape))
        return ids, attention_mask, position_ids

    def _no_positions_reason(self) -> str:
        return (f"{type(self.hf).__name__}'s forward takes no position_ids (positions come from the attention mask "
                f"there), so the traced module takes none either; pass attention_mask")

    def _forward_from_layer(self, residual, layer, *, return_type, loss_per_token, tokens, attention_mask,
                            position_ids, stop_at_layer):
        """TL's ``start_at_layer``: ``residual`` [B,S,D] enters ``blocks.{layer}.hook_resid_pre``."""
        if not isinstance(residual, torch.Tensor) or residual.dim() != 3:
            raise TypeError(f"with start_at_layer the input is the residual stream [batch, pos, d_model], got "
                            f"{type(residual).__name__} {tuple(getattr(residual, 'shape', ()))}")
        start = self._layer_index(layer, "start_at_layer", allow_end=False)
        graph_module, needs_tokens = self._started_module(start, stop_at_layer)
        if tokens is None:
            if needs_tokens or return_type in ("loss", "both"):
                why = ("the loss reads them" if return_type in ("loss", "both") else
                       f"{self.spec.family}'s later layers read the token ids (per-layer inputs)")
                raise ValueError(f"start_at_layer={layer} needs tokens= (the input token ids [batch, pos]): {why}")
            tokens = torch.zeros(residual.shape[:2], dtype=torch.long, device=residual.device)
        ids, attention_mask, position_ids = self._model_inputs(tokens, None, None, attention_mask, position_ids)
        if ids.shape != residual.shape[:2]:
            raise ValueError(f"tokens {tuple(ids.shape)} and the residual {tuple(residual.shape)} disagree on "
                             "[batch, pos]")
        out = graph_module(residual, *self._graph_args(ids, attention_mask, position_ids))
        if stop_at_layer is not None:
            return out
        return model_output(out, ids, attention_mask, return_type, loss_per_token)

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

    def compile(self, *args, **kwargs) -> None:
        """``nn.Module.compile``: ``torch.compile`` this module in place (docs/compile.md: what recompiles, what a hook
        may do). A meta-traced module has no weights to compile against and is refused."""
        if self._fxb_meta:
            raise UsageError("this module was traced on the meta device: there is nothing to compile (its graph holds "
                             "meta-device constants and it runs only on meta tensors). Materialise the HF model's "
                             "weights and trace it again on its real device, then compile")
        super().compile(*args, **kwargs)

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
        return (_retrace, (self.hf, self._fxb_options, self.tokenizer))

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
        new = HookedGraphModule(root, copy.deepcopy(self.graph, memo), spec=self.spec, dims=self.dims,
                                report=self.report, options=self._fxb_options,
                                traced_dtype=self._fxb_dtype, traced_on_meta=self._fxb_meta,
                                default_positions=self._fxb_positions)
        if self.tokenizer is not None:
            new.tokenizer = copy.deepcopy(self.tokenizer, memo)
        cfg = self.__dict__.get("_fxb_cfg")
        if cfg is not None:  # the copy keeps the config as edited (cfg.default_prepend_bos = False ...)
            new.__dict__["_fxb_cfg"] = copy.copy(cfg)
            new.__dict__["_fxb_cfg"]._module = weakref.ref(new)
        return new

    def _layer_index(self, layer, what: str, *, allow_end: bool) -> int:
        return layer_index(layer, self.dims["n_layers"], what, allow_end=allow_end)

    def _stop_hook(self, stop: int) -> str:
        """The hook node whose value ``stop_at_layer=stop`` returns: the residual entering block ``stop``."""
        n = self.dims["n_layers"]
        return hook_name("hook_resid_post", n - 1) if stop == n else hook_name("hook_resid_pre", stop)

    def _truncated_module(self, layer) -> fx.GraphModule:
        stop = self._layer_index(layer, "stop_at_layer", allow_end=True)
        if stop not in self._truncated:
            self._truncated[stop] = truncate_at(self, self._stop_hook(stop))
        return self._truncated[stop]

    def _started_module(self, start: int, stop_at_layer) -> tuple[fx.GraphModule, bool]:
        """The graph from ``blocks.{start}.hook_resid_pre`` (a residual input) to the logits or to ``stop_at_layer``."""
        stop = None if stop_at_layer is None else self._layer_index(stop_at_layer, "stop_at_layer", allow_end=True)
        if stop is not None and stop < start:
            raise ValueError(f"stop_at_layer={stop_at_layer} comes before start_at_layer={start}")
        key = ("start", start, stop)
        if key not in self._truncated:
            stop_at = None if stop is None else (hook_name("hook_resid_pre", start) if stop == start
                                                 else self._stop_hook(stop))
            module = _module_for(self, start_graph(self, hook_name("hook_resid_pre", start), stop_at),
                                 "StartedGraphModule")
            self._truncated[key] = (module, reads_tokens(module.graph))
        return self._truncated[key]

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

    def _bind_norms(self) -> None:
        """Point each norm core at its HF module, so ``gm.ln_final(x)`` computes HF's final norm (cores.py)."""
        from .cores import _NormCore
        for module in self.modules():
            if isinstance(module, _NormCore) and module.hf_path:
                module.bind_hf(self.hf.get_submodule(module.hf_path))

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
                 level: int | None = None, prepend: bool = False) -> list[HookHandle]:
        """Attach ``hook(tensor, hook=HookPoint)`` to one hook point or to every name a filter accepts.
        (``level``: TransformerLens's context level, accepted for its signature; fxbridge removes hooks by handle.)"""
        return [hp.add_hook(hook, dir=dir, is_permanent=is_permanent, prepend=prepend) for hp in self._select(name)]

    def reset_hooks(self, clear_contexts: bool = True, direction: str = "both", including_permanent: bool = False,
                    level: int | None = None) -> None:
        """Remove hooks (TransformerLens's signature): all but permanent ones unless ``including_permanent``;
        ``clear_contexts`` also empties every ``hook.ctx``."""
        if direction not in ("fwd", "bwd", "both"):
            raise ValueError(f"direction must be 'fwd', 'bwd' or 'both', got {direction!r}")
        for hp in self.hook_dict.values():
            hp.remove_hooks(direction, including_permanent=including_permanent)
            if clear_contexts:
                hp.clear_context()

    def clear_contexts(self) -> None:
        """Empty every hook point's ``ctx`` dict."""
        for hp in self.hook_dict.values():
            hp.clear_context()

    @contextlib.contextmanager
    def hooks(self, fwd_hooks: Iterable = (), bwd_hooks: Iterable = (), reset_hooks_end: bool = True,
              clear_contexts: bool = False):
        """Attach hooks for the ``with`` block; they are removed at its end, also when something raises
        (``clear_contexts``: and every ``hook.ctx`` is emptied)."""
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
            if clear_contexts:
                self.clear_contexts()

    def run_with_hooks(self, *args, fwd_hooks: Sequence = (), bwd_hooks: Sequence = (), reset_hooks_end: bool = True,
                       clear_contexts: bool = False, **kwargs) -> Any:
        """Forward with temporary hooks. Backward hooks attached here still run in a later ``.backward()``."""
        with self.hooks(fwd_hooks, bwd_hooks, reset_hooks_end, clear_contexts):
            return self(*args, **kwargs)

    def run_with_cache(self, *args, names_filter=None, device=None, remove_batch_dim: bool = False,
                       incl_bwd: bool = False, reset_hooks_end: bool = True, clear_contexts: bool = False,
                       pos_slice=None, return_cache_object: bool = True, **kwargs):
        """Forward, storing the activation of every hook point ``names_filter`` selects (one entry each).

        ``incl_bwd=True`` (TransformerLens): the output must be a scalar (``return_type="loss"``); its backward
        runs here and the cache also holds each selected activation's gradient under ``<name>_grad``.
        ``pos_slice`` (TransformerLens's: an int, a (start, stop[, step]) tuple, a slice or indices) keeps only those
        positions of each activation (the query positions of scores and patterns)."""
        names = self._cache_names(names_filter)
        store: dict[str, torch.Tensor] = {}

        def make_saver(key: str, prefix: str = ""):
            pos_dim = _position_dim(key)

            def save(tensor, hook):
                t = tensor.detach()
                if device is not None:
                    t = t.to(device)
                if remove_batch_dim:
                    t = t[0]
                if pos_slice is not None and t.dim() >= -pos_dim:
                    t = slice_dim(t, pos_slice, pos_dim)
                store[prefix + key] = t
            return save

        fwd = [(name, make_saver(name)) for name in names]
        bwd = [(name, make_saver(name + "_grad")) for name in names] if incl_bwd else []
        with self.hooks(fwd, bwd, reset_hooks_end=reset_hooks_end, clear_contexts=clear_contexts):
            out = self(*args, **kwargs)
            if incl_bwd:
                if not isinstance(out, torch.Tensor) or out.numel() != 1 or not out.requires_grad:
                    raise ValueError("run_with_cache(incl_bwd=True) runs backward from the output, which must be a "
                                     "scalar that requires grad: pass return_type='loss' (and leave grad enabled)")
                out.backward()
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


def _position_dim(name: str) -> int:
    """The position dim of a hook's activation, counted from the end: the first ``S`` of its table shape (the query
    positions of scores), -2 where the table does not know the name (as TransformerLens's default)."""
    shape = shape_of(name.removesuffix("_grad")) or ()
    return shape.index("S") - len(shape) if "S" in shape else -2


@torch.compiler.disable  # graph surgery, run once per cut: never worth dynamo's tracing (under gm.compile())
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
    return _module_for(gm, graph, "TruncatedGraphModule")


@torch.compiler.disable
def _module_for(gm: fx.GraphModule, graph: fx.Graph, class_name: str) -> fx.GraphModule:
    """A GraphModule running ``graph`` over gm's own modules and weights (nothing copied); dead code removed."""
    module = fx.GraphModule(gm, graph, class_name=class_name)
    for name, child in gm.named_children():
        setattr(module, name, child)
    module.graph.eliminate_dead_code(is_impure_node=_impure)
    module.recompile()
    _quiet_errors(type(module))
    return module


def _impure(node: fx.Node) -> bool:
    """fx's purity test, except that an inference dropout (``train=False``, an identity) is pure: unused, it goes."""
    if node.op == "call_function" and node.target is torch.ops.aten.dropout.default and node.args[2:3] == (False,):
        return False
    return node.is_impure()


def _quiet_errors(cls) -> None:
    """Plain ``nn.Module`` calls: fx's wrapper prints ~25 lines of generated code to stderr for every exception
    raised inside the graph, even one the caller catches. The traceback already names the failing line."""
    cls.__call__ = torch.nn.Module.__call__


def _retrace(hf_model, options: dict, tokenizer=None):
    from ..pipeline import trace
    return trace(hf_model, tokenizer=tokenizer, **options)
