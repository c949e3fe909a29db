"""Command line: ``fxbridge demo | inspect | export | bench`` (also ``python -m fxbridge``)."""
from __future__ import annotations

import argparse
import sys


def _demo(args) -> int:
    from .demo import run_demo
    run_demo(args.config)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fxbridge", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="trace the embedded default model, cache activations, ablate a head")
    demo.add_argument("--config", help="a config.json to build a random-weight model from (default: embedded)")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
