"""`npgpt train`'s options, in the order a run is thought about: what to train (the data and the
model), how (the optimizer and its schedule), how long and how often (steps, evaluation, saves,
logging), where (backend, device, precision, processes) and the files (config, out, resume).

Every option's default here is None: a value not given comes from the --config file, else the
resumed checkpoint, else the --init-from weights, else settings.RUN_DEFAULTS (resolve.py), so the
help states each default in words."""
from __future__ import annotations

import argparse

from ..config import PRESETS
from .settings import RUN_DEFAULTS, TOKENIZER_VOCAB

D = RUN_DEFAULTS
SWITCH = argparse.BooleanOptionalAction         # --cosine / --no-cosine: a config file's true can be turned off


def add_parser(sub):
    p = sub.add_parser("train", help="pretrain on a text file (default: The Verdict) or a folder of token shards",
                       description="Pretrain GPT-2 (default: the book's chapter-5 run). Options not given come from "
                                   "--config FILE, else a --resume checkpoint, else the defaults shown.")
    _what(p.add_argument_group("what to train: the data and the model", "the shape flags override the --preset's; "
                               "a resumed run keeps its model's and --init-from takes the weights' (a different value "
                               "is refused)"))
    _how(p.add_argument_group("how: the optimizer and its schedule"))
    _how_long(p.add_argument_group("how long and how often: steps, evaluation, saves, logging"))
    _where(p.add_argument_group("where: backend, device, precision, processes", "several processes: launch with "
                                "torchrun --nproc_per_node=N -m npgpt train --backend torch ..."))
    _files(p.add_argument_group("files: the config, the output, a run to resume"))
    return p


def _what(g):
    g.add_argument("--data", metavar="PATH", help="a UTF-8 text file, or a folder of token shards (npgpt prepare, "
                                                 "llm.c, nanoGPT's train.bin) (default: The Verdict, bundled)")
    g.add_argument("--max-length", type=int, metavar="T", help="tokens per window (default: the context length)")
    g.add_argument("--stride", type=int, help="text: step between windows (default: --max-length)")
    g.add_argument("--sampling", choices=("random", "epoch"),
                   help="shards: how a step's windows are drawn. random: distinct windows at random positions, drawn "
                        "anew each step; epoch: one pass over non-overlapping windows an epoch, in an order shuffled "
                        "by --seed and the epoch. Either way step s's windows depend on (seed, s) alone "
                        f"(default: {D['sampling']})")
    g.add_argument("--batch-size", type=int, metavar="B",
                   help="the micro-batch: windows one forward takes on each process (nanoGPT's batch_size, llm.c's "
                        "-b); a step trains B x --grad-accum x processes windows (before 2026-12, B was a whole "
                        f"step's windows; older checkpoints resume as they were) (default: {D['batch_size']})")
    g.add_argument("--tokens-per-step", type=int, metavar="N",
                   help="tokens an optimizer step over every process (llm.c's -d): --grad-accum is derived from it, "
                        "N / (B x processes x --max-length), and it must divide (default: B x --grad-accum x "
                        "processes x --max-length)")
    g.add_argument("--seed", type=int, help=f"initialisation and batch order (default: {D['seed']})")
    g.add_argument("--preset", metavar="NAME", help=f"model size (choices: {', '.join(PRESETS)}) (default: "
                                                    "book-124m, or the --resume checkpoint's)")
    g.add_argument("--n-layer", type=int, metavar="L", help="transformer blocks (default: the preset's)")
    g.add_argument("--n-head", type=int, metavar="NH", help="attention heads, dividing --n-embd (default: the "
                                                            "preset's)")
    g.add_argument("--n-embd", type=int, metavar="C", help="width of the residual stream (default: the preset's)")
    g.add_argument("--context-length", type=int, metavar="T", help="positions the model covers (default: the "
                                                                  "preset's)")
    g.add_argument("--vocab-size", type=int, metavar="V",
                   help=f"token embeddings, at least GPT-2's {TOKENIZER_VOCAB:,} (50304, a multiple of 64, runs "
                        "faster on a GPU; the padded rows are never targets) (default: the preset's)")
    g.add_argument("--qkv-bias", action=SWITCH, help="a bias in the query/key/value projection (GPT-2's; not the "
                                                     "book's 124M) (default: the preset's)")
    g.add_argument("--bias", action=SWITCH, help="biases in every LayerNorm and Linear (GPT-2's, the book's); "
                                                 "--no-bias is nanoGPT's bias=False and needs --no-qkv-bias "
                                                 "(default: the preset's)")
    g.add_argument("--tie-weights", action=SWITCH, help="the output head shares the token embedding (GPT-2's; not "
                                                        "the book's 124M) (default: the preset's)")
    g.add_argument("--drop-rate", type=float, help="dropout rate (default: the preset's, or the --init-from "
                                                   "weights' file's, else 0.1)")
    g.add_argument("--init-from", metavar="PATH",
                   help="start from pretrained weights (an OpenAI GPT-2 folder, a Hugging Face folder or "
                        ".safetensors, a book .pth, a nanoGPT ckpt.pt, an llm.c .bin, an npgpt .h5, or gpt2 / "
                        "gpt2-medium / -large / -xl from a local Hugging Face cache) with a new optimizer and schedule; the shape is "
                        "the weights' (default: none, a model initialised from --seed)")


