"""Does llm.c's own train_gpt2.c load the model files npgpt writes, and compute what npgpt computes?

Given an llm.c checkout (DIR holding train_gpt2.c and llmc/), this writes a random GPT-2 (2 layers,
C 128, NH 4, maxT 64, vocabulary 50,257 padded to 50,304; --shape 124m: GPT-2 small), biases and
LayerNorms random too, turns it into llm.c's float32 (version 3) and bfloat16 (version 5) model files
with `npgpt convert`, writes one batch as an llm.c token shard, and builds, with llm.c's compiler
flags, a harness of our own that includes train_gpt2.c with TESTING defined (its main() left out, as
llm.c's test_gpt2.c does). The harness calls llm.c: gpt2_build_from_checkpoint, its DataLoader,
gpt2_forward, then --steps AdamW steps (gpt2_backward, gpt2_update), printing every loss. npgpt's
NumPy model takes the same steps in float32, with gpt2_update's AdamW: weight decay on every
parameter, biases and LayerNorms too (decay="all"). train_gpt2.c cannot write a model file (only
llm.c's CUDA trainer can), so for the other direction the harness writes llm.c's first gradients and
its weights after one step in the model file's layout; npgpt reads them, compares them with its own,
and computes the loss on llm.c's weights.

    python benchmarks/llmc_check.py --llmc ~/llm.c [--shape small|124m] [--steps 3]

Exit 1 when a difference exceeds its tolerance (TOL); without DIR it is skipped in one line.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

import npgpt
from npgpt.data.shards import write_shard

SHAPES = {"small": dict(emb_dim=128, n_heads=4, n_layers=2, context_length=64),
          "124m": dict(emb_dim=768, n_heads=12, n_layers=12, context_length=1024)}
# float32 in two programs that sum in different orders. Measured on the small shape: losses 7e-8
# relative, gradients 1.2e-5 of each tensor's largest, weights after one step 1.2e-7 (one float32 ulp
# at 1.0). Weights whose first gradient is under SURE_GRAD are left out: there Adam's first step,
# lr * g / (|g| + eps) with eps 1e-8, turns on g's last bits (up to 1.5e-4 apart, 1 weight in 60,000);
# after that step, those weights shift every later gradient, so only the first step's are compared.
TOL = {"loss": (1e-5, "relative, every step"), "grads": (1e-4, "the first ones, over each tensor's largest"),
       "weights": (1e-6, "absolute, after the first step"), "read back": (1e-5, "relative: llm.c's weights in "
       "npgpt"), "bfloat16": (1e-5, "relative, the version 5 file's loss")}
SURE_GRAD = 1e-6
SEED = 1234
CFLAGS = ["-Ofast", "-Wno-unused-result", "-Wno-ignored-pragmas", "-Wno-unknown-attributes", "-march=native"]
HARNESS = r"""
// npgpt's harness around llm.c's train_gpt2.c: one batch, its loss, a few AdamW steps.
// usage: harness MODEL.bin SHARD.bin B T STEPS LR WEIGHT_DECAY [STEPPED.bin GRADS.bin]
// (the weights after the first step and the first gradients, in llm.c's layout)
#define TESTING
#include "train_gpt2.c"

// one value per parameter, in llm.c's layout, after a version 3 header of the model's shape
void write_floats(GPT2 *model, const char *path, float *values) {
    GPT2Config c = model->config;
    int header[256] = {20240326, 3, c.max_seq_len, c.vocab_size, c.num_layers, c.num_heads, c.channels,
                       c.padded_vocab_size};
    FILE *out = fopenCheck(path, "wb");
    fwriteCheck(header, sizeof(int), 256, out);
    fwriteCheck(values, sizeof(float), model->num_parameters, out);
    fcloseCheck(out);
}

