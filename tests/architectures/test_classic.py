"""OPT, XGLM, GPT-Neo, OpenAI GPT, Bloom, MPT: what is special in each, checked by hand computation or HF modules."""
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import traced
from tiny import left_padded, tokens

TOL = 1e-5
MIN = torch.finfo(torch.float32).min


def _cache(arch, ids, mask=None, names=None):
    _, _, gm = traced(arch)
    with torch.no_grad():
        return gm.run_with_cache(ids, attention_mask=mask, names_filter=names)[1]


def _diff(a, b):
    return (a - b).abs().max().item()


def test_opt_positions_come_from_the_mask_with_offset_2():
    model, _, _ = traced("opt")
    ids, mask = left_padded(3, 9, pads=[0, 3, 6])
    pos = _cache("opt", ids, mask, ["hook_pos_embed"])["hook_pos_embed"]
    want_ids = (torch.cumsum(mask, 1) * mask - 1) + 2  # by hand: first real token at row 2 of the table
    assert want_ids[1, 3].item() == 2 and want_ids[1, 0].item() == 1
    assert _diff(pos, model.model.decoder.embed_positions.weight[want_ids]) == 0


def test_opt_350m_post_ln_and_projections():
    model, _, _ = traced("opt_350m")
    dec = model.model.decoder
    ids = tokens(2, 7)
    cache = _cache("opt_350m", ids)
    with torch.no_grad():
        assert _diff(cache["hook_embed"], dec.project_in(dec.embed_tokens(ids))) < TOL
        layer = dec.layers[1]
        mid = cache["blocks.1.hook_resid_pre"] + cache["blocks.1.hook_attn_out"]
        assert _diff(cache["blocks.1.hook_resid_mid"], mid) < TOL  # before the norm, as TransformerLens's BERT
        n = layer.self_attn_layer_norm(mid)
        assert _diff(cache["blocks.1.ln1.hook_normalized"], F.layer_norm(mid, (64,))) < TOL
        assert _diff(cache["blocks.1.hook_resid_post"], layer.final_layer_norm(n + cache["blocks.1.hook_mlp_out"])) < TOL
        assert _diff(cache["hook_unembed"], model.lm_head(dec.project_out(cache["blocks.2.hook_resid_post"]))) < TOL
    assert cache["blocks.0.mlp.hook_pre"].shape == (2, 7, 96)  # OPT's [B*S,..] MLP rows seen as [B,S,..]


def test_xglm_embed_is_scaled_by_sqrt_d_model_in_the_module():
    model, _, _ = traced("xglm")
    ids = tokens(2, 5)
    cache = _cache("xglm", ids, names=["hook_embed", "hook_pos_embed", "blocks.0.hook_resid_pre"])
    assert _diff(cache["hook_embed"], model.model.embed_tokens.weight[ids] * math.sqrt(64)) < TOL
    assert _diff(cache["blocks.0.hook_resid_pre"], cache["hook_embed"] + cache["hook_pos_embed"]) < TOL


def test_xglm_positions_are_hf_arange_also_when_left_padded():
    model, _, _ = traced("xglm")
    ids, mask = left_padded(2, 6, pads=[0, 2])
    pos = _cache("xglm", ids, mask, ["hook_pos_embed"])["hook_pos_embed"]
    # HF (5.x) numbers positions 0..S-1 whatever the mask, plus the table offset 2: the same for both rows
    table = model.model.embed_positions.weights
    assert _diff(pos, table[torch.arange(6) + 2].expand(2, -1, -1)) == 0


@pytest.mark.parametrize("layer,window", [(0, None), (1, 4), (2, 4)])
def test_gpt_neo_scores_are_unscaled_and_windowed(layer, window):
    ids = tokens(1, 9)
    cache = _cache("gpt_neo", ids)
    q, k = cache[f"blocks.{layer}.attn.hook_q"], cache[f"blocks.{layer}.attn.hook_k"]
    scores = cache[f"blocks.{layer}.attn.hook_attn_scores"]
    qk = torch.einsum("bqhd,bkhd->bhqk", q, k)  # no 1/sqrt(dh)
    i, j = torch.arange(9)[:, None], torch.arange(9)[None, :]
    keep = (j <= i) if window is None else (j <= i) & (i - j < window)
    assert _diff(scores[..., keep], qk[..., keep]) < TOL
    above = j > i  # HF adds its causal mask (finfo.min) to where(bias, s, finfo.min): -inf above the diagonal
    assert torch.isinf(scores[..., above]).all()
    assert (scores[..., ~keep & ~above] == MIN).all() and (window is None) == bool((~keep & ~above).sum() == 0)


