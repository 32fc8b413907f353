"""The NumPy backend: GPT-2's forward, backward and AdamW written by hand.

reference.py is the textbook form of every layer and gpt2.py GPT-2 written with them; layers.py
and softmax_layers.py are the same math made fast; model.py runs either (build_model(kernels=...)),
optim.py is AdamW. Importing this package loads none of them:
NumpyGPT and AdamW load on first use, so `import npgpt.numpy_backend.reference` loads NumPy alone.
"""
__all__ = ["NumpyGPT", "AdamW"]


def __getattr__(name):
    if name == "NumpyGPT":
        from .model import NumpyGPT
        return NumpyGPT
    if name == "AdamW":
        from .optim import AdamW
        return AdamW
    raise AttributeError(f"module 'npgpt.numpy_backend' has no attribute {name!r}")
