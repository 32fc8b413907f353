"""A training run's settings, resolved once (resolve.py) from the --config file, the flags, a resumed
checkpoint's saved settings and the --init-from weights' shape, before anything is built.

`npgpt train` and everything below it read this one frozen object, never argparse's namespace. The
line a run prints at its start (`as_command`) and the settings its checkpoint keeps (`saved`) are
this object written out: the first pasted back into a shell gives the same run, the second is
what a --resume starts from."""
from __future__ import annotations

import shlex
from dataclasses import dataclass, field, fields

from ..config import GPTConfig

# The settings a checkpoint keeps, by name, with their defaults: the book's chapter-5 run, AdamW(lr
# 5e-4, weight decay 0.1 on every parameter, betas (0.9, 0.999)), a constant lr, no clipping. With
# --resume, an option not given takes the saved value, else the default here. A checkpoint saved
# before a key existed resumes with the default (older checkpoints lack "sampling", for one).
RUN_DEFAULTS = {"backend": "numpy", "init_from": None, "data": None, "data_sha256": None, "epochs": 10,
                "max_steps": None, "batch_size": 2, "max_length": None, "stride": None, "seed": 123, "lr": 5e-4,
                "weight_decay": 0.1, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "decay": "all", "eval_freq": 5,
                "eval_every": 250, "eval_iter": 5, "warmup": 0, "cosine": False, "min_lr": None,
                "lr_decay_steps": None, "clip": None, "save_every": None, "start_context": "Every effort moves you",
                "autocast": None, "compile": False, "grad_accum": 1,
                "world_size": 1,    # torchrun's processes, each with --batch-size x --grad-accum windows a step
                "sampling": "random", "schedule": "constant", "decay_fraction": None, "skip_loss_z": None,
                "skip_grad_z": None, "keep_last": 0, "keep_every": 0, "keep_best": False, "hellaswag": None,
                "hellaswag_limit": None, "hellaswag_batch": 8, "sample_every": None, "sample_tokens": 50,
                # saved since --batch-size became the micro-batch: a checkpoint without it saved the
                # windows of a whole step as batch_size (resolve.saved_settings translates)
                "tokens_per_step": None}
SAME_BATCHES = ("data_sha256", "max_length", "stride", "seed", "sampling")  # and the global batch: world_size x batch_size
# given with --resume, these apply from the next step (the run prints which); --decay is refused
CHANGEABLE = ("batch_size", "lr", "weight_decay", "beta1", "beta2", "eps", "warmup", "schedule", "min_lr", "lr_decay_steps",
              "decay_fraction", "clip", "backend", "autocast", "compile", "grad_accum", "skip_loss_z", "skip_grad_z",
              "keep_last", "keep_every", "keep_best", "hellaswag", "hellaswag_limit", "hellaswag_batch",
              "sample_every", "sample_tokens")
# the model's shape: flag -> GPTConfig field; each overrides the preset's (a resumed or --init-from run's
# shape is its weights')
SHAPE_FLAGS = {"n_layer": "n_layers", "n_head": "n_heads", "n_embd": "emb_dim", "context_length": "context_length",
               "vocab_size": "vocab_size", "qkv_bias": "qkv_bias", "bias": "bias", "tie_weights": "tie_weights",
               "drop_rate": "drop_rate"}
TOKENIZER_VOCAB = 50257                 # GPT-2's BPE: the ids the data and the samples use
TEXT_ONLY, SHARDS_ONLY = ("epochs", "stride", "eval_freq"), ("max_steps", "eval_every", "sampling")
TORCH_ONLY = ("autocast", "compile")


