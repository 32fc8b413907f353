"""npgpt: GPT-2 pretraining from scratch, in hand-written NumPy and in PyTorch, behind one interface."""
from .backend import AdamW, build_model
from .checkpoint import load_checkpoint, save_checkpoint
from .config import PRESETS, GPTConfig
from .data import load_corpus, make_loaders
from .params import init_params, num_params, param_shapes
from .pretrained import export_hf, load_pretrained
from .sampling import generate, next_token_probs
from .tokenizer import get_tokenizer, text_to_token_ids, token_ids_to_text
from .train import (TrainingDiverged, calc_loss_batch, calc_loss_loader, evaluate_model,
                    train_model_simple, warmup_cosine_lr)

__version__ = "0.1.0"
__all__ = [
    "AdamW", "GPTConfig", "PRESETS", "TrainingDiverged", "build_model", "calc_loss_batch",
    "calc_loss_loader", "evaluate_model", "export_hf", "generate", "get_tokenizer",
    "init_params", "load_checkpoint", "load_corpus", "load_pretrained", "make_loaders",
    "next_token_probs", "num_params", "param_shapes", "save_checkpoint", "text_to_token_ids",
    "token_ids_to_text", "train_model_simple", "warmup_cosine_lr"
]
