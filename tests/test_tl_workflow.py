"""The TransformerLens notebook workflow of examples/tl_workflow.py, run unchanged on traced GPT-2 and Llama.

Every number is recomputed here from the HF eager model alone, with TransformerLens's semantics written out: the
loss is HF's ``labels=`` loss; direct logit attribution centres (LayerNorm) and divides by the final norm's scale
computed by hand from the HF residual; head results are z_h @ W_O[h] from HF's output-projection input and weight;
patching and ablation are HF forward pre-hooks editing a decoder layer's input / the output projection's input.
"""
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import fxbridge as bridge
from conftest import traced
from fxbridge import utils
from tiny_tokenizer import gpt2_like

_spec = importlib.util.spec_from_file_location("tl_workflow", Path(__file__).parents[1] / "examples" / "tl_workflow.py")
workflow = importlib.util.module_from_spec(_spec)
sys.modules["tl_workflow"] = workflow
_spec.loader.exec_module(workflow)

TOL = 1e-4  # sums over heads / positions of fp32 values


class HF:
    """What the workflow reads, from the HF model: decoder layers, final norm, output projections, unembedding."""

    def __init__(self, model):
        self.model = model
        if hasattr(model, "transformer"):  # GPT-2
            self.layers, self.final = model.transformer.h, model.transformer.ln_f
            self.o_proj = [layer.attn.c_proj for layer in self.layers]
            self.W_O = [p.weight for p in self.o_proj]  # Conv1D [H*dh, D]
            self.mid = [layer.ln_2 for layer in self.layers]  # its input is resid_mid
        else:
            self.layers, self.final = model.model.layers, model.model.norm
            self.o_proj = [layer.self_attn.o_proj for layer in self.layers]
            self.W_O = [p.weight.T for p in self.o_proj]  # Linear [D, H*dh] -> [H*dh, D]
            self.mid = [layer.post_attention_layernorm for layer in self.layers]
        self.layernorm = isinstance(self.final, torch.nn.LayerNorm)
        self.eps = self.final.eps if self.layernorm else self.final.variance_epsilon
        self.W_U = model.lm_head.weight.T

    def scale(self, x):  # TL's ln_final.hook_scale from the residual
        xc = x - x.mean(-1, keepdim=True) if self.layernorm else x
        return (xc.pow(2).mean(-1, keepdim=True) + self.eps).sqrt()

    def centre(self, x):
        return x - x.mean(-1, keepdim=True) if self.layernorm else x

    def run(self, tokens, pre=None):
        """(logits, {layer: input}, {layer: resid_mid}, {layer: o_proj input}, final residual); ``pre``: (module,
        fn(args) -> args) pre-hooks that edit inputs."""
        seen = {"in": {}, "mid": {}, "z": {}}
        handles = []

        def rec(kind, i):
            def hook(module, args, kwargs):
                x = args[0] if args else kwargs["hidden_states"]
                seen[kind][i] = x.detach().clone()
            return hook
        for i in range(len(self.layers)):
            handles += [self.layers[i].register_forward_pre_hook(rec("in", i), with_kwargs=True),
                        self.mid[i].register_forward_pre_hook(rec("mid", i), with_kwargs=True),
                        self.o_proj[i].register_forward_pre_hook(rec("z", i), with_kwargs=True)]
        handles.append(self.final.register_forward_pre_hook(rec("in", "final"), with_kwargs=True))
        for module, fn in pre or ():
            handles.append(module.register_forward_pre_hook(fn, with_kwargs=True))
        try:
            with torch.no_grad():
                logits = self.model(input_ids=tokens).logits
        finally:
            for h in handles:
                h.remove()
        return logits, seen