@dataclass(frozen=True)
class RunSettings:
    """Every setting of a run, resolved and checked (resolve.py). None: not used by this run (an
    option of the other kind of data, of the other backend) or off (clip, save_every, hellaswag)."""
    # what to train: the data and the model
    data: str | None                  # a text file or a folder of shards, its real path; None: The Verdict
    data_sha256: str                  # of what decides the batches (checks.data_fingerprint)
    max_length: int                   # tokens per window
    stride: int | None                # text: step between windows
    sampling: str | None              # shards: "random" or "epoch"
    batch_size: int                   # the micro-batch: windows a forward on each process
    grad_accum: int                   # micro-batches a step on each process
    tokens_per_step: int              # micro-batch x accumulation x processes x max_length
    seed: int
    cfg: GPTConfig                    # the model's shape
    preset: str | None                # the preset cfg started from (None: a resumed or --init-from model)
    init_from: str | None             # the weights a new run starts from, their real path
    # how: the optimizer and its schedule
    lr: float
    warmup: int
    schedule: str                     # constant, cosine, linear or wsd (training/schedule.py)
    cosine: bool                      # schedule == "cosine" (the older flag's name for it)
    min_lr: float | None              # a decaying schedule's floor
    lr_decay_steps: int | None        # its length: None until the data says how many steps the run has
    decay_fraction: float | None      # wsd: the last fraction of lr_decay_steps that decays
    weight_decay: float
    decay: str                        # "all", "matrices" or "none"
    beta1: float
    beta2: float
    eps: float
    clip: float | None
    skip_loss_z: float | None         # the spike guard (training/guard.py); None: off
    skip_grad_z: float | None
    # how long and how often
    epochs: int | None                # text
    max_steps: int | None             # shards
    eval_freq: int | None             # text
    eval_every: int | None            # shards
    eval_iter: int
    hellaswag: str | None
    hellaswag_limit: int | None
    hellaswag_batch: int              # HellaSwag examples a forward
    start_context: str
    sample_every: int | None          # steps between samples; None: at every evaluation (shards), epoch (text)
    sample_tokens: int                # tokens a sample; 0: no samples
    save_every: int | None
    keep_last: int                    # training/keep.py's Keeper
    keep_every: int
    keep_best: bool
    progress: bool
    log_every: int | None             # without the progress bar
    # where
    backend: str
    kernels: str | None               # numpy: "fast" or "reference"
    device: str | None                # as given; None: the backend's default
    dtype: str
    autocast: str | None              # torch: "bf16", "fp16" or None
    compile: bool
    world_size: int                   # torchrun's processes
    # the files
    config: str | None
    out: str
    overwrite: bool
    resume: str | None
    auto: bool                        # --resume auto: resume is OUT's newest whole checkpoint, or None
    steps_done: int                   # by the resumed run (0 for a new one)
    # what a resume changes: {key: (saved, new)}; and which settings the --config file gave
    changes: dict = field(default_factory=dict)
    from_config: frozenset = frozenset()

    @property
    def shards(self) -> bool:
        """A run by steps over token shards (else by epochs over a text)."""
        return self.max_steps is not None

    def origin(self, key: str) -> str:
        """How a message names the setting: `--autocast bf16`, `--autocast bf16 (from run.toml)`."""
        value = getattr(self, key)
        shown = f"--{key.replace('_', '-')}" + ("" if value is True else f" {value}")
        return f"{shown} (from {self.config})" if key in self.from_config else shown

    @property
    def step_windows(self) -> int:
        """Windows an optimizer step on each process: the micro-batch times the accumulation."""
        return self.batch_size * self.grad_accum

    def batch_line(self) -> str:
        """What a step is: `micro 16 x accumulation 32 x processes 1 x T 1024 = 524,288 tokens a step`."""
        return (f"micro {self.batch_size} x accumulation {self.grad_accum} x processes {self.world_size} x T "
                f"{self.max_length} = {self.tokens_per_step:,} tokens a step")

    def torch_options(self) -> dict:
        """The backend's build options the run gives (none of them by default; numpy takes grad_accum)."""
        options = {"autocast": self.autocast, "compile": self.compile or None,
                   "grad_accum": self.grad_accum if self.grad_accum != 1 else None}
        return {k: v for k, v in options.items() if v and (self.backend == "torch" or k == "grad_accum")}

    def saved(self) -> dict:
        """What the checkpoint keeps (RUN_DEFAULTS' keys): a --resume starts from it."""
        return {key: getattr(self, key) for key in RUN_DEFAULTS}

    def as_flags(self) -> list[str]:
        """The settings as `npgpt train` flags: every one that applies to this run, so that the
        command gives the same run whatever the defaults, config files or checkpoints around it.
        --overwrite and --config are left out (a pasted line never replaces the checkpoint it made;
        the file's values are all here)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update({flag: getattr(self.cfg, name) for flag, name in SHAPE_FLAGS.items()})
        values["autocast"] = self.autocast or ("none" if self.backend == "torch" else None)
        if self.resume:
            values.update(init_from=None, preset=None)  # a resumed run keeps its model
        if self.auto:
            values["resume"] = "auto"
        if self.backend != "torch":
            values.update(dict.fromkeys(TORCH_ONLY))
        if self.progress:
            values["log_every"] = None
        values["hellaswag_batch"] = self.hellaswag and self.hellaswag_batch
        skip = ("data_sha256", "world_size", "changes", "from_config", "overwrite", "config", "cfg", "cosine",
                "tokens_per_step", "steps_done", "auto")
        argv = []
        for key, value in values.items():
            flag = "--" + key.replace("_", "-")
            if key in skip or value is None:
                continue
            if isinstance(value, bool):
                argv.append(flag if value else "--no-" + flag[2:])
            else:
                argv += [flag, repr(value) if isinstance(value, float) else str(value)]
        return argv

    def as_command(self) -> str:
        """The run as one shell command, quoted: paste it to run it again."""
        return shlex.join(["npgpt", "train", *self.as_flags()])
