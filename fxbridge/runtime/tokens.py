"""Tokenization in TransformerLens's API: ``to_tokens``, ``to_str_tokens``, ``to_string``, ``to_single_token``.

Semantics are legacy ``HookedTransformer``'s (what TL notebooks and SAELens are written against):
- ``gm.set_tokenizer(tok)`` keeps a tokenizer that prepends BOS itself where it can (TL's
  ``get_tokenizer_with_bos``: a copy with ``add_bos_token=True``, built in-process instead of reloaded from the
  hub), fills a missing pad / bos token from eos, and records ``cfg.tokenizer_prepends_bos``.
- ``prepend_bos=None`` means ``cfg.default_prepend_bos`` (True except for the families TL turns it off for);
  where the tokenizer adds BOS itself and BOS is not wanted it is stripped, where it does not and BOS is wanted
  the BOS text is prepended, as TL does. ``padding_side=None`` means ``gm.tokenizer.padding_side``.
- ``_tokenize_input`` is what the forward calls for string input: tokens on the module's device and TL's
  attention mask (``utils.get_attention_mask``), None where nothing was padded.
"""
from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np
import torch

from ..errors import UsageError
from .tl_config import HookedConfig, config_for

# Families whose tokenizer TL keeps as given (set_tokenizer skips get_tokenizer_with_bos for them).
KEEP_TOKENIZER_AS_GIVEN = frozenset({"OlmoForCausalLM", "OlmoeForCausalLM", "Olmo2ForCausalLM"})
_SIDES = ("left", "right")


