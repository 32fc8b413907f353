"""llm.c's C trainer timed on the model and batch npgpt trains, for bench_backends.py's llmc row.

Given a built llm.c checkout (DIR holding train_gpt2.c and llmc/; nothing is downloaded), this
writes npgpt's model in llm.c's model file format (npgpt.weights.llmc.write_llmc, float32, the
vocabulary padded to 50,304 rows as llm.c pads it) and the batch as an llm.c token shard, builds a
harness of our own with llm.c's compiler flags (llmc_check.py's: `#include "train_gpt2.c"` with
TESTING, so llm.c's own main() is left out), and times llm.c's training step as its main() does:
gpt2_forward, gpt2_zero_grad, gpt2_backward, gpt2_update, with OMP_NUM_THREADS threads (the
caller passes npgpt's pool size: the same cores for both). llm.c's code is compiled from DIR and
never copied here.

    python benchmarks/llmc_rival.py --llmc ~/llm.c [--shape llmc] [--steps 3]
"""
from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llmc_check import compile_harness  # noqa: E402

HARNESS = r"""
// npgpt's timing harness around llm.c's train_gpt2.c: WARMUP + STEPS training steps on one batch.
// usage: harness MODEL.bin SHARD.bin B T WARMUP STEPS   prints "step_s SECONDS" per timed step
#define TESTING
#include "train_gpt2.c"

int main(int argc, char **argv) {
    GPT2 model;
    gpt2_build_from_checkpoint(&model, argv[1]);
    int B = atoi(argv[3]), T = atoi(argv[4]), warmup = atoi(argv[5]), steps = atoi(argv[6]);
    DataLoader loader;
    dataloader_init(&loader, argv[2], B, T, 0, 1, 0);
    struct timespec start, end;
    for (int step = 0; step < warmup + steps; step++) {
        clock_gettime(CLOCK_MONOTONIC, &start);         // as train_gpt2.c's main() times a step
        dataloader_next_batch(&loader);
        gpt2_forward(&model, loader.inputs, loader.targets, B, T);
        gpt2_zero_grad(&model);
        gpt2_backward(&model);
        gpt2_update(&model, 1e-4f, 0.9f, 0.999f, 1e-8f, 0.1f, step + 1);
        clock_gettime(CLOCK_MONOTONIC, &end);
        if (step >= warmup) {
            printf("step_s %.6f loss %.6f\n", (end.tv_sec - start.tv_sec) + (end.tv_nsec - start.tv_nsec) / 1e9,
                   model.mean_loss);
        }
    }
    dataloader_free(&loader);
    gpt2_free(&model);
    return 0;
}
"""


def missing(llmc) -> str | None:
    """Why DIR cannot serve as an llm.c checkout, or None."""
    if llmc is None:
        return "no --llmc DIR given"
    if not (Path(llmc) / "train_gpt2.c").is_file():
        return f"no llm.c checkout at {llmc} (no train_gpt2.c there)"
    return None


def time_llmc(llmc, model, x, warmup, steps, threads) -> dict:
    """llm.c's step seconds on npgpt's model (tied head) and batch x (B, T), run in a child
    process with OMP_NUM_THREADS=threads; also the peak RSS of this process's children (the
    compiler's and the harness's: the harness's, at GPT-2's size) and the last loss."""
    from npgpt.data.shards import write_shard
    from npgpt.weights.llmc import write_llmc
    B, T = x.shape
    with tempfile.TemporaryDirectory(prefix="npgpt-llmc-rival-") as tmp:
        work = Path(tmp)
        exe = compile_harness(Path(llmc), work, source=HARNESS)
        write_llmc(model, work / "model.bin", vocab_size=min(model.cfg.vocab_size, 50257))
        # dataloader_next_batch reads B*T + 1 tokens; the batch repeats, as every other variant's does
        tokens = np.concatenate([np.asarray(x).reshape(-1)] * (warmup + steps + 1))
        write_shard(work / "batch_000000.bin", tokens)
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        cmd = [str(exe), str(work / "model.bin"), str(work / "batch_000000.bin"), str(B), str(T),
               str(warmup), str(steps)]
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [line.split() for line in done.stdout.splitlines() if line.startswith("step_s ")]
    if done.returncode != 0 or len(lines) != steps:
        raise RuntimeError(f"llm.c's harness failed (exit {done.returncode}):\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return {"train_s": [float(line[1]) for line in lines], "loss": float(lines[-1][3]),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}


def main():
    import npgpt
    from profile_numpy import SHAPES, shape
    from npgpt.numpy_backend import threads
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--llmc", type=Path, metavar="DIR")
    p.add_argument("--shape", default="llmc", choices=list(SHAPES))
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args()
    why = missing(args.llmc)
    if why:
        print(f"llmc_rival: skipped: {why}")
        return
    cfg, B, T = shape(args.shape)
    model = npgpt.build_model(cfg, backend="numpy", seed=123)
    x = np.random.default_rng(0).integers(0, min(cfg.vocab_size, 50257), (B, T))
    r = time_llmc(args.llmc, model, x, 1, args.steps, threads.num_threads())
    print(f"llm.c at {args.shape} (B={B}, T={T}, {threads.num_threads()} threads): step "
          + ", ".join(f"{s:.3f}" for s in r["train_s"]) + f" s; peak RSS {r['peak_rss_mb']:.0f} MB")


if __name__ == "__main__":
    main()
