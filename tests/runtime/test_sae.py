"""SAE splicing (HookedSAETransformer's API) on a traced module, with a hand-written SAE duck-typing SAELens's.

Oracles: the SAE's math written out here (relu((x - b_dec) W_enc + b_enc) W_dec + b_dec) applied to the activation
HF computes (HF forward hooks record it, or replace it for the reconstruction), and HF's own logits.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from conftest import traced
from tiny import forward_hooks, tokens

ARCHS = [pytest.param(a, marks=pytest.mark.xdist_group(a)) for a in ("llama", "gpt2")]
H = "blocks.0.hook_resid_post"  # = the output of HF's first decoder layer
SAE_NAMES = ("hook_sae_input", "hook_sae_acts_pre", "hook_sae_acts_post", "hook_sae_recons", "hook_sae_error",
             "hook_sae_output")


class Point(nn.Module):
    """Stands in for TransformerLens's HookPoint: an identity module (torch hooks can be registered on it)."""

    def forward(self, x):
        return x


class TinySAE(nn.Module):
    """The parts of SAELens's ``SAE`` that a model sees: cfg.metadata.hook_name, use_error_term, encode / decode
    calling its hook_sae_* submodules."""

    def __init__(self, hook_name: str, d_in: int = 64, d_sae: int = 24, seed: int = 0, use_error_term: bool = False,
                 old_cfg: bool = False, hook_name_out: str | None = None):
        super().__init__()
        meta = SimpleNamespace(hook_name=hook_name, hook_name_out=hook_name_out)
        self.cfg = SimpleNamespace(hook_name=hook_name) if old_cfg else SimpleNamespace(metadata=meta)
        self.use_error_term = use_error_term
        g = torch.Generator().manual_seed(seed)
        self.W_enc = nn.Parameter(torch.randn(d_in, d_sae, generator=g) * 0.3)
        self.b_enc = nn.Parameter(torch.randn(d_sae, generator=g) * 0.1)
        self.W_dec = nn.Parameter(torch.randn(d_sae, d_in, generator=g) * 0.3)
        self.b_dec = nn.Parameter(torch.randn(d_in, generator=g) * 0.1)
        for name in SAE_NAMES:
            setattr(self, name, Point())

    def encode(self, x):
        x = self.hook_sae_input(x)
        return self.hook_sae_acts_post(torch.relu(self.hook_sae_acts_pre((x - self.b_dec) @ self.W_enc + self.b_enc)))

    def decode(self, acts):
        return self.hook_sae_recons(acts @ self.W_dec + self.b_dec)

    def forward(self, x):
        return self.hook_sae_output(self.decode(self.encode(x)))


def acts_by_hand(sae, x):
    with torch.no_grad():
        return torch.relu((x - sae.b_dec) @ sae.W_enc + sae.b_enc)


def recons_by_hand(sae, x, edit=None):
    acts = acts_by_hand(sae, x)
    if edit is not None:
        acts = edit(acts.clone())
    with torch.no_grad():
        return acts @ sae.W_dec + sae.b_dec


def layer(ref, gm, i=0):
    return ref.get_submodule(f"{gm.spec.layers}.{i}")


def _first(output):
    return output[0] if isinstance(output, tuple) else output


def _replace(output, new):
    return (new, *output[1:]) if isinstance(output, tuple) else new


def hf_run(ref, module, ids, replace=None):
    """(HF logits, the output of ``module``); ``replace(x)`` substitutes that output (an HF forward hook)."""
    seen = {}

    def hook(mod, args, output):
        seen["x"] = _first(output).detach().clone()
        return _replace(output, replace(_first(output))) if replace is not None else None

    with forward_hooks((module, hook)), torch.no_grad():
        logits = ref(ids).logits
    return logits, seen["x"]


@pytest.fixture
def setup(request):
    model, ref, gm = traced(request.param)
    gm.reset_hooks(including_permanent=True)
    gm.reset_saes()
    yield ref, gm
    gm.reset_saes()


