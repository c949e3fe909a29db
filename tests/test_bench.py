"""The benchmark harness runs end to end and reports what it measured (structure and exactness, never timings)."""
import json

from fxbridge.bench import main, suite_entries


def test_suite_configs_cover_the_named_checkpoints():
    types = {entry["config"]["model_type"] for entry in suite_entries()}
    assert types == {"gemma2", "gpt_bigcode", "llama", "falcon", "gemma4_text"}


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
