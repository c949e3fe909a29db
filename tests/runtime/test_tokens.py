"""The tokens API (to_tokens, to_str_tokens, to_string, to_single_token, get_token_position, _tokenize_input) with
legacy HookedTransformer's BOS rules, on two in-process tokenizers: one that never adds BOS (GPT-2's convention)
and one whose post-processor prepends it (Llama's). Oracle: the vocabulary's ids and TL's rules, written out."""
import copy

import numpy as np
import pytest
import torch

import fxbridge as bridge
from conftest import traced
from tiny_tokenizer import ID, gpt2_like, llama_like

pytestmark = pytest.mark.xdist_group("gpt2")
E, S, EOS = ID["<|endoftext|>"], ID["<s>"], ID["</s>"]
H, W, THE, CAT, SAT = ID["hello"], ID["world"], ID["the"], ID["cat"], ID["sat"]


@pytest.fixture(scope="module")
def bare():
    """A traced GPT-2 of its own (a deep copy: tokenizers set here never reach the session's shared module)."""
    return copy.deepcopy(traced("gpt2")[2])


@pytest.fixture(params=["gpt2_like", "llama_like"])
def gm(request, bare):
    module = copy.deepcopy(bare)
    module.set_tokenizer(gpt2_like() if request.param == "gpt2_like" else llama_like())
    module.bos = E if request.param == "gpt2_like" else S  # the BOS / pad ids TL's rules give each tokenizer
    module.pad = E if request.param == "gpt2_like" else EOS
    return module


def test_no_tokenizer_until_set(bare):
    assert bare.tokenizer is None and bare.cfg.tokenizer_prepends_bos is None
    with pytest.raises(bridge.UsageError) as err:
        bare._tokenize_input("hello world")
    msg = str(err.value)
    assert "fxbridge.trace(model, tokenizer=tok)" in msg and "gm.set_tokenizer(tok)" in msg
    assert "fxbridge.from_pretrained(" in msg
    with pytest.raises(bridge.UsageError, match="needs a tokenizer"):
        bare.to_tokens("hello")


@pytest.mark.parametrize("thing", [object(), "gpt2", {"input_ids": [1]}])
def test_set_tokenizer_refuses_what_is_not_a_tokenizer(bare, thing):
    with pytest.raises(bridge.UsageError, match="PreTrainedTokenizerBase"):
        copy.deepcopy(bare).set_tokenizer(thing)


def test_set_tokenizer_as_tl():
    """GPT-2-like: TL's get_tokenizer_with_bos gives a BOS-prepending tokenizer (a copy; the caller's is left as it
    was), pad filled from eos. Llama-like: it already prepends BOS, so it is kept, and only pad is filled."""
    gm = copy.deepcopy(traced("gpt2")[2])
    plain = gpt2_like()
    gm.set_tokenizer(plain)
    assert gm.tokenizer is not plain and plain.encode("hello") == [H]
    assert gm.tokenizer.encode("hello") == [E, H] and gm.cfg.tokenizer_prepends_bos is True
    assert gm.tokenizer.pad_token == "<|endoftext|>" and gm.tokenizer.padding_side == "right"
    llama = llama_like()
    gm.set_tokenizer(llama, default_padding_side="left")
    assert gm.tokenizer is llama and llama.pad_token_id == EOS and llama.bos_token_id == S
    assert gm.cfg.tokenizer_prepends_bos is True and gm.cfg.default_padding_side == "left"
    with pytest.raises(bridge.UsageError, match="default_padding_side"):
        gm.set_tokenizer(llama_like(), default_padding_side="middle")


def test_to_tokens_bos(gm):
    assert gm.to_tokens("hello world").tolist() == [[gm.bos, H, W]]  # cfg.default_prepend_bos is True for GPT-2
    assert gm.to_tokens("hello world", prepend_bos=False).tolist() == [[H, W]]
    assert gm.to_tokens(["hello world"], prepend_bos=True).tolist() == [[gm.bos, H, W]]
    gm.cfg.default_prepend_bos = False  # what TL users set for a model trained without BOS
    try:
        assert gm.to_tokens("hello world").tolist() == [[H, W]]
        assert gm.to_tokens("hello world", prepend_bos=True).tolist() == [[gm.bos, H, W]]
    finally:
        gm.cfg.default_prepend_bos = True


def test_to_tokens_padding(gm):
    b, p = gm.bos, gm.pad
    assert gm.to_tokens(["hello", "the cat sat"]).tolist() == [[b, H, p, p], [b, THE, CAT, SAT]]
    assert gm.to_tokens(["hello", "the cat sat"], padding_side="left").tolist() == [[p, p, b, H], [b, THE, CAT, SAT]]
    # BOS removed from each row where it is, also behind left padding (TL's get_tokens_with_bos_removed)
    assert gm.to_tokens(["hello", "the cat sat"], prepend_bos=False, padding_side="left").tolist() == \
        [[p, p, H], [THE, CAT, SAT]]
    assert gm.to_tokens(["hello", "the cat sat"], prepend_bos=False).tolist() == [[H, p, p], [THE, CAT, SAT]]
    assert gm.tokenizer.padding_side == "right"  # the per-call side did not stick


