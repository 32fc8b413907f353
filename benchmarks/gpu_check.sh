#!/usr/bin/env bash
# npgpt's CUDA path, proved in one command on a machine with one NVIDIA GPU, offline, in < 8 minutes:
#
#     bash benchmarks/gpu_check.sh [OUTDIR]          (default OUTDIR: gpu_check_out)
#
# Needs: torch with CUDA, pytest, and npgpt installed from this checkout
# (pip install --no-deps --no-build-isolation -e .). No network, no pip installs. Stages, each under
# `timeout` (a failed or timed-out stage is recorded and the next one runs; all end by 7 min 45 s):
#   parity   pytest -m cuda parity/ : float64/float32/TF32/bf16 against float64, the compiled step
#            against eager, the step that never waits for the GPU                         <= 150 s
#   bench    benchmarks/bench_cuda.py: gpt2-small, T=1024, bf16, fused AdamW, compile off and on:
#            tokens/s, MFU, peak GPU memory                                                <= 140 s
#   train    npgpt prepare (a few MB of The Verdict, repeated) and a 200-step
#            npgpt train --backend torch --device cuda --autocast bf16 --compile             <= 120 s
#   ddp      torchrun --nproc_per_node=1: npgpt train over NCCL                               <= 45 s
# Writes OUTDIR/summary.md, OUTDIR/summary.json and each stage's log, and prints the headline numbers.
# Exit status: 0 every stage passed, 1 some did not, 2 no CUDA device (said in one line, at once).
# GPU_CHECK_DEVICE=cpu runs the same plumbing on a CPU with a tiny model (to try the script itself).
set -u

OUT=${1:-gpu_check_out}
PY=${PYTHON:-python}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
REPO=$(cd "$(dirname "$0")/.." && pwd)
START=$(date +%s)
DEADLINE=$((START + 465))
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}

if [ "$DEVICE" = cuda ] && ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check: no CUDA device (torch.cuda.is_available() is False, or torch is missing); nothing was run"
    exit 2
fi
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/npgpt_gpu_check.XXXXXX")
cd "$REPO" || exit 1
: > "$OUT/stages.tsv"

if [ "$DEVICE" = cuda ]; then
    REPEAT=150                   # The Verdict 150 times: 3 MB, 0.77M tokens
    TRAIN=(--device cuda --autocast bf16 --compile --preset gpt2-small --batch-size 8 --max-length 1024
           --max-steps 200 --eval-every 100)
else                             # the CPU try-out of the script: a tiny model, 4 steps, no compile
    REPEAT=3
    TRAIN=(--device cpu --autocast bf16 --preset tiny --batch-size 2 --max-length 64 --max-steps 4 --eval-every 2)
fi
export NPGPT_PARITY_REPORT="$OUT/parity_report.jsonl"

# stage NAME LIMIT_S COMMAND...: run it under timeout (cut to what is left before the deadline),
# its output in OUTDIR/NAME.log, and one line "name rc seconds" in stages.tsv (rc 124: timed out)
stage() {
    local name=$1 limit=$2 left rc t0
    shift 2
    left=$((DEADLINE - $(date +%s)))
    [ "$limit" -gt "$left" ] && limit=$left
    if [ "$limit" -lt 15 ]; then
        printf '%s\tskipped\t0\n' "$name" >> "$OUT/stages.tsv"
        echo "gpu_check: $name skipped, out of time"
        return
    fi
    echo "gpu_check: $name (at most ${limit} s) ..."
    t0=$(date +%s)
    timeout -k 10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    printf '%s\t%s\t%s\n' "$name" "$rc" "$(($(date +%s) - t0))" >> "$OUT/stages.tsv"
    echo "gpu_check: $name exit $rc after $(($(date +%s) - t0)) s (log: $OUT/$name.log)"
}

stage parity 150 "$PY" -m pytest -m cuda parity/ -v -rA -p no:cacheprovider

stage bench 140 "$PY" benchmarks/bench_cuda.py --out "$OUT" --batch-size 16 --steps 20 --budget 130

mkdir -p "$WORK/text"
stage shards 40 "$PY" -c "import sys, npgpt
from npgpt.cli import main
open(sys.argv[1], 'w', encoding='utf-8').write('\n\n'.join([npgpt.load_corpus()] * int(sys.argv[2])))
sys.exit(main(['prepare', sys.argv[1], '--out', sys.argv[3], '--val-fraction', '0.02', '--no-progress']))" \
    "$WORK/text/verdict.txt" "$REPEAT" "$WORK/shards"

