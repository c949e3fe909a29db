"""Run the benchmark suite: ``.venv/bin/python -m benchmarks.run [--device cpu|cuda] [--json out.json]``.

Every entry of benchmarks/configs/*.json is built with random weights (real shapes on CUDA, its small ``cpu``
sizes on CPU), traced, and timed against its eager HF forward; see ``fxbridge/bench.py`` for the workloads and
options (``--help``). Architectures fxbridge does not support yet are skipped with a one-line note.
Results go to stdout and, with ``--json``, to a file: do not commit them.
"""
import sys

from fxbridge.bench import main

if __name__ == "__main__":
    sys.exit(main())