def test_to_tokens_truncates_to_n_ctx(gm):
    text = " ".join(["cat"] * 300)
    assert gm.cfg.n_ctx == 128
    assert gm.to_tokens(text).shape == (1, 128)
    assert gm.to_tokens(text, truncate=False).shape == (1, 301)
    assert gm.to_tokens(text, move_to_device=False).device == torch.device("cpu")


def test_to_tokens_refuses_non_text(gm):
    for thing in (torch.tensor([1, 2]), [], [1, 2], None):
        with pytest.raises(bridge.UsageError, match="string or a non-empty list of strings"):
            gm.to_tokens(thing)
    with pytest.raises(bridge.UsageError, match="prepend_bos"):
        gm.to_tokens("hello", prepend_bos="yes")
    with pytest.raises(bridge.UsageError, match="padding_side"):
        gm.to_tokens("hello", padding_side="up")


def test_tokenize_input_mask(gm):
    """TL's get_attention_mask: pads 0; a BOS that is also the pad token (GPT-2) stays 1; None when unpadded."""
    tokens, mask = gm._tokenize_input("hello world")
    assert tokens.tolist() == [[gm.bos, H, W]] and mask is None
    tokens, mask = gm._tokenize_input(["hello", "the cat sat"], padding_side="left")
    assert tokens.tolist() == [[gm.pad, gm.pad, gm.bos, H], [gm.bos, THE, CAT, SAT]]
    assert mask.tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]]
    tokens, mask = gm._tokenize_input(["hello", "the cat sat"])
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    tokens, mask = gm._tokenize_input(["hello", "the cat sat"], prepend_bos=False, padding_side="left")
    assert tokens.tolist() == [[gm.pad, gm.pad, H], [THE, CAT, SAT]] and mask.tolist() == [[0, 0, 1], [1, 1, 1]]


def test_to_str_tokens(gm):
    bos = gm.tokenizer.bos_token
    assert gm.to_str_tokens("hello world") == [bos, "hello", "world"]
    assert gm.to_str_tokens("hello world", prepend_bos=False) == ["hello", "world"]
    ids = [THE, CAT, SAT]
    expected = ["the", "cat", "sat"]
    assert gm.to_str_tokens(torch.tensor(ids)) == expected
    assert gm.to_str_tokens(torch.tensor([ids])) == expected  # [1, pos]
    assert gm.to_str_tokens(np.array(ids)) == expected
    assert gm.to_str_tokens(ids) == expected
    assert gm.to_str_tokens(torch.tensor(CAT)) == ["cat"]
    assert gm.to_str_tokens(["hello", "the cat"], prepend_bos=False) == [["hello"], ["the", "cat"]]
    with pytest.raises(bridge.UsageError, match=r"\[pos\] or \[1, pos\]"):
        gm.to_str_tokens(torch.tensor([ids, ids]))
    assert gm.to_single_str_token(CAT) == "cat"


def test_to_string(gm):
    assert gm.to_string(torch.tensor([H, W])) == "hello world"
    assert gm.to_string([THE, CAT]) == "the cat"
    assert gm.to_string(torch.tensor([[H, W], [THE, CAT]])) == ["hello world", "the cat"]
    with pytest.raises(bridge.UsageError, match="shape"):
        gm.to_string(torch.zeros(1, 1, 2, dtype=torch.long))


def test_to_single_token(gm):
    assert gm.to_single_token("cat") == CAT  # no BOS, whatever the default
    with pytest.raises(bridge.UsageError, match="not a single token"):
        gm.to_single_token("the cat")


def test_get_token_position(gm):
    assert gm.get_token_position("cat", "the cat sat cat") == 2  # BOS at 0
    assert gm.get_token_position("cat", "the cat sat cat", mode="last") == 4
    assert gm.get_token_position(CAT, "the cat sat cat", prepend_bos=False) == 1
    assert gm.get_token_position(torch.tensor(SAT), torch.tensor([[THE, CAT, SAT]])) == 2
    with pytest.raises(bridge.UsageError, match="does not occur"):
        gm.get_token_position("dog", "the cat")
    with pytest.raises(ValueError, match="first"):
        gm.get_token_position("cat", "the cat", mode="middle")
    with pytest.raises(bridge.UsageError, match=r"\[1, pos\]"):
        gm.get_token_position("cat", torch.tensor([[CAT], [CAT]]))


def test_tokens_reach_the_model(gm):
    """What to_tokens gives runs through the traced module as HF's own input ids do."""
    model = traced("gpt2")[0]
    tokens = gm.to_tokens(["When Mary and John went to the store", "hello"])
    with torch.no_grad():
        assert torch.allclose(gm(tokens), model(tokens).logits, atol=1e-5)