def _replace_input(fn):
    def hook(module, args, kwargs):
        if args:
            return (fn(args[0].clone()), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": fn(kwargs["hidden_states"].clone())}
    return hook


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_tl_workflow_gives_transformer_lens_numbers(arch):
    model, ref, _ = traced(arch)
    gm = bridge.trace(model, tokenizer=gpt2_like())
    torch.set_grad_enabled(False)
    try:
        out = workflow.run_workflow(gm, utils)
    finally:
        torch.set_grad_enabled(True)
    hf = HF(ref)
    n_layers, n_heads, d_head = gm.cfg.n_layers, gm.cfg.n_heads, gm.cfg.d_head
    tokens = gm.to_tokens(workflow.PROMPTS)
    assert tokens[0, 0].item() == gm.tokenizer.bos_token_id  # prepend_bos=True on a tokenizer that adds none
    assert out["str_tokens"] == ["<|endoftext|>", *workflow.PROMPTS[0].split()]
    answers = torch.tensor([[gm.tokenizer.convert_tokens_to_ids(a.strip()) for a in pair] for pair in workflow.ANSWERS])

    def logit_diff(logits):
        last = logits[:, -1]
        return (last.gather(-1, answers[:, :1]) - last.gather(-1, answers[:, 1:])).mean().item()

    logits, seen = hf.run(tokens)
    with torch.no_grad():
        assert abs(out["loss"] - ref(input_ids=tokens, labels=tokens).loss.item()) < 1e-5
    assert abs(out["logit_diff"] - logit_diff(logits)) < 1e-5
    # direct logit attribution, by hand: centre (LayerNorm), divide by the final norm's scale, dot the direction
    diff_dir = (hf.W_U[:, answers[:, 0]] - hf.W_U[:, answers[:, 1]]).T  # [batch, D]
    final = seen["in"]["final"][:, -1]
    scale = hf.scale(final)

    def dla(x):  # x [..., batch, D] at the last position
        return ((hf.centre(x) / scale) * diff_dir).sum(-1).sum(-1) / len(workflow.PROMPTS)
    assert abs(out["dla_final"] - dla(final).item()) < TOL
    stack = []
    for i in range(n_layers):
        stack += [seen["in"][i][:, -1], seen["mid"][i][:, -1]]
    stack.append(final)
    assert out["logit_lens_labels"] == [f"{i}_{k}" for i in range(n_layers) for k in ("pre", "mid")] + ["final_post"]
    assert out["logit_lens"] == pytest.approx([dla(x).item() for x in stack], abs=TOL)
    # per head: z_h @ W_O[h] from HF's output-projection input
    heads = []
    for i in range(n_layers):
        z = seen["z"][i][:, -1].view(-1, n_heads, d_head)
        heads += [dla(z[:, h] @ hf.W_O[i][h * d_head:(h + 1) * d_head]).item() for h in range(n_heads)]
    assert out["head_labels"] == [f"L{i}H{h}" for i in range(n_layers) for h in range(n_heads)]
    assert out["head_dla"] == pytest.approx(heads, abs=TOL)
    # activation patching of resid_pre: HF with the clean layer input written into the corrupted run
    corrupted = tokens[[1, 0]]
    clean_diff, corrupt_diff = logit_diff(logits), logit_diff(hf.run(corrupted)[0])
    for layer in range(n_layers):
        for pos in range(tokens.shape[1]):
            def patch(x, layer=layer, pos=pos):
                x[:, pos] = seen["in"][layer][:, pos]
                return x
            patched = logit_diff(hf.run(corrupted, pre=[(hf.layers[layer], _replace_input(patch))])[0])
            expected = (patched - corrupt_diff) / (clean_diff - corrupt_diff)
            assert out["patching"][layer][pos] == pytest.approx(expected, abs=1e-3)
    # head ablation: zero head h's slice of the output projection's input
    base = out["loss"]
    for layer in range(n_layers):
        for h in range(n_heads):
            def zero(x, h=h):
                x[..., h * d_head:(h + 1) * d_head] = 0
                return x
            hook = _replace_input(zero)
            handle = hf.o_proj[layer].register_forward_pre_hook(hook, with_kwargs=True)
            try:
                with torch.no_grad():
                    loss = ref(input_ids=tokens, labels=tokens).loss.item()
            finally:
                handle.remove()
            assert out["head_ablation"][layer * n_heads + h] == pytest.approx(loss - base, abs=1e-5)
    # weights and hook.layer()
    assert torch.equal(gm.W_U, model.lm_head.weight.T)
    assert out["W_U_shape"] == (gm.cfg.d_model, gm.cfg.d_vocab)
    assert out["W_Q_shape"] == (n_layers, n_heads, gm.cfg.d_model, d_head)
    assert out["pattern_layers"] == list(range(n_layers))
    assert max(abs(v) for v in out["head_dla"]) > 0  # the attribution is not trivially zero


@pytest.mark.slow
def test_the_example_runs_as_a_script(capsys):
    workflow.main([])
    printed = capsys.readouterr().out
    assert "== gpt2: loss" in printed and "== llama: loss" in printed
