"""fxbridge.from_pretrained on local save_pretrained directories (a tiny GPT-2 and a tiny Llama, each with an
in-process tokenizer): the traced module's logits equal those of the HF model loaded from the same directory, the
tokenizer is set with TL's BOS handling, and load failures are ModelLoadErrors naming the source."""
import pytest
import torch
import transformers as tf

import fxbridge as bridge
from fxbridge.pretrained import _tokenizer
from tiny import build
from tiny_tokenizer import ID, gpt2_like, llama_like

TOKENIZERS = {"gpt2": gpt2_like, "llama": llama_like}
BOS = {"gpt2": ID["<|endoftext|>"], "llama": ID["<s>"]}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """arch -> a directory holding the tiny model and its tokenizer (save_pretrained)."""
    dirs = {}
    for arch, make in TOKENIZERS.items():
        where = tmp_path_factory.mktemp(f"tiny-{arch}")
        build(arch).save_pretrained(where)
        make().save_pretrained(where)
        dirs[arch] = where
    return dirs


@pytest.mark.parametrize("arch", [pytest.param(a, marks=pytest.mark.xdist_group(a)) for a in TOKENIZERS])
def test_from_pretrained_matches_hf(saved, arch):
    gm = bridge.from_pretrained(saved[arch], default_padding_side="left")
    ref = tf.AutoModelForCausalLM.from_pretrained(saved[arch]).eval()
    assert isinstance(gm, bridge.HookedGraphModule) and gm.tokenizer is not None
    assert gm.cfg.tokenizer_prepends_bos is True and gm.cfg.dtype == torch.float32 and gm.cfg.device == "cpu"
    assert gm.tokenizer.padding_side == "left" == gm.cfg.default_padding_side
    assert gm.cfg.model_name == saved[arch].name and gm.cfg.tokenizer_name == str(saved[arch])
    tokens = gm.to_tokens(["When Mary and John went to the store", "the cat sat on the mat"], padding_side="right")
    assert tokens[:, 0].tolist() == [BOS[arch]] * 2 and tokens[0, 1].item() == ID["When"]
    with torch.no_grad():
        assert torch.allclose(gm(tokens), ref(tokens).logits, atol=1e-5)


@pytest.mark.xdist_group("gpt2")
def test_tokenizer_choices(saved):
    where = saved["gpt2"]
    bf16 = bridge.from_pretrained(where, tokenizer=False, dtype="bfloat16")
    assert bf16.tokenizer is None and bf16.cfg.dtype == torch.bfloat16
    assert bf16.hf.lm_head.weight.dtype == torch.bfloat16
    mine = llama_like()
    assert _tokenizer(str(where), mine, False) is mine  # tokenizer=<object>: used as it is
    from_path = _tokenizer(str(where), saved["llama"], False)  # tokenizer=<path>: loaded from there
    assert from_path("hello").input_ids == [ID["<s>"], ID["hello"]]
    with pytest.raises(bridge.UsageError, match="tokenizer= takes"):
        bridge.from_pretrained(where, tokenizer=3)


def test_load_errors_name_the_source(tmp_path, saved):
    missing = tmp_path / "nowhere"
    with pytest.raises(bridge.ModelLoadError, match="nowhere"):
        bridge.from_pretrained(missing, tokenizer=False)
    no_tokenizer = tmp_path / "model-only"
    build("gpt2").save_pretrained(no_tokenizer)
    with pytest.raises(bridge.ModelLoadError, match="tokenizer=False") as err:
        bridge.from_pretrained(no_tokenizer)
    assert "model-only" in str(err.value)
    config_only = tmp_path / "config-only"
    config_only.mkdir()
    (config_only / "config.json").write_text((saved["gpt2"] / "config.json").read_text())
    with pytest.raises(bridge.ModelLoadError, match="config-only"):
        bridge.from_pretrained(config_only, tokenizer=False)
    with pytest.raises(bridge.ModelLoadError, match="unknown dtype"):
        bridge.from_pretrained(saved["gpt2"], dtype="float8")
    with pytest.raises(bridge.UsageError, match="unknown device"):
        bridge.from_pretrained(saved["gpt2"], device="tpu7")