class TokensMixin:
    """The tokenizer-facing half of the TransformerLens API on a traced module (``gm.tokenizer``, ``gm.to_tokens``)."""

    tokenizer = None  # a transformers tokenizer once set (set_tokenizer, trace(..., tokenizer=), from_pretrained)

    # ------------------------------------------------------------------------------------------------- config
    @property
    def cfg(self) -> HookedConfig:
        """TransformerLens's config fields (``n_layers``, ``d_head``, ``act_fn``, ``device``...), built once."""
        cfg = self.__dict__.get("_fxb_cfg")
        if cfg is None:
            try:
                cfg = config_for(self)
            except AttributeError as exc:  # inside a property nn.Module would report "no attribute 'cfg'"
                raise RuntimeError(f"building gm.cfg failed: {exc}") from exc
            self.__dict__["_fxb_cfg"] = cfg
        return cfg

    def set_tokenizer(self, tokenizer, default_padding_side: str | None = None) -> None:
        """Use ``tokenizer`` for string input, as TL's ``set_tokenizer``: a BOS-prepending variant where the tokenizer
        allows one, pad and bos tokens filled from eos where missing, ``cfg.tokenizer_prepends_bos`` recorded.
        ``default_padding_side`` ("left" / "right") sets the tokenizer's padding side; None keeps its own."""
        from transformers import PreTrainedTokenizerBase
        if not isinstance(tokenizer, PreTrainedTokenizerBase):
            raise UsageError(f"set_tokenizer takes a transformers tokenizer (PreTrainedTokenizerBase, e.g. from "
                             f"AutoTokenizer.from_pretrained(path)), got {type(tokenizer).__name__}")
        if default_padding_side not in (None, *_SIDES):
            raise UsageError(f"default_padding_side must be 'left', 'right' or None, got {default_padding_side!r}")
        keep = type(self.hf).__name__ in KEEP_TOKENIZER_AS_GIVEN
        tok = tokenizer if keep else tokenizer_with_bos(tokenizer)
        if default_padding_side is not None:
            tok.padding_side = default_padding_side
        if tok.padding_side is None:
            tok.padding_side = "right"
        prepends = len(tok.encode("")) > 0  # before the fills below, as TL
        if tok.eos_token is None:
            tok.eos_token = "<|endoftext|>"
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        if tok.bos_token is None:
            tok.bos_token = tok.eos_token
        self.tokenizer = tok
        cfg = self.cfg
        cfg.tokenizer_prepends_bos = prepends
        cfg.tokenizer_name = getattr(tok, "name_or_path", None) or cfg.tokenizer_name

    # ----------------------------------------------------------------------------------------- text -> tokens
    def to_tokens(self, input: str | Sequence[str], prepend_bos: bool | None = None, padding_side: str | None = None,
                  move_to_device: bool = True, truncate: bool = True) -> torch.Tensor:
        """Token ids [batch, pos] of a string or a list of strings, padded; BOS per ``prepend_bos`` (default
        ``cfg.default_prepend_bos``); truncated to ``cfg.n_ctx`` unless ``truncate=False``."""
        return self._encode(input, prepend_bos, padding_side, move_to_device, truncate)[0]

    def _tokenize_input(self, input, prepend_bos: bool | None = None, padding_side: str | None = None):
        """``(tokens [B,S] on the module's device, attention_mask or None)`` for string / list-of-string input (the
        forward's path). The mask is TL's ``utils.get_attention_mask``; None where nothing was padded."""
        if self.tokenizer is None:
            raise UsageError(
                f"the traced module got {type(input).__name__} input but has no tokenizer: pass one with "
                "fxbridge.trace(model, tokenizer=tok) or gm.set_tokenizer(tok), or load the model with "
                "fxbridge.from_pretrained(name_or_path), which loads its tokenizer too")
        tokens, padded = self._encode(input, prepend_bos, padding_side, True, True)
        if not padded:
            return tokens, None
        mask = attention_mask_for(self.tokenizer, tokens, self._prepend(prepend_bos), self._side(padding_side))
        return tokens, mask

    def _encode(self, input, prepend_bos, padding_side, move_to_device: bool, truncate: bool):
        """(tokens, whether the tokenizer padded any row)."""
        tok = self._require_tokenizer("to_tokens")
        if not (isinstance(input, str) or (isinstance(input, (list, tuple)) and input
                                           and all(isinstance(s, str) for s in input))):
            raise UsageError(f"to_tokens takes a string or a non-empty list of strings, got "
                             f"{_describe(input)}; token tensors go to the model directly")
        prepend, side = self._prepend(prepend_bos), self._side(padding_side)
        prepends = self.cfg.tokenizer_prepends_bos
        text = list(input) if isinstance(input, tuple) else input
        if prepend and not prepends and tok.bos_token is not None:
            text = tok.bos_token + text if isinstance(text, str) else [tok.bos_token + s for s in text]
        kwargs = {"return_tensors": "pt", "padding": True, "padding_side": side}
        if truncate and self.cfg.n_ctx:
            kwargs.update(truncation=True, max_length=self.cfg.n_ctx)
        encoded = tok(text, **kwargs)
        tokens = encoded["input_ids"]
        padded = "attention_mask" in encoded and not bool(encoded["attention_mask"].all())
        if not prepend and prepends:
            tokens = tokens_with_bos_removed(tok, tokens, side)
        if move_to_device and self.cfg.device is not None:
            tokens = tokens.to(self.cfg.device)
        return tokens, padded

    # ----------------------------------------------------------------------------------------- tokens -> text
    def to_string(self, tokens) -> str | list[str]:
        """Decode token ids: one string for [pos] (or a single id), a list of strings for [batch, pos]."""
        tok = self._require_tokenizer("to_string")
        if not isinstance(tokens, torch.Tensor):
            tokens = torch.as_tensor(np.asarray(tokens) if isinstance(tokens, np.ndarray) else tokens)
        if tokens.dim() == 2:
            return tok.batch_decode(tokens, clean_up_tokenization_spaces=False)
        if tokens.dim() <= 1:
            return tok.decode(tokens, clean_up_tokenization_spaces=False)
        raise UsageError(f"to_string takes token ids of shape [pos] or [batch, pos], got {tuple(tokens.shape)}")

    def to_str_tokens(self, input, prepend_bos: bool | None = None,
                      padding_side: str | None = None) -> list[str] | list[list[str]]:
        """Each token as its string: for a string (tokenized as ``to_tokens``), token ids [pos] / [1, pos] (tensor,
        array or list of ints), or a list of those (a list of results)."""
        tok = self._require_tokenizer("to_str_tokens")
        if isinstance(input, (list, tuple)) and not all(isinstance(t, (int, np.integer)) for t in input):
            return [self.to_str_tokens(item, prepend_bos, padding_side) for item in input]
        if isinstance(input, str):
            ids = self.to_tokens(input, prepend_bos=prepend_bos, padding_side=padding_side, move_to_device=False)[0]
        elif isinstance(input, (torch.Tensor, np.ndarray, list, tuple)):
            ids = torch.as_tensor(np.asarray(input)) if not isinstance(input, torch.Tensor) else input
            ids = ids.squeeze()  # a trivial batch dim
            if ids.dim() == 0:
                ids = ids.unsqueeze(0)
            if ids.dim() != 1:
                raise UsageError(f"to_str_tokens takes token ids of shape [pos] or [1, pos], got "
                                 f"{tuple(input.shape) if hasattr(input, 'shape') else len(input)}; pass a list of "
                                 "rows for a batch")
        else:
            raise UsageError(f"to_str_tokens takes a string, token ids (tensor, array, list of ints) or a list of "
                             f"those, got {_describe(input)}")
        return tok.batch_decode([[int(t)] for t in ids.tolist()], clean_up_tokenization_spaces=False)

    def to_single_token(self, string: str) -> int:
        """The id of a string that is exactly one token (no BOS); ``UsageError`` naming the split otherwise."""
        ids = self.to_tokens(string, prepend_bos=False, move_to_device=False).squeeze()
        if ids.dim() != 0:
            pieces = self.to_str_tokens(ids) if ids.numel() else []
            raise UsageError(f"{string!r} is not a single token: it tokenizes to {ids.numel()} tokens {pieces}; use "
                             "to_tokens for several tokens")
        return int(ids.item())

    def to_single_str_token(self, int_token: int) -> str:
        """The string of one token id."""
        if isinstance(int_token, bool) or not isinstance(int_token, (int, np.integer)):
            raise UsageError(f"to_single_str_token takes an int token id, got {_describe(int_token)}")
        return self.to_str_tokens(torch.tensor([int(int_token)]))[0]

    def get_token_position(self, single_token: str | int, input, mode: str = "first",
                           prepend_bos: bool | None = None, padding_side: str | None = None) -> int:
        """Position of ``single_token`` (a token id or a one-token string) in ``input`` (a string, or token ids
        [pos] / [1, pos]); ``mode`` "first" or "last" occurrence. Raises where it does not occur."""
        if mode not in ("first", "last"):
            raise ValueError(f"mode must be 'first' or 'last', not {mode!r}")
        if isinstance(input, str):
            tokens = self.to_tokens(input, prepend_bos=prepend_bos, padding_side=padding_side)
        else:
            tokens = torch.as_tensor(input)
        if tokens.dim() == 2:
            if tokens.shape[0] != 1:
                raise UsageError(f"get_token_position takes one sequence; tokens of shape {tuple(tokens.shape)} "
                                 "must be [1, pos] or [pos]")
            tokens = tokens[0]
        if isinstance(single_token, str):
            single_token = self.to_single_token(single_token)
        elif isinstance(single_token, torch.Tensor):
            single_token = int(single_token.item())
        indices = torch.arange(len(tokens), device=tokens.device)[tokens == single_token]
        if len(indices) == 0:
            raise UsageError(f"token {single_token} does not occur in the input ({len(tokens)} tokens)")
        return int(indices[0 if mode == "first" else -1].item())

    # ------------------------------------------------------------------------------------------------ helpers
    def _require_tokenizer(self, what: str):
        if self.tokenizer is None:
            raise UsageError(f"{what} needs a tokenizer: gm.set_tokenizer(tok), fxbridge.trace(model, tokenizer=tok) "
                             "or fxbridge.from_pretrained(name_or_path)")
        return self.tokenizer

    def _prepend(self, prepend_bos) -> bool:
        if prepend_bos is None:
            return bool(self.cfg.default_prepend_bos)
        if not isinstance(prepend_bos, bool):
            raise UsageError(f"prepend_bos must be True, False or None (cfg.default_prepend_bos), got {prepend_bos!r}")
        return prepend_bos

    def _side(self, padding_side) -> str:
        if padding_side is None:
            return getattr(self.tokenizer, "padding_side", None) or "right"
        if padding_side not in _SIDES:
            raise UsageError(f"padding_side must be 'left', 'right' or None (the tokenizer's), got {padding_side!r}")
        return padding_side