def _how(g):
    g.add_argument("--lr", type=float, help=f"peak learning rate (default: {D['lr']}, the book's; the GPT-2 recipe: "
                                            "6e-4)")
    g.add_argument("--warmup", type=int, metavar="STEPS",
                   help="linear warmup: step s < STEPS runs at lr*(s+1)/(STEPS+1), from near zero to just below --lr, "
                        f"as nanoGPT (appendix D starts at 3e-5 instead) (default: {D['warmup']})")
    g.add_argument("--schedule", choices=("constant", "cosine", "linear", "wsd"),
                   help="after warmup: constant --lr; cosine or linear from --lr down to --min-lr at step "
                        "--lr-decay-steps; wsd (warmup-stable-decay) --lr, then over the last --decay-fraction of "
                        "--lr-decay-steps down to --min-lr as 1 - sqrt (llm.c's -k); --min-lr holds after "
                        "(default: constant, or the --resume checkpoint's)")
    g.add_argument("--cosine", action=SWITCH, help="--schedule cosine, its older name (nanoGPT's decay_lr) "
                                                   "(default: off)")
    g.add_argument("--min-lr", type=float, help="a decaying --schedule's floor (default: --lr / 10, as nanoGPT)")
    g.add_argument("--final-lr-frac", type=float, metavar="Q",
                   help="the floor as a fraction of --lr: --min-lr Q x --lr (llm.c's -q), 0 <= Q <= 1 "
                        "(default: 0.1)")
    g.add_argument("--decay-fraction", type=float, metavar="F",
                   help="--schedule wsd: the last fraction of --lr-decay-steps that decays, 0 < F <= 1 "
                        "(default: 0.2, llm.c's)")
    g.add_argument("--lr-decay-steps", type=int, metavar="STEPS",
                   help="a decaying --schedule: the step at which it reaches --min-lr (default: the run's length: --max-steps on "
                        "shards, --epochs x the batches of an epoch on a text); a resumed run keeps its own, so a "
                        "larger --max-steps or --epochs continues at --min-lr unless this is given")
    g.add_argument("--weight-decay", type=float, help=f"AdamW's (default: {D['weight_decay']})")
    g.add_argument("--decay", choices=("all", "matrices", "none"),
                   help="the parameters weight decay applies to: all (the book's), matrices (every tensor of 2 or "
                        "more dimensions, as nanoGPT and llm.c: biases and LayerNorm exempt), or none "
                        f"(default: {D['decay']})")
    g.add_argument("--beta1", type=float, help=f"AdamW's beta1 (default: {D['beta1']})")
    g.add_argument("--beta2", type=float, help=f"AdamW's beta2 (default: {D['beta2']}, the book's and torch's; the "
                                               "GPT-2 recipe: 0.95)")
    g.add_argument("--eps", type=float, help=f"AdamW's epsilon (default: {D['eps']})")
    g.add_argument("--clip", type=float, metavar="NORM",
                   help="clip the global gradient norm to NORM on every step from the first, warmup included "
                        "(appendix D starts after warmup) (default: off, the book's)")
    g.add_argument("--skip-loss-z", type=float, metavar="Z",
                   help="skip the update of a step whose loss is more than Z standard deviations above the last "
                        "128 steps' mean (llm.c's -sl); skipped steps are counted in the progress line and "
                        "log.jsonl; 0: off (default: off)")
    g.add_argument("--skip-grad-z", type=float, metavar="Z",
                   help="the same for the gradient norm before clipping (llm.c's -sg); 0: off (default: off)")


