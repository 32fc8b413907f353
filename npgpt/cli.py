"""The `npgpt` command line: train, generate, eval, convert. `python -m npgpt ...` is the same program.

`npgpt train` with no arguments is the book's chapter-5 run: the 124M model on The Verdict with
the NumPy backend, 10 epochs, batch 2, AdamW lr 5e-4 and weight decay 0.1. Its checkpoint keeps
the run's settings, so `npgpt train --resume CKPT` carries on with the same batches and schedule.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path


# The run's settings, saved in its checkpoint. With --resume, an option not given takes the saved
# value (else the default here); the ones that decide the batches must not change mid-run.
RUN_DEFAULTS = {"data": None, "epochs": 10, "batch_size": 2, "max_length": None, "stride": None, "seed": 123,
                "lr": 5e-4, "weight_decay": 0.1, "eval_freq": 5, "eval_iter": 5, "warmup": 0, "cosine": False,
                "clip": None, "save_every": 0, "start_context": "Every effort moves you",
                "world_size": 1}    # torchrun's processes, each with its own --batch-size windows a step
SAME_BATCHES = ("data", "batch_size", "max_length", "stride", "seed")


def _train_parser(sub):
    p = sub.add_parser("train", help="pretrain on a text file (default: The Verdict)")
    d = RUN_DEFAULTS
    p.add_argument("--backend", choices=("numpy", "torch"), default="numpy")
    p.add_argument("--data", metavar="PATH", help="UTF-8 text file (default: The Verdict)")
    p.add_argument("--preset", help="model size (book-124m, gpt2-small, ..., tiny; default: book-124m, "
                                    "or the --resume checkpoint's)")
    p.add_argument("--drop-rate", type=float, help="dropout rate (default: the preset's)")
    p.add_argument("--epochs", type=int, help=f"total epochs of the run (default: {d['epochs']})")
    p.add_argument("--batch-size", type=int, help=f"default: {d['batch_size']}")
    p.add_argument("--max-length", type=int, help="tokens per window (default: the context length)")
    p.add_argument("--stride", type=int, help="step between windows (default: max length)")
    p.add_argument("--lr", type=float, help=f"peak learning rate (default: {d['lr']})")
    p.add_argument("--weight-decay", type=float, help=f"default: {d['weight_decay']}")
    p.add_argument("--eval-freq", type=int, help=f"evaluate every N steps (default: {d['eval_freq']})")
    p.add_argument("--eval-iter", type=int, help=f"batches per evaluation (default: {d['eval_iter']})")
    p.add_argument("--warmup", type=int, metavar="STEPS", help="linear warmup steps (default: 0)")
    p.add_argument("--cosine", action="store_true", default=None, help="cosine decay after warmup")
    p.add_argument("--clip", type=float, metavar="NORM", help="clip the global gradient norm")
    p.add_argument("--out", metavar="DIR", help="checkpoint, history.json, loss plot (default: runs/npgpt, "
                                                "or the folder of the --resume checkpoint)")
    p.add_argument("--save-every", type=int, metavar="STEPS", help="also checkpoint every N steps")
    p.add_argument("--resume", metavar="CKPT", help="continue the run saved in a checkpoint, with its settings")
    p.add_argument("--device", help="torch device (default: cuda if present, else cpu)")
    p.add_argument("--autocast", choices=("bf16",), help="torch on CUDA: bf16 autocast")
    p.add_argument("--compile", action="store_true", help="torch: torch.compile the training step")
    p.add_argument("--grad-accum", type=int, default=1, metavar="K",
                   help="torch: run each batch as K micro-batches (same gradients, less memory)")
    p.add_argument("--dtype", choices=("float32", "float64"), help="default: float32, or the --resume "
                                                                  "checkpoint's")
    p.add_argument("--seed", type=int, help=f"initialisation and batch order (default: {d['seed']})")
    p.add_argument("--start-context", help=f"prompt of the samples (default: {d['start_context']!r})")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _model_source(p):
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", metavar="FILE", help="an npgpt .h5 checkpoint")
    src.add_argument("--pretrained", metavar="PATH", help="weights: an OpenAI GPT-2 folder, a Hugging Face "
                                                         "folder or .safetensors, a book .pth, an npgpt .h5")
    p.add_argument("--n-heads", type=int, help="attention heads, for a book .pth (default: emb_dim / 64)")
    p.add_argument("--backend", choices=("numpy", "torch"), default="numpy")
    p.add_argument("--device")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="npgpt", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    g = sub.add_parser("generate", help="continue a prompt")
    _model_source(g)
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=50)
    g.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=50)
    g.add_argument("--top-p", type=float, default=0.95)
    g.add_argument("--seed", type=int, default=123)
    e = sub.add_parser("eval", help="train/val loss and perplexity on a text")
    _model_source(e)
    e.add_argument("--data", metavar="PATH", help="UTF-8 text file (default: The Verdict)")
    e.add_argument("--batch-size", type=int, default=2)
    e.add_argument("--max-length", type=int, default=256, help="tokens per window, also the stride "
                   "(default: 256, the book's exercise 5.5)")
    c = sub.add_parser("convert", help="convert weights between formats")
    c.add_argument("input", metavar="IN", help="an OpenAI GPT-2 folder, a Hugging Face folder or .safetensors, "
                                               "a book .pth, an npgpt .h5")
    c.add_argument("output", metavar="OUT", help="OUT.h5: npgpt checkpoint; OUT.safetensors: one file with "
                                                 "Hugging Face names; anything else: a Hugging Face folder")
    c.add_argument("--n-heads", type=int, help="attention heads, for a book .pth (default: emb_dim / 64)")
    c.add_argument("--dtype", choices=("float32", "float64"), default="float32", help="of the written weights")
    return parser


def _resolve_run(args) -> None:
    """Fill the run settings not given: from the resumed checkpoint's, else RUN_DEFAULTS (a checkpoint
    saved without them keeps its optimizer's lr and weight decay)."""
    from .checkpoint import open_checkpoint
    from .config import GPTConfig
    saved = {}
    if args.resume:
        with open_checkpoint(args.resume) as ckpt:
            saved = ckpt["run"]
        if args.preset is not None and GPTConfig.preset(args.preset, drop_rate=ckpt["config"].drop_rate) \
                != ckpt["config"]:
            raise ValueError(f"--preset {args.preset}: {args.resume} holds another model ({ckpt['config']}), "
                             "and a resumed run keeps its model (leave --preset out)")
        if args.dtype is not None and args.dtype != ckpt["dtype"]:
            raise ValueError(f"--dtype {args.dtype}: {args.resume} was trained in {ckpt['dtype']}, and a resumed "
                             "run keeps its model (leave --dtype out)")
    else:
        args.preset, args.dtype = args.preset or "book-124m", args.dtype or "float32"
    if args.data is not None:
        args.data = str(Path(args.data).resolve())
    changed = [k for k in SAME_BATCHES if k in saved and getattr(args, k) not in (None, saved[k])]
    if changed:
        flags = " ".join(f"--{k.replace('_', '-')} {saved[k]}" for k in changed)
        raise ValueError(f"{args.resume} was trained with {flags}; a resumed run must see the same batches "
                         f"(leave these options out, or start a new run)")
    for key, default in RUN_DEFAULTS.items():
        if getattr(args, key) is None:
            keep_optimizer = args.resume and key in ("lr", "weight_decay")
            setattr(args, key, saved.get(key, None if keep_optimizer else default))
    args.out = args.out or (str(Path(args.resume).parent) if args.resume else "runs/npgpt")
    _check_run(args)


