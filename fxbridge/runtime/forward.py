"""TransformerLens's forward semantics around the traced graph: inputs, return types, loss, partial forwards.

``gm(input, return_type="logits", loss_per_token=False, prepend_bos=None, padding_side=None, start_at_layer=None,
tokens=None, attention_mask=None, position_ids=None, stop_at_layer=None)`` is legacy HookedTransformer's forward:
- ``input``: token ids [B,S] (or [S]) or a string / list of strings (tokenized with ``gm.to_tokens``: a padded
  batch gets its attention mask and the mask-derived positions HF's ``generate`` and TransformerLens use);
- token ids run with HF's defaults (an all-ones mask, positions ``0..S-1``) unless the caller passes
  ``attention_mask`` / ``position_ids``, so ``gm(ids, attention_mask=m)`` equals HF's ``model(ids, attention_mask=m)``
  (TransformerLens derives positions from any mask it is given; fxbridge never guesses a mask from token values);
- ``return_type``: ``"logits"``, ``"loss"`` (TL's ``lm_cross_entropy_loss``, HF's ``labels=`` loss on unpadded
  input), ``"both"`` (an ``Output(logits, loss)`` named tuple) or ``None``;
- ``stop_at_layer=k`` in ``[-n_layers, n_layers]`` returns the residual stream entering block k (``n_layers``: the
  last block's output) and computes nothing after it; ``start_at_layer=k`` takes that residual as ``input`` and runs
  blocks k onward (a copy of the graph cut at ``blocks.k.hook_resid_pre``, built once per k and kept).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import fx

RETURN_TYPES = ("logits", "loss", "both", None)
_VIEW_OPS = {torch.ops.aten.view.default, torch.ops.aten.reshape.default, torch.ops.aten.unsqueeze.default,
             torch.ops.aten.expand.default, torch.ops.aten.slice.Tensor}
_SIZE_OPS = {torch.ops.aten.sym_size.int, torch.ops.aten.sym_numel.default, torch.ops.aten.sym_stride.int}


class Output(NamedTuple):
    """``return_type="both"``: TransformerLens's named tuple."""

    logits: torch.Tensor
    loss: torch.Tensor


def lm_cross_entropy_loss(logits: torch.Tensor, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None,
                          per_token: bool = False) -> torch.Tensor:
    """TransformerLens's next-token loss: mean of -log p(token_{t+1}) over positions whose token and next token are
    unmasked; ``per_token=True`` gives the [B, S-1] values (0 where masked)."""
    log_probs = F.log_softmax(logits, dim=-1)
    predicted = log_probs[..., :-1, :].gather(dim=-1, index=tokens[..., 1:, None])[..., 0]
    if attention_mask is not None:
        if attention_mask.shape != tokens.shape:
            raise ValueError(f"attention_mask {tuple(attention_mask.shape)} and tokens {tuple(tokens.shape)} must "
                             "have the same shape")
        keep = torch.logical_and(attention_mask[:, :-1].bool(), attention_mask[:, 1:].bool())
        predicted = predicted.masked_fill(~keep, 0.0)
        n_tokens = keep.sum()
    else:
        n_tokens = predicted.numel()
    if per_token:
        return -predicted
    return -predicted.sum() / n_tokens


def check_return_type(return_type) -> None:
    if return_type not in RETURN_TYPES:
        raise ValueError(f"return_type must be one of {', '.join(map(repr, RETURN_TYPES))}; got {return_type!r}")


def model_output(logits, tokens, attention_mask, return_type, loss_per_token: bool):
    if return_type == "logits":
        return logits
    if return_type is None:
        return None
    loss = lm_cross_entropy_loss(logits, tokens, attention_mask, per_token=loss_per_token)
    return loss if return_type == "loss" else Output(logits, loss)


_HF_ONLY = {"past_key_values": "generation with a KV cache is not part of the traced forward",
            "past_kv_cache": "generation with a KV cache is not part of the traced forward",
            "inputs_embeds": "the graph starts from token ids; to feed a residual stream use start_at_layer=0",
            "labels": "use return_type='loss' (TransformerLens's loss; equal to HF's labels= loss on unpadded input)",
            "use_cache": "the traced forward keeps no cache",
            "shortformer_pos_embed": "no supported family is a shortformer"}


def unsupported_arguments(kwargs: dict) -> None:
    reasons = "; ".join(f"{k}: {_HF_ONLY[k]}" for k in sorted(kwargs) if k in _HF_ONLY)
    raise TypeError(f"the traced module does not take {', '.join(sorted(kwargs))}. It takes input (tokens or "
                    "text), return_type, loss_per_token, prepend_bos, padding_side, attention_mask, position_ids, "
                    "start_at_layer, tokens, stop_at_layer" + (f" ({reasons})" if reasons else ""))


