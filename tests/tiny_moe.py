"""Tiny configs for the moe group (issue 11; merged into tiny.CONFIGS)."""
from tiny import COMMON, VOCAB, TinyConfig  # noqa: F401

CONFIGS: dict[str, TinyConfig] = {}
FEATURE_GUARDS: dict = {}
FAMILY: dict = {}
