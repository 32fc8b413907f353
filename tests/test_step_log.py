"""The run's log, OUT/log.jsonl, and what `npgpt train` prints and saves around it: a record for
every step (its lr the schedule's, its gradient norm before clipping one computed here from the
gradients of the same batch), every evaluation (its losses history.json's, HellaSwag's scores
those of npgpt.hellaswag on the saved model) and every save; a line every --log-every steps with
--no-progress; history.json at every evaluation; a shards run saved at every evaluation unless
--save-every says otherwise; a resumed run appending; and the refusals, one line each, exit 2."""
import json
import re
import struct
from array import array

import numpy as np
import pytest

import npgpt
from npgpt.cli import main
from npgpt.data.shards import TokenDir
from npgpt.hellaswag import hellaswag, load_examples
from npgpt.training.log import RunLog, step_line
from npgpt.training.schedule import warmup_cosine_lr

T, B, STEPS, EVERY, SEED = 16, 2, 8, 3, 123
EVALS = [0, 3, 6, 7]                              # every EVERY steps and the last
SCHEDULE = ["--lr", "1e-3", "--warmup", "3", "--cosine", "--min-lr", "1e-4"]

pytestmark = pytest.mark.usefixtures("one_thread")   # see conftest.py


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """An llm.c-format folder: 600 val and 3,000 train tokens."""
    folder = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(5)
    for name, n in (("t_val_000000.bin", 600), ("t_train_000001.bin", 3000)):
        tokens = rng.integers(0, 1000, n).tolist()
        (folder / name).write_bytes(struct.pack("<256i", 20240520, 1, n, *[0] * 253) + array("H", tokens).tobytes())
    return folder


@pytest.fixture(scope="module")
def hellaswag_file(tmp_path_factory):
    """Four examples in the dataset's jsonl form."""
    path = tmp_path_factory.mktemp("hellaswag") / "hellaswag_val.jsonl"
    examples = [("A man is sitting on a roof. He", ["is using wrap.", "is ripping level tiles off.",
                                                    "is holding a cube.", "starts pulling up roofing."], 3),
                ("The chef slices the onions and", ["cries.", "puts them in a pan with butter.",
                                                   "walks away.", "sings a song."], 1),
                ("She opens the laptop,", ["types a letter to her aunt.", "sleeps.", "closes it again.",
                                           "reads the news."], 0),
                ("The cat jumps onto the table and", ["knocks over a glass.", "purrs.", "eats the fish.",
                                                     "looks out of the window."], 2)]
    path.write_text("".join(json.dumps({"ctx": c, "endings": e, "label": y, "ind": i}) + "\n"
                            for i, (c, e, y) in enumerate(examples)))
    return path


def train(shards, out, *extra):
    return main(["train", "--preset", "tiny", "--drop-rate", "0", "--dtype", "float64", "--data", str(shards),
                 "--max-length", str(T), "--batch-size", str(B), "--eval-every", str(EVERY), "--eval-iter", "1",
                 "--max-steps", str(STEPS), "--seed", str(SEED), "--no-progress", "--out", str(out), *extra])


def read_log(out) -> list[dict]:
    """log.jsonl, each line parsed on its own (any line that is not one JSON object fails here)."""
    lines = (out / "log.jsonl").read_text().split("\n")
    assert lines[-1] == "", "the file ends with a whole line"
    return [json.loads(line) for line in lines[:-1]]


def of_kind(records, kind):
    return [r for r in records if r["kind"] == kind]


def independent_norm(shards) -> tuple[float, float]:
    """(loss, gradient norm) of step 0 computed here: the run's model as built from its seed, its
    first batch (TokenDir's batch(0) for the seed), np.sqrt of the sum of the squared gradients."""
    model = npgpt.build_model(npgpt.GPTConfig.preset("tiny", drop_rate=0.0), seed=SEED, dtype="float64")
    inputs, targets = TokenDir(shards).train_batches(B, T, SEED, 0, 1).batch(0)
    loss, grads = model.loss_and_grads(inputs, targets)
    return loss, float(np.sqrt(sum(np.sum(g.astype(np.float64) ** 2) for g in grads.values())))


