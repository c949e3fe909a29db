"""The command line: `python -m fxbridge inspect|export` on a config.json, and one-line errors."""
import json
import os
import subprocess
import sys

import pytest

from fxbridge import cli
from tiny import CONFIGS


def _fxbridge(*args, env=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "fxbridge", *args], capture_output=True, text=True, timeout=300,
                          env=env)


@pytest.fixture(scope="module")
def config_json(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "config.json"
    CONFIGS["llama"]().to_json_file(str(path))
    return path


def test_inspect_prints_architecture_passes_and_hook_table(config_json):
    from conftest import traced
    _, _, gm = traced("llama")  # the same tiny config, traced in-process
    done = _fxbridge("inspect", str(config_json), "--quiet")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "LlamaForCausalLM" in out and "model_type='llama'" in out
    for result in gm.report.passes:
        assert f"{result.name}" in out and f"{result.matches} matches" in out
    table = out[out.index("Hook table"):].splitlines()[3:]
    assert [line.split()[0] for line in table] == list(gm.hook_dict)
    assert "[B,S,Hkv,dh]" in out and "[B,S,2,16]" in out


@pytest.mark.parametrize("args", [["inspect", "no/such/dir/config.json"],  # a missing path
                                  ["inspect", "some-org/not-a-model"]])  # a hub id, offline
def test_bad_model_source_is_one_line_exit_2(args):
    done = _fxbridge(*args)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("fxbridge: error:") and args[1] in lines[0]


@pytest.mark.parametrize("args", [["inspect", "./missing-model"], ["export", "./missing.json", "out.svg"],
                                  ["inspect", "."]])
def test_bad_model_source_in_process(args, capsys):
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("fxbridge: error:") and repr(args[1]) in err


def test_export_command_writes_one_layer(config_json, tmp_path, capsys):
    out = tmp_path / "layer1.json"
    assert cli.main(["export", str(config_json), str(out), "--layer", "1", "--quiet"]) == 0
    data = json.loads(out.read_text())
    assert data["layer"] == 1 and data["view"] == "layer"
    assert data["hooks"] and all(h.startswith("blocks.1.") for h in data["hooks"])
    assert "blocks.1.attn.hook_pattern" in data["hooks"]
    assert cli.main(["export", str(config_json), str(tmp_path / "c.graphml"), "--view", "collapsed", "-q"]) == 0
    assert "wrote" in capsys.readouterr().out


def test_meta_device_inspect_and_json(config_json, capsys):
    """--meta: tracing on the meta device works; the table is the same as with real weights."""
    from conftest import traced
    _, _, gm = traced("llama")
    assert cli.main(["inspect", str(config_json), "--meta", "--json", "-q"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [h["name"] for h in data["hooks"]] == list(gm.hook_dict)
    assert [h["sizes"] for h in data["hooks"]] == [r.sizes for r in gm.hook_table()]
    assert {p["name"]: p["matches"] for p in data["passes"]} == {r.name: r.matches for r in gm.report.passes}


def test_user_errors_in_process_are_one_line(config_json, tmp_path, capsys):
    import transformers as tf
    opt = tmp_path / "opt.json"
    tf.OPTConfig(vocab_size=50, hidden_size=32, num_attention_heads=2, ffn_dim=48, num_hidden_layers=1,
                 word_embed_proj_dim=32).to_json_file(str(opt))
    assert cli.main(["inspect", str(opt), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'opt'" in err and "llama" in err
    assert cli.main(["export", str(config_json), str(tmp_path / "x.txt"), "-q"]) == 2
    assert ".graphml" in capsys.readouterr().err
    assert cli.main(["inspect", str(config_json), "--dtype", "int3", "-q"]) == 2
    assert "bfloat16" in capsys.readouterr().err


def test_loading_builds_what_the_config_says(config_json):
    import torch
    from fxbridge.loading import load_model
    model = load_model(config_json, dtype="bfloat16")
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert model.config.num_hidden_layers == CONFIGS["llama"]().num_hidden_layers
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    meta = load_model(config_json, meta=True)
    assert {p.device.type for p in meta.parameters()} == {"meta"}
    same = load_model(config_json, seed=0)
    again = load_model(config_json, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(same.parameters(), again.parameters()))


def test_loading_a_checkpoint_directory_keeps_its_weights(tmp_path):
    import torch
    from fxbridge.errors import ModelLoadError
    from fxbridge.loading import load_model
    from tiny import build
    model = build("llama")
    model.save_pretrained(str(tmp_path / "ckpt"))
    loaded = load_model(tmp_path / "ckpt")
    for (name, p), q in zip(model.named_parameters(), loaded.parameters()):
        assert torch.equal(p, q), name
    (tmp_path / "bare").mkdir()
    CONFIGS["llama"]().to_json_file(str(tmp_path / "bare" / "config.json"))
    with pytest.raises(ModelLoadError, match="no weights"):
        load_model(tmp_path / "bare")
    assert {p.device.type for p in load_model(tmp_path / "bare", meta=True).parameters()} == {"meta"}
