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
    mamba = _mamba_config(tmp_path / "mamba.json")
    assert cli.main(["inspect", str(mamba), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'mamba'" in err and "llama" in err
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


# ------------------------------------------------------------------------------- errors before the slow steps
@pytest.fixture
def no_weights(monkeypatch):
    """Record (and refuse) every attempt to build or load weights; the test asserts the list stays empty."""
    import transformers as tf
    calls = []

    def refuse(kind):
        def build(*args, **kwargs):
            calls.append(kind)
            raise AssertionError(f"weights were {kind} before the error was found")
        return build
    monkeypatch.setattr(tf.AutoModelForCausalLM, "from_config", refuse("built"))
    monkeypatch.setattr(tf.AutoModelForCausalLM, "from_pretrained", refuse("loaded"))
    return calls


@pytest.fixture
def no_trace(monkeypatch):
    import fxbridge
    calls = []

    def trace(*args, **kwargs):
        calls.append(args)
        raise AssertionError("traced before the error was found")
    monkeypatch.setattr(fxbridge, "trace", trace)
    return calls


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
    from tiny import build
    path = tmp_path_factory.mktemp("ckpt") / "llama"
    build("llama").save_pretrained(str(path))
    return path


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("fxbridge: error: ")
    return lines[0]


@pytest.mark.parametrize("device, cuda", [("cdua", False), ("cuda", False), ("cuda:7", True), ("mps:0:1", False)])
def test_bad_device_is_one_line_before_loading(config_json, device, cuda, monkeypatch, capsys, no_weights):
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)  # the same answer on a GPU machine
    monkeypatch.setattr(torch.cuda, "device_count", lambda: int(cuda))
    assert cli.main(["inspect", str(config_json), "--device", device, "-q"]) == 2
    line = _one_error_line(capsys)
    assert repr(device) in line and "cpu" in line
    assert no_weights == []


def test_parse_device_accepts_what_exists():
    import torch
    from fxbridge.errors import UsageError
    from fxbridge.loading import parse_device
    assert parse_device("cpu") == torch.device("cpu")
    assert parse_device(torch.device("meta")) == torch.device("meta")
    with pytest.raises(UsageError, match="'cdua'"):
        parse_device("cdua")
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="not available"):
            parse_device("cuda")


@pytest.mark.parametrize("where", ["parent-is-file", "proc", "read-only-dir", "is-a-directory"])
def test_unwritable_export_path_is_one_line_before_tracing(config_json, tmp_path, where, capsys, no_weights,
                                                            no_trace):
    if where == "proc" and not os.path.isdir("/proc/self"):
        pytest.skip("no /proc on this system")
    if where == "read-only-dir":
        if os.geteuid() == 0:
            pytest.skip("root writes into a chmod 555 directory")
        (tmp_path / "ro").mkdir(mode=0o555)
    if where == "is-a-directory":
        (tmp_path / "d.json").mkdir()
    out = {"parent-is-file": f"{config_json}/sub/out.json", "proc": "/proc/fxbridge-test-out.json",
           "read-only-dir": str(tmp_path / "ro" / "out.json"), "is-a-directory": str(tmp_path / "d.json")}[where]
    assert cli.main(["export", str(config_json), out]) == 2
    line = _one_error_line(capsys)
    assert "cannot write" in line and repr(out) in line
    assert no_weights == [] and no_trace == []
    assert not os.path.exists(f"{config_json}/sub")


def test_export_to_a_missing_directory_creates_nothing_before_writing(config_json, tmp_path, monkeypatch, capsys):
    """The writability probe leaves no file or directory behind; the export itself creates the directories."""
    import fxbridge
    monkeypatch.setattr(fxbridge, "trace", lambda *a, **k: (_ for _ in ()).throw(fxbridge.CaptureError("stop")))
    assert cli.main(["export", str(config_json), str(tmp_path / "new" / "sub" / "out.json"), "-q"]) == 2
    assert "stop" in _one_error_line(capsys)
    assert list(tmp_path.iterdir()) == []


