"""Capture: HF model -> torch.fx graph (see capture.py)."""
from .capture import HF_ROOT, Captured, capture, module_path

__all__ = ["HF_ROOT", "Captured", "capture", "module_path"]
