"""``fxbridge bench MODEL``: time the traced module against the eager HF forward it was traced from.

Workloads (each a ratio to HF's own forward with its default attention, measured side by side in one run,
interleaved round-robin so machine noise hits all of them alike; median of the repeats after warm-up; on
CUDA every timing synchronises, and peak memory is ``torch.cuda.max_memory_allocated`` above the weights):

    hf            HF forward, default attention implementation (the reference, 1.00x)
    traced        traced forward, no hooks
    hooks_resid   run_with_hooks with a no-op hook on every hook_resid_post
    cache_all     run_with_cache with every hook point
    cache_one     run_with_cache(names_filter=<the middle layer's hook_pattern>)
    tlens         TransformerLens TransformerBridge forward, only when transformer_lens is importable

plus ``trace()`` seconds for the model itself and, with ``--meta-trace``, for the same config on the meta device.
MODEL is a config.json (random weights), a suite entry (``fxbridge/bench_configs/*.json``, shipped with the package:
its name or path; ``--variant cpu`` picks its small sizes; ``--list`` lists them), or anything
``fxbridge.loading.load_model`` accepts. Without MODEL the whole suite runs, and entries that cannot be built or
traced here are skipped with a note; a MODEL that cannot be built or traced is an error (exit status 2 for
fxbridge's own errors, as everywhere on the command line).
Results print as a table; ``--json PATH`` writes them as JSON (never commit results).
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import statistics
import sys
import time
from importlib import resources
from pathlib import Path

import torch

from .loading import _first_line, load_model, model_from_config, parse_device, parse_dtype

log = logging.getLogger(__name__)

WORKLOADS = ("hf", "traced", "hooks_resid", "cache_all", "cache_one", "tlens")
NOTE_CHARS = 160  # an error in a table row or note: its type and first line, cut to this length


def _note(exc: BaseException) -> str:
    return _first_line(exc)[:NOTE_CHARS]


# ------------------------------------------------------------------------------------------------ models
def suite_dir():
    """The suite's directory, a ``Traversable`` (a ``Path`` in a regular install): package data of the installed
    fxbridge (pyproject's package-data), found relative to the package, so no repository checkout is needed."""
    return resources.files("fxbridge") / "bench_configs"


def suite_entries(directory=None) -> list[dict]:
    """The benchmark suite: one dict per ``fxbridge/bench_configs/*.json`` (name, config, cpu overrides)."""
    directory = suite_dir() if directory is None else directory
    entries = []
    for path in sorted((p for p in directory.iterdir() if p.name.endswith(".json")), key=lambda p: p.name):
        entry = json.loads(path.read_text())
        entry.setdefault("name", Path(path.name).stem)
        entry["path"] = str(path)
        entries.append(entry)
    return entries


def _entry_for(source: str) -> dict | None:
    from .errors import ModelLoadError

    path = Path(source)
    if path.suffix == ".json" and path.is_file():
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"cannot read a model config from {source!r}: {_first_line(exc)}") from exc
        if not isinstance(data, dict):
            raise ModelLoadError(f"{source!r} is not a model config (a JSON object)")
        if "config" in data:
            return {"name": data.get("name", path.stem), **data}
        return {"name": path.stem, "config": data}  # a plain HF config.json
    for entry in suite_entries():
        if source in (entry["name"], Path(entry["path"]).stem):
            return entry
    return None


def entry_config(entry: dict, variant: str = "full"):
    """The HF config of a suite entry; ``variant="cpu"`` applies its small-size overrides."""
    import transformers

    from .errors import ModelLoadError

    values = dict(entry["config"])
    if variant == "cpu":
        values.update(entry.get("cpu", {}))
    values.pop("architectures", None)
    values.pop("torch_dtype", None)
    try:
        return transformers.AutoConfig.for_model(values.pop("model_type"), **values)
    except (KeyError, TypeError, ValueError) as exc:  # no model_type, one this transformers does not know, ...
        raise ModelLoadError(f"cannot make an HF config for {entry['name']!r}: {_first_line(exc)}") from exc


