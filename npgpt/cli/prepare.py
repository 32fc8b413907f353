"""`npgpt prepare`: text files, .jsonl or folders of them -> llm.c token shards for `npgpt train --data DIR`."""
from __future__ import annotations

import argparse
import sys

GPT2_CONTEXT = 1024                                     # the gpt2 presets' context: their default --max-length
VAL_FRACTIONS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5)   # the ones a warning suggests


def add_parser(sub):
    p = sub.add_parser("prepare", help="tokenise a corpus into token shards (llm.c's format)")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help=".txt (one document), .jsonl (one document per "
                   "line, its \"text\"), either gzipped (.gz), or a folder of them")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the shards and their manifest")
    p.add_argument("--name", help="the shards' name prefix (default: the first input's name)")
    p.add_argument("--val-fraction", type=float, default=0.005, help="share of the tokens, from the first "
                   "documents, in the validation shard (default: 0.005)")
    p.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens per train shard "
                   "(default: 100,000,000, as llm.c)")
    p.add_argument("--workers", type=int, default=2, help="tokenizer threads (default: 2)")
    p.add_argument("--overwrite", action=argparse.BooleanOptionalAction,
                   help="replace shards of the same name in --out (default: off, refused)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="a progress bar")


def cmd_prepare(args):
    from ..data.prepare import prepare
    manifest = prepare(args.inputs, args.out, name=args.name, val_fraction=args.val_fraction,
                       shard_tokens=args.shard_tokens, workers=args.workers, progress=args.progress,
                       overwrite=args.overwrite)
    tokens = manifest["tokens"]
    documents = manifest["documents"]
    print(f"npgpt: {documents:,} document{'s' if documents != 1 else ''}, {tokens['train']:,} train + "
          f"{tokens['val']:,} val tokens in {len(manifest['shards'])} shards in {args.out}; train with: npgpt train "
          f"--data {args.out} --max-steps N", file=sys.stderr)
    warning = short_val(tokens)
    if warning:
        print(f"npgpt prepare: warning: {warning}", file=sys.stderr)
    return 0


def short_val(tokens: dict, context: int = GPT2_CONTEXT) -> str | None:
    """Why the val shard cannot give one training window of the gpt2 presets' context (context + 1
    tokens: the targets are the inputs moved by one), and the --val-fraction that would; None if it can."""
    need = context + 1
    if tokens["val"] >= need:
        return None
    said = (f"the val shard holds {tokens['val']:,} tokens, fewer than one window of the gpt2 presets' context "
            f"({context:,} + 1), which npgpt train refuses")
    fraction = next((f for f in VAL_FRACTIONS if f * tokens["total"] >= need), None)
    if fraction is None:
        return f"{said}; the corpus ({tokens['total']:,} tokens) is too small for it: train with --max-length " \
               f"{max(tokens['val'] - 1, 1)} or less"
    return f"{said}; --val-fraction {fraction} would give about {int(fraction * tokens['total']):,} (or train with " \
           f"--max-length {max(tokens['val'] - 1, 1)} or less)"
