"""The fxbridge benchmark runner, ``python -m benchmarks.run`` (= ``fxbridge bench``); the suite's model shapes are
package data in ``fxbridge/bench_configs/*.json``."""
