"""`npgpt train --config FILE.toml` (npgpt/cli/config_file.py): the file's options, overridden by flags;
one line naming the key and the file for anything wrong; the configs shipped in configs/ all load."""
from pathlib import Path

import pytest

from npgpt.cli import build_parser, config_file, main
from npgpt.cli.resolve import resolve

REPO = Path(__file__).resolve().parent.parent


def parse(tmp_path, text, *flags):
    """The run's settings as main() resolves them: the flags given over the file's values."""
    path = tmp_path / "run.toml"
    path.write_text(text)
    parser = build_parser()
    args = parser.parse_args(["train", "--config", str(path), *flags])
    return resolve(args, config_file.load_config(path, parser.subcommands["train"]))


def test_the_file_sets_options_and_flags_override_it(tmp_path):
    text = 'preset = "tiny"\nepochs = 3\nlr = 1\ncosine = true\nbatch-size = 4\nkernels = "reference"\n'
    s = parse(tmp_path, text)
    assert (s.preset, s.epochs, s.lr, s.cosine, s.batch_size, s.kernels) == ("tiny", 3, 1.0, True, 4, "reference")
    assert isinstance(s.lr, float)                       # an integer where a number is wanted
    s = parse(tmp_path, text, "--epochs", "5", "--kernels", "fast")
    assert (s.epochs, s.kernels, s.batch_size) == (5, "fast", 4)


def test_a_switch_of_the_file_is_turned_off_by_its_no_flag(tmp_path):
    """cosine = true in the file, --no-cosine on the command line: off (the flag wins), and the
    other way round; no-progress = true is progress off."""
    on = 'preset = "tiny"\ncosine = true\noverwrite = true\nno-progress = true\n'
    s = parse(tmp_path, on)
    assert (s.cosine, s.overwrite, s.progress) == (True, True, False)
    s = parse(tmp_path, on, "--no-cosine", "--no-overwrite", "--progress")
    assert (s.cosine, s.overwrite, s.progress) == (False, False, True)
    s = parse(tmp_path, 'preset = "tiny"\ncosine = false\nprogress = false\n', "--cosine")
    assert (s.cosine, s.progress) == (True, False)


@pytest.mark.parametrize("text, message", [
    ("epoch = 3\n", "'epoch' is no option of npgpt train"),
    ("batch_size = 3\n", "'batch_size' is no option of npgpt train (write it 'batch-size')"),
    ("max_iters = 3\n", "'max_iters' is no option of npgpt train (nanoGPT's max_iters is --max-steps)"),
    ("config = 'other.toml'\n", "'config' is no option of npgpt train"),
    ("epochs = 2.5\n", "epochs must be an integer, got 2.5"),
    ("epochs = true\n", "epochs must be an integer, got True"),
    ("lr = '5e-4'\n", "lr must be a number, got '5e-4'"),
    ("cosine = 1\n", "cosine must be true or false, got 1"),
    ("backend = 'jax'\n", "backend must be one of 'numpy', 'torch', got 'jax'"),
    ("preset = 7\n", "preset must be a string, got 7"),
    ("epochs = \n", "not a readable TOML file"),
])
def test_wrong_keys_and_values_are_one_line_naming_the_file(tmp_path, capsys, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    assert main(["train", "--config", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and str(path) in err, err
    assert not (tmp_path / "out").exists()                     # refused before anything ran


def test_a_missing_file(tmp_path, capsys):
    assert main(["train", "--config", str(tmp_path / "none.toml")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_a_run_from_a_file(tmp_path, verdict_start):
    path = tmp_path / "tiny.toml"
    path.write_text(f'preset = "tiny"\ndata = "{verdict_start(3000)}"\nepochs = 1\neval-freq = 100\n'
                    f'no-progress = true\nout = "{tmp_path / "run"}"\n')
    assert main(["train", "--config", str(path)]) == 0
    assert (tmp_path / "run" / "checkpoint.h5").is_file()


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.toml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    train = build_parser().subcommands["train"]
    assert config_file.load_config(path, train)


def test_configs_are_shipped():
    names = {p.name for p in (REPO / "configs").glob("*.toml")}
    assert len(names) >= 4, names
