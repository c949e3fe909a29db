"""Tokenization in TransformerLens's API: ``to_tokens``, ``to_str_tokens``, ``to_string``, ``to_single_token``.

(Scaffold: filled in by the tokenizer work of issue 12.)
"""
from __future__ import annotations


class TokensMixin:
    """The tokenizer-facing half of the TransformerLens API on a traced module (``gm.tokenizer``, ``gm.to_tokens``)."""
