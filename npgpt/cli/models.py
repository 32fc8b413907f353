"""`npgpt generate`, `eval` and `convert`: commands that load a trained or pretrained model."""
from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path


def add_parsers(sub):
    g = sub.add_parser("generate", help="continue a prompt")
    _model_source(g)
    g.add_argument("--prompt", required=True, metavar="TEXT", help="the text to continue")
    g.add_argument("--max-new-tokens", type=int, default=50, metavar="N", help="tokens to add")
    g.add_argument("--temperature", type=float, default=1.0, help="0: greedy, the most likely token each time")
    g.add_argument("--top-k", type=int, default=50, metavar="K", help="sample among the K most likely tokens")
    g.add_argument("--top-p", type=float, default=0.95, metavar="P",
                   help="sample among the most likely tokens that hold probability P")
    g.add_argument("--seed", type=int, default=123, help="the sampling's random numbers")
    e = sub.add_parser("eval", help="train/val loss and perplexity on a text, HellaSwag accuracy")
    _model_source(e)
    e.add_argument("--data", metavar="PATH", help="UTF-8 text file (default: The Verdict, bundled, unless "
                                                 "--hellaswag alone is given), or a folder of token shards "
                                                 "(their val part)")
    e.add_argument("--hellaswag", metavar="FILE", help="HellaSwag jsonl (hellaswag_val.jsonl): acc and acc_norm "
                                                       "(default: none)")
    e.add_argument("--hellaswag-limit", type=int, metavar="N", help="only the first N HellaSwag examples "
                                                                    "(default: all)")
    e.add_argument("--batch-size", type=int, default=2, metavar="B", help="windows a forward pass")
    e.add_argument("--max-length", type=int, help="tokens per window, also the stride (default: a --checkpoint's "
                   "context length; 256 with --pretrained, the book's exercise 5.5)")
    c = sub.add_parser("convert", help="convert weights between formats")
    c.add_argument("input", metavar="IN", help="an OpenAI GPT-2 folder, a Hugging Face folder or .safetensors, "
                                               "a book .pth, a nanoGPT ckpt.pt, an llm.c model .bin, an npgpt "
                                               ".h5, or gpt2 / gpt2-medium / -large / -xl from a local Hugging "
                                               "Face cache")
    c.add_argument("output", metavar="OUT", help="OUT.h5: npgpt checkpoint; OUT.safetensors: one file with "
                                                 "Hugging Face names; OUT.bin: an llm.c model file; anything "
                                                 "else: a Hugging Face folder")
    c.add_argument("--n-head", type=int, help="attention heads, for a book .pth (default: emb_dim / 64)")
    c.add_argument("--dtype", choices=("float32", "float64", "bfloat16"), default="float32",
                   help="of the written weights (bfloat16: an llm.c .bin only, its version 5; default: float32, "
                        "version 3 for a .bin)")
    c.add_argument("--vocab-size", type=int, metavar="V", help="an llm.c IN: its V drops wte's padded rows, its Vp "
                                                               "keeps them (default: V)")
    c.add_argument("--overwrite", action=argparse.BooleanOptionalAction, help="replace OUT if it exists (never the "
                                                                              "input itself) (default: off)")


def _model_source(p):
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", metavar="FILE", help="an npgpt .h5 checkpoint (no default: give it or "
                                                          "--pretrained)")
    src.add_argument("--pretrained", metavar="PATH", help="weights: an OpenAI GPT-2 folder, a Hugging Face "
                                                         "folder or .safetensors, a book .pth, an npgpt .h5 (no "
                                                         "default: give it or --checkpoint)")
    p.add_argument("--n-head", type=int, help="attention heads, for a book .pth (default: emb_dim / 64)")
    p.add_argument("--backend", choices=("numpy", "torch"), help="default: the backend that trained a --checkpoint, "
                                                                   "else numpy")
    p.add_argument("--device", help="torch device: cpu, cuda or cuda:N (default: cuda if present, else cpu)")



