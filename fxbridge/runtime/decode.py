"""KV-cached decoding on a traced module: companion graphs derived once from its graph (no re-trace, no capture).

Where the KV cache lives, and why
---------------------------------
In a *decode graph*, as explicit inputs and outputs, not as state inside the attention cores. The decode graph is the
traced graph with ``k = cat([past_k, k_new], dim=2)`` (and the same for v) in front of every attention core, the
cores' masks as inputs, and every layer's concatenated k / v returned beside the logits; the next step passes them
back in. That choice gives:
- an edit at ``hook_k`` / ``hook_v`` / ``hook_rot_k`` during a step is what is cached (the cache sits downstream of
  every hook point), as in TransformerLens;
- nothing is left behind when a generation stops or a hook raises (there is no module state to reset), and two
  generations (threads, deep copies) never share a cache;
- one call runs every layer: no per-layer Python loop beyond the hook dispatch the graph does anyway, and the step
  is one plain fx graph (issue 14's ``torch.compile`` takes it whole);
- k / v values that several cores read (Gemma 4's KV sharing) are cached once, as HF shares that cache.
A prefill graph is the same without the past inputs (the prompt's k / v are returned as they are).

Masks. The traced graph builds its attention masks (causal, padding, sliding window, chunks, ALiBi) from the 2-D
attention mask, over the whole sequence. A decode step needs the rows of its new positions over all keys: the last
rows of the masks the graph builds for the whole sequence. The *mask graph* is the mask-building part of the traced
graph, copied; it runs on the whole sequence's mask and the rows of the new positions go to the decode graph. So a
step attends exactly as the uncached forward over the whole sequence does, for every mask the capture knows.

Positions. ``position_ids`` is an input of the graph (tracer/capture.py) and gets the new positions. A position
counter the graph computes itself from the sequence length (``arange(S)``, HF's ``cache_position``: Llama 4's
attention temperature reads it) is shifted by the number of cached positions.
"""
from __future__ import annotations

import types
from dataclasses import dataclass

import torch
from torch import fx

from ..errors import UsageError

aten = torch.ops.aten
_ARANGES = {aten.arange.default, aten.arange.start, aten.arange.start_step}
_OFFSET = "fxb_cached_len"


@dataclass
class Decoder:
    """The three companion graphs of a traced module, and what they read.

    - ``masks(*inputs over the whole sequence) -> (mask_0, ...)``;
    - ``prefill(*inputs, *mask rows, cached_len) -> (logits, (kv_0, ...))``;
    - ``step(*inputs of the new positions, *mask rows, cached_len, *past kv) -> (logits, (kv_0, ...))``.
    ``inputs`` are the traced graph's placeholders (input_ids, attention_mask[, position_ids]).
    """

    masks: fx.GraphModule
    prefill: fx.GraphModule
    step: fx.GraphModule
    static: fx.GraphModule
    inputs: tuple[str, ...]
    n_kv: int
    static_reason: str | None = None  # why a static cache cannot serve this graph (None: it can)
    _compiled: dict | None = None  # torch.compile options (as a sorted tuple) -> the compiled static step

    def run(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor | None, n_new: int,
            past: tuple | None):
        """(logits of the last ``n_new`` positions, the k / v of every position) for the sequence ``ids`` [B,T]
        (its whole ``mask`` and ``positions``), of which ``past`` caches the first T - n_new positions."""
        full = _inputs(self.inputs, ids, mask, positions)
        total = ids.shape[1]
        rows = tuple(_new_rows(m, n_new, total) for m in self.masks(*full))
        new = tuple(x[:, total - n_new:] for x in full)
        cached = torch.tensor(total - n_new, device=ids.device)
        if past is None:
            return self.prefill(*new, *rows, cached)
        return self.step(*new, *rows, cached, *past)


    # ---------------------------------------------------------------------- static cache (compiled decoding)
    def start_static(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor | None, length: int):
        """Prefill the prompt ``ids`` [B,P] into a static cache of ``length`` positions; returns (logits of the prompt,
        state). The masks of all ``length`` positions are built once (generated tokens extend the mask with ones) and
        a step takes its row: a causal mask's rows do not depend on the positions after them."""
        if self.static_reason is not None:
            raise UsageError(self.static_reason)
        batch, prompt = ids.shape
        full_mask = torch.cat([mask, mask.new_ones(batch, length - prompt)], dim=1)
        full_positions = None
        if positions is not None:
            full_positions = torch.cat([positions, positions[:, -1:] + torch.arange(
                1, length - prompt + 1, device=positions.device)], dim=1)
        full_ids = torch.cat([ids, ids.new_zeros(batch, length - prompt)], dim=1)  # the mask graph reads their shape
        masks = tuple(self.masks(*_inputs(self.inputs, full_ids, full_mask, full_positions)))
        for m in masks:
            if m.dim() < 2 or m.shape[-2:] != (length, length):
                raise UsageError(f"an attention mask of the traced graph has shape {tuple(m.shape)}, not [..., "
                                 f"{length}, {length}]: a static cache needs causal masks; generate without compile")
        rows = tuple(m[..., :prompt, :prompt] for m in masks)
        logits, kv = self.prefill(*_inputs(self.inputs, ids, mask, positions), *rows,
                                  torch.tensor(0, device=ids.device))
        cache = []
        for value in kv:
            buffer = value.new_zeros((*value.shape[:2], length, *value.shape[3:]))
            buffer[:, :, :prompt] = value
            cache.append(buffer)
        return logits, {"masks": masks, "mask": full_mask, "positions": full_positions, "cache": tuple(cache)}

    def static_step(self, state: dict, new_ids: torch.Tensor, position: int, options: dict | None = None):
        """Logits [B,1,V] of ``new_ids`` [B,1] at sequence position ``position``, its k / v written into the cache,
        by the static step compiled with ``options`` (``torch.compile``'s keywords; compiled once per options,
        recompiled by dynamo when the batch size, the cache length or the set of attached hooks changes)."""
        key = tuple(sorted((options or {}).items()))
        if self._compiled is None:
            self._compiled = {}
        if key not in self._compiled:
            self._compiled[key] = torch.compile(self.static, **{"dynamic": False, **(options or {})})
        compiled = self._compiled[key]
        rows = tuple(m[..., position:position + 1, :].contiguous() for m in state["masks"])
        index = torch.tensor([position], device=new_ids.device)
        values = {"input_ids": new_ids.contiguous(), "attention_mask": state["mask"][:, position:position + 1].contiguous(),
                  "position_ids": None if state["positions"] is None else
                  state["positions"][:, position:position + 1].contiguous()}
        return compiled(*(values[name] for name in self.inputs), *rows, index[0], index, *state["cache"])[0]