def tokenizer_with_bos(tokenizer):
    """A tokenizer that prepends BOS itself, as TL's ``get_tokenizer_with_bos``: ``tokenizer`` where it already
    does (or has no BOS token), else a copy with ``add_bos_token=True`` where the tokenizer supports that (TL
    reloads it from its path with that flag; the copy is the same tokenizer without a reload), else ``tokenizer``."""
    if tokenizer.bos_token is None or _prepends_bos(tokenizer) or getattr(tokenizer, "add_bos_token", False):
        return tokenizer
    try:
        with_bos = copy.deepcopy(tokenizer)
        with_bos.add_bos_token = True
    except (AttributeError, TypeError, ValueError):  # a tokenizer class without the flag: TL keeps it as well
        return tokenizer
    if not _prepends_bos(with_bos):
        return tokenizer
    with_bos.padding_side = tokenizer.padding_side
    return with_bos


def _prepends_bos(tokenizer) -> bool:
    ids = tokenizer.encode("")
    return len(ids) > 0 and ids[0] == tokenizer.bos_token_id


def tokens_with_bos_removed(tokenizer, tokens: torch.Tensor, padding_side: str) -> torch.Tensor:
    """Drop the BOS the tokenizer put at the start of each row (TL's ``get_tokens_with_bos_removed``): position 0
    for right padding, the first non-pad position for left padding."""
    if tokenizer.bos_token_id is None:
        return tokens
    if padding_side == "right":
        return tokens[..., 1:]
    if tokenizer.bos_token_id == tokenizer.pad_token_id:
        is_leading_pad = torch.cumsum(tokens.ne(tokenizer.pad_token_id), -1) == 0
        bos_at = is_leading_pad.sum(-1) - 1  # the BOS is the last of the leading "pads"
    else:
        bos_at = (tokens == tokenizer.bos_token_id).int().argmax(-1)
    keep = torch.ones_like(tokens, dtype=torch.bool)
    keep[torch.arange(tokens.shape[0]), bos_at] = False
    return tokens[keep].view(tokens.shape[0], tokens.shape[1] - 1)


def attention_mask_for(tokenizer, tokens: torch.Tensor, prepend_bos: bool, padding_side: str) -> torch.Tensor:
    """TL's ``utils.get_attention_mask``: 0 on the trailing (right padding) or leading (left padding) pad tokens,
    except a BOS that is also the pad token, which stays attended."""
    mask = torch.ones_like(tokens)
    not_pad = tokens.ne(tokenizer.pad_token_id)
    if padding_side == "right":
        mask[torch.cumsum(not_pad.flip(-1), -1).flip(-1) == 0] = 0
        return mask
    is_leading_pad = torch.cumsum(not_pad, -1) == 0
    mask[is_leading_pad] = 0
    if prepend_bos and tokenizer.bos_token_id == tokenizer.pad_token_id:
        bos_at = is_leading_pad.sum(-1) - 1
        rows = torch.arange(tokens.shape[0], device=tokens.device)
        mask[rows[bos_at >= 0], bos_at[bos_at >= 0]] = 1
    return mask


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    if isinstance(value, (list, tuple)):
        return f"a {type(value).__name__} of {len(value)} ({', '.join(sorted({type(v).__name__ for v in value}))})"
    return f"{type(value).__name__} {value!r}"
