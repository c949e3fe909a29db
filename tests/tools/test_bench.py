"""The benchmark harness runs end to end and reports what it measured (structure and exactness, never timings)."""
import json
import os
import shutil
import subprocess
import sys
from fnmatch import fnmatch
from pathlib import Path

import pytest

from fxbridge import bench, cli
from fxbridge.bench import main, suite_entries

REPO = Path(__file__).resolve().parents[2]
SUITE_FILES = ["falcon-7b-scaled", "gemma-2-2b", "gemma-4-text", "llama-3.2-1b", "mixtral-8x7b-scaled", "qwen2-moe-scaled",
               "santacoder-1b"]


def test_suite_configs_cover_the_named_checkpoints():
    types = {entry["config"]["model_type"] for entry in suite_entries()}
    assert types == {"gemma2", "gpt_bigcode", "llama", "falcon", "gemma4_text", "mixtral", "qwen2_moe"}


def test_bench_one_model_writes_table_and_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = main(["llama-3.2-1b", "--device", "cpu", "--variant", "cpu", "--batch", "1", "--seq", "8", "--warmup", "0",
               "--repeats", "1", "--no-meta-trace", "--json", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "llama-3.2-1b" in printed and "traced x" in printed
    data = json.loads(out.read_text())
    assert data["env"]["torch"] and data["env"]["transformers"]
    (row,) = data["results"]
    assert row["model_type"] == "llama"
    assert set(row["ratio"]) >= {"hf", "traced", "hooks_resid", "cache_all", "cache_one"}
    assert row["ratio"]["hf"] == 1.0 and all(v > 0 for v in row["ratio"].values())
    assert row["max_abs_diff"] < 1e-5  # the traced module it timed computes HF's logits


# ----------------------------------------------------------------------------- exit status of `fxbridge bench`
@pytest.fixture
def no_weights(monkeypatch):
    import transformers as tf
    calls = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise AssertionError("weights were built")
    monkeypatch.setattr(tf.AutoModelForCausalLM, "from_config", refuse)
    monkeypatch.setattr(tf.AutoModelForCausalLM, "from_pretrained", refuse)
    return calls


def _mamba(path):
    """A causal LM fxbridge has no spec for (a state-space model: no attention to hook)."""
    import transformers as tf
    tf.MambaConfig(vocab_size=101, hidden_size=48, num_hidden_layers=2, intermediate_size=88).to_json_file(str(path))
    return path


def _one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fxbridge: error: "), captured.err
    assert captured.out == ""  # no table for a model that was never benchmarked
    return lines[0]


@pytest.mark.parametrize("args, says", [
    (["{tmp}/does-not-exist"], "no such file or directory"),
    (["{tmp}/mamba.json"], "model_type='mamba'"),
    (["{tmp}/broken.json"], "broken.json"),
    (["llama-3.2-1b", "--device", "cdua"], "'cdua'"),
    (["llama-3.2-1b", "--dtype", "fp33"], "'fp33'"),
    (["llama-3.2-1b", "--json", "{tmp}/mamba.json/out.json"], "cannot write"),
])
def test_bench_of_a_model_that_cannot_be_built_exits_2(args, says, tmp_path, capsys, no_weights):
    _mamba(tmp_path / "mamba.json")
    (tmp_path / "broken.json").write_text('{"model_type": "llama", "hidden_size": ')
    argv = [a.replace("{tmp}", str(tmp_path)) for a in args]
    assert cli.main(["bench", *argv, "--variant", "cpu", "--no-meta-trace"]) == 2
    assert says in _one_error_line(capsys)
    assert no_weights == []


def test_bench_of_a_model_that_cannot_be_traced_exits_2(monkeypatch, capsys):
    import fxbridge
    from fxbridge.errors import CaptureError

    def fail(model, **kwargs):
        raise CaptureError("torch.export could not capture it")
    monkeypatch.setattr(fxbridge, "trace", fail)
    assert cli.main(["bench", "llama-3.2-1b", "--device", "cpu", "--variant", "cpu", "--seq", "8", "--repeats", "1",
                     "--warmup", "0", "--no-meta-trace"]) == 2
    assert "could not capture it" in _one_error_line(capsys)


def test_suite_run_skips_an_unsupported_entry_with_a_note(tmp_path, monkeypatch, capsys, no_weights):
    """Without a MODEL argument the suite goes on past entries it cannot run, exit 0, and builds no weights for them."""
    config = json.loads(_mamba(tmp_path / "mamba.json").read_text())
    (tmp_path / "suite").mkdir()
    (tmp_path / "suite" / "mamba-2.8b.json").write_text(json.dumps({"name": "mamba-2.8b", "config": config}))
    monkeypatch.setattr(bench, "suite_dir", lambda: tmp_path / "suite")
    assert main(["--device", "cpu", "--no-meta-trace"]) == 0
    captured = capsys.readouterr()
    assert "mamba-2.8b" in captured.out and "'mamba' is not supported yet" in captured.out
    assert no_weights == []


# ------------------------------------------------------------------------- the suite ships inside the package
def test_suite_configs_are_package_data():
    """The suite lives in the installed package (not the repository) and pyproject ships every file of it."""
    import fxbridge
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    package = Path(fxbridge.__file__).resolve().parent
    directory = Path(str(bench.suite_dir())).resolve()
    assert directory.parent == package
    files = sorted(p.relative_to(package).as_posix() for p in directory.glob("*.json"))
    assert [Path(f).stem for f in files] == SUITE_FILES
    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["fxbridge"]
    assert all(any(fnmatch(f, pattern) for pattern in patterns) for f in files), (files, patterns)
    assert [Path(e["path"]).stem for e in suite_entries()] == SUITE_FILES


def test_bench_list_and_the_benchmarks_runner():
    done = subprocess.run([sys.executable, "-m", "benchmarks.run", "--list"], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert [line.split()[0] for line in done.stdout.splitlines()] == [e["name"] for e in suite_entries()]
    assert [Path(line.split()[-1]).stem for line in done.stdout.splitlines()] == SUITE_FILES


def test_suite_is_found_from_a_regular_install(tmp_path):
    """`pip install .` (not editable) into a directory; `fxbridge bench --list` run from there lists the suite."""
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "fxbridge", source / "fxbridge", ignore=shutil.ignore_patterns("__pycache__"))
    target = tmp_path / "site"
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                          "--no-index", "--target", str(target), str(source)], capture_output=True, text=True,
                         timeout=600)
    assert pip.returncode == 0, pip.stderr
    assert not (target / "benchmarks").exists()
    env = {**os.environ, "PYTHONPATH": str(target), "HF_HUB_OFFLINE": "1"}  # not the repository's fxbridge
    done = subprocess.run([sys.executable, "-m", "fxbridge", "bench", "--list"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    listed = [Path(line.split()[-1]) for line in done.stdout.splitlines()]
    assert [path.stem for path in listed] == SUITE_FILES
    assert all(path.parent == target / "fxbridge" / "bench_configs" and path.is_file() for path in listed)


def test_decoding_benchmark_checks_tokens_and_reports_ratios(tmp_path, capsys):
    """benchmarks/generate.py at toy sizes: it checks every traced workload's greedy tokens against HF generate's
    (it refuses to time otherwise) and reports each workload's ratio to HF."""
    sys.path.insert(0, str(REPO))
    try:
        from benchmarks import generate as decoding
    finally:
        sys.path.remove(str(REPO))
    import torch
    rows = decoding.run("cpu", repeats=1, warmup=0, sizes=(torch.float32, 2, 5, 3))
    assert [r["workload"] for r in rows] == ["hf", "traced", "hook_resid", "hook_every_resid", "no_cache"]
    assert rows[0]["ratio_to_hf"] == 1.0 and all(r["seconds"] > 0 for r in rows)
    assert "x HF" in decoding.format_rows(rows)


def test_harvesting_benchmark_checks_activations_and_reports_ratios():
    """benchmarks/harvest.py at toy sizes, without the compiled workloads (compiling costs minutes here): it checks
    every workload's activation against HF's hidden state before timing."""
    sys.path.insert(0, str(REPO))
    try:
        from benchmarks import harvest
    finally:
        sys.path.remove(str(REPO))
    import torch
    rows = harvest.run("cpu", repeats=1, warmup=0, sizes=(torch.float32, 2, 8), compile=False)
    assert [r["workload"] for r in rows] == ["hf_hidden_states", "cache_full", "cache_stop"]
    assert rows[0]["ratio_to_hf"] == 1.0 and "x HF" in harvest.format_rows(rows)
