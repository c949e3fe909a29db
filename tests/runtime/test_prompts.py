"""utils.test_prompt prints TransformerLens's report; the expected text is written out here from HF's logits on the
token ids the tokenizer itself gives (word-level tokenizer built in-process)."""
from __future__ import annotations

import pytest
import torch

import fxbridge as bridge
from fxbridge import utils
from tiny import VOCAB, build
from tiny_tokenizer import numbered

pytestmark = pytest.mark.xdist_group("gpt2")


def word_tokenizer():
    return numbered(VOCAB)


@pytest.fixture(scope="module")
def models():
    model = build("gpt2")
    return model, bridge.trace(model, tokenizer=word_tokenizer())


def _report_lines(logits_row, answer_id: int, top_k: int, decode) -> list[str]:
    probs = logits_row.softmax(-1)
    rank = int((probs > probs[answer_id]).sum())
    lines = [f"Rank: {rank: <8} Logit: {logits_row[answer_id].item():5.2f} Prob: {probs[answer_id].item():6.2%} "
             f"Token: |{decode(answer_id)}|"]
    order = torch.argsort(probs, descending=True)
    lines += [f"Top {i}th token. Logit: {logits_row[order[i]].item():5.2f} Prob: {probs[order[i]].item():6.2%} "
              f"Token: |{decode(int(order[i]))}|" for i in range(top_k)]
    return lines, rank


def test_single_answer_report(models, capsys):
    model, gm = models
    tok = gm.tokenizer
    ids = [tok.bos_token_id, *tok("w7 w8 w9", add_special_tokens=False)["input_ids"]]
    answer = tok(" w11 w12", add_special_tokens=False)["input_ids"]
    full = torch.tensor([ids + answer])
    with torch.no_grad():
        logits = model(full).logits[0]
    utils.test_prompt("w7 w8 w9", "w11 w12", gm, prepend_bos=True, top_k=3)
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"Tokenized prompt: {['<bos>', 'w7', 'w8', 'w9']}"
    assert out[1] == f"Tokenized answer: {['w11', 'w12']}"
    ranks, expected = [], []
    for k, answer_id in enumerate(answer):
        lines, rank = _report_lines(logits[len(ids) + k - 1], answer_id, 3, lambda i: tok.decode([i]))
        expected += ["Performance on answer token:", *lines]
        ranks.append(rank)
    assert out[2:-1] == expected
    assert out[-1] == f"Ranks of the answer tokens: {list(zip(['w11', 'w12'], ranks))}"


def test_several_answers_compare_first_tokens(models, capsys):
    model, gm = models
    tok = gm.tokenizer
    ids = tok("w20 w21", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, -1]
    utils.test_prompt("w20 w21", ["w30", "w31"], gm, prepend_bos=False, print_details=False)
    probs = logits.softmax(-1)
    ranks = [int((probs > probs[t]).sum()) for t in (30, 31)]
    assert capsys.readouterr().out.strip() == f"Ranks of the answer tokens: {[[('w30', ranks[0]), ('w31', ranks[1])]]}"