def load(source: str, *, device: str | torch.device, dtype: torch.dtype, variant: str = "full", meta: bool = False,
         seed: int = 0):
    """(name, model) for a bench MODEL argument (see the module docstring); the architecture is checked
    (``UnsupportedArchitecture``) before any weight is built."""
    from .architectures import get_spec

    entry = _entry_for(source)
    if entry is not None:
        config = entry_config(entry, variant)
        get_spec(config)
        return entry["name"], model_from_config(config, device=device, dtype=dtype, meta=meta, seed=seed)
    return source, load_model(source, device=device, dtype=dtype, meta=meta, seed=seed)


# ----------------------------------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_round_robin(fns: dict, device: torch.device, *, warmup: int, repeats: int) -> dict[str, float]:
    """Median seconds per call of each fn; the repeats are interleaved so noise spreads over all of them."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


def peak_memory(fn, device: torch.device) -> int | None:
    """Peak bytes allocated by ``fn`` above what was allocated before it (CUDA only)."""
    if device.type != "cuda":
        return None
    gc.collect()
    torch.cuda.empty_cache()
    _sync(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    result = fn()
    _sync(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del result
    return peak


def cache_bytes(cache) -> int:
    """Bytes held by the tensors of an activation cache, each storage counted once."""
    seen, total = set(), 0
    for tensor in cache.values():
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


# ------------------------------------------------------------------------------------------- workloads
def _noop(tensor, hook):
    return None


def workloads(model, gm, ids) -> dict:
    """name -> zero-argument callable running that workload on ``ids`` (no grad)."""
    n_layers = gm.dims["n_layers"]
    resid = [name for name in gm.hook_dict if name.endswith("hook_resid_post")]
    pattern = f"blocks.{n_layers // 2}.attn.hook_pattern"
    fns = {
        "hf": lambda: model(input_ids=ids, use_cache=False).logits,
        "traced": lambda: gm(ids),
        "hooks_resid": lambda: gm.run_with_hooks(ids, fwd_hooks=[(name, _noop) for name in resid]),
        "cache_all": lambda: gm.run_with_cache(ids),
        "cache_one": lambda: gm.run_with_cache(ids, names_filter=pattern),
    }
    tlens = _tlens_forward(model, ids)
    if tlens is not None:
        fns["tlens"] = tlens
    return fns


def _tlens_forward(model, ids):
    """A TransformerLens TransformerBridge forward over the same HF model, when transformer_lens is importable."""
    try:
        from transformer_lens.model_bridge import TransformerBridge  # optional, never a dependency
    except Exception:
        return None
    try:
        bridge = TransformerBridge.boot(model)  # API differs between 4.x releases; skip quietly when it does
    except Exception as exc:
        log.info("TransformerLens is importable but could not wrap %s: %s", type(model).__name__, exc)
        return None
    return lambda: bridge(ids)


def bench_model(name: str, model, *, batch: int, seq: int, warmup: int, repeats: int, meta_config=None,
                skip_errors: bool = True) -> dict:
    """Trace ``model`` and time every workload against its HF forward. Returns one result row (a dict).

    A model that cannot be traced gives a row with ``skipped`` (``skip_errors=False``: the error propagates)."""
    from . import trace
    from .errors import UnsupportedArchitecture

    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    row: dict = {"model": name, "model_type": model.config.model_type, "device": str(device),
                 "dtype": str(dtype).replace("torch.", ""), "batch": batch, "seq": seq,
                 "layers": int(model.config.num_hidden_layers), "attn_impl": model.config._attn_implementation}
    try:
        start = time.perf_counter()
        gm = trace(model)
        row["trace_s"] = time.perf_counter() - start
        row["capture_notes"] = list(getattr(gm.report, "capture_notes", []))
    except Exception as exc:  # a suite run notes it and goes on with the next entry
        if not skip_errors:
            raise
        row["skipped"] = (f"model_type {model.config.model_type!r} is not supported yet"
                          if isinstance(exc, UnsupportedArchitecture) else f"trace failed: {_note(exc)}")
        return row
    if meta_config is not None:
        row.update(meta_trace(meta_config, dtype))
    vocab = int(model.config.vocab_size)
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0)).to(device)
    fns = workloads(model, gm, ids)
    with torch.no_grad():
        exact = (fns["traced"]().float() - fns["hf"]().float()).abs().max().item()
        row["max_abs_diff"] = exact
        times = time_round_robin(fns, device, warmup=warmup, repeats=repeats)
        row["ms"] = {k: v * 1e3 for k, v in times.items()}
        row["ratio"] = {k: v / times["hf"] for k, v in times.items()}
        if device.type == "cuda":
            row["peak_mb"] = {k: peak_memory(fn, device) / 2**20 for k, fn in fns.items()}
            _, cache = fns["cache_all"]()
            row["cache_all_mb"] = cache_bytes(cache) / 2**20
            del cache
    gm.reset_hooks(including_permanent=True)
    return row


def meta_trace(config, dtype) -> dict:
    """trace() seconds for ``config`` built on the meta device (no weights materialised)."""
    from . import trace

    try:
        model = model_from_config(config, dtype=dtype, meta=True)
        start = time.perf_counter()
        gm = trace(model)
        return {"meta_trace_s": time.perf_counter() - start, "meta_layers": int(config.num_hidden_layers),
                "meta_capture_notes": list(getattr(gm.report, "capture_notes", []))}
    except Exception as exc:
        return {"meta_trace_error": _note(exc)}


# ------------------------------------------------------------------------------------------------ output
def format_table(rows: list[dict]) -> str:
    cols = [w for w in WORKLOADS if any(w in r.get("ratio", {}) for r in rows)]
    head = ["model", "dev", "BxS", "hf ms", *[f"{c} x" for c in cols if c != "hf"], "trace s", "meta s", "maxdiff"]
    has_mem = any("peak_mb" in r for r in rows)
    if has_mem:
        head += ["hf MB", "cache_all MB (cache)"]
    lines = []
    for r in rows:
        if "skipped" in r:
            lines.append([r["model"], r["device"], "", f"skipped: {r['skipped']}"])
            continue
        cells = [r["model"], r["device"], f"{r['batch']}x{r['seq']}", f"{r['ms']['hf']:.2f}"]
        cells += [f"{r['ratio'][c]:.2f}" if c in r["ratio"] else "-" for c in cols if c != "hf"]
        meta = f"{r['meta_trace_s']:.2f}" if "meta_trace_s" in r else ("err" if "meta_trace_error" in r else "-")
        cells += [f"{r['trace_s']:.2f}", meta,
                  f"{r['max_abs_diff']:.1e}"]
        if has_mem and "peak_mb" in r:
            cells += [f"{r['peak_mb']['hf']:.0f}", f"{r['peak_mb']['cache_all']:.0f} ({r['cache_all_mb']:.0f})"]
        lines.append(cells)
    widths = [max(len(str(x)) for x in col) for col in zip(head, *[c for c in lines if len(c) == len(head)])]
    fmt = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)) if len(cells) == len(head) \
        else "  ".join(cells[:3]) + "  " + cells[3]
    notes = [f"{r['model']}: meta trace failed: {r['meta_trace_error']}" for r in rows if "meta_trace_error" in r]
    notes += [f"{r['model']}: {note}" for r in rows for note in r.get("capture_notes", [])]
    return "\n".join([fmt(head), fmt(["-" * w for w in widths]), *map(fmt, lines), *notes])


# --------------------------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", default=None,
                        help="config JSON, suite name (--list) or a model fxbridge.loading accepts; "
                             "default: the whole suite")
    parser.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    parser.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: bf16 on cuda, fp32 on cpu)")
    parser.add_argument("--variant", choices=("full", "cpu"), default=None,
                        help="suite entries: real shapes (full) or small sizes (cpu); default: cpu on cpu")
    parser.add_argument("--batch", type=int, default=None, help="default 4 on cuda, 2 on cpu")
    parser.add_argument("--seq", type=int, default=None, help="default 512 on cuda, 128 on cpu")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=None, help="default 20 on cuda, 15 on cpu")
    parser.add_argument("--meta-trace", action=argparse.BooleanOptionalAction, default=True,
                        help="also time trace() of the real-shape config on the meta device (suite entries)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", default=None, help="write the results to this path as JSON")
    parser.add_argument("--list", action="store_true", help="list the suite's entries (name, model_type, file); exit")


def _list_suite() -> int:
    for entry in suite_entries():
        print(f"{entry['name']:<20} {entry['config']['model_type']:<14} {entry['path']}")
    return 0


def _skipped(source: str, device: torch.device, why: str) -> dict:
    print(f"{source}: skipped ({why})", file=sys.stderr, flush=True)
    return {"model": source, "device": str(device), "skipped": why}


def run(args: argparse.Namespace) -> int:
    """Bench ``args.model``, or every suite entry when it is None. Errors about an explicitly named model (it cannot
    be found, built or traced; a bad ``--device``, ``--dtype`` or ``--json`` path) raise, before any timing."""
    from .cli import check_writable
    from .errors import UnsupportedArchitecture

    if args.list:
        return _list_suite()
    device = parse_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_cuda = device.type == "cuda"
    dtype = parse_dtype(args.dtype) or (torch.bfloat16 if on_cuda else torch.float32)
    if args.json:
        check_writable(args.json)
    if args.threads:
        torch.set_num_threads(args.threads)
    variant = args.variant or ("full" if on_cuda else "cpu")
    batch, seq = args.batch or (4 if on_cuda else 2), args.seq or (512 if on_cuda else 128)
    repeats = args.repeats or (20 if on_cuda else 15)
    explicit = args.model is not None
    rows = []
    for source in [args.model] if explicit else [e["name"] for e in suite_entries()]:
        started = time.perf_counter()
        try:
            name, model = load(source, device=device, dtype=dtype, variant=variant)
        except Exception as exc:
            if explicit:
                raise
            rows.append(_skipped(source, device, f"model_type {exc.model_type!r} is not supported yet"
                                 if isinstance(exc, UnsupportedArchitecture) else f"could not build: {_note(exc)}"))
            continue
        entry = _entry_for(source)
        meta_cfg = entry_config(entry, "full") if (entry and args.meta_trace and "cpu" in entry) else None
        row = bench_model(name, model, batch=batch, seq=seq, warmup=args.warmup, repeats=repeats, meta_config=meta_cfg,
                          skip_errors=not explicit)
        row["variant"] = variant if entry else "loaded"
        row["bench_s"] = time.perf_counter() - started
        rows.append(row)
        print(f"{name}: {'skipped (' + row['skipped'] + ')' if 'skipped' in row else 'done'} "
              f"in {row['bench_s']:.1f}s", file=sys.stderr, flush=True)
        del model
        gc.collect()
        if on_cuda:
            torch.cuda.empty_cache()
    print(format_table(rows))
    if args.json:
        _write_json(args.json, rows, device)
    return 0


def _write_json(path: str, rows: list[dict], device: torch.device) -> None:
    from .errors import UsageError

    on_cuda = device.type == "cuda"
    meta = {"torch": torch.__version__, "transformers": _version("transformers"), "device_name":
            torch.cuda.get_device_name(device) if on_cuda else "cpu", "threads": torch.get_num_threads()}
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps({"env": meta, "results": rows}, indent=2))
    except OSError as exc:
        raise UsageError(f"cannot write {path!r}: {exc.strerror or exc}") from exc


def _version(package: str) -> str:
    try:
        from importlib.metadata import version
        return version(package)
    except Exception:
        return "?"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fxbridge bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":  # through the command line, for its one-line errors
    from .cli import main as cli_main
    sys.exit(cli_main(["bench", *sys.argv[1:]]))
