"""``test_prompt``: TransformerLens's exploratory check of a prompt's answer (``transformer_lens.utils.test_prompt``).

Prints what TransformerLens prints (same lines, same number formats) for any model with TL's tokenizer API
(``to_tokens``, ``to_str_tokens``, ``to_string``) whose forward on tokens returns logits: a traced module with a
tokenizer. TransformerLens prints through ``rich`` (the rank lines in bold); this prints plain text.
"""
from __future__ import annotations

import torch


def test_prompt(prompt: str, answer: str | list[str], model, prepend_space_to_answer: bool = True,
                print_details: bool = True, prepend_bos: bool | None = None, top_k: int = 10) -> None:
    """Print the rank, logit and probability of ``answer`` after ``prompt`` (and the ``top_k`` tokens at each answer
    position). A list of answers compares them as alternative next tokens (their first token only).
    ``prepend_space_to_answer`` adds a space to an answer that does not start with one; ``prepend_bos`` overrides
    the model's default for the prompt. Returns None, as TransformerLens."""
    answers = [answer] if isinstance(answer, str) else list(answer)
    n_answers = len(answers)
    multiple = n_answers > 1
    if prepend_space_to_answer:
        answers = [a if a.startswith(" ") else " " + a for a in answers]
    prompt_tokens = model.to_tokens(prompt, prepend_bos=prepend_bos)
    answer_tokens = model.to_tokens(answers, prepend_bos=False)
    if multiple:
        answer_tokens = answer_tokens[:, :1]
    tokens = torch.cat((prompt_tokens.repeat(answer_tokens.shape[0], 1), answer_tokens.to(prompt_tokens.device)), 1)
    prompt_str_tokens = model.to_str_tokens(prompt, prepend_bos=prepend_bos)
    answer_str_tokens_list = [model.to_str_tokens(a, prepend_bos=False) for a in answers]
    prompt_length = len(prompt_str_tokens)
    answer_length = 1 if multiple else len(answer_str_tokens_list[0])
    if print_details:
        print("Tokenized prompt:", prompt_str_tokens)
        if multiple:
            print("Tokenized answers:", answer_str_tokens_list)
        else:
            print("Tokenized answer:", answer_str_tokens_list[0])
    with torch.no_grad():
        logits = model(tokens)
    probs = logits.softmax(dim=-1)
    answer_ranks = []
    for index in range(prompt_length, prompt_length + answer_length):
        position_tokens = tokens[:, index]
        str_tokens = [a[index - prompt_length] for a in answer_str_tokens_list]
        token_probs = probs[:, index - 1]  # position index-1 predicts the token at index
        sorted_probs, sorted_positions = token_probs.sort(descending=True)
        ranks = sorted_positions.argsort(-1)[range(n_answers), position_tokens.cpu()].tolist()
        answer_ranks.append(list(zip(str_tokens, ranks)))
        if print_details:
            _print_position(model, logits, token_probs, sorted_probs, sorted_positions, index, position_tokens,
                            str_tokens, ranks, top_k)
    if not multiple:
        print(f"Ranks of the answer tokens: {[r[0] for r in answer_ranks]}")
    else:
        print(f"Ranks of the answer tokens: {answer_ranks}")


test_prompt.__test__ = False  # a library function whose name starts with test_: not a pytest test


def _print_position(model, logits, token_probs, sorted_probs, sorted_positions, index, position_tokens, str_tokens,
                    ranks, top_k) -> None:
    n_answers = len(ranks)
    print(f"Performance on answer token{'s' if n_answers > 1 else ''}:\n" + "\n".join(
        f"Rank: {ranks[i]: <8} Logit: {logits[i, index - 1, position_tokens[i]].item():5.2f} "
        f"Prob: {token_probs[i, position_tokens[i]].item():6.2%} Token: |{str_tokens[i]}|" for i in range(n_answers)))
    for i in range(min(top_k, sorted_positions.shape[-1])):
        print(f"Top {i}th token. Logit: {logits[0, index - 1, sorted_positions[0, i]].item():5.2f} "
              f"Prob: {sorted_probs[0, i].item():6.2%} Token: |{model.to_string(sorted_positions[0, i])}|")