int main(int argc, char **argv) {
    GPT2 model;
    gpt2_build_from_checkpoint(&model, argv[1]);
    int B = atoi(argv[3]), T = atoi(argv[4]), steps = atoi(argv[5]);
    float lr = (float)atof(argv[6]), wd = (float)atof(argv[7]);
    DataLoader loader;
    dataloader_init(&loader, argv[2], B, T, 0, 1, 0);  // rank 0 of 1, no shuffling: the shard's first batch
    dataloader_next_batch(&loader);
    for (int step = 0; step <= steps; step++) {
        gpt2_forward(&model, loader.inputs, loader.targets, B, T);
        printf("loss %d %.9g\n", step, model.mean_loss);
        if (step == steps) { break; }
        gpt2_zero_grad(&model);
        gpt2_backward(&model);
        if (step == 0 && argc == 10) { write_floats(&model, argv[9], model.grads_memory); }
        gpt2_update(&model, lr, 0.9f, 0.999f, 1e-8f, wd, step + 1);
        if (step == 0 && argc == 10) { write_floats(&model, argv[8], model.params_memory); }
    }
    dataloader_free(&loader);
    gpt2_free(&model);
    return 0;
}
"""


def compile_harness(llmc: Path, work: Path, source: str = HARNESS) -> Path:
    """A harness (this file's, or source) built as llm.c's Makefile builds train_gpt2 (OpenMP if
    the compiler has it)."""
    src, exe = work / "harness.c", work / "harness"
    src.write_text(source)
    cc = os.environ.get("CC", "gcc")
    for omp in (["-fopenmp", "-DOMP"], []):
        cmd = [cc, *CFLAGS, *omp, "-I", str(llmc), str(src), "-lm", "-o", str(exe)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode == 0:
            print("built:", " ".join(cmd))
            return exe
    sys.exit(f"llmc_check: the harness did not compile against {llmc}:\n{done.stderr}")


def run_llmc(exe, model_bin, shard, B, T, steps, lr, wd, *outs):
    """(exit code, llm.c's losses, its whole output); outs: files for the weights after a step, the gradients."""
    args = [exe, model_bin, shard, B, T, steps, repr(lr), repr(wd), *outs]
    done = subprocess.run([str(a) for a in args], capture_output=True, text=True)
    losses = [float(line.split()[2]) for line in done.stdout.splitlines() if line.startswith("loss ")]
    return done.returncode, losses, done.stdout + done.stderr


def random_model(shape: str, seed: int):
    """A GPT-2 of the shape, its biases and LayerNorms random too, so a misplaced one shows."""
    cfg = npgpt.GPTConfig(vocab_size=50257, drop_rate=0.0, qkv_bias=True, tie_weights=True, emb_init_std=0.02,
                          **SHAPES[shape])
    model = npgpt.build_model(cfg, backend="numpy", seed=seed, dtype="float32")
    rng, params = np.random.default_rng(seed), model.params()
    for name, p in params.items():
        if p.ndim == 1:
            p += rng.normal(0.0, 0.1, p.shape).astype(np.float32)
    model.load_params(params)
    return model


def step_diffs(model, x, y, c_losses, lr, wd, steps, work) -> dict:
    """npgpt's steps beside llm.c's: its losses, first gradients and weights after the first step, and
    llm.c's weights after that step read by npgpt (their loss against llm.c's). Relative differences,
    except the weights': absolute, where the first gradient is at least SURE_GRAD."""
    _, grads = model.loss_and_grads(x, y)
    grads = {n: g.copy() for n, g in grads.items()}
    opt = npgpt.AdamW(model, lr=lr, weight_decay=wd, betas=(0.9, 0.999), eps=1e-8, decay="all")
    losses = [model.train_step(x, y, opt)]
    stepped = {n: w.copy() for n, w in model.params().items()}
    losses += [model.train_step(x, y, opt) for _ in range(steps - 1)] + [model.loss(x, y)]
    c_grads = npgpt.load_pretrained(work / "grads.bin", backend="numpy").params()
    c_model = npgpt.load_pretrained(work / "stepped.bin", backend="numpy")
    c_stepped = c_model.params()
    for step, (a, b) in enumerate(zip(c_losses, losses)):
        print(f"  loss after {step} steps: llm.c {a:.7f}  npgpt {b:.7f}  diff {a - b:+.2e}")
    unsure = sum(int((np.abs(g) < SURE_GRAD).sum()) for g in grads.values())
    print(f"  ({unsure:,} weights whose first gradient is under {SURE_GRAD:g} left out of the weights' difference)")
    return {"loss": max(abs(a - b) / abs(b) for a, b in zip(c_losses, losses)),
            "grads": max(float(np.abs(c_grads[n] - g).max() / np.abs(g).max()) for n, g in grads.items()),
            "weights": max(float(np.abs(c_stepped[n] - w)[np.abs(grads[n]) >= SURE_GRAD].max(initial=0))
                           for n, w in stepped.items()),
            "read back": abs(c_model.loss(x, y) - c_losses[1]) / abs(c_losses[1])}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--llmc", required=True, type=Path, metavar="DIR", help="an llm.c checkout")
    p.add_argument("--shape", choices=SHAPES, default="small")
    p.add_argument("--steps", type=int, default=3, help="AdamW steps (default 3; 0: the loss only)")
    p.add_argument("--batch", type=int, nargs=2, default=(4, 64), metavar=("B", "T"))
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.1)
    args = p.parse_args(argv)
    if not (args.llmc / "train_gpt2.c").is_file():
        print(f"llmc_check: skipped: no llm.c checkout at {args.llmc} (no train_gpt2.c there)")
        return 0
    (B, T), steps, lr, wd = args.batch, args.steps, args.lr, args.weight_decay
    with tempfile.TemporaryDirectory(prefix="npgpt-llmc-") as tmp:
        work = Path(tmp)
        exe = compile_harness(args.llmc, work)
        model = random_model(args.shape, SEED)
        npgpt.save_checkpoint(work / "run.h5", model)
        for dtype in ("float32", "bfloat16"):
            subprocess.run([sys.executable, "-m", "npgpt", "convert", str(work / "run.h5"),
                            str(work / f"model_{dtype}.bin"), "--dtype", dtype], check=True)
        tokens = np.random.default_rng(SEED).integers(0, 50257, B * T + 1)
        shard = work / "batch_val_000000.bin"
        write_shard(shard, tokens)
        x, y = tokens[:-1].reshape(B, T), tokens[1:].reshape(B, T)

        outs = (work / "stepped.bin", work / "grads.bin") if steps else ()
        code, c_losses, out = run_llmc(exe, work / "model_float32.bin", shard, B, T, steps, lr, wd, *outs)
        if code != 0 or len(c_losses) != steps + 1:
            sys.exit(f"llmc_check: llm.c's harness failed (exit {code}):\n{out}")
        print(f"shape {args.shape} ({npgpt.num_params(model.cfg):,} parameters), batch {B}x{T}, {steps} AdamW "
              f"steps" + f" (lr {lr}, betas 0.9 0.999, eps 1e-8, weight decay {wd} on every parameter)" * (steps > 0))
        if steps:
            diffs = step_diffs(model, x, y, c_losses, lr, wd, steps, work)
        else:
            loss = model.loss(x, y)
            diffs = {"loss": abs(c_losses[0] - loss) / abs(c_losses[0])}
            print(f"  loss: llm.c {c_losses[0]:.7f}  npgpt {loss:.7f}  diff {c_losses[0] - loss:+.2e}")

        code, bf_losses, out = run_llmc(exe, work / "model_bfloat16.bin", shard, B, T, 0, lr, wd)
        if code != 0:
            said = next((line for line in out.splitlines() if "version" in line.lower()), out.strip()[-200:])
            print(f"  bfloat16 file (version 5): llm.c's train_gpt2.c refuses it, exit {code}: {said!r}")
        else:
            bf = npgpt.load_pretrained(work / "model_bfloat16.bin", backend="numpy")
            diffs["bfloat16"] = abs(bf_losses[0] - bf.loss(x, y)) / abs(bf_losses[0])
    for key, diff in diffs.items():
        print(f"  max difference, {key:<9}: {diff:.2e}  (tolerance {TOL[key][0]:.0e}; {TOL[key][1]})")
    failed = [key for key, diff in diffs.items() if diff > TOL[key][0]]
    print(f"FAILED: {', '.join(failed)}" if failed else "OK: llm.c loads npgpt's file and computes the same")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
