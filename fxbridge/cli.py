"""Command line: ``fxbridge demo | inspect | export | bench`` (also ``python -m fxbridge``).

MODEL is a path to a ``config.json`` (the architecture with random weights: fast, no download), a local
checkpoint directory, or a hub id (real weights through ``AutoModelForCausalLM.from_pretrained``).

    fxbridge inspect path/to/config.json             # architecture, passes with match counts, hook table
    fxbridge export path/to/config.json gemma2.svg --layer 3 --view collapsed
    fxbridge bench path/to/config.json               # traced vs eager HF timings (fxbridge/bench.py)

Errors the user can fix (a missing file, an unsupported architecture, a device this machine lacks, an output path
that cannot be written, Graphviz not installed) print one line and exit with status 2. They are checked before
the slow steps: the config is read and its architecture checked before any weight is built or loaded.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

EXIT_USAGE = 2


def _demo(args) -> int:
    from .demo import run_demo
    run_demo(args.config)
    return 0


def _load_and_trace(args, *, verify: bool = False, before_weights=None):
    """Validate the options, read the config, check its architecture and call ``before_weights(config)``; only
    then build (or load) the weights and trace."""
    import fxbridge as bridge
    from .architectures import get_spec
    from .loading import load_model, parse_device, parse_dtype, read_config

    device, dtype = parse_device(args.device), parse_dtype(args.dtype)
    config = read_config(args.model, meta=args.meta)  # the config only: no weights yet
    get_spec(config)
    if before_weights is not None:
        before_weights(config)
    model = load_model(args.model, device=device, dtype=dtype, meta=args.meta, seed=args.seed, config=config,
                       progress=not args.quiet)
    gm = bridge.trace(model, progress=not args.quiet, verify=verify and not args.meta)
    return model, gm


def check_writable(path: str | os.PathLike) -> Path:
    """Fail now, not after a slow load and trace, when ``path`` cannot be written. Leaves nothing behind.

    Missing directories are fine (they are created when the file is written); a parent that is a file, a target
    that is a directory, or a directory that refuses new files (``/proc``, read-only) raises ``UsageError``.
    """
    from .errors import UsageError

    path = Path(path).expanduser()
    if path.is_dir():
        raise UsageError(f"cannot write {str(path)!r}: it is a directory")
    if path.exists():
        try:
            with open(path, "ab"):  # appends nothing: only asks whether writing is allowed
                pass
        except OSError as exc:
            raise UsageError(f"cannot write {str(path)!r}: {exc.strerror or exc}") from exc
        return path
    ancestor = path.absolute().parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UsageError(f"cannot write {str(path)!r}: {str(ancestor)!r} is a file, not a directory")
    try:  # the only reliable test (root ignores permission bits; /proc refuses new files)
        fd, probe = tempfile.mkstemp(dir=ancestor, prefix=".fxbridge-probe-")
    except OSError as exc:
        raise UsageError(f"cannot write {str(path)!r}: cannot create files in {str(ancestor)!r} "
                         f"({exc.strerror or exc})") from exc
    os.close(fd)
    os.unlink(probe)
    return path


def _inspect(args) -> int:
    model, gm = _load_and_trace(args, verify=args.verify)
    table = gm.hook_table()
    if args.json:
        print(json.dumps({"model": args.model, "class": type(model).__name__, "model_type": gm.spec.model_type,
                          "dims": gm.dims, "passes": [vars(r) for r in gm.report.passes],
                          "hooks": table.as_dicts()}, indent=1))
        return 0
    n_params = sum(p.numel() for p in model.parameters())
    param = next(iter(model.parameters()), None)
    where = f"{param.dtype}, {param.device}".replace("torch.", "") if param is not None else "no parameters"
    print(f"{args.model}\n  {type(model).__name__} (model_type={gm.spec.model_type!r}, family {gm.spec.family}): "
          f"{n_params / 1e6:.2f}M parameters ({where})")
    print("  dims: " + ", ".join(f"{k}={v}" for k, v in gm.dims.items()))
    if args.verify and not args.meta:
        print("  verified against HF: every layer's output and the logits agree")
    print(f"\nPasses\n{gm.report}\n\nHook table ({len(table)} hook points)\n{table}")
    return 0


def _export(args) -> int:
    """Every check that needs no weights runs first: format and view, the model's config (architecture, layer
    index), Graphviz, the output path; only then are the weights built and traced."""
    import fxbridge as bridge

    from .architectures import dims_from_config, get_spec
    from .errors import UsageError
    from .exporter import FORMATS, RENDERED, check_layer, check_renderer
    ext = Path(args.out).suffix.lower()
    if ext not in FORMATS:
        raise UsageError(f"cannot export to {args.out!r}: use one of the extensions {', '.join(FORMATS)}")
    if args.view == "layer" and args.layer is None:
        raise UsageError("--view layer needs --layer N (the decoder layer to show)")

    def before_weights(config):
        if args.layer is not None:
            check_layer(args.layer, dims_from_config(config, get_spec(config))["n_layers"])
        if ext in RENDERED:
            check_renderer(ext)
        check_writable(args.out)
    _, gm = _load_and_trace(args, before_weights=before_weights)
    view = args.view or ("layer" if args.layer is not None else "full")
    try:
        path = bridge.export(gm, args.out, view=view, layer=args.layer)
    except OSError as exc:  # a full disk, a directory removed meanwhile, ...
        raise UsageError(f"cannot write {args.out!r}: {exc.strerror or exc}") from exc
    print(f"wrote {path}")
    return 0


def _bench(args) -> int:
    """Imported only when this subcommand runs; fxbridge/bench.py parses its own options."""
    from .bench import main
    return main(args.rest)


def _model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a config.json (random weights), a checkpoint directory, or a hub id")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: float32 for a config.json, "
                                                 "the checkpoint's own for real weights)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:1 ... (default: cpu)")
    p.add_argument("--meta", action="store_true",
                   help="build the model on the meta device: no weight memory; trace/inspect/export only")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights for a config.json")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress messages on stderr")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fxbridge", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="trace the embedded default model, cache activations, ablate a head")
    demo.add_argument("--config", help="a config.json to build a random-weight model from (default: embedded)")
    demo.set_defaults(func=_demo)

    inspect = sub.add_parser("inspect", help="trace MODEL; print its architecture, passes and hook table")
    _model_arguments(inspect)
    inspect.add_argument("--json", action="store_true", help="print JSON instead of text")
    inspect.add_argument("--verify", action="store_true",
                         help="also compare every layer with the HF model on random tokens (not with --meta)")
    inspect.set_defaults(func=_inspect)

    export = sub.add_parser("export", help="trace MODEL; write its graph (.svg .png .pdf .dot .json .graphml)")
    _model_arguments(export)
    export.add_argument("out", help="output file; the extension picks the format")
    export.add_argument("--layer", type=int, default=None, help="only decoder layer N")
    export.add_argument("--view", choices=("full", "layer", "collapsed"), default=None,
                        help="full: every node; layer: one layer (needs --layer); collapsed: one box per HF "
                             "module and hook point (default: full, or layer with --layer)")
    export.set_defaults(func=_export)

    bench = sub.add_parser("bench", help="time traced vs eager HF (see `fxbridge bench --help`)", add_help=False)
    bench.add_argument("rest", nargs=argparse.REMAINDER)
    bench.set_defaults(func=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .errors import FxBridgeError

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:  # everything after `bench` (also --help) belongs to bench.py's own parser
        args = argparse.Namespace(func=_bench, rest=argv[1:])
    else:
        args = build_parser().parse_args(argv)
    # the command line is an application: keep the hub client's retry warnings out of the one-line errors
    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)
    try:
        return args.func(args)
    except FxBridgeError as exc:
        # errors the user can act on: one line, no traceback (set FXBRIDGE_DEBUG=1 for it)
        if os.environ.get("FXBRIDGE_DEBUG"):
            raise
        message = " ".join(str(exc).split())
        print(f"fxbridge: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:  # `fxbridge inspect ... | head`: the reader left; not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print("fxbridge: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
