"""What the command line refuses so that nothing a user saved is lost, and what it checks before a
run starts: each refusal is one line, exit code 2, and leaves every file as it was."""
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import npgpt
from npgpt.cli import main
from npgpt.run_state import TrainState

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def text(verdict_start):
    return verdict_start(1200)


def train_args(text, out, *extra):
    return ["train", "--preset", "tiny", "--data", str(text), "--max-length", "16", "--epochs", "1",
            "--eval-freq", "5", "--eval-iter", "1", "--no-progress", "--out", str(out), *extra]


def digest(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def trained(tmp_path_factory, text):
    """A finished run's folder: checkpoint.h5 and history.json."""
    out = tmp_path_factory.mktemp("run")
    assert main(train_args(text, out)) == 0
    return out


def refused(argv, capsys, *fragments):
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and all(f in err[0] for f in fragments), err
    return err[0]


def test_a_new_run_never_replaces_a_checkpoint(trained, text, capsys):
    before = {p.name: digest(p) for p in trained.iterdir()}
    refused(train_args(text, trained, "--seed", "7"), capsys, f"{trained / 'checkpoint.h5'} already exists",
            "--resume", "--overwrite")
    assert {p.name: digest(p) for p in trained.iterdir()} == before


def test_overwrite_and_resume_are_the_ways_to_write_there(trained, text, tmp_path, capsys):
    out = tmp_path / "copy"
    out.mkdir()
    (out / "checkpoint.h5").write_bytes((trained / "checkpoint.h5").read_bytes())
    assert main(["train", "--resume", str(out / "checkpoint.h5"), "--epochs", "2", "--no-progress"]) == 0
    assert npgpt.load_checkpoint(out / "checkpoint.h5")[2].epoch == 2
    assert main(train_args(text, out, "--overwrite")) == 0
    assert npgpt.load_checkpoint(out / "checkpoint.h5")[2].epoch == 1


def test_convert_never_replaces_its_input_or_an_existing_file(trained, tmp_path, capsys):
    ckpt = trained / "checkpoint.h5"
    before = digest(ckpt)
    refused(["convert", str(ckpt), str(ckpt)], capsys, "is the input")
    refused(["convert", str(ckpt), str(ckpt), "--overwrite"], capsys, "is the input")
    assert digest(ckpt) == before
    other = tmp_path / "other.safetensors"
    other.write_bytes(b"keep me")
    refused(["convert", str(ckpt), str(other)], capsys, f"{other} already exists", "--overwrite")
    assert other.read_bytes() == b"keep me"
    assert main(["convert", str(ckpt), str(other), "--overwrite"]) == 0
    assert other.stat().st_size > 1000


@pytest.mark.parametrize("extra, message", [
    (["--start-context", ""], "--start-context must be some text"),
    (["--start-context", "   "], "--start-context must be some text"),
    (["--grad-accum", "0"], "--grad-accum must be a positive integer, got 0"),
    (["--compile"], "--compile needs --backend torch"),
    (["--preset", ""], "--preset is empty"),
    (["--out", ""], "--out is empty"),
    (["--device", "cuda"], "--device cuda: the numpy backend runs on the CPU"),
    (["--backend", "torch", "--device", "banana"], "--device banana: not a torch device"),
    (["--seed", str(2**64)], "--seed must be an integer in [0, 9223372036854775807]"),
])
def test_settings_are_checked_before_anything_is_built(text, tmp_path, capsys, extra, message):
    args = train_args(text, tmp_path / "out", *extra)
    if "--out" in extra:
        args = args[:args.index("--out")] + args[args.index("--out") + 2:] + extra[-2:]
    refused(args, capsys, message)
    assert not (tmp_path / "out").exists()


def test_cuda_that_is_not_there_is_one_line(text, tmp_path, capsys):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    refused(train_args(text, tmp_path / "out", "--backend", "torch", "--device", "cuda"), capsys,
            "--device cuda: this machine has no CUDA device")


def test_an_out_that_cannot_be_written_fails_before_training(text, tmp_path, capsys):
    """A file where the folder should be: refused before the first step (as root, a read-only folder
    is still writable, so a file stands in for it)."""
    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    refused(train_args(text, blocker / "out"), capsys, f"--out {blocker / 'out'}: cannot write in {blocker}")


def test_compile_reaches_the_model(text, tmp_path, monkeypatch):
    """--compile once got lost on its way (True == 1 was filtered out with grad_accum's default)."""
    seen = {}

    class Built(Exception):
        pass

    def build_model(cfg, **kwargs):
        seen.update(kwargs)
        raise Built
    monkeypatch.setattr(npgpt, "build_model", build_model)
    with pytest.raises(Built):
        main(train_args(text, tmp_path / "out", "--backend", "torch", "--compile", "--grad-accum", "2"))
    assert seen["compile"] is True and seen["grad_accum"] == 2


def test_resume_refuses_data_whose_contents_changed(text, tmp_path, capsys):
    data = tmp_path / "data.txt"
    data.write_text(text.read_text(encoding="utf-8"), encoding="utf-8")
    assert main(train_args(data, tmp_path / "run")) == 0
    capsys.readouterr()
    data.write_text(text.read_text(encoding="utf-8").replace("the", "a"), encoding="utf-8")
    ckpt = tmp_path / "run" / "checkpoint.h5"
    before = digest(ckpt)
    refused(["train", "--resume", str(ckpt), "--epochs", "2"], capsys, "its contents differ from the data")
    assert digest(ckpt) == before


def test_python_api_resume_keeps_the_schedules_peak(tmp_path, verdict_text):
    """The checkpoint stores the schedule's peak: a cosine run resumed through the Python API after
    epoch 1 continues the same curve (it once restarted from the last, decayed lr)."""
    cfg = npgpt.GPTConfig.preset("tiny")
    tok = npgpt.get_tokenizer()
    train, val = npgpt.make_loaders(verdict_text[:1500], tok, batch_size=2, max_length=16, stride=16)

    def run(model, opt, state, on_epoch_end=None):
        npgpt.train_model_simple(model, train, val, opt, 2, 100, 1, "Every", tok, warmup_steps=3, cosine=True,
                                 state=state, on_epoch_end=on_epoch_end, progress=False, print_fn=lambda *_: None)

    def save_after_epoch_1(state):
        if state.epoch == 1:
            npgpt.save_checkpoint(tmp_path / "e1.h5", model, opt, state=state)
    model = npgpt.build_model(cfg, dtype="float64")
    opt = npgpt.AdamW(model, lr=1e-3)
    whole = TrainState()
    run(model, opt, whole, save_after_epoch_1)
    model, opt, resumed = npgpt.load_checkpoint(tmp_path / "e1.h5")
    assert len(resumed.lrs) == len(train)
    run(model, opt, resumed)
    np.testing.assert_allclose(resumed.lrs, whole.lrs, rtol=1e-12)
    assert max(resumed.lrs) == pytest.approx(1e-3, rel=0.05)


def test_a_second_sigterm_exits_143(text, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "npgpt", *train_args(text, tmp_path / "run", "--epochs", "1000",
                                                                         "--eval-freq", "1")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        for line in proc.stdout:                          # training has started
            if "(Step 000003)" in line:
                break
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 143
    finally:
        proc.kill()
        proc.communicate()
