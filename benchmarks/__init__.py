"""The fxbridge benchmark suite: model shapes in configs/*.json, run with ``python -m benchmarks.run``."""