def _how_long(g):
    g.add_argument("--epochs", type=int, help=f"text: total epochs of the run (default: {D['epochs']})")
    g.add_argument("--max-steps", type=int, help="shards: total optimizer steps of the run (default: none, it must "
                                                 "be given)")
    g.add_argument("--eval-freq", type=int, metavar="N", help=f"text: evaluate every N steps (default: "
                                                              f"{D['eval_freq']})")
    g.add_argument("--eval-every", type=int, metavar="N", help=f"shards: evaluate and sample every N steps "
                                                               f"(default: {D['eval_every']})")
    g.add_argument("--eval-iter", type=int, metavar="N", help=f"batches per evaluation (default: {D['eval_iter']})")
    g.add_argument("--hellaswag", metavar="FILE", help="also score HellaSwag (a jsonl as hellaswag_val.jsonl) at each "
                                                       "evaluation: acc and acc_norm, kept on --resume; none turns it off "
                                                       "(default: off)")
    g.add_argument("--hellaswag-limit", type=int, metavar="N", help="only the first N HellaSwag examples "
                                                                    "(default: all)")
    g.add_argument("--hellaswag-batch", type=int, metavar="N", help="HellaSwag examples a forward (4 x N "
                                                                    f"sequences) (default: {D['hellaswag_batch']})")
    g.add_argument("--start-context", metavar="TEXT", help="prompt of the samples (default: "
                                                          f"{D['start_context']!r})")
    g.add_argument("--sample-every", type=int, metavar="N", help="a greedy sample every N steps (default: at every "
                                                                 "evaluation on shards, after every epoch on a text)")
    g.add_argument("--sample-tokens", type=int, metavar="K", help="tokens a sample; 0: no samples (default: "
                                                                  f"{D['sample_tokens']})")
    g.add_argument("--save-every", type=int, metavar="STEPS",
                   help="checkpoint every N steps; 0: at the end only, a kill loses the run (default: shards, at "
                        "every evaluation; a text, at the end only); exact to the step on every device")
    g.add_argument("--keep-last", type=int, metavar="K",
                   help="also keep the K newest saves as OUT/checkpoint_<steps>.h5 (llm.c's -nk); 0: only "
                        "checkpoint.h5 (default: 0)")
    g.add_argument("--keep-every", type=int, metavar="M",
                   help="keep every save whose steps done are a multiple of M for good (llm.c's -nm) (default: 0, "
                        "none)")
    g.add_argument("--keep-best", action=SWITCH, help="keep OUT/checkpoint_best.h5, the save at the lowest "
                                                      "validation loss; saves at every evaluation (default: off)")
    g.add_argument("--progress", action=SWITCH, help="a progress bar; --no-progress prints a line every --log-every "
                                                     "steps instead (default: on)")
    g.add_argument("--log-every", type=int, metavar="N", help="--no-progress: print every N-th step's loss, lr, "
                                                              "gradient norm and speed; OUT/log.jsonl has every "
                                                              "step (default: 10)")


def _where(g):
    g.add_argument("--backend", choices=("numpy", "torch"), help="default: numpy, or the --resume checkpoint's")
    g.add_argument("--kernels", choices=("fast", "reference"),
                   help="numpy: the layers to run, fast (layers.py) or reference (reference.py, the textbook "
                        "form: slower, the same math) (default: fast)")
    g.add_argument("--device", help="torch device: cpu, cuda or cuda:N (default: cuda if present, else cpu)")
    g.add_argument("--dtype", choices=("float32", "float64"), help="the parameters' (default: float32, or the "
                                                                  "--resume checkpoint's)")
    g.add_argument("--autocast", choices=("bf16", "fp16", "none"),
                   help="torch: bf16 autocast (CUDA from Ampere on, or a CPU with bf16), or fp16 with a GradScaler "
                        "(CUDA GPUs without bf16: T4, V100; its state is saved); none turns a resumed run's off "
                        "(default: none, or the --resume checkpoint's)")
    g.add_argument("--compile", action=SWITCH,
                   help="torch: torch.compile the training step (default: off, or the --resume checkpoint's)")
    g.add_argument("--grad-accum", type=int, metavar="K",
                   help="micro-batches of --batch-size a step on each process, their gradients summed (nanoGPT's "
                        "gradient_accumulation_steps per process); both backends (default: 1, or derived from "
                        "--tokens-per-step, or the --resume checkpoint's)")


def _files(g):
    g.add_argument("--config", metavar="FILE.toml",
                   help="read options from a TOML file, each under its flag's name (max-steps = 1000, cosine = "
                        "true); flags given here override it (examples: configs/ in the repository) (default: none)")
    g.add_argument("--out", metavar="DIR", help="checkpoint, history.json, log.jsonl, loss plot (default: runs/npgpt, "
                                                "or the folder of the --resume checkpoint)")
    g.add_argument("--overwrite", action=SWITCH, help="replace a checkpoint already in --out (default: off, refused)")
    g.add_argument("--resume", metavar="CKPT",
                   help="continue the run saved in a checkpoint, with its settings and schedule; the optimizer and "
                        "schedule options given with it apply from the next step, and the run says so; auto: "
                        "the newest whole checkpoint in --out, else a new run, and nothing once OUT/DONE says the "
                        "run is finished (for a restart loop: until npgpt train ... --resume auto; do sleep 1; "
                        "done) (default: none, a new run)")
