"""SAELens (sae-lens >= 6.54) runs unchanged on a traced module: ActivationsStore, the trainer with
``override_model=``, evals, and ``run_with_cache_with_saes`` with a real ``sae_lens.SAE``.

Optional: ``make test-sae`` runs it in .venv-sae; elsewhere it is skipped (sae_lens not installed). Oracles: HF's own
activations (forward hooks on its decoder layers), HF's logits and per-token cross-entropy written out here, the
tokenizer's own ids. Tiny random GPT-2 and Llama, a word-level tokenizer built in-process; no downloads, wandb off.
"""
from __future__ import annotations

import copy
import os

import pytest

sae_lens = pytest.importorskip("sae_lens")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from datasets import Dataset  # noqa: E402
from sae_lens import (  # noqa: E402
    LanguageModelSAERunnerConfig,
    LanguageModelSAETrainingRunner,
    LoggingConfig,
    StandardSAE,
    StandardSAEConfig,
    StandardTrainingSAEConfig,
)
from sae_lens.evals import EvalConfig, get_recons_loss, run_evals  # noqa: E402
from sae_lens.training.activation_scaler import ActivationScaler  # noqa: E402
from sae_lens.training.activations_store import ActivationsStore  # noqa: E402

import fxbridge as bridge  # noqa: E402
from tiny import VOCAB, build, forward_hooks  # noqa: E402
from tiny_tokenizer import numbered  # noqa: E402

os.environ.setdefault("WANDB_MODE", "disabled")
# SAELens's advice for real runs (tiny in-process datasets, untokenized text, several epochs) is noise here
pytestmark = [pytest.mark.sae, pytest.mark.filterwarnings("ignore::UserWarning:sae_lens.training.activations_store")]
CTX = 12  # context size of every store here
D = 64  # d_model of the tiny models


def word_tokenizer():
    return numbered(VOCAB)


_MODELS: dict[str, tuple] = {}


def traced_with_tokenizer(arch: str):
    """(HF model, traced module with the word tokenizer), traced once per module run."""
    if arch not in _MODELS:
        model = build(arch)
        _MODELS[arch] = (model, bridge.trace(model, tokenizer=word_tokenizer()))
    return _MODELS[arch]


def hf_layer_outputs(model, gm, ids: torch.Tensor) -> dict[int, torch.Tensor]:
    """Layer index -> HF decoder layer output (= blocks.i.hook_resid_post), recorded by HF forward hooks."""
    seen: dict[int, torch.Tensor] = {}
    layers = model.get_submodule(gm.spec.layers)

    def recorder(i):
        def hook(module, args, output):
            seen[i] = (output[0] if isinstance(output, tuple) else output).detach()
        return hook

    with forward_hooks(*[(layer, recorder(i)) for i, layer in enumerate(layers)]), torch.no_grad():
        model(ids)
    return seen


def random_words(n_rows: int, seed: int) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 9, (n_rows,), generator=g)
    return [" ".join(f"w{int(t)}" for t in torch.randint(3, VOCAB, (int(n),), generator=g)) for n in lengths]


def runner_cfg(hook_name: str, tmp_path, **overrides) -> LanguageModelSAERunnerConfig:
    base = dict(
        sae=StandardTrainingSAEConfig(d_in=D, d_sae=32, l1_coefficient=1e-3), hook_name=hook_name,
        model_name="tiny-traced", dataset_path="", is_dataset_tokenized=False, streaming=False, context_size=CTX,
        training_tokens=CTX * 4 * 40, train_batch_size_tokens=CTX * 4, store_batch_size_prompts=4,
        n_batches_in_buffer=8, lr=1e-2, device="cpu", seed=0, prepend_bos=True, n_eval_batches=1,
        eval_batch_size_prompts=2, logger=LoggingConfig(log_to_wandb=False), checkpoint_path=str(tmp_path / "ckpt"),
        output_path=str(tmp_path / "out"), n_checkpoints=0, verbose=False, dead_feature_window=10,
        feature_sampling_window=10, n_batches_for_norm_estimate=2)
    base.update(overrides)
    return LanguageModelSAERunnerConfig(**base)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_activations_store_over_token_dataset(arch, tmp_path):
    model, gm = traced_with_tokenizer(arch)
    g = torch.Generator().manual_seed(1)
    rows = torch.randint(3, VOCAB, (16, CTX), generator=g)
    store = ActivationsStore.from_config(gm, runner_cfg("blocks.0.hook_resid_post", tmp_path, is_dataset_tokenized=True),
                                         override_dataset=Dataset.from_dict({"tokens": rows.tolist()}))
    batch = store.get_batch_tokens()
    torch.testing.assert_close(batch, rows[:4])  # a pretokenized dataset's rows, as they are
    acts = store.get_activations(batch)
    assert acts.shape == (4, CTX, D)
    torch.testing.assert_close(acts, hf_layer_outputs(model, gm, batch)[0], atol=1e-5, rtol=1e-5)
    assert next(store).shape == (4 * CTX, D)  # the shuffled training buffer


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_activations_store_over_text_dataset_last_layer(arch, tmp_path):
    """Text rows go through gm.to_tokens(prepend_bos=False) and are packed with the tokenizer's BOS; the last
    layer's hook makes SAELens ask for stop_at_layer=n_layers."""
    model, gm = traced_with_tokenizer(arch)
    n_layers = model.config.num_hidden_layers
    hook = f"blocks.{n_layers - 1}.hook_resid_post"
    texts = random_words(40, seed=2)
    store = ActivationsStore.from_config(gm, runner_cfg(hook, tmp_path),
                                         override_dataset=Dataset.from_dict({"text": texts}))
    batch = store.get_batch_tokens()
    assert batch.shape == (4, CTX) and (batch[:, 0] == 0).all()  # BOS first in every row
    words = [i for text in texts for i in gm.tokenizer(text, add_special_tokens=False)["input_ids"]]
    packed = batch.flatten()
    packed = packed[packed != 0].tolist()
    assert packed == words[:len(packed)]  # the text's own token ids, in order, separated by BOS
    acts = store.get_activations(batch)
    torch.testing.assert_close(acts, hf_layer_outputs(model, gm, batch)[n_layers - 1], atol=1e-5, rtol=1e-5)


