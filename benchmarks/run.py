"""Run the benchmark suite: ``.venv/bin/python -m benchmarks.run [--device cpu|cuda] [--json out.json]``.

The same as ``fxbridge bench``: every entry of the suite (``fxbridge/bench_configs/*.json``, package data, so an
installed fxbridge has it too; ``--list`` lists it) is built with random weights (real shapes on CUDA, its small
``cpu`` sizes on CPU), traced, and timed against its eager HF forward; see ``fxbridge/bench.py`` for the workloads
and options (``--help``). Architectures fxbridge does not support yet are skipped with a one-line note.
Results go to stdout and, with ``--json``, to a file: do not commit them.
"""
import sys

from fxbridge.cli import main as cli_main


def main(argv: list[str] | None = None) -> int:
    return cli_main(["bench", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