def check_input_ids(input) -> torch.Tensor:
    if isinstance(input, torch.Tensor):
        if input.is_floating_point() or input.is_complex() or input.dtype == torch.bool:
            raise TypeError(f"token ids must be an integer tensor [batch, pos], got dtype {input.dtype} (a residual "
                            "stream goes in with start_at_layer=)")
        if input.dim() not in (1, 2):
            raise ValueError(f"token ids must be [batch, pos] or [pos], got shape {tuple(input.shape)}")
        return input
    raise TypeError(f"the input is token ids (an integer tensor [batch, pos]), a string or a list of strings; "
                    f"got {type(input).__name__}")


def check_mask(mask, ids: torch.Tensor) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"attention_mask must be a tensor [batch, pos], got {type(mask).__name__}")
    if mask.dim() == 1 and ids.shape[0] == 1:
        mask = mask.unsqueeze(0)
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask has shape {tuple(mask.shape)}, input_ids {tuple(ids.shape)}; they must "
                         "match")
    return mask.to(ids.device)


def check_positions(position_ids, ids: torch.Tensor) -> torch.Tensor:
    if not isinstance(position_ids, torch.Tensor) or position_ids.is_floating_point():
        raise TypeError("position_ids must be an integer tensor [batch, pos]")
    if position_ids.dim() == 1:
        position_ids = position_ids.unsqueeze(0)
    if position_ids.shape[-1] != ids.shape[1] or position_ids.shape[0] not in (1, ids.shape[0]):
        raise ValueError(f"position_ids has shape {tuple(position_ids.shape)}, input_ids {tuple(ids.shape)}; "
                         "they must match (a batch of 1 is broadcast)")
    return position_ids.to(ids.device).expand(ids.shape)


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """HF ``generate``'s positions for a padded batch: each row counts its unmasked tokens from 0 (pads get 1)."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 1)


def counted_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """The positions HF's forward derives from the mask where it does so itself (OPT): each row counts its unmasked
    tokens from 0, pads get -1 (``cumsum(mask) * mask - 1``; the same as ``positions_from_mask`` on real tokens)."""
    mask = attention_mask.long()
    return mask.cumsum(-1) * mask - 1


def layer_index(layer, n_layers: int, what: str, *, allow_end: bool) -> int:
    """``layer`` as an index in ``[0, n_layers]`` (``allow_end``) or ``[0, n_layers)``; negatives count from the end."""
    import operator
    try:
        if isinstance(layer, bool):  # True == 1 would pass for an index
            raise TypeError
        layer = operator.index(layer)  # ints, numpy ints, 0-d integer tensors; not 1.0, 0.5 or "1"
    except TypeError:
        raise TypeError(f"{what} must be an int layer index (or None), got {type(layer).__name__} {layer!r}") from None
    top = n_layers if allow_end else n_layers - 1
    if not -n_layers <= layer <= top:
        raise ValueError(f"{what} must be in [-{n_layers}, {top}], got {layer}")
    return layer + n_layers if layer < 0 else layer


@torch.compiler.disable  # graph surgery (under gm.compile(), dynamo would trace it)
def start_graph(gm: fx.GraphModule, resid_pre: str, stop_at: str | None) -> fx.Graph:
    """A copy of gm's graph whose hook node ``resid_pre`` reads a new first input ``residual`` (what came before it
    is dead: the caller removes it), ending at the hook node ``stop_at`` when given."""
    graph = fx.Graph()
    residual = graph.placeholder("residual")
    env: dict[fx.Node, fx.Node] = {}
    found = False
    for node in gm.graph.nodes:
        if node.op == "output":
            graph.output(env[node.args[0]])
            break
        if node.op == "call_module" and node.target == resid_pre:
            env[node] = graph.call_module(node.target, (residual,))
            env[node].meta.update(node.meta)
            found = True
        else:
            env[node] = graph.node_copy(node, lambda n: env[n])
        if stop_at is not None and node.op == "call_module" and node.target == stop_at:
            graph.output(env[node])
            break
    if not found:
        raise KeyError(f"{resid_pre!r} is not a node of the graph")
    return graph


def reads_tokens(graph: fx.Graph) -> bool:
    """Whether the token ids feed a computation in ``graph`` (not only its sizes)."""
    ids = next(n for n in graph.nodes if n.op == "placeholder" and n.name == "input_ids")
    todo = [ids]
    while todo:  # views of the ids (GPT-2's input_ids.view(-1, S)) read them only where something else uses them
        for user in todo.pop().users:
            if user.op == "call_function" and user.target in _VIEW_OPS:
                todo.append(user)
            elif not (user.op == "call_function" and user.target in _SIZE_OPS):
                return True
    return False
