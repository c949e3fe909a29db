"""Capture: HF model -> torch.fx graph (see capture.py), and the vocabulary for reading it (graph_facts.py)."""
from .capture import Captured, capture
from .graph_facts import HF_ROOT

__all__ = ["HF_ROOT", "Captured", "capture"]
