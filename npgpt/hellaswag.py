"""HellaSwag, completion style: the downstream score llm.c and the GPT-2 reproduction report beside
the val loss, computed once against the backend interface (model.logits), so both backends give it.

An example is a context and four endings, one of them right (its label). Each ending is scored by
the cross-entropy of its tokens given the context, as llm.c's dev/data/hellaswag.py does: a row is
encode(ctx) + encode(" " + ending) (GPT-2's tokens for a word carry the space before it; encoded
with encode_ordinary, so a literal <|endoftext|> stays text), and only the ending's tokens count. acc: the right ending has the lowest SUM of its token losses; acc_norm:
the lowest MEAN per token (which does not favour short endings). ending_losses scores one example,
its four rows one batch padded on the right to the longest: the padding comes after every scored
token, so causal attention never sees it, and the mask leaves it out of the sums. hellaswag()
scores batch_examples examples a forward the same way (batch_losses), the log-probabilities
computed where the model runs (model.masked_loss_sums: on the GPU for the torch backend) and only
each row's sum brought back; under torchrun each rank scores its share and the counts are summed.

The file is the dataset's own jsonl (hellaswag_val.jsonl: 10,042 examples), one JSON object a line
with "ctx" (a string), "endings" (4 strings) and "label" (0-3); other keys are ignored.

Shape letters: E endings (4), L tokens of the longest row, V vocabulary.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .data.sources import _json_type
from .files import open_regular

N_ENDINGS = 4
MAX_BYTES = 64 << 20         # hellaswag_val.jsonl is 11 MB, its longest line about 2 kB
MAX_LINE_BYTES = 1 << 20


def _check_example(example, where: str) -> dict:
    """example, checked to hold a string "ctx", four string "endings" and an int "label" 0-3."""
    if not isinstance(example, dict):
        raise ValueError(f"{where}: expected a JSON object with \"ctx\", \"endings\" and \"label\", "
                         f"got {_json_type(example)}")
    for key in ("ctx", "endings", "label"):
        if key not in example:
            hint = " (hellaswag_test.jsonl has no labels: use hellaswag_val.jsonl)" if key == "label" else ""
            raise ValueError(f"{where}: no \"{key}\" field (fields: {', '.join(list(example)[:8])}){hint}")
    ctx, endings, label = example["ctx"], example["endings"], example["label"]
    if not isinstance(ctx, str):
        raise ValueError(f"{where}: \"ctx\" is {_json_type(ctx)}, expected a string")
    if not ctx:
        raise ValueError(f"{where}: \"ctx\" is empty; the first token of an ending needs a context")
    if not isinstance(endings, list):
        raise ValueError(f"{where}: \"endings\" is {_json_type(endings)}, expected an array of "
                         f"{N_ENDINGS} strings")
    if len(endings) != N_ENDINGS:
        raise ValueError(f"{where}: \"endings\" has {len(endings)} items, expected {N_ENDINGS}")
    for i, ending in enumerate(endings):
        if not isinstance(ending, str):
            raise ValueError(f"{where}: \"endings\" item {i} is {_json_type(ending)}, expected a string")
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < N_ENDINGS:
        raise ValueError(f"{where}: \"label\" is {json.dumps(label)}, expected 0, 1, 2 or 3")
    return {"ctx": ctx, "endings": endings, "label": label}


def load_examples(path: str | os.PathLike) -> list[dict]:
    """Every example of a HellaSwag jsonl file, checked: [{"ctx", "endings", "label", "where"}, ...]
    ("where": the file and line, for later messages). Blank lines are skipped; anything else wrong
    is a ValueError naming the file and line, as is a file of more than MAX_BYTES or a line of
    more than MAX_LINE_BYTES, or anything but a regular file."""
    path = Path(path)
    examples, offset = [], 0
    with open_regular(path, "a HellaSwag .jsonl file") as f:
        for number, raw in enumerate(iter(lambda: f.readline(MAX_LINE_BYTES + 1), b""), start=1):
            where = f"{path} line {number}"
            offset += len(raw)
            if len(raw) > MAX_LINE_BYTES or offset > MAX_BYTES:
                raise ValueError(f"{where}: {'the line' if len(raw) > MAX_LINE_BYTES else 'the file'} is longer "
                                 f"than {MAX_LINE_BYTES if len(raw) > MAX_LINE_BYTES else MAX_BYTES:,} bytes; "
                                 "not a HellaSwag file")
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {offset - len(raw) + e.start})") from None
            if not line.strip():
                continue
            try:
                example = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not JSON ({e.msg} at column {e.colno})") from None
            except RecursionError:
                raise ValueError(f"{where}: JSON nested deeper than Python's recursion limit") from None
            except ValueError as e:             # Python's limit of 4,300 digits on an integer
                raise ValueError(f"{where}: not JSON npgpt reads ({e})") from None
            examples.append({**_check_example(example, where), "where": where})
    if not examples:
        raise ValueError(f"{path}: no examples (expected one JSON object a line with \"ctx\", \"endings\" "
                         "and \"label\")")
    return examples


def render(example: dict, tokenizer, context_length: int, where: str = "example"):
    """(tokens (E, L) int64, mask (E, L) bool): row e is the context's tokens then ending e's,
    zero-padded on the right; mask marks ending e's tokens.

    A context too long for the model is cut from the left, the same for all four rows: it keeps
    its last context_length + 1 - (longest ending) tokens, so that each row's inputs (all but its
    last token) fit in context_length and every ending token is scored given the same context.
    An ending that leaves no room for a single context token is a ValueError."""
    ctx = tokenizer.encode_ordinary(example["ctx"])
    ends = [tokenizer.encode_ordinary(" " + ending) for ending in example["endings"]]
    longest = max(len(e) for e in ends)
    if longest > context_length:
        raise ValueError(f"{where}: an ending of {longest} tokens leaves no context in the model's "
                         f"context_length of {context_length}")
    ctx = ctx[-(context_length + 1 - longest):]
    rows = [ctx + end for end in ends]
    tokens = np.zeros((N_ENDINGS, len(ctx) + longest), dtype=np.int64)      # (E, L)
    mask = np.zeros(tokens.shape, dtype=bool)                               # (E, L)
    for e, (row, end) in enumerate(zip(rows, ends)):
        tokens[e, :len(row)] = row
        mask[e, len(ctx):len(row)] = True
    return tokens, mask


def ending_losses(model, tokens: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sum, mean) of each row's token losses over its masked tokens: (E,), (E,) float64. One
    example a forward, from the logits on the host: the plain scoring, which batch_losses (the
    one hellaswag() runs) is tested against.
    Token t is predicted by the logits at t - 1; only the masked positions' logits are turned
    into log-probabilities, in float64 (E x L x V in float64 would be 160 MB for GPT-2)."""
    logits = model.logits(tokens[:, :-1])                          # (E, L-1, V)
    targets, scored = tokens[:, 1:], mask[:, 1:]                   # (E, L-1) each
    rows, cols = np.nonzero(scored)                                # one entry per scored token
    picked = np.asarray(logits[rows, cols], dtype=np.float64)      # (n, V)
    top = picked.max(axis=1)
    logsumexp = top + np.log(np.exp(picked - top[:, None]).sum(axis=1))
    losses = logsumexp - picked[np.arange(len(rows)), targets[rows, cols]]      # (n,)
    sums = np.bincount(rows, weights=losses, minlength=len(tokens))             # (E,)
    return sums, sums / scored.sum(axis=1)