def test_write_error_at_export_time_is_one_line(config_json, tmp_path, monkeypatch, capsys):
    import fxbridge.exporter as exporter

    def full_disk(graph):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(exporter, "to_json", full_disk)
    out = tmp_path / "out.json"
    assert cli.main(["export", str(config_json), str(out), "-q"]) == 2
    line = _one_error_line(capsys)
    assert "No space left on device" in line and repr(str(out)) in line


@pytest.mark.parametrize("source", ["config", "checkpoint"])
def test_layer_out_of_range_is_reported_before_building(config_json, checkpoint_dir, source, capsys, no_weights,
                                                         no_trace, tmp_path):
    model = str(config_json if source == "config" else checkpoint_dir)
    assert cli.main(["export", model, str(tmp_path / "x.json"), "--layer", "9"]) == 2
    assert "layer must be in [0, 3), got 9" in _one_error_line(capsys)
    assert no_weights == [] and no_trace == []
    assert cli.main(["export", model, str(tmp_path / "x.json"), "--view", "layer"]) == 2
    assert "--layer" in _one_error_line(capsys)


def test_missing_graphviz_is_reported_before_tracing(config_json, tmp_path, monkeypatch, capsys, no_weights,
                                                      no_trace):
    monkeypatch.setitem(sys.modules, "graphviz", None)  # `import graphviz` raises ImportError
    assert cli.main(["export", str(config_json), str(tmp_path / "g.svg"), "-q"]) == 2
    assert "fxbridge[render]" in _one_error_line(capsys)
    assert no_weights == [] and no_trace == []


def _mamba_config(path, **sizes):
    """A causal LM fxbridge has no spec for (a state-space model: no attention to hook)."""
    import transformers as tf
    tf.MambaConfig(**{"vocab_size": 101, "hidden_size": 48, "num_hidden_layers": 2, "intermediate_size": 88,
                      **sizes}).to_json_file(str(path))
    return path


def test_unsupported_config_is_rejected_before_its_weights_exist(tmp_path, capsys, no_weights):
    """A real-size unsupported config (Mamba 2.8B shapes, ~11 GB in fp32) is refused from the config alone."""
    big = _mamba_config(tmp_path / "mamba.json", vocab_size=50280, hidden_size=2560, num_hidden_layers=64,
                        intermediate_size=5120)
    for command in (["inspect", str(big)], ["export", str(big), str(tmp_path / "x.json")]):
        assert cli.main(command) == 2
        assert "model_type='mamba'" in _one_error_line(capsys)
    assert no_weights == []


def test_unsupported_checkpoint_and_load_model_check_the_config_first(tmp_path, no_weights):
    import transformers as tf
    from fxbridge.errors import UnsupportedArchitecture
    from fxbridge.loading import build_from_config, load_model
    config = _mamba_config(tmp_path / "mamba.json")
    (tmp_path / "ckpt").mkdir()
    tf.MambaConfig.from_json_file(str(config)).save_pretrained(str(tmp_path / "ckpt"))
    (tmp_path / "ckpt" / "model.safetensors").write_bytes(b"")  # never opened: the config is refused first
    for load in (lambda: load_model(config), lambda: load_model(tmp_path / "ckpt"),
                 lambda: load_model(config, meta=True), lambda: build_from_config(config)):
        with pytest.raises(UnsupportedArchitecture, match="mamba"):
            load()
    assert no_weights == []


def test_progress_line_while_building_random_weights(config_json, tmp_path, capsys):
    assert cli.main(["export", str(config_json), str(tmp_path / "p.json")]) == 0
    err = capsys.readouterr().err.splitlines()
    building = [i for i, line in enumerate(err) if line.startswith("[fxbridge") and "random weights" in line]
    capturing = [i for i, line in enumerate(err) if "capturing" in line]
    assert building and capturing and building[0] < capturing[0], err
    assert cli.main(["export", str(config_json), str(tmp_path / "q.json"), "-q"]) == 0
    assert "random weights" not in capsys.readouterr().err
