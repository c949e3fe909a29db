"""Tiny tokenizers built in-process (no hub): a word-level vocabulary inside tiny.VOCAB, wrapped in
``PreTrainedTokenizerFast``, in the two BOS conventions TransformerLens handles.

- ``gpt2_like()``: no post-processor (the tokenizer never adds BOS itself); bos = eos = ``<|endoftext|>``, no pad
  token (as GPT-2's).
- ``llama_like()``: a ``TemplateProcessing`` post-processor that prepends ``<s>`` (as Llama's); eos ``</s>``, no pad.
"""
from __future__ import annotations

from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

WORDS = ("<|endoftext|>", "<s>", "</s>", "<unk>", "hello", "world", "the", "cat", "sat", "on", "mat", "a", "dog",
         "When", "Mary", "and", "John", "went", "to", "store", ",", "gave", "drink", ".")
ID = {w: i for i, w in enumerate(WORDS)}


def _base(post_bos: str | None) -> Tokenizer:
    tok = Tokenizer(models.WordLevel(dict(ID), unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if post_bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{post_bos} $A", pair=f"{post_bos} $A {post_bos} $B", special_tokens=[(post_bos, ID[post_bos])])
    return tok


def gpt2_like() -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=_base(None), bos_token="<|endoftext|>",
                                   eos_token="<|endoftext|>", unk_token="<unk>")


def llama_like() -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=_base("<s>"), bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def numbered(vocab_size: int) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over a whole tiny vocabulary: <bos>=0 (also eos), <unk>=1, <pad>=2, then ``w3`` ...
    ``w{vocab_size-1}`` (text of any token ids: ``" ".join(f"w{i}" for i in ids)``)."""
    vocab = {"<bos>": 0, "<unk>": 1, "<pad>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<bos>", unk_token="<unk>",
                                   pad_token="<pad>")