def _inputs(names, ids, mask, positions) -> tuple:
    values = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
    return tuple(values[name] for name in names)


def _new_rows(mask: torch.Tensor, n_new: int, total: int) -> torch.Tensor:
    """The query rows of the new positions of an additive mask [..., T, T] (a row dim of 1 broadcasts); None for
    one new position that masks nothing (HF's decode step skips such a mask too, and so runs SDPA's GQA kernel)."""
    if mask.dim() < 2 or mask.shape[-1] != total or mask.shape[-2] not in (1, total):
        raise UsageError(f"an attention mask of the traced graph has shape {tuple(mask.shape)} over a sequence of "
                         f"{total}, not [..., {total}, {total}]: KV-cached decoding cannot take its rows; generate "
                         "with use_past_kv_cache=False")
    rows = mask if mask.shape[-2] == 1 else mask[..., total - n_new:, :]
    if n_new == 1 and rows.is_floating_point() and not bool(rows.any()):
        return None  # nothing masked (a decode step without padding or window): SDPA's unmasked kernel, as HF's
    return rows


def attention_calls(gm: fx.GraphModule) -> list[tuple[fx.Node, torch.nn.Module]]:
    """(node, core) for every attention core call of the graph (a module declaring ``KV_INPUTS``)."""
    calls = []
    for node in gm.graph.nodes:
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            if hasattr(type(module), "KV_INPUTS"):
                calls.append((node, module))
    return calls


@torch.compiler.disable  # graph surgery, once per module
def build_decoder(gm: fx.GraphModule) -> Decoder:
    """The decoder of ``gm`` (built once per traced module by ``gm.generate``)."""
    from .module import _module_for
    calls = attention_calls(gm)
    if not calls:
        raise UsageError("the traced graph has no attention core, so there is no k / v to cache; generate with "
                         "use_past_kv_cache=False")
    kv_nodes = list(dict.fromkeys(node.args[i] for node, core in calls for i in core.KV_INPUTS))
    mask_nodes = list(dict.fromkeys(node.args[core.MASK_INPUT] for node, core in calls
                                    if node.args[core.MASK_INPUT] is not None))
    region = _ancestors(mask_nodes)
    blocked = sorted(n.target for n in region if n.op == "call_module")
    if blocked:
        raise UsageError(f"the traced graph's attention masks depend on {', '.join(blocked[:3])}, not on the inputs "
                         "alone, so the masks of a decode step cannot be computed from its inputs; generate with "
                         "use_past_kv_cache=False")
    inputs = tuple(n.name for n in gm.graph.nodes if n.op == "placeholder")

    masks = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in gm.graph.nodes:
        if node.op == "placeholder" or node in region:
            env[node] = masks.node_copy(node, lambda n: env[n])
    masks.output(tuple(env[m] for m in mask_nodes))

    counters = _position_counters(gm.graph)
    prefill = _decode_graph(gm.graph, calls, kv_nodes, mask_nodes, counters, past="none")
    step = _decode_graph(gm.graph, calls, kv_nodes, mask_nodes, counters, past="concat")
    static = _decode_graph(gm.graph, calls, kv_nodes, mask_nodes, counters, past="static")
    masks_module = _fast(_module_for(gm, masks, "MaskGraphModule"))
    return Decoder(masks=masks_module, prefill=_fast(_module_for(gm, prefill, "PrefillGraphModule")),
                   step=_fast(_module_for(gm, step, "DecodeGraphModule")),
                   static=_module_for(gm, static, "StaticDecodeGraphModule"), inputs=inputs, n_kv=len(kv_nodes),
                   static_reason=_static_reason(calls, masks_module))


