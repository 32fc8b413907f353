"""llm.c's token files as its dev/data scripts name them (tinyshakespeare.py, tinystories.py,
fineweb.py), written here the way its data_common.write_datafile writes them (a 256-int32 header
with np.tofile, then uint16 tokens), are read whatever their names; a folder with two sets, or
llm.c files beside nanoGPT's headerless train.bin, is refused naming the files; and
`npgpt train --data DIR` runs on them."""
import numpy as np
import pytest

from npgpt.cli import main
from npgpt.data.shards import TokenDir


def write_datafile(path, tokens, version=1):
    header = np.zeros(256, dtype="<i4")
    header[0], header[1], header[2] = 20240520, version, len(tokens)
    with open(path, "wb") as f:
        header.tofile(f)
        np.asarray(tokens, dtype="<u2" if version == 1 else "<u4").tofile(f)


def write_set(folder, names, seed=0):
    """Each file in names gets its own random tokens; returns {name: tokens}."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    written = {}
    for name in names:
        written[name] = rng.integers(0, 50257, int(rng.integers(300, 700))).tolist()
        write_datafile(folder / name, written[name])
    return written


LLMC_SETS = {
    "tiny_shakespeare": (["tiny_shakespeare_val.bin"], ["tiny_shakespeare_train.bin"]),
    "TinyStories": (["TinyStories_val.bin"], ["TinyStories_train.bin"]),
    "fineweb": (["fineweb_val_000000.bin"], ["fineweb_train_000001.bin", "fineweb_train_000002.bin"]),
    "edu_fineweb": (["edu_fineweb_val_000000.bin"], ["edu_fineweb_train_000001.bin"]),
    "data": (["data_val.bin"], ["data_train_2.bin", "data_train_10.bin"]),       # numbers by value
    "retrieval": (["retrieval_val.bin"], ["retrieval_train.bin"]),   # "val" inside a name: the last word decides
    "": (["val.bin"], ["train.bin"]),                                # nanoGPT's names with llm.c's header
}


@pytest.mark.parametrize("name", LLMC_SETS)
def test_llmc_files_are_read_whatever_their_names(tmp_path, name):
    val, train = LLMC_SETS[name]
    written = write_set(tmp_path, val + train)
    d = TokenDir(tmp_path)
    assert d.format == "llm.c" and d.name == name
    assert [p.name for p in d.files["val"]] == val and [p.name for p in d.files["train"]] == train
    assert [a.tolist() for a in d.val] == [written[n] for n in val]
    assert [a.tolist() for a in d.train] == [written[n] for n in train]


def test_nanogpt_files_still_read(tmp_path):
    np.arange(500, dtype=np.uint16).tofile(tmp_path / "train.bin")
    np.arange(300, dtype=np.uint16).tofile(tmp_path / "val.bin")
    d = TokenDir(tmp_path)
    assert d.format == "nanogpt" and d.num_tokens == {"val": 300, "train": 500}


def test_two_sets_are_refused_naming_the_files(tmp_path):
    write_set(tmp_path, ["tiny_shakespeare_val.bin", "tiny_shakespeare_train.bin", "TinyStories_val.bin",
                         "TinyStories_train.bin"])
    with pytest.raises(ValueError) as e:
        TokenDir(tmp_path)
    assert str(e.value) == (f"{tmp_path}: holds 2 sets of token files (TinyStories: TinyStories_val.bin, "
                            "TinyStories_train.bin; tiny_shakespeare: tiny_shakespeare_val.bin, "
                            "tiny_shakespeare_train.bin); keep one set per folder, or pass a name to pick one")
    assert TokenDir(tmp_path, name="TinyStories").files["train"] == [tmp_path / "TinyStories_train.bin"]


def test_llmc_files_beside_nanogpt_files_are_refused(tmp_path):
    write_set(tmp_path, ["fineweb_val_000000.bin"] + [f"fineweb_train_{i:06d}.bin" for i in range(1, 6)])
    np.arange(500, dtype=np.uint16).tofile(tmp_path / "train.bin")
    np.arange(300, dtype=np.uint16).tofile(tmp_path / "val.bin")
    with pytest.raises(ValueError) as e:
        TokenDir(tmp_path)
    assert str(e.value) == (f"{tmp_path}: holds both llm.c-format files (fineweb_val_000000.bin, "
                            "fineweb_train_000001.bin, fineweb_train_000002.bin and 3 more) and nanoGPT's "
                            "headerless train.bin, val.bin; keep one kind per folder")


@pytest.mark.parametrize("files, message", [
    (["tiny_shakespeare_train.bin"], "no tiny_shakespeare_val.bin shard; a token folder needs both a val and a "
                                     "train part (found tiny_shakespeare_train.bin)"),
    (["fineweb_val_000000.bin"], "no fineweb_train_*.bin shard"),
])
def test_a_missing_split_is_named(tmp_path, files, message):
    write_set(tmp_path, files)
    with pytest.raises(ValueError, match=message.replace("*", r"\*").replace("(", r"\(").replace(")", r"\)")):
        TokenDir(tmp_path)


def test_files_that_are_not_llmc_gpt2_tokens_are_refused_by_name(tmp_path):
    write_set(tmp_path, ["TinyStories_val.bin"])
    np.arange(1000, dtype=np.uint16).tofile(tmp_path / "TinyStories_train.bin")         # no header
    with pytest.raises(ValueError, match="TinyStories_train.bin: magic number 65536, expected 20240520"):
        TokenDir(tmp_path)
    write_datafile(tmp_path / "TinyStories_train.bin", list(range(500)), version=2)   # llm.c's Llama 3 tokens
    with pytest.raises(ValueError, match="TinyStories_train.bin: version 2, expected 1"):
        TokenDir(tmp_path)


def test_train_and_eval_run_on_llmc_files(tmp_path, capsys, one_thread):
    data = tmp_path / "tinyshakespeare"
    write_set(data, ["tiny_shakespeare_val.bin", "tiny_shakespeare_train.bin"])
    out = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--data", str(data), "--max-steps", "2", "--max-length", "16",
                 "--batch-size", "2", "--eval-every", "1", "--eval-iter", "1", "--no-progress",
                 "--out", str(out)]) == 0
    assert (out / "checkpoint.h5").is_file()
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(out / "checkpoint.h5"), "--data", str(data), "--max-length", "16"]) == 0
    assert capsys.readouterr().out.startswith("val loss ")
    write_set(data, ["TinyStories_val.bin", "TinyStories_train.bin"])
    assert main(["train", "--preset", "tiny", "--data", str(data), "--max-steps", "2", "--no-progress",
                 "--out", str(tmp_path / "refused")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds 2 sets of token files" in err and "TinyStories_train.bin" in err
