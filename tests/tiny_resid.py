"""Tiny configs for one family group (merged into tiny.CONFIGS; see tiny.GROUPS)."""
from tiny import COMMON, VOCAB, TinyConfig  # noqa: F401

CONFIGS: dict[str, TinyConfig] = {}
FEATURE_GUARDS: dict = {}
FAMILY: dict[str, dict] = {}  # golden-hook facts, as tests/runtime/test_hooks.py FAMILY