@pytest.mark.parametrize("clip", [None, "0.05"], ids=["no-clip", "clip"])
def test_every_step_evaluation_and_save_is_a_line(shards, tmp_path, capsys, clip):
    """Without --clip the norm is computed for the log (Backend.grad_norm); with it, it is
    clipping's own, before clipping (0.05 is below every step's norm here: every step clipped)."""
    out = tmp_path / "run"
    assert train(shards, out, *SCHEDULE, *(["--clip", clip] if clip else []), "--log-every", "2") == 0
    records = read_log(out)
    assert [r["kind"] for r in records[:4]] == ["run", "step", "eval", "save"]
    assert records[0] == {**records[0], "kind": "run", "first_step": 0, "resume": None, "backend": "numpy",
                          "world_size": 1}
    steps = of_kind(records, "step")
    assert [r["step"] for r in steps] == list(range(STEPS))
    for r in steps:
        assert r["lr"] == warmup_cosine_lr(r["step"], 1e-3, STEPS, warmup_steps=3, min_lr=1e-4)
        assert r["ms"] > 0 and r["tok_s"] > 0 and "mfu" not in r         # no known peak on the CPU
        assert r["norm"] > 0.05
    loss, norm = independent_norm(shards)
    assert steps[0]["loss"] == loss
    assert steps[0]["norm"] == pytest.approx(norm, rel=1e-12)
    assert len({r["norm"] for r in steps}) == STEPS                     # each step its own

    history = json.loads((out / "history.json").read_text())
    evals = of_kind(records, "eval")
    assert [r["step"] for r in evals] == history["steps"] == EVALS
    assert [r["train_loss"] for r in evals] == history["train_losses"]
    assert [r["val_loss"] for r in evals] == history["val_losses"]
    assert [r["tokens_seen"] for r in evals] == history["tokens_seen"]
    assert history["lrs"] == [r["lr"] for r in steps]
    # the mean training loss since the last report, as the eval line prints it
    assert evals[1]["train_loss"] == pytest.approx(np.mean([r["loss"] for r in steps[1:4]]), rel=1e-15)
    # a shards run saves at every evaluation, and not twice at the last
    assert of_kind(records, "save") == [{**r, "kind": "save", "path": str(out / "checkpoint.h5"), "step": s}
                                        for r, s in zip(of_kind(records, "save"), EVALS)]
    assert npgpt.load_checkpoint(out / "checkpoint.h5")[2].global_step == STEPS - 1
    for r in records:
        assert isinstance(r["time"], float) and r["elapsed_s"] >= 0
    assert [r["time"] for r in records] == sorted(r["time"] for r in records)

    stdout = capsys.readouterr().out.splitlines()
    printed = [line for line in stdout if line.startswith("step ")]
    assert printed == [step_line(r, STEPS) for r in steps if r["step"] % 2 == 0]
    assert re.fullmatch(r"step 2/8 \| loss \d+\.\d{4} \| lr 7\.50e-04 \| norm \d+\.\d\d \| \d+ ms \| [\d,]+ tok/s",
                        printed[1]), printed[1]
    assert f"loss {steps[2]['loss']:.4f}" in printed[1]


