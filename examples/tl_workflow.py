"""A TransformerLens notebook workflow, unchanged, on a traced module (``python examples/tl_workflow.py``).

``run_workflow(model)`` is written the way TransformerLens demos write it (ARENA 1.3, "Exploratory analysis"): it
takes any object with TransformerLens's API -- a traced fxbridge module or a TransformerLens ``HookedTransformer``
-- and returns the numbers the notebook looks at. Run as a script it builds a tiny random GPT-2 and a tiny Llama
with an in-process word-level tokenizer (no downloads; ``--model PATH`` loads a real checkpoint with
``fxbridge.from_pretrained`` instead, given prompts whose names are single tokens in its vocabulary).
"""
from __future__ import annotations

import argparse
from functools import partial

import einops
import torch

PROMPTS = ["When Mary and John went to the store , John gave a drink to",
           "When John and Mary went to the store , Mary gave a drink to"]
ANSWERS = [(" Mary", " John"), (" John", " Mary")]  # (correct, wrong)


def logits_to_ave_logit_diff(logits, answer_tokens, per_prompt=False):
    final_logits = logits[:, -1, :]
    answer_logits = final_logits.gather(dim=-1, index=answer_tokens)
    diff = answer_logits[:, 0] - answer_logits[:, 1]
    return diff if per_prompt else diff.mean()


def residual_stack_to_logit_diff(residual_stack, cache, logit_diff_directions):
    scaled = cache.apply_ln_to_stack(residual_stack, layer=-1, pos_slice=-1)
    return einops.einsum(scaled, logit_diff_directions, "... batch d_model, batch d_model -> ...") / len(PROMPTS)


def run_workflow(model, utils, prompts=PROMPTS, answers=ANSWERS) -> dict:
    """Tokenize, loss, logit difference, direct logit attribution (per layer and per head), activation patching of
    resid_pre per layer and position, head ablation, weights and hook.layer(); every number in one dict."""
    out = {}
    # tokenize
    tokens = model.to_tokens(prompts, prepend_bos=True)
    out["str_tokens"] = model.to_str_tokens(prompts[0])
    answer_tokens = torch.tensor([[model.to_single_token(a) for a in pair] for pair in answers])
    # loss and logit difference
    out["loss"] = model(tokens, return_type="loss").item()
    logits, cache = model.run_with_cache(tokens)
    out["logit_diff"] = logits_to_ave_logit_diff(logits, answer_tokens).item()
    # direct logit attribution: the logit lens over the accumulated residual, and per head
    answer_dirs = model.tokens_to_residual_directions(answer_tokens)  # [batch, 2, d_model]
    diff_dirs = answer_dirs[:, 0] - answer_dirs[:, 1]
    final = cache["resid_post", -1][:, -1, :]
    scaled_final = cache.apply_ln_to_stack(final, layer=-1, pos_slice=-1)
    out["dla_final"] = (einops.einsum(scaled_final, diff_dirs, "batch d, batch d ->") / len(prompts)).item()
    accumulated, labels = cache.accumulated_resid(layer=-1, incl_mid=True, pos_slice=-1, return_labels=True)
    out["logit_lens_labels"] = labels
    out["logit_lens"] = residual_stack_to_logit_diff(accumulated, cache, diff_dirs).tolist()
    per_head, head_labels = cache.stack_head_results(layer=-1, pos_slice=-1, return_labels=True)
    out["head_labels"] = head_labels
    out["head_dla"] = residual_stack_to_logit_diff(per_head, cache, diff_dirs).tolist()
    # activation patching: clean resid_pre into the corrupted run, per layer and position
    corrupted_tokens = tokens[[1, 0]]  # the other prompt: names swapped
    corrupted_logits = model(corrupted_tokens)
    clean_diff, corrupt_diff = out["logit_diff"], logits_to_ave_logit_diff(corrupted_logits, answer_tokens).item()

    def patch_residual_component(corrupted_residual_component, hook, pos, clean_cache):
        corrupted_residual_component[:, pos, :] = clean_cache[hook.name][:, pos, :]
        return corrupted_residual_component

    patched = torch.zeros(model.cfg.n_layers, tokens.shape[1])
    for layer in range(model.cfg.n_layers):
        for position in range(tokens.shape[1]):
            hook_fn = partial(patch_residual_component, pos=position, clean_cache=cache)
            patched_logits = model.run_with_hooks(corrupted_tokens, return_type="logits",
                                                  fwd_hooks=[(utils.get_act_name("resid_pre", layer), hook_fn)])
            patched[layer, position] = logits_to_ave_logit_diff(patched_logits, answer_tokens)
    out["patching"] = ((patched - corrupt_diff) / (clean_diff - corrupt_diff)).tolist()

    # head ablation: zero one head's z
    def ablate_head(z, hook, head):
        z[:, :, head, :] = 0.0
        return z

    ablated = []
    for layer in range(model.cfg.n_layers):
        for head in range(model.cfg.n_heads):
            loss = model.run_with_hooks(tokens, return_type="loss",
                                        fwd_hooks=[(utils.get_act_name("z", layer), partial(ablate_head, head=head))])
            ablated.append(loss.item() - out["loss"])
    out["head_ablation"] = ablated
    # weights and hook.layer()
    out["W_U_shape"] = tuple(model.W_U.shape)
    out["W_Q_shape"] = tuple(model.W_Q.shape)
    layers_seen = []
    model.run_with_hooks(tokens, return_type=None, fwd_hooks=[(lambda name: name.endswith("attn.hook_pattern"),
                                                               lambda t, hook: layers_seen.append(hook.layer()))])
    out["pattern_layers"] = layers_seen
    return out


def tiny_models():
    """(name, traced module) for a tiny random GPT-2 and Llama with the in-process word-level tokenizer."""
    import transformers as tf
    from tokenizers import Tokenizer, models, pre_tokenizers

    import fxbridge as bridge
    words = sorted({w for p in PROMPTS for w in p.split()} | {"<|endoftext|>", "<unk>"})
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = tf.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>",
                                           eos_token="<|endoftext|>", unk_token="<unk>")
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    configs = {"gpt2": tf.GPT2Config(vocab_size=len(words), n_embd=64, n_layer=2, n_head=4, n_positions=64, **ids),
               "llama": tf.LlamaConfig(vocab_size=len(words), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                       **ids)}
    for name, config in configs.items():
        torch.manual_seed(0)
        model = tf.AutoModelForCausalLM.from_config(config).eval()
        yield name, bridge.trace(model, tokenizer=tokenizer)


def main(argv=None) -> None:
    import fxbridge as bridge
    from fxbridge import utils
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a checkpoint directory or hub id (default: tiny random models)")
    args = parser.parse_args(argv)
    pairs = [(args.model, bridge.from_pretrained(args.model))] if args.model else tiny_models()
    torch.set_grad_enabled(False)
    for name, model in pairs:
        out = run_workflow(model, utils)
        print(f"== {name}: loss {out['loss']:.4f}, logit diff {out['logit_diff']:.4f}, "
              f"DLA of the final residual {out['dla_final']:.4f}")
        print("   logit lens:", ", ".join(f"{l} {v:+.3f}" for l, v in zip(out["logit_lens_labels"], out["logit_lens"])))
        top = max(range(len(out["head_dla"])), key=lambda i: abs(out["head_dla"][i]))
        print(f"   largest head attribution: {out['head_labels'][top]} {out['head_dla'][top]:+.4f}")
        print(f"   W_U {out['W_U_shape']}, W_Q {out['W_Q_shape']}, pattern hooks fired at layers {out['pattern_layers']}")


if __name__ == "__main__":
    main()
