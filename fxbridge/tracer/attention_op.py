"""The attention boundary: an opaque custom op that HF's attention modules call during capture.

Transformers v5 routes every attention module through ``AttentionInterface`` with the query, key and value
*after* q/k norms and rotary embeddings and *before* any repeat to the query heads, plus the additive mask and
the scaling / softcap of that layer, and the learned per-head sink logits where the model has them (gpt_oss
``s_aux``: one more softmax column per head, dropped after the softmax). fxbridge registers an implementation named ``"fxbridge"`` that calls the
custom op ``fxbridge::attention``; torch.export keeps a custom op as one node, so the captured graph holds one
node per attention call with exactly the quantities TransformerLens hooks (rot_q, rot_k, v, the mask, the
scale). ``passes/hook_attention.py`` later replaces that node by an ``AttentionCore`` module.

``AttentionCall`` is how the rest of fxbridge reads and writes such a node (``call.k``, ``call.with_layer(i)``),
and the AttentionCore call that replaces it; nothing else knows the op's argument positions.

The HF model is not modified: ``capture_attention`` switches ``config._attn_implementation`` for the
duration of the capture only and restores it (HF's own ``set_attn_implementation`` does the same switch).
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
from torch import fx
from transformers.masking_utils import AttentionMaskInterface, eager_mask
from transformers.modeling_utils import AttentionInterface

from ..runtime.attention import eager_attention

IMPLEMENTATION = "fxbridge"


@torch.library.custom_op("fxbridge::attention", mutates_args=())
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor], scaling: float,
              softcap: Optional[float], layer_idx: int, sinks: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Opaque attention node used only while capturing; computes HF eager attention."""
    return eager_attention(q, k, v, mask, scaling, softcap, sinks=sinks)


@attention.register_fake
def _attention_fake(q, k, v, mask, scaling, softcap, layer_idx, sinks=None):
    batch, heads, seq, _ = q.shape
    return q.new_empty(batch, seq, heads, v.shape[-1])


ATTENTION_OP = torch.ops.fxbridge.attention.default
_CORE_META = "fxbridge_attention"  # on an AttentionCore call: (scaling, softcap, layer_idx) of the call it replaced
_INPUTS = ("q", "k", "v", "mask", "sinks")  # the tensor inputs, in AttentionCore.forward's order


@dataclass(frozen=True)
class AttentionCall:
    """One attention call of a graph: an ``fxbridge::attention`` node, or the ``AttentionCore`` call replacing it.

    q [B,H,Sq,dh] (after q norm and RoPE), k / v [B,Hkv,Sk,dh] (before any repeat), the additive mask (or None),
    and the layer's scale, attention softcap and index; ``sinks`` [H] the learned sink logit of each head (gpt_oss),
    or None. ``node`` is the graph node read (None for a new call).
    """

    q: fx.Node
    k: fx.Node
    v: fx.Node
    mask: Optional[fx.Node]
    scaling: float
    softcap: Optional[float]
    layer_idx: int
    sinks: Optional[fx.Node] = None
    node: Optional[fx.Node] = dataclasses.field(default=None, compare=False)

    @staticmethod
    def is_op(node: fx.Node) -> bool:
        return node.op == "call_function" and node.target is ATTENTION_OP

    @staticmethod
    def is_core(node: fx.Node) -> bool:
        return node.op == "call_module" and _CORE_META in node.meta

    @classmethod
    def of(cls, node: fx.Node) -> "AttentionCall":
        if cls.is_op(node):
            return cls(*node.args, node=node)
        if cls.is_core(node):
            q, k, v, mask, *sinks = node.args
            return cls(q, k, v, mask, *node.meta[_CORE_META], sinks=sinks[0] if sinks else None, node=node)
        raise ValueError(f"{node.name} ({node.op} {node.target}) is not an attention call")

    @classmethod
    def find(cls, graph: fx.Graph) -> list["AttentionCall"]:
        """The graph's ``fxbridge::attention`` nodes, in graph order."""
        return [cls.of(n) for n in graph.find_nodes(op="call_function", target=ATTENTION_OP)]

    @property
    def args(self) -> tuple:
        """The op's positional arguments (``sinks`` only where the call has them)."""
        base = (self.q, self.k, self.v, self.mask, self.scaling, self.softcap, self.layer_idx)
        return base if self.sinks is None else (*base, self.sinks)

    def inputs(self) -> dict[str, Optional[fx.Node]]:
        """{"q", "k", "v", "mask"} (and "sinks" where the call has them) -> the node fed there."""
        return {role: getattr(self, role) for role in _INPUTS if role != "sinks" or self.sinks is not None}

    def roles_of(self, value: fx.Node) -> set[str]:
        """Which of q, k, v, mask ``value`` is fed as."""
        return {role for role, node in self.inputs().items() if node is value}

    def replace(self, **changes) -> "AttentionCall":
        return dataclasses.replace(self, **changes)

    def with_layer(self, layer_idx: int) -> "AttentionCall":
        return self.replace(layer_idx=layer_idx)

    def emit(self, graph: fx.Graph) -> fx.Node:
        """A new ``fxbridge::attention`` node for this call (at the graph's insertion point)."""
        return graph.call_function(ATTENTION_OP, self.args)

    def emit_core(self, graph: fx.Graph, target: str) -> fx.Node:
        """A call of the AttentionCore module at ``target`` with this call's inputs (it holds scale and softcap)."""
        node = graph.call_module(target, tuple(self.inputs().values()))
        node.meta[_CORE_META] = (self.scaling, self.softcap, self.layer_idx)
        return node


def _hf_attention_function(module, query, key, value, attention_mask, dropout=0.0, scaling=None, softcap=None,
                           **kwargs):
    """The function registered in HF's AttentionInterface under the name ``"fxbridge"``."""
    sinks = kwargs.get("s_aux")
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    layer_idx = getattr(module, "layer_idx", None)
    out = torch.ops.fxbridge.attention(query, key, value, attention_mask, float(scaling),
                                       None if softcap is None else float(softcap),
                                       -1 if layer_idx is None else int(layer_idx), sinks)
    return out, None


AttentionInterface.register(IMPLEMENTATION, _hf_attention_function)
AttentionMaskInterface.register(IMPLEMENTATION, eager_mask)


def _configs(model):
    seen = []
    for module in model.modules():
        cfg = getattr(module, "config", None)
        if cfg is not None and all(cfg is not c for c in seen):
            seen.append(cfg)
            for sub in getattr(cfg, "sub_configs", {}) or {}:
                sub_cfg = getattr(cfg, sub, None)
                if sub_cfg is not None and all(sub_cfg is not c for c in seen):
                    seen.append(sub_cfg)
    return seen


@contextlib.contextmanager
def capture_attention(model):
    """Route the model's attention through ``fxbridge::attention`` while the block runs, then restore."""
    saved = [(cfg, cfg._attn_implementation) for cfg in _configs(model)]
    try:
        for cfg, _ in saved:
            cfg._attn_implementation = IMPLEMENTATION
        yield
    finally:
        for cfg, impl in saved:
            cfg._attn_implementation = impl