def test_log_every_defaults_to_10_and_the_bar_prints_none(shards, tmp_path, capsys):
    assert train(shards, tmp_path / "a", "--max-steps", "12") == 0
    assert [line.split(" |")[0] for line in capsys.readouterr().out.splitlines() if line.startswith("step ")] \
        == ["step 0/12", "step 10/12"]
    args = ["train", "--preset", "tiny", "--data", str(shards), "--max-steps", "2", "--max-length", str(T),
            "--batch-size", str(B), "--out", str(tmp_path / "b")]
    assert main(args) == 0
    assert not [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert len(of_kind(read_log(tmp_path / "b"), "step")) == 2          # the file has them all the same


def test_history_is_rewritten_at_every_evaluation_and_save_every_sets_the_saves(shards, tmp_path, capsys,
                                                                               monkeypatch):
    """--save-every 0: no save before the end, one warning line; history.json follows the
    evaluations all the same. --save-every 2: steps 1, 3, 5, 7."""
    seen = []
    write = RunLog.write

    def spy(self, record):                  # what history.json holds when each step is logged
        path = self.path.parent / "history.json"
        seen.append((record.get("step"), json.loads(path.read_text())["global_step"] if path.exists() else None))
        write(self, record)
    monkeypatch.setattr(RunLog, "write", spy)
    out = tmp_path / "off"
    assert train(shards, out, "--save-every", "0") == 0
    err = capsys.readouterr().err.splitlines()
    assert [line for line in err if "warning" in line] == [
        "npgpt: warning: --save-every 0 saves no checkpoint before the end (Ctrl-C and SIGTERM still do); a kill "
        "or a crash loses the run"]
    records = read_log(out)
    assert [r["step"] for r in of_kind(records, "save")] == [STEPS - 1]
    step_seen = {step: at for (step, at), r in zip(seen, records) if r["kind"] == "step"}
    assert step_seen == {0: None, 1: 0, 2: 0, 3: 0, 4: 3, 5: 3, 6: 3, 7: 6}

    monkeypatch.undo()
    assert train(shards, tmp_path / "two", "--save-every", "2") == 0
    assert [r["step"] for r in of_kind(read_log(tmp_path / "two"), "save")] == [1, 3, 5, 7]
    assert not [line for line in capsys.readouterr().err.splitlines() if "warning" in line]


def test_a_resumed_run_appends_to_the_log(shards, tmp_path):
    out = tmp_path / "run"
    assert train(shards, out, "--max-steps", "5") == 0
    before = (out / "log.jsonl").read_bytes()
    assert main(["train", "--resume", str(out / "checkpoint.h5"), "--max-steps", "8", "--no-progress"]) == 0
    after = (out / "log.jsonl").read_bytes()
    assert after.startswith(before)
    records = read_log(out)
    runs = of_kind(records, "run")
    assert [(r["first_step"], r["resume"]) for r in runs] == [(0, None), (5, str(out / "checkpoint.h5"))]
    assert [r["step"] for r in of_kind(records, "step")] == list(range(8))
    history = json.loads((out / "history.json").read_text())
    assert [r["val_loss"] for r in of_kind(records, "eval")] == history["val_losses"]


def test_a_torn_last_line_stays_alone(tmp_path):
    """A line cut short (power loss, full disk) does not swallow the next record."""
    path = tmp_path / "log.jsonl"
    path.write_bytes(b'{"kind": "step", "step": 0}\n{"kind": "st')
    with RunLog(path, 10) as log:
        log.write({"kind": "save", "step": 0, "loss": float("nan")})
        assert path.read_text().endswith("\n")             # in the file at once, not in a buffer
        lines = path.read_text().splitlines()
    assert lines[1] == '{"kind": "st'
    assert json.loads(lines[2])["loss"] is None and json.loads(lines[2])["kind"] == "save"


def test_hellaswag_at_every_evaluation(shards, tmp_path, capsys, hellaswag_file):
    out = tmp_path / "run"
    assert train(shards, out, "--hellaswag", str(hellaswag_file), "--hellaswag-limit", "3") == 0
    evals = of_kind(read_log(out), "eval")
    assert [r["hellaswag_n"] for r in evals] == [3] * len(EVALS)
    model = npgpt.load_checkpoint(out / "checkpoint.h5")[0]            # saved at the last evaluation
    expected = hellaswag(model, load_examples(hellaswag_file), npgpt.get_tokenizer(), limit=3)
    assert (evals[-1]["hellaswag_acc"], evals[-1]["hellaswag_acc_norm"]) == (expected["acc"], expected["acc_norm"])
    history = json.loads((out / "history.json").read_text())
    assert history["hellaswag"] == [{"step": r["step"], "n": 3, "acc": r["hellaswag_acc"],
                                     "acc_norm": r["hellaswag_acc_norm"]} for r in evals]
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("Steps (Step 000007)")]
    assert lines == [f"Steps (Step 000007): Train loss {evals[-1]['train_loss']:.3f}, Val loss "
                     f"{evals[-1]['val_loss']:.3f}, HellaSwag acc {expected['acc']:.4f} acc_norm "
                     f"{expected['acc_norm']:.4f} (3 examples)"]
    # the scores of the first run stay in the history of a resumed run (the checkpoint keeps them), and
    # the resumed run goes on scoring (its --hellaswag is kept)
    assert main(["train", "--resume", str(out / "checkpoint.h5"), "--max-steps", "10", "--no-progress"]) == 0
    resumed = json.loads((out / "history.json").read_text())["hellaswag"]
    assert resumed[:len(evals)] == history["hellaswag"] and [r["step"] for r in resumed[len(evals):]] == [9]


