"""``gm.generate``: TransformerLens's sampling loop on the traced graph, with every hook live and a KV cache.

``gm.generate(input, max_new_tokens=10, stop_at_eos=True, eos_token_id=None, do_sample=True, top_k=None, top_p=None,
temperature=1.0, freq_penalty=0.0, use_past_kv_cache=True, attention_mask=None, prepend_bos=None, padding_side=None,
return_type="input", verbose=True, names_filter=None)`` is legacy ``HookedTransformer.generate``:
- ``input``: token ids [B,S] (or [S]), a string, or a list of strings (tokenized left-padded, as TL does);
- each step samples from the last position's logits with TL's ``sample_logits`` (temperature, frequency penalty,
  top-k or top-p); ``do_sample=False`` takes the argmax, the tokens of HF ``generate(do_sample=False)``;
- a row that produced an EOS id (``eos_token_id``, else the tokenizer's, else the HF model's generation config)
  gets that EOS id from then on; the loop stops when every row has finished or after ``max_new_tokens``;
- ``return_type``: ``"input"`` (strings for string input, else tokens), ``"str"`` or ``"tokens"``; the prompt is
  part of what is returned.
Hooks attached with ``add_hook`` / ``hooks()`` fire on every forward of the generation: the prompt's forward sees the
whole prompt, each later one only its new position ([B,1,D] residuals, [B,H,1,S_total] patterns) when the KV
cache is used (``runtime/decode.py`` says where the cache lives, and why), the whole sequence again when not.
``names_filter`` also returns the activations of every forward (a ``GenerationCache``).

Positions and masks are HF generate's: a padded batch's positions count each row's real tokens from 0
(``positions_from_mask``), and generated tokens extend the mask with ones.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import UsageError
from .cache import ActivationCache
from .forward import check_input_ids, check_mask, positions_from_mask

RETURN_TYPES = ("input", "str", "tokens")


def sample_logits(final_logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None,
                  temperature: float = 1.0, freq_penalty: float = 0.0,
                  tokens: torch.Tensor | None = None) -> torch.Tensor:
    """TransformerLens's ``utils.sample_logits``: one token per row of ``final_logits`` [B, vocab].

    ``temperature == 0`` is the argmax. Otherwise the logits are divided by the temperature, ``freq_penalty`` times
    each token's count in ``tokens`` [B, pos] is subtracted, then only the ``top_k`` largest (or the smallest set
    whose probability reaches ``top_p``) stay, and one token is drawn from the softmax."""
    if temperature == 0.0:
        return final_logits.argmax(dim=-1)
    final_logits = final_logits / temperature
    if freq_penalty > 0:
        if tokens is None or tokens.dim() != 2:
            raise ValueError("a frequency penalty needs the tokens so far (tokens= [batch, pos])")
        counts = torch.zeros_like(final_logits).scatter_add_(
            -1, tokens, torch.ones_like(tokens, dtype=final_logits.dtype))
        final_logits = final_logits - freq_penalty * counts
    if top_k is not None:
        if top_k <= 0:
            raise ValueError(f"top_k must be positive, got {top_k}")
        top_k = min(top_k, final_logits.shape[-1])
        kth = final_logits.topk(top_k, dim=-1).values[..., -1:]
        final_logits = final_logits.masked_fill(final_logits < kth, -float("inf"))
    elif top_p is not None:
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        sorted_logits, sorted_indices = torch.sort(final_logits, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative > top_p
        remove[..., 1:] = remove[..., :-1].clone()  # keep the token that crosses top_p
        remove[..., 0] = False
        final_logits = final_logits.masked_fill(remove.scatter(-1, sorted_indices, remove), -float("inf"))
    return torch.distributions.Categorical(logits=final_logits.float()).sample()


class GenerationCache(list):
    """The activations of every forward of a ``generate`` call, one ``ActivationCache`` per forward: ``[0]`` is the
    prompt's (every prompt position), ``[t]`` the forward that sampled new token t (its one new position with the KV
    cache, the whole sequence so far without it)."""

    def __init__(self, steps: Sequence[ActivationCache], cached: bool):
        super().__init__(steps)
        self.cached = cached

    def positions(self, name: str) -> torch.Tensor:
        """``name``'s activation at every position the generation ran (the prompt, then each fed token), joined
        along its position dim: [B, S_prompt + steps - 1, ...] for a residual hook. Scores and patterns, whose key
        dim grows every step, cannot be joined: read them step by step."""
        from .module import _position_dim
        first = self[0][name]
        dim = _position_dim(name) % first.dim() if first.dim() else 0
        if "attn_scores" in name or "pattern" in name:
            raise ValueError(f"{name}'s key dim grows with every step; read it per step (cache[t][{name!r}])")
        parts = [first]
        for step in self[1:]:
            value = step[name]
            parts.append(value if self.cached else value.narrow(dim, value.shape[dim] - 1, 1))
        return torch.cat(parts, dim=dim)


class GenerateMixin:
    """``generate`` for HookedGraphModule (module docstring)."""

    def generate(self, input="", max_new_tokens: int = 10, stop_at_eos: bool = True,
                 eos_token_id: int | Sequence[int] | None = None, do_sample: bool = True, top_k: int | None = None,
                 top_p: float | None = None, temperature: float = 1.0, freq_penalty: float = 0.0,
                 use_past_kv_cache: bool = True, attention_mask: torch.Tensor | None = None,
                 prepend_bos: bool | None = None, padding_side: str | None = None, return_type: str | None = "input",
                 verbose: bool = True, *, names_filter=None, compile: bool | dict | None = None):
        """Sample up to ``max_new_tokens`` tokens with the hooks live (TransformerLens's ``generate``; see
        ``runtime/generate.py``). With ``names_filter`` it returns ``(output, GenerationCache)``. ``compile=True``
        (the default on a module after ``gm.compile()``) decodes with a static KV cache and a compiled step; a
        dict is ``torch.compile``'s options for it (``{"backend": "aot_eager"}``; docs/compile.md)."""
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
        if return_type not in RETURN_TYPES:
            raise ValueError(f"return_type must be one of {', '.join(map(repr, RETURN_TYPES))} (input embeddings are "
                             f"not supported: the traced graph starts at the token ids); got {return_type!r}")
        if self._fxb_meta:
            raise UsageError("this module was traced on the meta device, where nothing can be generated (there are "
                             "no weights to compute with): materialise the HF model's weights and trace it again")
        text_input = isinstance(input, str) or (isinstance(input, (list, tuple)) and len(input) > 0
                                                and all(isinstance(s, str) for s in input))
        ids, mask = self._generation_inputs(input, text_input, attention_mask, prepend_bos, padding_side)
        if return_type == "input":
            return_type = "str" if text_input else "tokens"
        if return_type == "str" and self.tokenizer is None:
            raise UsageError("return_type='str' needs a tokenizer: gm.set_tokenizer(tok), or return_type='tokens'")
        stop_tokens, eos_pad = self._stop_tokens(eos_token_id) if stop_at_eos else ([], None)
        if not do_sample:
            temperature = 0.0

        positions = positions_from_mask(mask) if "position_ids" in self._fxb_inputs else None
        decoder = self._decoder() if use_past_kv_cache and max_new_tokens else None
        if compile is None:
            compile = getattr(self, "_compiled_call_impl", None) is not None  # gm.compile() was called
        static = None
        if compile and decoder is not None:
            static = _bucket(ids.shape[1] + max_new_tokens)
        steps: list[ActivationCache] = []
        store: dict[str, torch.Tensor] = {}
        savers = [(name, _saver(store, name)) for name in self._cache_names(names_filter)] \
            if names_filter is not None else []
        finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        stop = torch.tensor(stop_tokens, device=ids.device)
        past = None
        with torch.inference_mode(), self.hooks(savers):
            for _ in _progress(range(max_new_tokens), verbose):
                if static is not None:
                    if past is None:
                        logits, past = decoder.start_static(ids, mask, positions, static)
                    else:
                        logits = decoder.static_step(past, ids[:, -1:], ids.shape[1] - 1,
                                                     compile if isinstance(compile, dict) else None)
                elif decoder is not None:
                    n_new = ids.shape[1] if past is None else 1
                    logits, past = decoder.run(ids, mask, positions, n_new, past)
                else:
                    logits = self._graph_forward(*self._graph_args(ids, mask, positions))
                if savers:
                    steps.append(ActivationCache(dict(store), self.dims["n_layers"], aliases=self.aliases,
                                                 model=self))
                    store.clear()
                final = logits[:, -1, :]
                new = sample_logits(final, top_k=top_k, top_p=top_p, temperature=temperature,
                                    freq_penalty=freq_penalty, tokens=ids)  # temperature 0: the argmax
                if stop_tokens:
                    new = new.masked_fill(finished, eos_pad)
                    finished |= torch.isin(new, stop)
                ids = torch.cat([ids, new[:, None].to(ids.dtype)], dim=1)
                mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
                if positions is not None:
                    positions = torch.cat([positions, positions[:, -1:] + 1], dim=1)
                if stop_tokens and bool(finished.all()):
                    break
        output = self._generation_output(ids, return_type)
        if names_filter is None:
            return output
        return output, GenerationCache(steps, cached=decoder is not None)

    def _decoder(self):
        """The KV-cache decode graphs (runtime/decode.py), derived once per traced module."""
        if "decoder" not in self._truncated:
            from .decode import build_decoder
            self._truncated["decoder"] = build_decoder(self)
        return self._truncated["decoder"]

    def _generation_inputs(self, input, text_input: bool, attention_mask, prepend_bos, padding_side):
        """(prompt ids [B,P] on the module's device, its mask [B,P]; every row ending in a real token)."""
        if text_input:
            side = "left" if isinstance(input, (list, tuple)) and len(input) > 1 else padding_side
            ids, mask = self._tokenize_input(list(input) if isinstance(input, tuple) else input,
                                             prepend_bos=prepend_bos, padding_side=side)
            attention_mask = attention_mask if attention_mask is not None else mask
        else:
            ids = check_input_ids(input)
            device = self.cfg.device
            if device is not None:
                ids = ids.to(device)
        if ids.dim() == 1:
            ids = ids.unsqueeze(0)
        if ids.shape[1] == 0:
            raise ValueError("the prompt is empty: generation needs at least one token to start from")
        mask = torch.ones_like(ids) if attention_mask is None else check_mask(attention_mask, ids)
        if not bool(mask[:, -1].all()):
            raise ValueError("every row of the prompt must end in a real token (attention_mask 1 in the last "
                             "column): left-pad the batch (padding_side='left'), as generation appends at the end")
        return ids, mask

    def _stop_tokens(self, eos_token_id) -> tuple[list[int], int]:
        """(the ids that end a row, the id a finished row gets): TL's rules, with the HF model's generation config
        as the last source of an EOS id."""
        tok = self.tokenizer
        tok_eos = getattr(tok, "eos_token_id", None) if tok is not None else None
        if eos_token_id is None:
            eos_token_id = tok_eos
        if eos_token_id is None:
            eos_token_id = getattr(getattr(self.hf, "generation_config", None), "eos_token_id", None)
        if eos_token_id is None or (isinstance(eos_token_id, (list, tuple)) and not eos_token_id):
            raise ValueError("stop_at_eos=True needs an EOS token id and none was found (no eos_token_id argument, "
                             "tokenizer or generation config eos_token_id): pass eos_token_id=..., or "
                             "stop_at_eos=False to always generate max_new_tokens")
        if isinstance(eos_token_id, int):
            return [eos_token_id], eos_token_id
        ids = [int(i) for i in eos_token_id]
        return ids, tok_eos if tok_eos is not None else ids[0]

    def _generation_output(self, ids: torch.Tensor, return_type: str):
        if return_type == "tokens":
            return ids
        texts = [self.tokenizer.decode(row, skip_special_tokens=True) for row in ids]
        return texts[0] if len(texts) == 1 else texts


STATIC_BUCKET = 64  # a static cache's length is the generation's, rounded up to this: one compile serves many lengths


def _bucket(length: int) -> int:
    return -(-length // STATIC_BUCKET) * STATIC_BUCKET


def _saver(store: dict, name: str):
    def save(tensor, hook):
        store[name] = tensor.detach()
    return save


def _progress(steps, verbose: bool):
    if not verbose:
        return steps
    from tqdm.auto import tqdm
    return tqdm(steps)