stage train 120 "$PY" -m npgpt train --backend torch "${TRAIN[@]}" --data "$WORK/shards" --no-progress \
    --out "$OUT/train"

stage ddp 45 "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 -m npgpt train --backend torch \
    --device "$DEVICE" --preset tiny --epochs 1 --batch-size 2 --max-length 64 --no-progress --out "$OUT/ddp"

rm -rf "$WORK"
"$PY" - "$OUT" "$DEVICE" "$(($(date +%s) - START))" <<'EOF'
"""Summarise the stages: OUTDIR/summary.json, OUTDIR/summary.md, and the headline on stdout."""
import json, re, sys
from pathlib import Path

out, device, total_s = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
def read(path, parse=json.loads):
    try:
        return parse(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None

stages = {}
for line in (out / "stages.tsv").read_text().splitlines():
    name, rc, seconds = line.split("\t")
    stages[name] = {"rc": None if rc == "skipped" else int(rc), "seconds": int(seconds),
                    "status": "skipped" if rc == "skipped" else "passed" if rc == "0" else
                              "timed out" if rc in ("124", "137") else "failed"}
summary = {"device": device, "total_s": total_s, "stages": stages}

log = read(out / "parity.log", lambda text: text) or ""
results = re.findall(r"^(parity/\S+::\S+) (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)", log, re.M)
counts = {}
for _, result in results:
    counts[result] = counts.get(result, 0) + 1
summary["parity"] = {"counts": counts, "failed": [t for t, r in results if r in ("FAILED", "ERROR")],
                     "report": [json.loads(l) for l in (read(out / "parity_report.jsonl", lambda t: t) or "").splitlines() if l]}

bench = read(out / "cuda.json") or {}
summary["bench"] = bench.get("rows", [])
summary["gpu"] = bench.get("meta", {}).get("gpu")

history = read(out / "train" / "history.json") or {}
train = {key: history.get(key) for key in ("global_step", "wall_time_s", "train_step_s", "train_losses",
                                            "val_losses", "tokens_seen")}
if history.get("train_step_s") and history.get("tokens_seen"):
    train["tokens_per_s_incl_compile"] = history["tokens_seen"][-1] / history["train_step_s"]
summary["train"] = train
summary["ddp"] = {"checkpoint": (out / "ddp" / "checkpoint.h5").is_file()}
(out / "summary.json").write_text(json.dumps(summary, indent=1))

def pct(x):
    return "-" if x is None else f"{100 * x:.1f}%"
lines = [f"# npgpt gpu_check: {summary['gpu'] or device}, {total_s} s in all", "",
         "| stage | status | exit | seconds |", "| --- | --- | --- | --- |"]
lines += [f"| {n} | {s['status']} | {s['rc']} | {s['seconds']} |" for n, s in stages.items()]
lines += ["", f"parity: {counts}" + (f"; failed: {summary['parity']['failed']}" if summary['parity']['failed'] else "")]
for r in summary["bench"]:
    if "error" in r:
        lines.append(f"bench compile {'on' if r['compile'] else 'off'}: failed: {r['error']}")
    else:
        lines.append(f"bench {r['config']} B={r['B']} T={r['T']} bf16 compile {'on' if r['compile'] else 'off'}: "
                     f"{r['tokens_per_s']:,.0f} tokens/s, MFU {pct(r['mfu'])}, {r['step_ms']:.1f} ms/step, "
                     f"peak GPU memory {r['peak_memory_gb']:.1f} GB, warm-up {r['warmup_s']:.0f} s")
if train["train_losses"] and train["val_losses"]:
    lines.append(f"train: step {train['global_step']}, train loss {train['train_losses'][0]:.3f} -> "
                 f"{train['train_losses'][-1]:.3f}, val {train['val_losses'][-1]:.3f}; "
                 f"{train['train_step_s']} s in steps (compile included), {train['wall_time_s']} s in all")
else:
    lines.append("train: no history.json (see train.log)")
lines.append(f"ddp (torchrun, 1 process, {'NCCL' if device == 'cuda' else 'gloo'}): "
             f"{'checkpoint written' if summary['ddp']['checkpoint'] else 'no checkpoint (see ddp.log)'}")
(out / "summary.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
sys.exit(0 if all(s["status"] == "passed" for s in stages.values()) else 1)
EOF
