"""`npgpt prepare`: text files, .jsonl or folders of them -> llm.c token shards for `npgpt train --data DIR`."""
from __future__ import annotations

import sys


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
    p.add_argument("--overwrite", action="store_true", help="replace shards of the same name in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def cmd_prepare(args):
    from ..data.prepare import prepare
    manifest = prepare(args.inputs, args.out, name=args.name, val_fraction=args.val_fraction,
                       shard_tokens=args.shard_tokens, workers=args.workers, progress=not args.no_progress,
                       overwrite=args.overwrite)
    tokens = manifest["tokens"]
    print(f"npgpt: {manifest['documents']:,} documents, {tokens['train']:,} train + {tokens['val']:,} val tokens "
          f"in {len(manifest['shards'])} shards in {args.out}; train with: npgpt train --data {args.out} "
          "--max-steps N", file=sys.stderr)
    return 0
