"""`npgpt train`'s flags for long runs, end to end on tiny models: --schedule (from a config file,
with --final-lr-frac) gives each step the lr written out here by hand; the spike guard's skipped
updates are counted in log.jsonl and the --no-progress lines; --sample-every / --sample-tokens size
the samples; --save-every and a SIGTERM save exactly at their step even where the loop reads the
device back only every 10 steps (a GPU, imitated); --keep-best; --hellaswag kept on --resume unless
--hellaswag none."""
import json
import math
import os
import signal
import struct
from array import array

import numpy as np
import pytest

import npgpt
from npgpt.base import Backend
from npgpt.cli import main
from npgpt.weights.checkpoint import read_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")   # see conftest.py


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """An llm.c-format folder (header packed with struct): 600 val and 3,000 train tokens."""
    folder = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(8)
    for name, n in (("r_val_000000.bin", 600), ("r_train_000001.bin", 3000)):
        tokens = rng.integers(0, 1000, n).tolist()
        (folder / name).write_bytes(struct.pack("<256i", 20240520, 1, n, *[0] * 253) + array("H", tokens).tobytes())
    return folder


def train(shards, out, *extra):
    return main(["train", "--preset", "tiny", "--data", str(shards), "--eval-iter", "1", "--batch-size", "1",
                 "--max-length", "8", "--no-progress", "--out", str(out), *extra])


def records(out, kind):
    return [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if r["kind"] == kind]


def test_a_linear_and_a_wsd_schedule_from_a_config_file(shards, tmp_path, capsys, monkeypatch):
    config = tmp_path / "run.toml"
    config.write_text('schedule = "linear"\nwarmup = 2\nlr = 1e-3\nfinal-lr-frac = 0.25\nmax-steps = 10\n'
                      'eval-every = 5\n')
    assert train(shards, tmp_path / "linear", "--config", str(config)) == 0
    # warmup: lr (s+1)/(warmup+1); then a line from 1e-3 at step 2 to 2.5e-4 at step 10
    expected = [1e-3 * 1 / 3, 1e-3 * 2 / 3] + [1e-3 - 7.5e-4 * (s - 2) / 8 for s in range(2, 10)]
    assert [r["lr"] for r in records(tmp_path / "linear", "step")] == pytest.approx(expected, rel=1e-12)
    assert train(shards, tmp_path / "wsd", "--config", str(config), "--schedule", "wsd", "--decay-fraction",
                 "0.5") == 0
    # stable to step 5 (the last half of 10 decays), then 1 - sqrt(progress) down to 2.5e-4
    expected = [1e-3 / 3, 2e-3 / 3] + [1e-3] * 3 + [1e-3 - 7.5e-4 * math.sqrt((s - 5) / 5) for s in range(5, 10)]
    assert [r["lr"] for r in records(tmp_path / "wsd", "step")] == pytest.approx(expected, rel=1e-12)
    saved = read_checkpoint(tmp_path / "wsd" / "checkpoint.h5")["state"].schedule
    assert (saved.kind, saved.decay_fraction, saved.min_lr, saved.decay_steps) == ("wsd", 0.5, 2.5e-4, 10)
    monkeypatch.setattr(npgpt, "build_model", lambda *a, **k: pytest.fail("a model was built"))
    assert train(shards, tmp_path / "bad", "--config", str(config), "--schedule", "wsd", "--decay-fraction",
                 "0.9") == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "npgpt train: error: --decay-fraction 0.9: the wsd decay, the last 0.9 of 10 steps, would start at step 1, "
        "inside --warmup 2 (give a smaller --decay-fraction or --warmup)")


def test_skipped_updates_are_counted_in_the_log_and_the_lines(shards, tmp_path, capsys):
    """--skip-grad-z 0.01 skips most updates once the 128-step window is full (a norm above the mean
    by a hundredth of a standard deviation); each is a record of log.jsonl with the count so far."""
    out = tmp_path / "run"
    assert train(shards, out, "--max-steps", "140", "--eval-every", "1000", "--skip-grad-z", "0.01",
                 "--sample-tokens", "0", "--log-every", "1") == 0
    steps = records(out, "step")
    skipped = [r["step"] for r in steps if "skipped" in r]
    assert skipped and min(skipped) >= 128
    assert [r.get("skipped_steps", 0) for r in steps] == [sum(s <= r["step"] for s in skipped) for r in steps]
    assert read_checkpoint(out / "checkpoint.h5")["state"].skipped_steps == skipped
    last = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step 139/")]
    assert last and last[0].endswith(f"| {len(skipped)} skipped")


