"""``fxbridge.from_pretrained``: TransformerLens's one-line start, ``HookedTransformer.from_pretrained(name)``.

Loads the causal LM with ``AutoModelForCausalLM.from_pretrained`` and its tokenizer with
``AutoTokenizer.from_pretrained`` (a hub id, or a local ``save_pretrained`` directory), traces the model and sets
the tokenizer (``gm.set_tokenizer``, TL's BOS handling), so string input, ``to_tokens`` and ``gm.cfg`` work at once.
Failures to load raise ``ModelLoadError`` naming the source and the reason.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from .errors import ModelLoadError, UnsupportedArchitecture, UsageError
from .loading import _first_line, parse_device, parse_dtype

log = logging.getLogger(__name__)


def from_pretrained(name_or_path: str | Path, *, dtype: str | torch.dtype | None = None,
                    device: str | torch.device | None = None, tokenizer=True, trust_remote_code: bool = False,
                    progress: bool = False, default_padding_side: str | None = None, **hf_kwargs):
    """A traced module with its tokenizer set, from a hub id or a local checkpoint directory.

    ``dtype``: "float32", "bfloat16", a ``torch.dtype``...; None keeps the checkpoint's (HF's ``dtype="auto"``).
    ``device``: moved there after loading ("cuda", "cuda:1"...); None leaves it where HF loads it (the CPU).
    ``tokenizer``: True loads the checkpoint's tokenizer; a tokenizer object is used as it is; a path loads the
    tokenizer from there; False or None sets none (token input only). ``hf_kwargs`` go to
    ``AutoModelForCausalLM.from_pretrained`` (``revision=``, ``attn_implementation=``...).
    """
    source = str(name_or_path)
    dtype = parse_dtype(dtype)
    device = parse_device(device) if device is not None else None
    config = _config(source, trust_remote_code)  # before the tokenizer and any weight: a bad source fails fast
    tok = _tokenizer(source, tokenizer, trust_remote_code)
    model = _model(source, config, dtype, device, trust_remote_code, hf_kwargs)
    from .pipeline import trace
    gm = trace(model, progress=progress)
    if tok is not None:
        gm.set_tokenizer(tok, default_padding_side=default_padding_side)
    return gm


def _config(source: str, trust_remote_code: bool):
    from transformers import AutoConfig
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except Exception as exc:  # no such path, offline, not a model directory, unknown model_type
        raise ModelLoadError(f"could not read a model config from {source!r}: {_first_line(exc)}") from exc
    _refuse_if_transformers_lacks(config)
    return config


def _model(source: str, config, dtype, device, trust_remote_code: bool, hf_kwargs: dict):
    from transformers import AutoModelForCausalLM
    try:
        model = AutoModelForCausalLM.from_pretrained(source, config=config, dtype=dtype or "auto",
                                                     trust_remote_code=trust_remote_code, **hf_kwargs)
    except Exception as exc:  # OSError (no weights, offline), ValueError (not a causal LM), bad kwargs
        raise ModelLoadError(f"could not load a causal LM from {source!r}: {_first_line(exc)}") from exc
    if device is not None:
        model = model.to(device)
    return model.eval()


def _refuse_if_transformers_lacks(config) -> None:
    """A family fxbridge knows but the installed transformers lacks: say so before any weight is loaded."""
    from .architectures import get_spec
    try:
        get_spec(config)
    except UnsupportedArchitecture as exc:
        if exc.missing:
            raise
        # an unregistered model_type: trace() infers a spec from the loaded model (or says why it cannot)


_NO_TOKENIZER = ("Pass tokenizer=False to load the model without one (token input only), or tokenizer=<a tokenizer "
                 "object or its path>")


def _tokenizer(source: str, tokenizer, trust_remote_code: bool):
    from transformers import AutoTokenizer, PreTrainedTokenizerBase
    if tokenizer is None or tokenizer is False:
        return None
    if isinstance(tokenizer, PreTrainedTokenizerBase):
        return tokenizer
    if tokenizer is True or isinstance(tokenizer, (str, Path)):
        where = source if tokenizer is True else str(tokenizer)
        try:
            tok = AutoTokenizer.from_pretrained(where, trust_remote_code=trust_remote_code)
        except Exception as exc:
            raise ModelLoadError(f"could not load a tokenizer from {where!r}: {_first_line(exc)}. {_NO_TOKENIZER}"
                                 ) from exc
        # transformers builds an empty tokenizer of the config's class where the files are missing: refuse it
        if not tok.encode("hello world", add_special_tokens=False):
            raise ModelLoadError(f"{where!r} has no tokenizer files (the {type(tok).__name__} transformers built "
                                 f"from it has an empty vocabulary). {_NO_TOKENIZER}")
        return tok
    raise UsageError(f"tokenizer= takes True (the checkpoint's), a tokenizer object, a path, or False; got "
                     f"{type(tokenizer).__name__}")