def test_openai_gpt_post_ln_block():
    model, _, _ = traced("openai-gpt")
    ids = tokens(2, 6)
    cache = _cache("openai-gpt", ids)
    block = model.transformer.h[1]
    with torch.no_grad():
        mid = cache["blocks.1.hook_resid_pre"] + cache["blocks.1.hook_attn_out"]
        assert _diff(cache["blocks.1.hook_resid_mid"], mid) < TOL
        n = block.ln_1(mid)
        assert _diff(cache["blocks.1.ln2.hook_normalized"], F.layer_norm(n + cache["blocks.1.hook_mlp_out"], (64,))) < TOL
        assert _diff(cache["blocks.1.hook_resid_post"], block.ln_2(n + cache["blocks.1.hook_mlp_out"])) < TOL
        assert _diff(cache["hook_unembed"], model.lm_head(cache["blocks.2.hook_resid_post"])) < TOL  # no final norm
    i, j = torch.arange(6)[:, None], torch.arange(6)[None, :]
    assert torch.isinf(cache["blocks.0.attn.hook_attn_scores"][..., j > i]).all()  # s * bias: -inf above the diagonal


def _alibi_check(arch, scale, alibi):
    ids = tokens(2, 7)
    cache = _cache(arch, ids)
    q, k = cache["blocks.1.attn.hook_q"], cache["blocks.1.attn.hook_k"]
    qk = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    scores = cache["blocks.1.attn.hook_attn_scores"]
    keep = torch.ones(7, 7).tril().bool()
    assert _diff(scores[..., keep], (qk + alibi)[..., keep]) < TOL
    assert alibi.abs().max() > 0.1  # the bias is not negligible


def test_bloom_alibi_in_scores_and_embedding_norm():
    model, _, _ = traced("bloom")
    slopes = torch.tensor([2 ** (-8 * (h + 1) / 4) for h in range(4)])  # by hand: 4 heads, 2^(-8h/n)
    _alibi_check("bloom", 1 / math.sqrt(16), slopes[None, :, None, None] * torch.arange(7.0))
    ids = tokens(2, 5)
    cache = _cache("bloom", ids, names=["hook_embed", "ln_embed.hook_normalized", "blocks.0.hook_resid_pre"])
    ln = model.transformer.word_embeddings_layernorm
    with torch.no_grad():
        assert _diff(cache["ln_embed.hook_normalized"], F.layer_norm(cache["hook_embed"], (64,))) < TOL
        assert _diff(cache["blocks.0.hook_resid_pre"], ln(cache["hook_embed"])) < TOL


def test_mpt_alibi_in_scores():
    slopes = torch.tensor([2 ** (-8 * (h + 1) / 4) for h in range(4)])  # alibi_bias_max 8, 4 heads
    _alibi_check("mpt", 1 / math.sqrt(16), slopes[None, :, None, None] * torch.arange(-6.0, 1.0))


@pytest.mark.parametrize("arch", ["mpt", "gpt_neo"])
def test_sliced_buffers_run_every_length_up_to_the_maximum(arch):
    _, ref, gm = traced(arch)  # the capture guarded on seq != max; every length must still run and match
    for seq in (127, 128):
        ids = tokens(1, seq)
        with torch.no_grad():
            assert _diff(gm(ids), ref(ids).logits) < TOL


def _variant(arch, **changes):
    """A traced variant of tiny ``arch`` with config ``changes`` and its eager reference."""
    import copy

    import fxbridge
    from tiny import CONFIGS, build_from_config, eager_reference
    config = CONFIGS[arch]()
    for key, value in changes.items():
        setattr(config, key, copy.deepcopy(value))
    model = build_from_config(config)
    return model, eager_reference(model), fxbridge.trace(model)


def _parity(ref, gm):
    ids, mask = left_padded(3, 9, pads=[0, 3, 6])
    with torch.no_grad():
        assert _diff(gm(tokens(2, 8)), ref(tokens(2, 8)).logits) < TOL
        assert _diff(gm(ids, attention_mask=mask)[mask.bool()], ref(ids, attention_mask=mask).logits[mask.bool()]) < TOL


def test_mpt_clip_qkv_is_inside_hook_q():
    from transformers import MptConfig
    attn_config = MptConfig(**{"attn_config": {"clip_qkv": 0.05}}).attn_config
    model, ref, gm = _variant("mpt", attn_config=attn_config)
    assert model.transformer.blocks[0].attn.clip_qkv == 0.05
    _parity(ref, gm)
    with torch.no_grad():
        q = gm.run_with_cache(tokens(1, 6), names_filter="blocks.0.attn.hook_q")[1]["blocks.0.attn.hook_q"]
    assert q.abs().max().item() == pytest.approx(0.05)  # the clamp bites and hook_q is after it


@pytest.mark.slow  # more configs of the same families: pytest -m slow
@pytest.mark.parametrize("arch,changes", [
    ("opt", dict(enable_bias=False, layer_norm_elementwise_affine=False)),
    ("opt", dict(word_embed_proj_dim=48)),  # pre-LN with project_in / project_out
    ("gpt_neo", dict(attention_types=[[["local"], 3]], attention_layers=["local"] * 3)),
    ("xglm", dict(scale_embedding=False)),
    ("bloom", dict(apply_residual_connection_post_layernorm=True)),  # resid_mid = ln1 output + attn_out, as HF adds
])
def test_other_configs_of_the_families_match_hf(arch, changes):
    _, ref, gm = _variant(arch, **changes)
    _parity(ref, gm)
