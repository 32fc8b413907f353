"""npgpt: GPT-2 pretraining from scratch, in hand-written NumPy and in PyTorch, behind one interface.

`import npgpt` is cheap: each name below is imported from its module on first use, so reading
npgpt.numpy_backend.layers loads NumPy and nothing else, and the NumPy path never imports torch.
"""
import importlib

__version__ = "0.1.0"

_HOMES = {
    ".backend": ("AdamW", "build_model"),
    ".config": ("GPTConfig", "PRESETS"),
    ".data": ("load_corpus", "make_loaders"),
    ".params": ("init_params", "num_params", "param_shapes"),
    ".run_state": ("TrainingDiverged",),
    ".sampling": ("generate", "next_token_probs", "sampled_token_counts"),
    ".tokenizer": ("get_tokenizer", "text_to_token_ids", "token_ids_to_text"),
    ".training.loop": ("calc_loss_batch", "calc_loss_loader", "evaluate_model", "train_model_simple",
                       "train_steps"),
    ".training.perf": ("peak_flops",),
    ".training.schedule": ("warmup_cosine_lr",),
    ".weights.checkpoint": ("load_checkpoint", "save_checkpoint"),
    ".weights.export": ("export_hf",),
    ".weights.pretrained": ("load_pretrained",),
}
_MODULE_OF = {name: module for module, names in _HOMES.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name):
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'npgpt' has no attribute {name!r}")
    value = getattr(importlib.import_module(_MODULE_OF[name], __name__), name)
    globals()[name] = value                       # later lookups skip __getattr__
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