def test_samples_are_sized_spaced_or_off(shards, tmp_path, capsys):
    start = "Every effort moves you"
    assert train(shards, tmp_path / "a", "--max-steps", "6", "--eval-every", "3", "--seed", "1") == 0
    assert sum(line.startswith(start) for line in capsys.readouterr().out.splitlines()) == 3     # steps 0, 3, 5
    assert train(shards, tmp_path / "b", "--max-steps", "6", "--eval-every", "3", "--sample-tokens", "0") == 0
    assert not any(line.startswith(start) for line in capsys.readouterr().out.splitlines())
    assert train(shards, tmp_path / "c", "--max-steps", "6", "--eval-every", "100", "--sample-every", "2",
                 "--sample-tokens", "3") == 0
    samples = [line for line in capsys.readouterr().out.splitlines() if line.startswith(start)]
    tok = npgpt.get_tokenizer()
    assert len(samples) == 3 and all(len(tok.encode(s)) <= len(tok.encode(start)) + 3 for s in samples)


def test_save_every_and_a_signal_act_at_their_step_where_the_device_is_read_every_10(shards, tmp_path,
                                                                                     monkeypatch):
    """A backend that queues its steps (a GPU) is read back every 10 steps; --save-every 3 still
    saves after steps 3, 6, 9 (global steps 2, 5, 8), and a SIGTERM during step 13 saves step 13."""
    monkeypatch.setattr(Backend, "synchronous", False)
    out = tmp_path / "run"
    assert train(shards, out, "--max-steps", "12", "--eval-every", "1000", "--save-every", "3",
                 "--sample-tokens", "0") == 0
    assert [r["step"] for r in records(out, "save")] == [2, 5, 8, 11]
    model_class, calls = npgpt.numpy_backend.model.NumpyGPT, []
    train_step = model_class.train_step

    def signalled(self, *args, **kwargs):                # SIGTERM arrives while step 13 is taken
        calls.append(1)
        if len(calls) == 13:
            os.kill(os.getpid(), signal.SIGTERM)
        return train_step(self, *args, **kwargs)
    monkeypatch.setattr(model_class, "train_step", signalled)
    out = tmp_path / "stopped"
    assert train(shards, out, "--max-steps", "40", "--eval-every", "1000", "--sample-tokens", "0") == 128 + 15
    assert read_checkpoint(out / "checkpoint.h5")["state"].global_step == 12


def test_keep_best_and_hellaswag_kept_on_resume(shards, tmp_path, capsys):
    hellaswag = tmp_path / "hs.jsonl"
    hellaswag.write_text("".join(json.dumps({"ctx": f"A man {w}", "endings": ["a", "b", "c", "d"], "label": 1}) + "\n"
                                 for w in ("runs", "sits", "eats")))
    out = tmp_path / "run"
    assert train(shards, out, "--max-steps", "4", "--eval-every", "2", "--keep-best", "--hellaswag", str(hellaswag),
                 "--hellaswag-batch", "2", "--sample-tokens", "0") == 0
    best = read_checkpoint(out / "checkpoint_best.h5")["state"]
    evals = records(out, "eval")
    assert best.val_losses[-1] == min(r["val_loss"] for r in evals) and best.track_steps[-1] == best.global_step
    assert all(r["hellaswag_n"] == 3 for r in evals)
    assert main(["train", "--resume", str(out / "checkpoint.h5"), "--max-steps", "6"]) == 0
    assert all(r["hellaswag_n"] == 3 for r in records(out, "eval")[len(evals):])
    n = len(records(out, "eval"))
    assert main(["train", "--resume", str(out / "checkpoint.h5"), "--max-steps", "8", "--hellaswag", "none"]) == 0
    later = records(out, "eval")[n:]
    assert later and not any("hellaswag_n" in r for r in later)
    assert read_checkpoint(out / "checkpoint.h5")["run"]["hellaswag"] is None


def test_fp16_runs_resumes_and_bf16_is_refused_on_a_gpu_without_it(shards, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert train(shards, out, "--backend", "torch", "--device", "cpu", "--autocast", "fp16", "--max-steps", "3",
                 "--eval-every", "2", "--sample-tokens", "0") == 0
    assert read_checkpoint(out / "checkpoint.h5")["run"]["autocast"] == "fp16"
    assert main(["train", "--resume", str(out / "checkpoint.h5"), "--max-steps", "4", "--device", "cpu"]) == 0
    assert "--autocast fp16" in capsys.readouterr().err                  # the run line: kept on resume
    # a CUDA device without bf16 (a T4), imitated: bf16 refused in one line before a model is built
    import torch
    from npgpt.torch_backend import device as device_module
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(device_module, "cuda_bf16_missing",
                        lambda dev: "Tesla T4 (compute capability 7.5) has no bf16; use autocast 'fp16'")
    monkeypatch.setattr(npgpt, "build_model", lambda *a, **k: pytest.fail("a model was built"))
    assert train(shards, tmp_path / "t4", "--backend", "torch", "--device", "cuda", "--autocast", "bf16",
                 "--max-steps", "3") == 2
    assert capsys.readouterr().err.strip() == ("npgpt train: error: --autocast bf16: Tesla T4 (compute capability "
                                               "7.5) has no bf16: give --autocast fp16 (with a GradScaler), or "
                                               "train in float32 (leave --autocast out)")