def batch_losses(model, rendered: list) -> list[tuple[np.ndarray, np.ndarray]]:
    """ending_losses of several examples in one forward: rendered is [(tokens, mask), ...] from
    render, stacked into (4 x examples, longest L) rows padded on the right (the padding after
    every scored token, as within an example). -> [(sums (E,), means (E,)), ...] float64."""
    L = max(tokens.shape[1] for tokens, _ in rendered)
    tokens = np.zeros((N_ENDINGS * len(rendered), L), dtype=np.int64)     # (R, L)
    mask = np.zeros(tokens.shape, dtype=bool)                             # (R, L)
    for i, (t, m) in enumerate(rendered):
        tokens[N_ENDINGS * i:N_ENDINGS * (i + 1), :t.shape[1]] = t
        mask[N_ENDINGS * i:N_ENDINGS * (i + 1), :m.shape[1]] = m
    sums = model.masked_loss_sums(tokens, mask)                           # (R,)
    means = sums / mask[:, 1:].sum(axis=1)
    return [(sums[N_ENDINGS * i:N_ENDINGS * (i + 1)], means[N_ENDINGS * i:N_ENDINGS * (i + 1)])
            for i in range(len(rendered))]


def _sum_over_ranks(counts: list[int], model) -> list[int]:
    """counts summed over the ranks where torch.distributed is running (all_reduce), else as given.
    torch is looked up, never imported: a NumPy run has no ranks."""
    import sys
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return counts
    import torch
    t = torch.tensor(counts, dtype=torch.int64, device=getattr(model, "device", "cpu"))
    dist.all_reduce(t)
    return [int(v) for v in t.tolist()]