def per_token_ce(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """TL's loss_per_token: cross-entropy of position p predicting token p+1, [B, S-1]."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="none").view(ids.shape[0], -1)


def random_sae(hook_name: str, seed: int = 0, **cfg) -> StandardSAE:
    sae = StandardSAE(StandardSAEConfig(d_in=D, d_sae=32, **cfg))
    sae.cfg.metadata.hook_name = hook_name
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec):
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return sae


def hf_logits_replacing(model, gm, ids, layer: int, replace=None) -> torch.Tensor:
    module = model.get_submodule(f"{gm.spec.layers}.{layer}")

    def hook(mod, args, output):
        if replace is None:
            return None
        x = output[0] if isinstance(output, tuple) else output
        return (replace(x), *output[1:]) if isinstance(output, tuple) else replace(x)

    with forward_hooks((module, hook)), torch.no_grad():
        return model(ids).logits


def test_evals_recons_loss_and_run_evals(tmp_path):
    """get_recons_loss calls gm(tokens, return_type="both", loss_per_token=True) and run_with_hooks with the same
    keywords; run_evals runs its whole pipeline over the store."""
    model, gm = traced_with_tokenizer("gpt2")
    hook = "blocks.1.hook_resid_post"
    sae = random_sae(hook)
    ids = torch.randint(3, VOCAB, (2, CTX), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        metrics = get_recons_loss(sae, gm, ActivationScaler(), ids, compute_kl=True, compute_ce_loss=True)
        want_plain = per_token_ce(model(ids).logits, ids)
        want_sae = per_token_ce(hf_logits_replacing(model, gm, ids, 1, lambda x: sae.decode(sae.encode(x))), ids)
        want_zero = per_token_ce(hf_logits_replacing(model, gm, ids, 1, torch.zeros_like), ids)
    torch.testing.assert_close(metrics["ce_loss_without_sae"], want_plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(metrics["ce_loss_with_sae"], want_sae, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(metrics["ce_loss_with_ablation"], want_zero, atol=1e-5, rtol=1e-5)
    assert (metrics["ce_loss_with_sae"] - want_plain).abs().max() > 1e-3  # the SAE really was spliced in

    store = ActivationsStore.from_config(gm, runner_cfg(hook, tmp_path),
                                         override_dataset=Dataset.from_dict({"text": random_words(40, seed=4)}))
    cfg = EvalConfig(batch_size_prompts=2, n_eval_reconstruction_batches=1, n_eval_sparsity_variance_batches=1,
                     compute_kl=True, compute_ce_loss=True, compute_l2_norms=True, compute_sparsity_metrics=True,
                     compute_variance_metrics=True)
    results, _ = run_evals(sae, store, gm, ActivationScaler(), eval_config=cfg)
    ce = results["model_performance_preservation"]
    assert ce["ce_loss_without_sae"] > 0 and ce["ce_loss_with_sae"] != ce["ce_loss_without_sae"]
    assert results["model_behavior_preservation"]["kl_div_with_sae"] > 0


def test_training_with_override_model_lowers_the_loss(tmp_path):
    model, gm = traced_with_tokenizer("gpt2")
    hook = "blocks.1.hook_resid_post"
    runner = LanguageModelSAETrainingRunner(runner_cfg(hook, tmp_path), override_model=gm,
                                            override_dataset=Dataset.from_dict({"text": random_words(200, seed=5)}))
    held_out = torch.randint(3, VOCAB, (8, CTX), generator=torch.Generator().manual_seed(6))
    x = hf_layer_outputs(model, gm, held_out)[1].flatten(0, 1)
    before = copy.deepcopy(runner.sae)
    trained = runner.run()

    def mse(sae):
        with torch.no_grad():
            return float((sae.decode(sae.encode(x)) - x).pow(2).sum(-1).mean())

    assert mse(trained) < 0.5 * mse(before), (mse(before), mse(trained))


@pytest.mark.parametrize("use_error_term", [False, True])
def test_run_with_cache_with_saes_real_sae(use_error_term):
    model, gm = traced_with_tokenizer("gpt2")
    hook = "blocks.0.hook_resid_post"
    sae = random_sae(hook, seed=7)
    ids = torch.randint(3, VOCAB, (2, CTX), generator=torch.Generator().manual_seed(8))
    x = hf_layer_outputs(model, gm, ids)[0]
    with torch.no_grad():
        logits, cache = gm.run_with_cache_with_saes(ids, saes=[sae], use_error_term=use_error_term)
        want = hf_logits_replacing(model, gm, ids, 0, None if use_error_term else lambda a: sae.decode(sae.encode(a)))
        acts = sae.encode(x)
    torch.testing.assert_close(logits, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cache[f"{hook}.hook_sae_acts_post"], acts, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cache[f"{hook}.hook_sae_input"], x, atol=1e-5, rtol=1e-5)
    assert (f"{hook}.hook_sae_error" in cache) == use_error_term
    assert gm.acts_to_saes == {}


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_hook_z_sae_flattens_heads(arch):
    """An SAE trained on hook_z (reshape_activations="hook_z") sees [B,S,H*dh] and its output goes back per head: HF's
    o_proj input replaced by the reconstruction."""
    model, gm = traced_with_tokenizer(arch)
    hook = "blocks.0.attn.hook_z"
    sae = random_sae(hook, seed=9, reshape_activations="hook_z")
    ids = torch.randint(3, VOCAB, (2, CTX), generator=torch.Generator().manual_seed(10))
    o_proj = model.get_submodule(f"{gm.spec.layers}.0.{gm.spec.attn}.{gm.spec.o_proj}")
    seen = {}

    def replace(module, args):
        seen["z"] = args[0].detach()
        with torch.no_grad():
            return (sae.b_dec + torch.relu((args[0] - sae.b_dec) @ sae.W_enc + sae.b_enc) @ sae.W_dec,)

    handle = o_proj.register_forward_pre_hook(replace)
    try:
        with torch.no_grad():
            want = model(ids).logits
    finally:
        handle.remove()
    with torch.no_grad():
        logits, cache = gm.run_with_cache_with_saes(ids, saes=[sae])
    torch.testing.assert_close(logits, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cache[f"{hook}.hook_sae_input"], seen["z"], atol=1e-5, rtol=1e-5)
    assert cache[hook].shape == (2, CTX, 4, 16)


def test_exclude_special_tokens_from_the_tokenizer():
    """add_sae(exclude_special_tokens=True): the tokenizer's BOS / PAD positions keep the model's activation."""
    model, gm = traced_with_tokenizer("gpt2")
    hook = "blocks.0.hook_resid_post"
    sae = random_sae(hook, seed=11)
    tok = gm.tokenizer
    ids = torch.randint(3, VOCAB, (2, CTX), generator=torch.Generator().manual_seed(12))
    ids[:, 0], ids[1, 5] = tok.bos_token_id, tok.pad_token_id
    keep = torch.isin(ids, torch.tensor([tok.bos_token_id, tok.pad_token_id]))[..., None]
    with torch.no_grad():
        want = hf_logits_replacing(model, gm, ids, 0, lambda a: torch.where(keep, a, sae.decode(sae.encode(a))))
        got = gm.run_with_saes(ids, saes=[sae], exclude_special_tokens=True)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_string_input_with_an_sae_bypassing_bos():
    """A string goes through the tokenizer with TL's BOS (GPT-2: prepended), and the BOS position is bypassed."""
    model, gm = traced_with_tokenizer("gpt2")
    hook = "blocks.0.hook_resid_post"
    sae = random_sae(hook, seed=13)
    text = "w5 w9 w17 w33"
    ids = torch.tensor([[gm.tokenizer.bos_token_id, *gm.tokenizer(text, add_special_tokens=False)["input_ids"]]])
    keep = torch.zeros(ids.shape, dtype=torch.bool)[..., None]
    keep[0, 0] = True
    with torch.no_grad():
        want = hf_logits_replacing(model, gm, ids, 0, lambda a: torch.where(keep, a, sae.decode(sae.encode(a))))
        got = gm.run_with_saes(text, saes=[sae], exclude_special_tokens=True)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