def _load_model(args):
    """(model in eval mode, its tokenizer): the one beside --pretrained weights, else GPT-2's."""
    import npgpt
    from ..weights.pretrained import load_tokenizer
    if args.pretrained:
        args.backend = args.backend or "numpy"
        model = npgpt.load_pretrained(args.pretrained, backend=args.backend, device=args.device,
                                      n_heads=args.n_head)
        tok = load_tokenizer(args.pretrained)
    else:
        if args.backend is None:
            from ..weights.checkpoint import open_checkpoint
            with open_checkpoint(args.checkpoint) as ckpt:
                args.backend = ckpt["run"].get("backend", ckpt["rng"].get("backend", "numpy"))
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
    """Mean loss over every window of the train and validation parts of a text: with GPT-2's 124M
    weights and the defaults (windows of 256, stride 256, batch 2, train ratio 0.9) the book reports
    3.7547 / 3.5596. For a folder of token shards, over every window of its val shards. With
    --hellaswag FILE, HellaSwag's acc and acc_norm too (alone when --data is not given)."""
    import npgpt
    from ..hellaswag import hellaswag, load_examples
    if args.hellaswag_limit is not None and (args.hellaswag is None or args.hellaswag_limit <= 0):
        raise ValueError(f"--hellaswag-limit {args.hellaswag_limit}: expected a positive number of examples "
                         "of a --hellaswag FILE")
    examples = None if args.hellaswag is None else load_examples(args.hellaswag)   # bad input before the load
    model, tok = _load_model(args)
    if args.data is not None or examples is None:
        default = 256 if args.pretrained else model.cfg.context_length
        max_length = min(args.max_length or default, model.cfg.context_length)
        if args.data is not None and os.path.isdir(args.data):           # token shards: every val window
            from ..data.shards import TokenDir
            parts = [("val", TokenDir(args.data).val_batches(args.batch_size, max_length))]
        else:
            parts = zip(("train", "val"), npgpt.make_loaders(npgpt.load_corpus(args.data), tok,
                                                             batch_size=args.batch_size, max_length=max_length,
                                                             stride=max_length))
        print(f"npgpt eval: {args.pretrained or args.checkpoint} on the {model.backend} backend, windows of "
              f"{max_length} tokens (stride {max_length}), batch {args.batch_size}", file=sys.stderr)
        for name, loader in parts:
            loss = npgpt.calc_loss_loader(model, loader)
            print(f"{name} loss {loss:.4f}  perplexity {math.exp(loss):.2f}")
    if examples is not None:
        r = hellaswag(model, examples, tok, limit=args.hellaswag_limit, progress=sys.stderr.isatty())
        print(f"hellaswag: {r['n']} examples, acc {r['acc']:.4f}, acc_norm {r['acc_norm']:.4f}")
    return 0


def cmd_convert(args):
    import npgpt
    from ..weights.export import save_safetensors
    src, out = Path(args.input), Path(args.output)
    if out.exists() and src.exists() and (os.path.samefile(src, out) or src.resolve() in out.resolve().parents):
        raise ValueError(f"{out}: is the input {src} (or inside it); write the converted weights elsewhere")
    if out.exists() and not args.overwrite:
        raise ValueError(f"{out} already exists; pass --overwrite to replace it")
    llmc = out.suffix == ".bin"
    if args.dtype == "bfloat16" and not llmc:
        raise ValueError(f"--dtype bfloat16: {out} is not an llm.c .bin; npgpt's other formats hold float32 or "
                         "float64")
    model = npgpt.load_pretrained(args.input, dtype="float32" if llmc else args.dtype, n_heads=args.n_head,
                                  vocab_size=args.vocab_size)
    if llmc:
        from ..weights.llmc import write_llmc
        write_llmc(model, out, dtype=args.dtype)
    elif out.suffix in (".h5", ".hdf5"):
        npgpt.save_checkpoint(out, model)
    elif out.suffix == ".safetensors":
        save_safetensors(model, out)
    else:
        npgpt.export_hf(model, out, tokenizer_from=args.input)
    print(f"npgpt: wrote {out} ({npgpt.num_params(model.cfg):,} parameters, {model.cfg})", file=sys.stderr)
    return 0