def hellaswag(model, path_or_examples, tokenizer, limit: int | None = None, rank: int = 0,
              world_size: int = 1, progress: bool = False, batch_examples: int = 8,
              reduce: bool = False) -> dict:
    """HellaSwag accuracy of model: {"n", "correct", "correct_norm", "acc", "acc_norm"}.

    path_or_examples: a jsonl file (see load_examples) or a list of example dicts (load the file
    once with load_examples when evaluating it again and again, as a training run does).
    limit: only the first limit examples. rank, world_size: this process scores examples
    rank, rank + W, ... of them, and n and the counts are its own; summed over the ranks they are
    those of one process; reduce=True sums them over the ranks of torch.distributed (every rank
    must call it then) and returns the totals on every rank. batch_examples: examples a forward
    (batch_losses; the logits held are 4 x batch_examples x L x V). The model is in eval mode
    (no dropout) while scoring, and is put back in training mode afterwards if it was. Contexts
    too long for the model are cut from the left (see render)."""
    if isinstance(path_or_examples, (str, os.PathLike)):
        examples = load_examples(path_or_examples)
    else:
        examples = []
        for i, ex in enumerate(path_or_examples):
            where = ex.get("where", f"example {i}") if isinstance(ex, dict) else f"example {i}"
            examples.append({**_check_example(ex, where), "where": where})
        if not examples:
            raise ValueError("hellaswag: no examples given")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank!r}")
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0:
            raise ValueError(f"limit must be a positive integer or None, got {limit!r}")
        examples = examples[:limit]
    if isinstance(batch_examples, bool) or not isinstance(batch_examples, int) or batch_examples < 1:
        raise ValueError(f"batch_examples must be a positive integer, got {batch_examples!r}")
    mine = range(rank, len(examples), world_size)
    was_training, correct, correct_norm = model.training, 0, 0
    model.eval()
    try:
        with tqdm(total=len(mine), desc="hellaswag", unit="example", disable=not progress, mininterval=1.0) as bar:
            for start in range(0, len(mine), batch_examples):
                chunk = [examples[i] for i in mine[start:start + batch_examples]]
                rendered = [render(ex, tokenizer, model.cfg.context_length, ex["where"]) for ex in chunk]
                for ex, (sums, means) in zip(chunk, batch_losses(model, rendered)):
                    correct += int(sums.argmin() == ex["label"])
                    correct_norm += int(means.argmin() == ex["label"])
                bar.update(len(chunk))
    finally:
        if was_training:
            model.train()
    n = len(mine)
    if reduce:
        n, correct, correct_norm = _sum_over_ranks([n, correct, correct_norm], model)
    return {"n": n, "correct": correct, "correct_norm": correct_norm,
            "acc": correct / n if n else float("nan"), "acc_norm": correct_norm / n if n else float("nan")}