@pytest.mark.parametrize("setup", ARCHS, indirect=True)
def test_reconstruction_replaces_the_activation(setup):
    ref, gm = setup
    sae, ids = TinySAE(H), tokens(2, 7)
    want, _ = hf_run(ref, layer(ref, gm), ids, replace=lambda x: recons_by_hand(sae, x))
    plain, _ = hf_run(ref, layer(ref, gm), ids)
    with torch.no_grad():
        got = gm.run_with_saes(ids, saes=[sae])
    assert (want - plain).abs().max() > 1e-2  # the splice is visible in the logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert gm.acts_to_saes == {}  # run_with_saes removes it
    torch.testing.assert_close(gm(ids), plain, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("setup", ARCHS, indirect=True)
def test_error_term_keeps_logits_and_caches_every_sae_point(setup):
    ref, gm = setup
    sae, ids = TinySAE(H), tokens(2, 7)
    want, x = hf_run(ref, layer(ref, gm), ids)
    with torch.no_grad():
        logits, cache = gm.run_with_cache_with_saes(ids, saes=[sae], use_error_term=True)
    torch.testing.assert_close(logits, want, atol=1e-5, rtol=1e-5)
    recons = recons_by_hand(sae, x)
    torch.testing.assert_close(cache[f"{H}.hook_sae_input"], x, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cache[f"{H}.hook_sae_acts_post"], acts_by_hand(sae, x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cache[f"{H}.hook_sae_recons"], recons, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cache[f"{H}.hook_sae_error"], x - recons, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cache[f"{H}.hook_sae_output"], x, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cache[H], x, atol=1e-5, rtol=1e-5)  # the hook point itself: the SAE's input
    assert (cache[f"{H}.hook_sae_acts_post"] > 0).any() and (cache[f"{H}.hook_sae_acts_post"] == 0).any()


@pytest.mark.parametrize("setup", ARCHS, indirect=True)
def test_sae_points_are_hook_points_by_name(setup):
    ref, gm = setup
    sae, ids = TinySAE(H), tokens(1, 5)
    names = [f"{H}.{p}" for p in SAE_NAMES]
    gm.add_sae(sae)
    listed = list(gm.hook_dict)
    assert set(names) <= set(listed) and listed.index(H) < min(listed.index(n) for n in names)
    assert listed.index(f"{H}.hook_sae_output") < listed.index("blocks.1.hook_resid_pre")  # firing order
    assert all(gm.resolve(n) == n and gm.hook_dict[n].name == n for n in names)
    _, cache = gm.run_with_cache(ids, names_filter=lambda n: "hook_sae" in n)
    assert sorted(cache) == sorted(n for n in names if not n.endswith("error"))  # no error term: no error hook
    _, cache = gm.run_with_cache(ids, names_filter=[f"{H}.hook_sae_acts_post"])
    assert list(cache) == [f"{H}.hook_sae_acts_post"]
    gm.reset_saes()
    assert not set(names) & set(gm.hook_dict)
    with pytest.raises(KeyError):
        gm.resolve(f"{H}.hook_sae_acts_post")


@pytest.mark.parametrize("setup", ARCHS, indirect=True)
def test_editing_features_through_a_hook(setup):
    """Feature ablation as SAELens users write it: zero a latent through hook_sae_acts_post; with the error term
    the output is decode(edited acts) + (x - decode(clean acts))."""
    ref, gm = setup
    sae, ids = TinySAE(H), tokens(2, 7)
    _, x = hf_run(ref, layer(ref, gm), ids)
    latent = int(acts_by_hand(sae, x).sum((0, 1)).argmax())

    def ablate(acts, hook=None):
        acts[..., latent] = 0.0
        return acts

    for use_error_term in (False, True):
        def by_hand(x):
            out = recons_by_hand(sae, x, edit=ablate)
            return out + (x - recons_by_hand(sae, x)) if use_error_term else out
        want, _ = hf_run(ref, layer(ref, gm), ids, replace=by_hand)
        gm.add_sae(sae, use_error_term=use_error_term)
        with torch.no_grad():
            got = gm.run_with_hooks(ids, fwd_hooks=[(f"{H}.hook_sae_acts_post", ablate)])
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        gm.reset_saes()
        sae.use_error_term = use_error_term  # run_with_hooks_with_saes takes the SAE's own setting (as SAELens)
        with torch.no_grad():
            got = gm.run_with_hooks_with_saes(ids, saes=[sae], fwd_hooks=[(f"{H}.hook_sae_acts_post", ablate)])
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert gm.acts_to_saes == {}


@pytest.mark.parametrize("setup", ARCHS[:1], indirect=True)
def test_attached_sae_survives_calls_and_hook_resets(setup):
    ref, gm = setup
    sae, ids = TinySAE(H, old_cfg=True), tokens(2, 6)  # older SAELens: cfg.hook_name
    want, _ = hf_run(ref, layer(ref, gm), ids, replace=lambda x: recons_by_hand(sae, x))
    plain, _ = hf_run(ref, layer(ref, gm), ids)
    gm.add_sae(sae)
    gm.reset_hooks(including_permanent=True)  # hooks, not SAEs (as HookedSAETransformer)
    with torch.no_grad():
        for _ in range(2):
            torch.testing.assert_close(gm(ids), want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(gm(ids, stop_at_layer=1), recons_by_hand(sae, layer_out(ref, gm, ids)),
                                   atol=1e-5, rtol=1e-5)
    assert gm.acts_to_saes == {H: sae}
    gm.reset_saes(H)
    assert gm.acts_to_saes == {}
    with torch.no_grad():
        torch.testing.assert_close(gm(ids), plain, atol=1e-5, rtol=1e-5)
    with pytest.warns(UserWarning, match="no SAE is attached"):
        gm.reset_saes(H)


def layer_out(ref, gm, ids):
    return hf_run(ref, layer(ref, gm), ids)[1]


@pytest.mark.parametrize("setup", ARCHS[:1], indirect=True)
def test_context_restores_the_previous_sae_also_after_an_error(setup):
    ref, gm = setup
    first, second, ids = TinySAE(H, seed=1), TinySAE(H, seed=2), tokens(1, 6)
    want_first, _ = hf_run(ref, layer(ref, gm), ids, replace=lambda x: recons_by_hand(first, x))
    want_second, _ = hf_run(ref, layer(ref, gm), ids, replace=lambda x: recons_by_hand(second, x))
    gm.add_sae(first)
    with torch.no_grad():
        with gm.saes(saes=second):
            assert gm.acts_to_saes[H] is second
            torch.testing.assert_close(gm(ids), want_second, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(gm(ids), want_first, atol=1e-5, rtol=1e-5)

        def boom(acts, hook):
            raise RuntimeError("boom")
        with pytest.raises(RuntimeError, match="boom"):
            gm.run_with_hooks_with_saes(ids, saes=[second], fwd_hooks=[(f"{H}.hook_sae_acts_pre", boom)])
        assert gm.acts_to_saes == {H: first}
        assert not any(gm.hook_dict[f"{H}.{p}"].has_hooks for p in SAE_NAMES)
        torch.testing.assert_close(gm(ids), want_first, atol=1e-5, rtol=1e-5)
        # the SAE called directly, outside the model, is itself (the splice's hooks act only inside a forward)
        x = torch.randn(2, 64)
        torch.testing.assert_close(first(x), recons_by_hand(first, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("setup", ARCHS[:1], indirect=True)
def test_sae_on_a_point_only_computed_when_hooked(setup):
    """ln2.hook_normalized exists only on the hooked path of the norm core: an SAE there must switch it on."""
    ref, gm = setup
    name = "blocks.1.ln2.hook_normalized"
    sae, ids = TinySAE(name), tokens(1, 6)
    norm = layer(ref, gm, 1).get_submodule(gm.spec.ln2)
    seen = {}
    with forward_hooks((norm, lambda m, args, out: seen.update(x=args[0].detach()))), torch.no_grad():
        want = ref(ids).logits
    x = seen["x"]
    normalized = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + ref.config.rms_norm_eps)
    with torch.no_grad():
        logits, cache = gm.run_with_cache_with_saes(ids, saes=sae, use_error_term=True,
                                                    names_filter=lambda n: n.startswith(name + "."))
    torch.testing.assert_close(logits, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cache[f"{name}.hook_sae_acts_post"], acts_by_hand(sae, normalized),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("setup", ARCHS[:1], indirect=True)
def test_transcoder_and_alias_and_gradients(setup):
    """A transcoder (hook_name_out) reads resid_mid and replaces mlp_out; an SAE named by a TransformerBridge alias
    (blocks.0.hook_out = resid_post) answers to both spellings; gradients reach the SAE's weights."""
    ref, gm = setup
    ids = tokens(1, 6)
    tc = TinySAE("blocks.0.hook_resid_mid", hook_name_out="blocks.0.hook_mlp_out", seed=3)
    block = layer(ref, gm)
    seen = {}
    with forward_hooks((block.get_submodule(gm.spec.ln2), lambda m, args, out: seen.update(mid=args[0])),
                       (block.mlp, lambda m, args, out: recons_by_hand(tc, seen["mid"]))), torch.no_grad():
        want = ref(ids).logits
    with torch.no_grad():
        torch.testing.assert_close(gm.run_with_saes(ids, saes=[tc]), want, atol=1e-5, rtol=1e-5)
    sae = TinySAE("blocks.0.hook_out")
    _, cache = gm.run_with_cache_with_saes(ids, saes=[sae])
    assert gm.acts_to_saes == {}
    torch.testing.assert_close(cache["blocks.0.hook_out.hook_sae_acts_post"], cache[f"{H}.hook_sae_acts_post"])
    gm.run_with_saes(ids, saes=[sae]).sum().backward()
    assert sae.W_enc.grad is not None and sae.W_enc.grad.abs().sum() > 0


@pytest.mark.parametrize("setup", ARCHS[:1], indirect=True)
def test_bad_saes(setup):
    ref, gm = setup
    with pytest.raises(KeyError, match="resid_post"):
        gm.add_sae(TinySAE("blocks.0.hook_resid_postt"))
    nameless = TinySAE(H)
    nameless.cfg.metadata.hook_name = None
    with pytest.raises(ValueError, match="cfg.metadata.hook_name"):
        gm.add_sae(nameless)
    wrong = TinySAE(H, d_in=64)
    wrong.decode = lambda acts: acts  # d_sae wide, not d_in
    with pytest.raises(ValueError, match="SAE output of shape"), torch.no_grad():
        gm.run_with_saes(tokens(1, 4), saes=[wrong])
    assert gm.acts_to_saes == {}


@pytest.mark.parametrize("setup", ARCHS[:1], indirect=True)
def test_exclude_special_tokens_bypasses_those_positions(setup):
    ref, gm = setup
    sae, ids = TinySAE(H), tokens(2, 7)
    special = [int(ids[0, 0]), int(ids[1, 3])]
    keep = torch.isin(ids, torch.tensor(special))[..., None]
    for use_error_term in (False, True):
        by_hand = (lambda x: x) if use_error_term else (lambda x: torch.where(keep, x, recons_by_hand(sae, x)))
        want, x = hf_run(ref, layer(ref, gm), ids, replace=by_hand)
        with torch.no_grad():
            logits, cache = gm.run_with_cache_with_saes(ids, saes=[sae], use_error_term=use_error_term,
                                                        exclude_special_tokens=special)
        torch.testing.assert_close(logits, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(cache[f"{H}.hook_sae_output"], by_hand(x), atol=1e-5, rtol=1e-5)
        if use_error_term:
            error = torch.where(keep, torch.zeros_like(x), x - recons_by_hand(sae, x))
            torch.testing.assert_close(cache[f"{H}.hook_sae_error"], error, atol=1e-5, rtol=1e-5)
    assert not gm._forward_pre_hooks and not gm._forward_hooks  # the mask hooks leave with the SAE
    if getattr(gm, "tokenizer", None) is None:
        with pytest.raises(ValueError, match="tokenizer"):
            gm.add_sae(sae, exclude_special_tokens=True)
    assert gm.acts_to_saes == {}


@pytest.mark.parametrize("setup", ARCHS[:1], indirect=True)
def test_deepcopy_with_an_sae_attached_copies_no_sae(setup):
    import copy
    ref, gm = setup
    sae, ids = TinySAE(H), tokens(1, 5)
    want, _ = hf_run(ref, layer(ref, gm), ids, replace=lambda x: recons_by_hand(sae, x))
    plain, _ = hf_run(ref, layer(ref, gm), ids)
    gm.add_sae(sae)
    twin = copy.deepcopy(gm)
    with torch.no_grad():
        torch.testing.assert_close(twin(ids), plain, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(gm(ids), want, atol=1e-5, rtol=1e-5)
    assert twin.acts_to_saes == {} and f"{H}.hook_sae_acts_post" not in twin.hook_dict


@pytest.mark.parametrize("setup", ARCHS, indirect=True)
def test_generation_with_an_sae_attached_equals_the_no_cache_loop(setup):
    """An attached SAE is spliced into every forward of ``generate``; with the KV cache its reconstruction at each
    new position gives the tokens of the no-cache loop (the SAE on the whole sequence, argmax, append)."""
    ref, gm = setup
    sae, ids = TinySAE(H), tokens(2, 6)
    with gm.saes(saes=[sae]):
        cached = gm.generate(ids, max_new_tokens=5, do_sample=False, stop_at_eos=False, verbose=False)
        loop = ids
        for _ in range(5):
            with torch.no_grad():
                loop = torch.cat([loop, gm(loop)[:, -1].argmax(-1, keepdim=True)], dim=1)
    plain = gm.generate(ids, max_new_tokens=5, do_sample=False, stop_at_eos=False, verbose=False)
    assert torch.equal(cached, loop)
    assert not torch.equal(cached, plain)  # the SAE's reconstruction error changes what is generated
