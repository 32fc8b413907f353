"""Parity suite: the NumPy and the PyTorch backends, built from the same parameters, must agree."""