def test_the_step_norm_is_the_backends_own(shards, monkeypatch):
    """Backend.grad_norm and train_step's last_grad_norm (with and without clipping), both
    backends, against np.sqrt of the sum of squares of loss_and_grads' gradients."""
    inputs, targets = TokenDir(shards).train_batches(B, T, SEED, 0, 1).batch(0)
    for backend in ("numpy", "torch"):
        if backend == "torch":
            pytest.importorskip("torch")
        model = npgpt.build_model(npgpt.GPTConfig.preset("tiny"), backend=backend, seed=1, dtype="float64")
        _, grads = model.loss_and_grads(inputs, targets)
        expected = float(np.sqrt(sum(np.sum(g ** 2) for g in grads.values())))
        assert model.grad_norm() == pytest.approx(expected, rel=1e-12), backend
        opt = npgpt.AdamW(model)
        for clip in (None, expected / 2):
            model.load_params(npgpt.build_model(npgpt.GPTConfig.preset("tiny"), seed=1, dtype="float64").params())
            model.train_step(inputs, targets, opt, clip_norm=clip)
            assert model.last_grad_norm == pytest.approx(expected, rel=1e-12), (backend, clip)
            if backend == "torch":       # the loop's step: the norm a device tensor until read
                model.load_params(npgpt.build_model(npgpt.GPTConfig.preset("tiny"), seed=1, dtype="float64").params())
                model.train_step(inputs, targets, opt, clip_norm=clip, sync=False)
                assert float(model.last_grad_norm) == pytest.approx(expected, rel=1e-12), (backend, clip)
    model = npgpt.build_model(npgpt.GPTConfig.preset("tiny"), seed=1)          # float32: squared in float64
    _, grads = model.loss_and_grads(inputs, targets)
    expected = float(np.sqrt(sum(np.sum(g.astype(np.float64) ** 2) for g in grads.values())))
    from npgpt.numpy_backend import model as numpy_model, threads
    monkeypatch.setattr(numpy_model, "NORM_BLOCK", 1000)       # many blocks, summed in order
    norms = []
    try:
        for n in (1, 3):
            threads.set_num_threads(n)
            norms.append(model.grad_norm())
    finally:
        threads.set_num_threads(threads.default_num_threads())
    assert norms[0] == norms[1], "the norm depends on the number of threads"
    assert norms[0] == pytest.approx(expected, rel=1e-14)
    assert model.clip_grad_norm(1e9) == norms[0]


@pytest.mark.parametrize("extra, message", [
    (["--log-every", "0"], "--log-every 0: expected a positive number of steps"),
    (["--log-every", "-3"], "--log-every -3: expected a positive number of steps"),
    (["--hellaswag", "{missing}"], "--hellaswag {missing}: no such file"),
    (["--hellaswag", "{bad}"], '--hellaswag: {bad} line 2: no "endings" field (fields: ctx, label)'),
    (["--hellaswag", "{good}", "--hellaswag-limit", "0"],
     "--hellaswag-limit 0: expected a positive number of examples of a --hellaswag FILE"),
    (["--hellaswag-limit", "5"], "--hellaswag-limit 5: expected a positive number of examples of a --hellaswag FILE"),
    (["--save-every", "-1"], "--save-every must be an integer >= 0, got -1"),
])
def test_refusals_are_one_line_before_the_model_is_built(shards, tmp_path, capsys, monkeypatch, hellaswag_file,
                                                        extra, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(hellaswag_file.read_text().splitlines()[0] + "\n" + json.dumps({"ctx": "x", "label": 0}) + "\n")
    names = {"missing": tmp_path / "missing.jsonl", "bad": bad, "good": hellaswag_file}
    extra = [a.format(**names) for a in extra]
    message = message.format(**names)

    def never(*args, **kwargs):
        raise AssertionError("a model was built")
    monkeypatch.setattr(npgpt, "build_model", never)
    assert train(shards, tmp_path / "out", *extra) == 2
    assert capsys.readouterr().err.splitlines() == [f"npgpt train: error: {message}"]
    assert not (tmp_path / "out").exists()


def test_log_every_needs_no_progress(shards, tmp_path, capsys):
    args = ["train", "--preset", "tiny", "--data", str(shards), "--max-steps", "2", "--log-every", "5",
            "--out", str(tmp_path / "out")]
    assert main(args) == 2
    assert capsys.readouterr().err.splitlines() == [
        "npgpt train: error: --log-every 5: the lines replace the progress bar: give --no-progress"]


def test_a_queued_device_logs_each_step_of_a_window_as_its_own(shards, tmp_path, monkeypatch):
    """On a GPU the loop reads the losses back every FLUSH_EVERY steps: each step's record still
    has its own loss, lr and norm (the same as a run flushed after every step), the window's
    speed shared."""
    from npgpt.numpy_backend import NumpyGPT
    assert train(shards, tmp_path / "cpu", *SCHEDULE, "--max-steps", "12") == 0
    monkeypatch.setattr(NumpyGPT, "synchronous", False, raising=False)
    assert train(shards, tmp_path / "gpu", *SCHEDULE, "--max-steps", "12") == 0
    cpu, gpu = (of_kind(read_log(tmp_path / d), "step") for d in ("cpu", "gpu"))
    for key in ("step", "loss", "lr", "norm"):
        assert [r[key] for r in gpu] == [r[key] for r in cpu], key
    assert len({r["ms"] for r in gpu[1:3]}) == 1             # steps 1 and 2 were read back together
