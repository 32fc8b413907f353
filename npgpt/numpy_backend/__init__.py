"""The NumPy backend: GPT-2's forward, backward and AdamW written by hand."""
from .model import NumpyGPT
from .optim import AdamW

__all__ = ["NumpyGPT", "AdamW"]
