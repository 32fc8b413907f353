"""Bad input on the command line: exit code 2 and one line on stderr, `npgpt <cmd>: error: ...`, that
names what was wrong and what was expected; a traceback only with --debug. The API-level checks
behind these messages are in test_robustness.py, test_generate.py, test_data.py, test_config.py and
test_pretrained.py; here each case goes through npgpt.cli.main, and a few through `python -m npgpt`."""
from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

import npgpt
from npgpt.weights.checkpoint import _digest
from npgpt.cli import main

TINY = npgpt.GPTConfig.preset("tiny")                                   # GPT-2's vocabulary: the CLI's tokenizer
SMALL = npgpt.GPTConfig.preset("tiny", vocab_size=300, context_length=16)


def rewrite(src, dst, version=None, **config):
    """A copy of checkpoint src with other config fields or format version, its checksum made
    valid again: a file npgpt could have written, not a damaged one."""
    shutil.copyfile(src, dst)
    with h5py.File(dst, "r+") as f:
        cfg = json.loads(f.attrs["config"].decode())
        f.attrs["config"] = np.bytes_(json.dumps({**cfg, **config}).encode())
        if version is not None:
            f.attrs["version"] = version
        f.attrs["checksum"] = _digest(f)
    return dst


class CreatesMarker:
    """Unpickling this calls os.mkdir(path): a stand-in for any code a pickle can run."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return os.mkdir, (self.path,)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad-input")
    f = {"dir": d, "missing": d / "missing.txt", "missing_h5": d / "missing.h5", "latin1": d / "latin1.txt",
         "notes": d / "notes.txt", "notes_h5": d / "notes.h5", "empty": d / "empty.h5", "a400": d / "a400.txt",
         "a40": d / "a40.txt"}
    f["latin1"].write_bytes("Caf\xe9 au lait. ".encode("latin-1") * 50)
    f["notes"].write_text("hello, not weights")
    f["notes_h5"].write_text("hello, not HDF5")
    f["empty"].write_bytes(b"")
    f["a400"].write_text(" a" * 400)                  # 400 tokens: 360 train, 40 validation
    f["a40"].write_text(" a" * 40)

    model = npgpt.build_model(TINY, seed=1)
    f["tiny"] = npgpt.save_checkpoint(d / "tiny.h5", model)                       # no optimizer state
    (d / "cut.h5").write_bytes(f["tiny"].read_bytes()[:f["tiny"].stat().st_size // 2])
    f["cut"] = d / "cut.h5"
    f["newer"] = rewrite(f["tiny"], d / "newer.h5", version=99)
    f["other"] = rewrite(f["tiny"], d / "other.h5", n_layers=3)                 # params for 2 blocks
    f["heads"] = rewrite(f["tiny"], d / "heads.h5", n_heads=3)                  # 32 % 3 != 0
    f["ctx"] = rewrite(f["tiny"], d / "ctx.h5", context_length=32)              # wpe is (64, 32)
    npgpt.save_checkpoint(d / "run.h5", model, npgpt.AdamW(model))
    f["run"] = d / "run.h5"

    small = npgpt.build_model(SMALL, seed=1)
    from safetensors.numpy import load_file, save_file
    npgpt.export_hf(small, d / "hf")
    tensors = load_file(d / "hf" / "model.safetensors")
    for name, change in (("shape", lambda t: {**t, "transformer.h.1.mlp.c_fc.weight":
                                              t["transformer.h.1.mlp.c_fc.weight"].T.copy()}),
                         ("missing", lambda t: {k: v for k, v in t.items() if k != "transformer.ln_f.weight"})):
        shutil.copytree(d / "hf", d / f"hf-{name}")
        save_file(change(tensors), d / f"hf-{name}" / "model.safetensors")
        f[f"hf-{name}"] = d / f"hf-{name}"
    (d / "other-st").mkdir()
    save_file({"encoder.layer.0.weight": np.zeros((4, 4), np.float32)}, d / "other-st" / "bert.safetensors")
    f["not-gpt2"] = d / "other-st" / "bert.safetensors"
    return f


def cases(f):
    """(argv, fragments the message must hold). Paths come from the files fixture."""
    data = ["--preset", "tiny", "--no-progress", "--out", str(f["dir"] / "out")]
    short = [*data, "--data", str(f["a400"]), "--max-length", "16"]
    gen = ["generate", "--checkpoint", str(f["tiny"]), "--prompt", "Hello"]
    return [
        # the corpus
        (["train", *data, "--data", str(f["missing"])], ["corpus file not found", "missing.txt"]),
        (["train", *data, "--data", str(f["latin1"])], ["latin1.txt: not UTF-8"]),
        (["train", *data, "--data", str(f["a40"]), "--max-length", "48"],
         ["training loader", "36 tokens", "at least 49"]),
        (["train", *data, "--data", str(f["a400"]), "--max-length", "48"],
         ["validation loader", "40 tokens", "at least 49"]),
        (["train", *short, "--batch-size", "64"], ["one training batch", "22 windows", "batch_size is 64"]),
        # the run's numbers
        (["train", *short, "--batch-size", "0"], ["--batch-size must be a positive integer, got 0"]),
        (["train", *short[:-1], "0"], ["--max-length must be a positive integer, got 0"]),
        (["train", *short, "--stride", "-3"], ["--stride must be a positive integer, got -3"]),
        (["train", *short[:-1], "65"], ["--max-length 65 exceeds the model's context length 64"]),
        (["train", *short, "--epochs", "0"], ["--epochs must be a positive integer, got 0"]),
        (["train", *short, "--eval-freq", "0"], ["--eval-freq must be a positive integer, got 0"]),
        (["train", *short, "--eval-iter", "0"], ["--eval-iter must be a positive integer, got 0"]),
        (["train", *short, "--save-every", "-1"], ["--save-every must be an integer >= 0, got -1"]),
        (["train", *short, "--clip", "0"], ["--clip must be a positive number, got 0.0"]),
        (["train", *short, "--lr", "nan"], ["--lr must be a number >= 0, got nan"]),
        (["train", *short, "--seed", "-1"], ["--seed must be an integer in [0, 9223372036854775807], got -1"]),
        # the model
        (["train", *short, "--preset", "gpt5"], ["unknown preset 'gpt5'", "tiny"]),
        (["train", *short, "--drop-rate", "1.5"], ["--drop-rate must be a number in [0, 1), got 1.5"]),
        # the checkpoint to resume
        (["train", "--resume", str(f["missing_h5"])], ["checkpoint not found", "missing.h5"]),
        (["train", "--resume", str(f["empty"])], ["empty.h5: not an HDF5 file"]),
        (["train", "--resume", str(f["notes_h5"])], ["notes.h5: not an HDF5 file"]),
        (["train", "--resume", str(f["cut"])], ["cut.h5: damaged"]),
        (["train", "--resume", str(f["newer"])], ["newer.h5: checkpoint format version 99 is newer", "reads (3)"]),
        (["train", "--resume", str(f["other"])], ["other.h5: the tensors in params/ do not fit its config",
                                                  "missing ['h.2.ln_1.weight'"]),
        (["train", "--resume", str(f["ctx"])], ["ctx.h5: the tensors in params/ do not fit its config",
                                                "wpe: expected shape (32, 32), got (64, 32)"]),
        (["train", "--resume", str(f["heads"])], ["heads.h5: its config is not valid",
                                                  "emb_dim (32) must be divisible by n_heads (3)"]),
        (["train", "--resume", str(f["tiny"])], ["tiny.h5: holds no optimizer state"]),
        (["train", "--resume", str(f["run"]), "--preset", "gpt2-small"], ["--preset gpt2-small", "another model"]),
        (["train", "--resume", str(f["run"]), "--dtype", "float64"], ["--dtype float64", "trained in float32"]),
        # generation settings
        (["generate", "--checkpoint", str(f["tiny"]), "--prompt", ""], ["--prompt is empty"]),
        ([*gen, "--max-new-tokens", "-1"], ["max_new_tokens must be an integer >= 0, got -1"]),
        ([*gen, "--temperature", "-1"], ["temperature must be a finite number >= 0", "got -1.0"]),
        ([*gen, "--temperature", "nan"], ["temperature must be a finite number >= 0", "got nan"]),
        ([*gen, "--temperature", "inf"], ["temperature must be a finite number >= 0", "got inf"]),
        ([*gen, "--top-k", "0"], ["top_k must be an integer in [1, 50257]", "got 0"]),
        ([*gen, "--top-k", "50258"], ["top_k must be an integer in [1, 50257]", "got 50258"]),
        ([*gen, "--top-p", "0"], ["top_p must be a number in (0, 1]", "got 0.0"]),
        ([*gen, "--top-p", "1.5"], ["top_p must be a number in (0, 1]", "got 1.5"]),
        # the weights
        (["generate", "--checkpoint", str(f["missing_h5"]), "--prompt", "Hi"], ["checkpoint not found"]),
        (["generate", "--checkpoint", str(f["other"]), "--prompt", "Hi"],
         ["other.h5: the tensors in params/ do not fit"]),
        (["generate", "--pretrained", str(f["missing"]), "--prompt", "Hi"], ["weights not found", "missing.txt"]),
        (["generate", "--pretrained", str(f["notes"]), "--prompt", "Hi"], ["notes.txt: not a weight file"]),
        (["generate", "--pretrained", str(f["not-gpt2"]), "--prompt", "Hi"],
         ["bert.safetensors", "expected a Hugging Face GPT-2"]),
        (["generate", "--pretrained", str(f["hf-shape"]), "--prompt", "Hi"],
         ["transformer.h.1.mlp.c_fc.weight", "expected shape (32, 128), got (128, 32)"]),
        (["generate", "--pretrained", str(f["hf-missing"]), "--prompt", "Hi"], ["ln_f.weight"]),
        (["eval", "--checkpoint", str(f["tiny"]), "--data", str(f["missing"])], ["corpus file not found"]),
        (["eval", "--checkpoint", str(f["tiny"]), "--batch-size", "0"], ["batch_size must be a positive integer"]),
        (["convert", str(f["missing"]), str(f["dir"] / "out.h5")], ["weights not found"]),
        (["convert", str(f["notes"]), str(f["dir"] / "out.h5")], ["notes.txt: not a weight file"]),
    ]


def test_each_bad_input_is_one_line_and_exit_code_2(files, capsys):
    failures = []
    for argv, fragments in cases(files):
        code = main(argv)
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        prefix = f"npgpt {argv[0]}: error: "
        ok = (code == 2 and len(lines) == 1 and lines[0].startswith(prefix) and "Traceback" not in err
              and all(s in lines[0] for s in fragments))
        if not ok:
            failures.append(f"{' '.join(argv)}\n  exit {code}, stderr: {err!r}\n  expected: {fragments}")
    assert not failures, "\n".join(failures)
    assert not (files["dir"] / "out").exists()                  # nothing was started, nothing written


def test_a_prompt_longer_than_the_context_is_cropped_not_refused(files, capsys):
    prompt = "Every effort moves you " * 40                      # 200 tokens, the context is 64
    assert main(["generate", "--checkpoint", str(files["tiny"]), "--prompt", prompt, "--max-new-tokens", "3",
                 "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    model, _, _ = npgpt.load_checkpoint(files["tiny"])
    ids = npgpt.text_to_token_ids(prompt, npgpt.get_tokenizer())
    expected = npgpt.generate(model.eval(), ids[:, -64:], max_new_tokens=3, temperature=0.0)
    assert out.rstrip("\n") == prompt + npgpt.token_ids_to_text(expected[:, 64:], npgpt.get_tokenizer())


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("wrapper", ["torch-zip", "raw-pickle"])
def test_a_pth_carrying_code_is_refused_and_never_run(tmp_path, capsys, wrapper):
    """The payload is live (plain pickle.loads runs it); npgpt refuses the file and the marker
    folder the payload would create never appears."""
    torch = pytest.importorskip("torch")
    marker = tmp_path / "payload-ran"
    state = {"tok_emb.weight": torch.zeros(3, 2), "pos_emb.weight": torch.zeros(4, 2), "x": CreatesMarker(marker)}
    path = tmp_path / "evil.pth"
    if wrapper == "torch-zip":
        torch.save(state, path)
    else:
        path.write_bytes(pickle.dumps({**state, "tok_emb.weight": [[0.0] * 2] * 3}))
        pickle.loads(path.read_bytes())                         # proof that the payload works ...
        assert marker.is_dir()
        marker.rmdir()                                          # ... then undo it
    for argv in (["generate", "--pretrained", str(path), "--prompt", "Hi"],
                 ["convert", str(path), str(tmp_path / "out.h5")]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "weights_only" in err[0] and "evil.pth" in err[0], err
    with pytest.raises(ValueError, match="never unpickles"):
        npgpt.load_pretrained(path)
    assert not marker.exists() and not (tmp_path / "out.h5").exists()


def test_argparse_errors_exit_2_too(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--batch-size", "two"])
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == \
        "npgpt train: error: argument --batch-size: invalid int value: 'two'"


def run_cli(*argv):
    return subprocess.run([sys.executable, "-m", "npgpt", *argv], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": os.pathsep.join(
                              [str(Path(npgpt.__file__).resolve().parent.parent), os.environ.get("PYTHONPATH", "")])})


def test_python_m_npgpt_shows_a_traceback_only_with_debug(files):
    """The real program: exit status 2 and one line without --debug; with it, the traceback."""
    args = ["train", "--preset", "tiny", "--data", str(files["missing"]), "--out", str(files["dir"] / "out")]
    plain = run_cli(*args)
    assert plain.returncode == 2 and plain.stdout == ""
    assert plain.stderr.splitlines() == [f"npgpt train: error: corpus file not found: {files['missing']}"]
    debug = run_cli("--debug", *args)
    assert debug.returncode == 1
    assert "Traceback (most recent call last)" in debug.stderr
    assert debug.stderr.strip().splitlines()[-1] == f"FileNotFoundError: corpus file not found: {files['missing']}"


def test_torch_only_options_need_the_torch_backend(tmp_path, capsys):
    assert main(["train", "--preset", "tiny", "--compile", "--out", str(tmp_path)]) == 2
    assert "--compile needs --backend torch" in capsys.readouterr().err
    assert main(["train", "--preset", "tiny", "--autocast", "fp16", "--out", str(tmp_path)]) == 2
    assert "--autocast fp16 needs --backend torch" in capsys.readouterr().err
    assert main(["train", "--preset", "tiny", "--backend", "torch", "--dtype", "float64", "--autocast", "fp16",
                 "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == ("npgpt train: error: --autocast fp16 needs --dtype float32 (mixed "
                                               "precision keeps float32 parameters)")
