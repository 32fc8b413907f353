"""The `npgpt` command line: train, generate, eval. `python -m npgpt ...` is the same program.

`npgpt train` with no arguments is the book's chapter-5 run: the 124M model on The Verdict with
the NumPy backend, 10 epochs, batch 2, AdamW lr 5e-4 and weight decay 0.1.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path


def _train_parser(sub):
    p = sub.add_parser("train", help="pretrain on a text file (default: The Verdict)")
    p.add_argument("--backend", choices=("numpy", "torch"), default="numpy")
    p.add_argument("--data", metavar="PATH", help="UTF-8 text file (default: The Verdict)")
    p.add_argument("--preset", default="book-124m", help="model size (book-124m, gpt2-small, ..., tiny)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--max-length", type=int, help="tokens per window (default: the context length)")
    p.add_argument("--stride", type=int, help="step between windows (default: max length)")
    p.add_argument("--lr", type=float, default=5e-4, help="peak learning rate")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--eval-freq", type=int, default=5, help="evaluate every N steps")
    p.add_argument("--eval-iter", type=int, default=5, help="batches per evaluation")
    p.add_argument("--warmup", type=int, default=0, metavar="STEPS", help="linear warmup steps")
    p.add_argument("--cosine", action="store_true", help="cosine decay after warmup")
    p.add_argument("--clip", type=float, metavar="NORM", help="clip the global gradient norm")
    p.add_argument("--out", default="runs/npgpt", metavar="DIR", help="checkpoint, history.json, loss plot")
    p.add_argument("--save-every", type=int, default=0, metavar="STEPS", help="also checkpoint every N steps")
    p.add_argument("--resume", metavar="CKPT", help="continue from a checkpoint")
    p.add_argument("--device", help="torch device (default: cuda if present, else cpu)")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--seed", type=int, default=123)
    p.add_argument("--start-context", default="Every effort moves you", help="prompt of the samples")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _model_source(p):
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", metavar="FILE", help="an npgpt .h5 checkpoint")
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
    e.add_argument("--max-length", type=int, default=256)
    return parser


def cmd_train(args):
    import numpy as np
    import npgpt
    from .plot import plot_losses
    from .train import TrainState

    tok = npgpt.get_tokenizer()
    if args.resume:
        model, opt, state = npgpt.load_checkpoint(args.resume, backend=args.backend, device=args.device)
        if opt is None:
            raise ValueError(f"{args.resume}: holds no optimizer state, so training cannot resume from it")
        opt.lr = args.lr
    else:
        cfg = npgpt.GPTConfig.preset(args.preset)
        model = npgpt.build_model(cfg, backend=args.backend, seed=args.seed, dtype=args.dtype, device=args.device)
        opt = npgpt.AdamW(model, lr=args.lr, weight_decay=args.weight_decay)
        state = TrainState()
    cfg = model.cfg
    max_length = args.max_length or cfg.context_length
    if max_length > cfg.context_length:
        raise ValueError(f"--max-length {max_length} exceeds the model's context length {cfg.context_length}")
    text = npgpt.load_corpus(args.data)
    train_loader, val_loader = npgpt.make_loaders(text, tok, batch_size=args.batch_size, max_length=max_length,
                                                  stride=args.stride or max_length, seed=args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / "checkpoint.h5"
    started = time.time()

    def save(state):
        npgpt.save_checkpoint(ckpt_path, model, opt, state=state)
        history = {"train_losses": state.train_losses, "val_losses": state.val_losses,
                   "tokens_seen": state.track_tokens_seen, "steps": state.track_steps, "lrs": state.lrs,
                   "epoch": state.epoch, "global_step": state.global_step, "config": cfg.to_dict(),
                   "backend": model.backend, "wall_time_s": round(time.time() - started, 1)}
        (out / "history.json").write_text(json.dumps(history, indent=1))

    def on_step(state):
        if args.save_every and (state.global_step + 1) % args.save_every == 0:
            save(state)

    print(f"npgpt: {args.backend} backend, {npgpt.num_params(cfg):,} parameters, {len(train_loader)} train / "
          f"{len(val_loader)} val batches of {args.batch_size}x{max_length} tokens, {args.epochs} epochs",
          file=sys.stderr)
    npgpt.train_model_simple(model, train_loader, val_loader, opt, args.epochs, args.eval_freq, args.eval_iter,
                             args.start_context, tok, warmup_steps=args.warmup, cosine=args.cosine,
                             clip_norm=args.clip, state=state, on_step=on_step, on_epoch_end=save,
                             progress=not args.no_progress)
    if state.train_losses:
        plot_losses(args.epochs, state.track_tokens_seen, state.train_losses, state.val_losses, out / "loss.png")
    print(f"npgpt: done in {time.time() - started:.0f} s; wrote {ckpt_path}, {out / 'history.json'}"
          f"{', ' + str(out / 'loss.png') if state.train_losses else ''}", file=sys.stderr)
    return 0


def _load_model(args):
    import npgpt
    model, _, _ = npgpt.load_checkpoint(args.checkpoint, backend=args.backend, device=args.device)
    return model.eval()


def cmd_generate(args):
    import npgpt
    model = _load_model(args)
    tok = npgpt.get_tokenizer()
    if not args.prompt:
        raise ValueError("--prompt is empty: generation needs at least one token")
    ids = npgpt.text_to_token_ids(args.prompt, tok)[:, -model.cfg.context_length:]   # the book crops too
    out = npgpt.generate(model, ids, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                         top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    print(npgpt.token_ids_to_text(out, tok))
    return 0


def cmd_eval(args):
    import npgpt
    model = _load_model(args)
    tok = npgpt.get_tokenizer()
    max_length = min(args.max_length, model.cfg.context_length)
    train_loader, val_loader = npgpt.make_loaders(npgpt.load_corpus(args.data), tok, batch_size=args.batch_size,
                                                  max_length=max_length, stride=max_length)
    for name, loader in (("train", train_loader), ("val", val_loader)):
        loss = npgpt.calc_loss_loader(model, loader)
        print(f"{name} loss {loss:.4f}  perplexity {math.exp(loss):.2f}")
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    command = {"train": cmd_train, "generate": cmd_generate, "eval": cmd_eval}[args.command]
    try:
        return command(args)
    except KeyboardInterrupt:
        print("npgpt: interrupted", file=sys.stderr)
        return 130
    except (ValueError, TypeError, OSError, FloatingPointError) as e:
        if args.debug:
            raise
        print(f"npgpt {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
