"""The PyTorch backend: GPT-2 as an nn.Module with autograd, SDPA attention, torch AdamW (fused
where supported), bf16 autocast and torch.compile on request. Imported only for backend="torch"."""
from .model import TorchGPT
from .optim import make_adamw

__all__ = ["TorchGPT", "make_adamw"]