def _check_run(args) -> None:
    """The run's numbers, given or resumed, before anything is built: each error names the option."""
    def check(key, ok, expected):
        value = getattr(args, key)
        if value is not None and (isinstance(value, bool) or not ok(value)):
            raise ValueError(f"--{key.replace('_', '-')} must be {expected}, got {value!r}")
    for key in ("epochs", "batch_size", "max_length", "stride", "eval_freq", "eval_iter"):
        check(key, lambda v: isinstance(v, int) and v >= 1, "a positive integer")
    for key in ("save_every", "warmup", "seed"):
        check(key, lambda v: isinstance(v, int) and v >= 0, "an integer >= 0")
    check("clip", lambda v: isinstance(v, (int, float)) and 0 < v < math.inf, "a positive number")
    for key in ("lr", "weight_decay"):
        check(key, lambda v: isinstance(v, (int, float)) and 0 <= v < math.inf, "a number >= 0")


class _Stopped(Exception):
    """Raised at a step boundary after a signal asked the run to stop; its checkpoint is saved."""


class _StopOnSignal:
    """Ctrl-C (SIGINT) or SIGTERM while training: the first one only sets a flag, which the loop
    checks after each step (the run saves its checkpoint there, between two optimizer steps, and
    exits with 128 + the signal's number: 130 for Ctrl-C); a second one interrupts at once. Signals
    ignored when npgpt started (nohup) stay ignored; the previous handlers come back on exit."""
    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum = None
        self.previous = {}

    def _handler(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    def check(self) -> None:
        if self.signum is not None:
            raise _Stopped

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():      # signals reach the main thread only
            for s in self.SIGNALS:
                if signal.getsignal(s) is not signal.SIG_IGN:
                    self.previous[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)
        self.previous = {}


def _kept(ckpt_path) -> str:
    """What a run that stopped on an error leaves behind: its last checkpoint, as it was."""
    from .checkpoint import open_checkpoint
    try:
        with open_checkpoint(ckpt_path) as ckpt:
            state = ckpt["state"]
    except (OSError, ValueError):
        return f"no checkpoint was saved to {ckpt_path}"
    return f"the last checkpoint, {ckpt_path} (step {state.global_step}), is kept as it was"


def cmd_train(args):
    import npgpt
    from .checkpoint import atomic_write
    from .plot import plot_losses
    from .train import TrainState

    tok = npgpt.get_tokenizer()
    args.world_size = None                      # the resumed run's, else 1
    _resolve_run(args)
    ranks = None                                # started by torchrun: data-parallel, one rank per process
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        if args.backend != "torch":
            raise ValueError("under torchrun, train with --backend torch (DistributedDataParallel); "
                             "the numpy backend runs in one process")
        from .torch_backend.distributed import Ranks
        ranks = Ranks(args.device)
        args.device = str(ranks.device)
    world_size = 1 if ranks is None else ranks.world_size
    if args.resume and args.world_size != world_size:
        raise ValueError(f"{args.resume} was trained by {args.world_size} processes (torchrun ranks), this run "
                         f"has {world_size}; a resumed run must see the same batches, so resume it with "
                         f"{args.world_size}")
    args.world_size = world_size
    is_main = ranks is None or ranks.is_main    # rank 0 alone prints and writes files
    torch_options = {k: v for k, v in (("autocast", args.autocast), ("compile", args.compile),
                                       ("grad_accum", args.grad_accum)) if v not in (None, False, 1)}
    if torch_options and args.backend != "torch":
        raise ValueError(f"--{next(iter(torch_options)).replace('_', '-')} needs --backend torch")
    if args.resume:
        model, opt, state = npgpt.load_checkpoint(args.resume, backend=args.backend, device=args.device,
                                                  **torch_options)
        if opt is None:
            raise ValueError(f"{args.resume}: holds no optimizer state, so training cannot resume from it")
        if args.drop_rate is not None and args.drop_rate != model.cfg.drop_rate:
            raise ValueError(f"--drop-rate {args.drop_rate}: {args.resume} was trained with "
                             f"{model.cfg.drop_rate}, and a resumed run keeps its model")
        for key in ("lr", "weight_decay"):
            if getattr(args, key) is None:
                setattr(args, key, getattr(opt, key))
            setattr(opt, key, getattr(args, key))
    else:
        overrides = {} if args.drop_rate is None else {"drop_rate": args.drop_rate}
        cfg = npgpt.GPTConfig.preset(args.preset, **overrides)
        model = npgpt.build_model(cfg, backend=args.backend, seed=args.seed, dtype=args.dtype, device=args.device,
                                  **torch_options)
        opt = npgpt.AdamW(model, lr=args.lr, weight_decay=args.weight_decay)
        state = TrainState()
    cfg = model.cfg
    max_length = args.max_length = args.max_length or cfg.context_length
    args.stride = args.stride or max_length
    run = {key: getattr(args, key) for key in RUN_DEFAULTS}
    if max_length > cfg.context_length:
        raise ValueError(f"--max-length {max_length} exceeds the model's context length {cfg.context_length}")
    text = npgpt.load_corpus(args.data)
    train_loader, val_loader = npgpt.make_loaders(text, tok, batch_size=args.batch_size, max_length=max_length,
                                                  stride=args.stride, seed=args.seed)
    if ranks is not None:
        ranks.wrap(model)
        train_loader, val_loader = ranks.shard(train_loader), ranks.shard(val_loader)
    out = Path(args.out)
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / "checkpoint.h5"
    started = time.time()

    def save(state):
        if not is_main:
            return
        npgpt.save_checkpoint(ckpt_path, model, opt, state=state, run=run)
        history = {"train_losses": state.train_losses, "val_losses": state.val_losses,
                   "tokens_seen": state.track_tokens_seen, "steps": state.track_steps, "lrs": state.lrs,
                   "epoch": state.epoch, "global_step": state.global_step, "config": cfg.to_dict(),
                   "backend": model.backend, "wall_time_s": round(time.time() - started, 1)}
        atomic_write(out / "history.json", lambda tmp: Path(tmp).write_text(json.dumps(history, indent=1)))

    stop = _StopOnSignal()

    def on_step(state):
        if ranks:               # every rank stops at the same step, whichever got the signal
            stop.signum = ranks.agree_max(stop.signum or 0) or None
        if args.save_every and (state.global_step + 1) % args.save_every == 0 or stop.signum is not None:
            save(state)
        stop.check()

    def on_epoch_end(state):
        save(state)
        stop.check()

    if is_main:
        print(f"npgpt: {args.backend} backend, {npgpt.num_params(cfg):,} parameters, {len(train_loader)} train / "
              f"{len(val_loader)} val batches of {args.batch_size}x{max_length} tokens"
              f"{f' on each of {world_size} processes' if ranks else ''}, {args.epochs} epochs", file=sys.stderr)
    try:
        with stop:
            npgpt.train_model_simple(model, train_loader, val_loader, opt, args.epochs, args.eval_freq,
                                     args.eval_iter, args.start_context, tok, warmup_steps=args.warmup,
                                     cosine=args.cosine, clip_norm=args.clip, state=state, on_step=on_step,
                                     on_epoch_end=on_epoch_end, progress=not args.no_progress and is_main,
                                     print_fn=None if is_main else (lambda *_: None))
    except _Stopped:
        epoch = state.global_step // len(train_loader) + 1
        if is_main:
            launcher = f"torchrun --nproc_per_node={world_size} -m npgpt" if ranks else "npgpt"
            print(f"npgpt: {signal.Signals(stop.signum).name} at step {state.global_step} (epoch {epoch}); "
                  f"saved {ckpt_path}; continue with: {launcher} train --resume {ckpt_path}", file=sys.stderr)
        if ranks:
            ranks.finish()
        return 128 + stop.signum
    except npgpt.TrainingDiverged as e:
        raise npgpt.TrainingDiverged(f"training diverged at {e}; {_kept(ckpt_path)}") from e
    except OSError as e:                                     # a save failed: disk full, no permission, ...
        raise OSError(f"training stopped: {e}; {_kept(ckpt_path)}") from e
    if ranks is not None:
        ranks.finish()
        if not is_main:
            return 0
    if state.train_losses:
        plot_losses(args.epochs, state.track_tokens_seen, state.train_losses, state.val_losses, out / "loss.png")
    print(f"npgpt: done in {time.time() - started:.0f} s; wrote {ckpt_path}, {out / 'history.json'}"
          f"{', ' + str(out / 'loss.png') if state.train_losses else ''}", file=sys.stderr)
    return 0


def _load_model(args):
    """(model in eval mode, its tokenizer): the one beside --pretrained weights, else GPT-2's."""
    import npgpt
    from .pretrained import load_tokenizer
    if args.pretrained:
        model = npgpt.load_pretrained(args.pretrained, backend=args.backend, device=args.device,
                                      n_heads=args.n_heads)
        tok = load_tokenizer(args.pretrained)
    else:
        model, _, _ = npgpt.load_checkpoint(args.checkpoint, backend=args.backend, device=args.device)
        tok = npgpt.get_tokenizer()
    if tok.n_vocab > model.cfg.vocab_size:
        raise ValueError(f"{args.pretrained or args.checkpoint}: the model has {model.cfg.vocab_size} token "
                         f"embeddings but its tokenizer makes ids up to {tok.n_vocab - 1}; keep the tokenizer's "
                         "encoder.json and vocab.bpe beside the weights")
    return model.eval(), tok


def cmd_generate(args):
    import npgpt
    model, tok = _load_model(args)
    if not args.prompt:
        raise ValueError("--prompt is empty: generation needs at least one token")
    ids = npgpt.text_to_token_ids(args.prompt, tok)     # generate() looks at the last context_length tokens
    out = npgpt.generate(model, ids, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                         top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    print(npgpt.token_ids_to_text(out, tok))
    return 0


def cmd_eval(args):
    """Mean loss over every window of the train and validation parts: with GPT-2's 124M weights and the
    defaults (windows of 256, stride 256, batch 2, train ratio 0.9) the book reports 3.7547 / 3.5596."""
    import npgpt
    model, tok = _load_model(args)
    max_length = min(args.max_length, model.cfg.context_length)
    train_loader, val_loader = npgpt.make_loaders(npgpt.load_corpus(args.data), tok, batch_size=args.batch_size,
                                                  max_length=max_length, stride=max_length)
    for name, loader in (("train", train_loader), ("val", val_loader)):
        loss = npgpt.calc_loss_loader(model, loader)
        print(f"{name} loss {loss:.4f}  perplexity {math.exp(loss):.2f}")
    return 0


def cmd_convert(args):
    import npgpt
    from .pretrained import save_safetensors
    model = npgpt.load_pretrained(args.input, dtype=args.dtype, n_heads=args.n_heads)
    out = Path(args.output)
    if out.suffix in (".h5", ".hdf5"):
        npgpt.save_checkpoint(out, model)
    elif out.suffix == ".safetensors":
        save_safetensors(model, out)
    else:
        npgpt.export_hf(model, out, tokenizer_from=args.input)
    print(f"npgpt: wrote {out} ({npgpt.num_params(model.cfg):,} parameters, {model.cfg})", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    command = {"train": cmd_train, "generate": cmd_generate, "eval": cmd_eval, "convert": cmd_convert}[args.command]
    try:
        return command(args)
    except KeyboardInterrupt:
        print("npgpt: interrupted", file=sys.stderr)
        return 130
    except (ValueError, TypeError, OSError, FloatingPointError) as e:
        if args.debug:
            raise
        message = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
        print(f"npgpt {args.command}: error: {message or type(e).__name__}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
