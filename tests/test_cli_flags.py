"""The command line as a newcomer meets it (npgpt/cli/parser.py, train_flags.py, settings.py): help in
groups with every default and choice, no abbreviations, a --no- form for every switch, one line and
exit code 2 for every usage error, unknown options answered with the real flag (nanoGPT's and
llm.c's spellings mapped), and the printed settings line pasted back giving the same run."""
import argparse
import json
import shlex
import struct
from array import array

import h5py
import numpy as np
import pytest

import npgpt
from npgpt.cli import build_parser, main
from npgpt.cli.parser import HelpFormatter

pytestmark = pytest.mark.usefixtures("one_thread")   # see conftest.py


def parsers():
    top = build_parser()
    return [("npgpt", top), *top.subcommands.items()]


def usage_error(capsys, argv) -> str:
    """argv is refused by the parser: exit code 2 and one line on stderr (returned)."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1, err
    return err[0]


def test_every_option_says_its_default_and_choices_and_no_parser_abbreviates():
    formatter = HelpFormatter("npgpt")
    for name, parser in parsers():
        assert parser.allow_abbrev is False, name
        for action in parser._actions:
            if not action.option_strings or isinstance(action, argparse._HelpAction):
                continue
            text = formatter._get_help_string(action)
            assert action.required or "default" in text, f"{name} {action.option_strings}: {text!r}"
            for choice in action.choices or ():
                assert str(choice) in text, f"{name} {action.option_strings}: {choice} not in {text!r}"


def test_every_switch_has_its_no_form():
    for name, parser in parsers():
        for action in parser._actions:
            if action.nargs == 0 and not isinstance(action, argparse._HelpAction):
                assert isinstance(action, argparse.BooleanOptionalAction), f"{name} {action.option_strings}"


def test_train_help_is_in_the_order_a_run_is_thought_about(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    titles = ["what to train", "how: the optimizer", "how long and how often", "where: backend", "files: the config"]
    places = [out.index(t) for t in titles]
    assert places == sorted(places), places
    assert out.index("--data PATH") < out.index("--lr LR") < out.index("--max-steps") < out.index("--backend") \
        < out.index("--config FILE.toml")
    assert "book-124m, gpt2-small, gpt2-medium, gpt2-large, gpt2-xl, tiny" in " ".join(out.split())


@pytest.mark.parametrize("argv, words", [
    (["train", "--max-step", "5"], ["unrecognized option --max-step", "did you mean --max-steps?"]),
    (["train", "--warm", "5"], ["unrecognized option --warm", "did you mean --warmup?"]),
    (["train", "--max_iters=5000"], ["nanoGPT's max_iters is --max-steps"]),
    (["train", "--learning_rate", "6e-4"], ["nanoGPT's learning_rate is --lr"]),
    (["train", "--block_size", "1024"], ["--context-length"]),
    (["train", "--n_layer", "12"], ["--n-layer"]),
    (["train", "--batch_size", "12"], ["did you mean --batch-size?"]),
    (["train", "--gradient_accumulation_steps", "40"], ["--grad-accum"]),
    (["train", "--warmup_iters", "2000"], ["--warmup"]),
    (["train", "--lr_decay_iters", "600000"], ["--lr-decay-steps"]),
    (["train", "--min_lr", "6e-5"], ["--min-lr"]),
    (["train", "--eval_interval", "2000"], ["--eval-every"]),
    (["train", "--eval_iters", "200"], ["--eval-iter"]),
    (["train", "--weight_decay", "0.1"], ["--weight-decay"]),
    (["train", "--grad_clip", "1.0"], ["--clip"]),
    (["train", "--dropout", "0.0"], ["--drop-rate"]),
    (["train", "--init_from", "gpt2"], ["--init-from", "--resume"]),
    (["train", "--out_dir", "out"], ["--out"]),
    (["train", "--dtype", "bfloat16"], ["--dtype", "--autocast bf16"]),
    (["train", "--compile=False"], ["--compile=False", "--no-compile"]),
    (["train", "-l", "0.0006"], ["llm.c's -l is --lr"]),
    (["train", "-x", "10"], ["llm.c's -x is --max-steps"]),
    (["train", "-b", "4"], ["--batch-size"]),
    (["train", "-t", "1024"], ["--max-length"]),
    (["train", "-v", "250"], ["--eval-every"]),
    (["train", "-u", "700"], ["--warmup"]),
    (["train", "-c", "0.1"], ["--weight-decay"]),
    (["train", "-o", "log124M"], ["--out"]),
    (["train", "-i", "data/x_train_*.bin"], ["--data"]),
    (["train", "-e", "gpt2_124M.bin"], ["--init-from"]),
    (["generate", "--checkpoint", "x.h5", "--prompt", "Hi", "--max_new_tokens", "5"], ["--max-new-tokens"]),
    (["generate", "--prompt", "Hi", "-e", "gpt2_124M.bin"], ["--pretrained"]),
    (["train", "--frobnicate"], ["unrecognized option --frobnicate", "npgpt train --help"]),
    (["train", "stray"], ["unrecognized argument stray"]),
    (["train", "--batch-size", "two"], ["argument --batch-size: invalid int value: 'two'"]),
    (["train", "--backend", "jax"], ["invalid choice: 'jax'"]),
    (["generate", "--checkpoint", "x.h5"], ["the following arguments are required: --prompt"]),
    (["trian"], ["invalid choice: 'trian'", "did you mean train?"]),
    ([], ["the following arguments are required: COMMAND"]),
])
def test_every_usage_error_is_one_line_naming_the_real_flag(capsys, argv, words):
    line = usage_error(capsys, argv)
    prefix = f"npgpt {argv[0]}: error: " if argv and argv[0] != "trian" else "npgpt: error: "
    assert line.startswith(prefix) and all(w in line for w in words), line


def test_a_tiny_run_pasted_back_is_the_same_run(verdict_start, tmp_path, capsys):
    """A run from a config file and flags prints its settings as a quoted command; that command,
    split as a shell splits it (only --out changed), gives the same losses, lrs and parameters."""
    config = tmp_path / "run.toml"
    config.write_text('preset = "tiny"\ncosine = true\nwarmup = 2\nlr = 2e-3\nno-progress = true\n')
    first = tmp_path / "first"
    assert main(["train", "--config", str(config), "--data", str(verdict_start(2000)), "--epochs", "2",
                 "--max-length", "16", "--start-context", "Every effort's \"moves\"", "--out", str(first)]) == 0
    from npgpt.numpy_backend import threads
    lines = capsys.readouterr().err.splitlines()             # the first lines: the settings, the pool, its BLAS
    assert lines[0].startswith("npgpt: run: npgpt train ")
    assert lines[1].startswith(f"npgpt: numpy backend: {threads.num_threads()} thread") and "BLAS " in lines[1]
    line = lines[0]
    argv = shlex.split(line[len("npgpt: run: "):])
    assert argv[:2] == ["npgpt", "train"]
    assert argv[argv.index("--schedule") + 1] == "cosine" and lines[2].startswith("npgpt: batch: micro 2 x ")
    for flag in ("--dtype", "--kernels", "--out", "--schedule", "--min-lr", "--lr-decay-steps", "--no-progress"):
        assert flag in argv, flag
    assert argv[argv.index("--start-context") + 1] == "Every effort's \"moves\""
    assert "--config" not in argv
    second = tmp_path / "second"
    argv[argv.index("--out") + 1] = str(second)
    assert main(argv[1:]) == 0
    histories = [json.loads((out / "history.json").read_text()) for out in (first, second)]
    for key in ("train_losses", "val_losses", "lrs", "steps"):
        assert histories[0][key] == histories[1][key], key
    assert histories[0]["lrs"][1] < histories[0]["lrs"][2] > histories[0]["lrs"][-1]     # warmup, then the cosine
    with h5py.File(first / "checkpoint.h5") as a, h5py.File(second / "checkpoint.h5") as b:
        for name in a["params"]:
            np.testing.assert_array_equal(a["params"][name][()], b["params"][name][()], err_msg=name)


@pytest.fixture
def no_build(monkeypatch):
    """Fail the test if a model is built or loaded."""
    def boom(*a, **k):
        raise AssertionError("a model was built before the data was checked")
    for name in ("build_model", "load_checkpoint"):
        monkeypatch.setattr(npgpt, name, boom)
    monkeypatch.setattr("npgpt.weights.pretrained.load_pretrained", boom)


def test_a_val_split_shorter_than_a_window_is_refused_before_the_model_exists(tmp_path, capsys, no_build):
    """gpt2-xl (1.5B parameters) would take minutes to build: the refusal comes first, in one line."""
    folder = tmp_path / "shards"
    folder.mkdir()
    for name, n in (("s_val_000000.bin", 25), ("s_train_000001.bin", 5000)):
        tokens = np.random.default_rng(0).integers(0, 1000, n).tolist()
        (folder / name).write_bytes(struct.pack("<256i", 20240520, 1, n, *[0] * 253) + array("H", tokens).tobytes())
    assert main(["train", "--preset", "gpt2-xl", "--data", str(folder), "--max-steps", "5", "--max-length", "64",
                 "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "val shards are too short" in err[0] and "25" in err[0], err
    assert not (tmp_path / "out").exists()


def test_an_autocast_from_a_config_file_is_named_with_its_file(tmp_path, capsys, monkeypatch):
    pytest.importorskip("torch")
    from npgpt.torch_backend import device
    monkeypatch.setattr(device, "cpu_bf16_missing", lambda: "no fast bf16 here")
    config = tmp_path / "gpu.toml"
    config.write_text('backend = "torch"\nautocast = "bf16"\npreset = "tiny"\n')
    assert main(["train", "--config", str(config), "--device", "cpu", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"npgpt train: error: --autocast bf16 (from {config}): no fast bf16 here: train in float32 "
                   f"(set autocast = \"none\" in {config}, or give --autocast none)"]
    monkeypatch.setattr(device, "cpu_bf16_missing", lambda: None)       # --autocast none wins over the file
    argv = ["train", "--config", str(config), "--autocast", "none", "--device", "cpu", "--out", str(tmp_path / "o")]
    monkeypatch.setattr("npgpt.cli.train.check_out", lambda *a: (_ for _ in ()).throw(SystemExit("checks passed")))
    with pytest.raises(SystemExit, match="checks passed"):
        main(argv)


def test_a_book_pth_without_heads_names_the_flag_the_commands_have():
    from npgpt.weights.pretrained import _default_heads
    with pytest.raises(ValueError, match=r"pass n_heads \(--n-head\)$"):
        _default_heads(96, None, "book.pth")
    for name, parser in parsers():
        assert "--n-heads" not in {o for a in parser._actions for o in a.option_strings}, name


def test_prepare_warns_of_a_val_shard_shorter_than_a_gpt2_window(tmp_path, capsys, verdict_text):
    """The Verdict is one document of 5,145 tokens, 5,146 with its <|endoftext|> (tiktoken): the
    default --val-fraction 0.005 keeps int(0.005 * 5146) = 25 for val, and 0.2 is the first of
    the suggested fractions whose share (1,029) holds a window of 1,024 + 1."""
    total = len(npgpt.get_tokenizer().encode_ordinary(verdict_text)) + 1
    assert (int(0.005 * total), int(0.1 * total) < 1025 <= int(0.2 * total)) == (25, True)
    text = tmp_path / "verdict.txt"
    text.write_text(verdict_text, encoding="utf-8")
    assert main(["prepare", str(text), "--out", str(tmp_path / "s"), "--no-progress"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("npgpt: 1 document, ") and "25 val tokens" in err[0]
    assert err[1].startswith("npgpt prepare: warning: the val shard holds 25 tokens") and \
        "--val-fraction 0.2 would give about 1,029" in err[1], err
    assert main(["prepare", str(text), "--out", str(tmp_path / "s"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already exists; give --overwrite" in err[0], err
    assert main(["prepare", str(text), "--out", str(tmp_path / "s"), "--no-progress", "--overwrite",
                 "--val-fraction", "0.2"]) == 0
    assert "warning" not in capsys.readouterr().err