def _static_reason(calls, masks: fx.GraphModule) -> str | None:
    """Why a static cache (a fixed-length buffer whose unused positions only a causal mask hides) cannot serve
    this graph, or None."""
    unmasked = [node.target for node, core in calls if node.args[core.MASK_INPUT] is None]
    if unmasked:
        return (f"{unmasked[0]} attends without a mask, so the unused positions of a static cache would be "
                "attended: generate without compile")
    for node in masks.graph.nodes:  # the mask graph may read the token ids' shape, not their values
        if node.op == "placeholder" and node.name == "input_ids" and any(
                user.target is not aten.sym_size.int for user in node.users):
            return "the traced graph's masks read the token ids, which a static cache does not know ahead: " \
                   "generate without compile"
    return None


def _ancestors(nodes) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    stack = list(nodes)
    while stack:
        node = stack.pop()
        if node not in seen:
            seen.add(node)
            stack.extend(node.all_input_nodes)
    return seen


def _position_counters(graph: fx.Graph) -> set[fx.Node]:
    """``arange`` nodes over the sequence length (HF's ``cache_position`` and the like): positions the graph counts
    itself. The sequence length is the symbol of the first placeholder's dim 1 (input_ids [B,S])."""
    first = next(n for n in graph.nodes if n.op == "placeholder")
    val = first.meta.get("val")
    if val is None or val.dim() < 2:
        return set()
    seq = str(val.shape[1])
    counters = set()
    for node in graph.nodes:
        out = node.meta.get("val")
        if node.op == "call_function" and node.target in _ARANGES and isinstance(out, torch.Tensor) \
                and out.dim() == 1 and str(out.shape[0]) == seq:
            counters.add(node)
    return counters


def _decode_graph(source: fx.Graph, calls, kv_nodes, mask_nodes, counters, *, past: str) -> fx.Graph:
    """``past``: "none" (prefill: the new k / v returned), "concat" (``cat([past, new], 2)``, returned) or "static"
    (``past.index_copy_(2, index, new)`` into fixed-length buffers, written in place; nothing returned)."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in source.nodes:
        if node.op == "placeholder":
            env[node] = graph.node_copy(node)
    mask_in = [graph.placeholder(f"fxb_mask_{i}") for i in range(len(mask_nodes))]
    offset = graph.placeholder(_OFFSET)
    index = graph.placeholder("fxb_index") if past == "static" else None
    buffers = [graph.placeholder(f"fxb_past_{i}") for i in range(len(kv_nodes))] if past != "none" else []
    mask_index = {m: i for i, m in enumerate(mask_nodes)}
    kv_index = {kv: i for i, kv in enumerate(kv_nodes)}
    cores = dict(calls)
    fed: dict[fx.Node, fx.Node] = {}  # a cached k / v node -> what the cores read (past and new, concatenated)

    def kv_value(kv: fx.Node) -> fx.Node:
        if kv not in fed:
            if past == "concat":
                fed[kv] = graph.call_function(aten.cat.default, ([buffers[kv_index[kv]], env[kv]], 2))
            elif past == "static":
                fed[kv] = graph.call_function(aten.index_copy_.default, (buffers[kv_index[kv]], 2, index, env[kv]))
            else:
                fed[kv] = env[kv]
        return fed[kv]

    for node in source.nodes:
        if node.op == "placeholder":
            continue
        if node.op == "output":
            graph.output((env[node.args[0]], () if past == "static" else tuple(fed[kv] for kv in kv_nodes)))
            break
        if node in cores:
            core = cores[node]
            args = [env[a] if isinstance(a, fx.Node) else a for a in node.args]
            for i in core.KV_INPUTS:
                args[i] = kv_value(node.args[i])
            if node.args[core.MASK_INPUT] is not None:
                args[core.MASK_INPUT] = mask_in[mask_index[node.args[core.MASK_INPUT]]]
            env[node] = graph.call_module(node.target, tuple(args), dict(node.kwargs))
            env[node].meta.update(node.meta)
            continue
        env[node] = graph.node_copy(node, lambda n: env[n])
        if node in counters:
            env[node] = graph.call_function(aten.add.Tensor, (env[node], offset))
    return graph


def _fast(module: fx.GraphModule) -> fx.GraphModule:
    """The module with fast_forward.py's executable (same code, less interpreter overhead) where it applies."""
    from .fast_forward import build_fast_forward, slots_for
    fast, targets = build_fast_forward(module, module.recompile())
    slots = slots_for(module, targets) if fast is not None else None
    if slots is not None:
        module._fxb_slots = slots
        module.forward = types.MethodType(fast, module)
    return module
