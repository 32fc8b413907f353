"""Hostile and damaged files through the command line: every reader refuses them in one line that
names the file, exit 2, without a traceback, within a memory and a time limit.

The cases are generated here, each file written by the test's own means (h5py, struct, a
LevelDB table and protobuf written by hand below, torch.save re-zipped by zipfile): JSON and
TOML nested 100,000 deep, counts such as n_layer 2**40, sizes declared but absent, offsets past
2**63, compressed zip members, HDF5 links and storage outside the file, FIFOs, /dev/zero and
folders where a file belongs, bytes that are not UTF-8, integers beyond Python's 4,300 digits, a
NaN optimizer step and an RNG state of -1. All cases run in ONE subprocess (importing torch costs
seconds) under RLIMIT_AS and a per-case alarm; a few run as `python -m npgpt` of their own.
The writers are in hostile_writers.py; prepare's own cases in test_hostile_prepare.py.
"""
import json
import os
import resource
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest

import npgpt
from hostile_writers import book_pth, copy_with, field, reseal, safetensors_with, tf_bundle

REPO = Path(__file__).resolve().parent.parent
FIXTURE = REPO / "tests" / "fixtures" / "openai-tiny"
MEMORY_LIMIT = 3 << 29              # 1.5 GiB of address space for the whole run
CASE_SECONDS = 20
DEEP = 100_000
HUGE_INT = "9" * 5000               # past Python's 4,300-digit limit on int("...")


def limited():
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))



@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """{case: (argv, the name its refusal must show)} and the folder they live in."""
    d = tmp_path_factory.mktemp("hostile")
    cfg = npgpt.GPTConfig.preset("tiny", vocab_size=300, context_length=16, emb_dim=16)
    model = npgpt.build_model(cfg, seed=0)
    opt = npgpt.AdamW(model, lr=1e-3)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 300, (2, 8))
    model.train_step(x, x, opt)
    ckpt = npgpt.save_checkpoint(d / "good.h5", model, opt, global_step=1)
    hf = npgpt.export_hf(model, d / "hf")
    st = hf / "model.safetensors"
    shards = d / "shards"
    (d / "corpus").mkdir()
    (d / "corpus" / "a.txt").write_text(npgpt.load_corpus()[:3000])
    from npgpt.data.prepare import prepare
    prepare(d / "corpus", shards, name="c", val_fraction=0.3, progress=False)
    os.mkfifo(d / "fifo")
    os.mkfifo(d / "pipe.jsonl")
    zero = Path("/dev/zero")
    out = str(d / "out.h5")
    deep = "[" * DEEP

    def conv(path):
        return ["convert", str(path), out, "--overwrite"]

    def h5(name, change, sealed=True):
        dst = d / f"{name}.h5"
        if sealed:
            return reseal(ckpt, dst, change)
        shutil.copy(ckpt, dst)
        with h5py.File(dst, "r+") as f:
            change(f)
        return dst

    def config_attr(**fields):
        return lambda f: f.attrs.__setitem__("config", np.bytes_(json.dumps({**cfg.to_dict(), **fields})))

    def rng_minus_one(f):
        state = model.rng_state()
        state["state"]["state"] = -1
        f["train_state"].attrs["rng"] = np.bytes_(json.dumps({"backend": "numpy", "state": state}))

    def replace(group, name, **kwargs):
        def change(f):
            shape, dtype = f[group][name].shape, f[group][name].dtype
            del f[group][name]
            f[group].create_dataset(name, shape=shape, dtype=dtype, **kwargs)
        return change

    other = d / "other.h5"                      # a valid checkpoint of other numbers, each with its crc32
    shutil.copy(ckpt, other)
    with h5py.File(other, "r+") as f:
        for ds in f["params"].values():
            ds[...] = ds[()] * 2 + 1
            ds.attrs["crc32"] = zlib.crc32(np.ascontiguousarray(ds[()]).data)

    def external_link(f):
        del f["params"]
        f["params"] = h5py.ExternalLink(str(other), "/params")

    def soft_link(f):
        del f["params"]
        f["params"] = h5py.SoftLink("/optimizer/exp_avg")

    def virtual(f):
        layout = h5py.VirtualLayout(shape=(16,), dtype="f4")
        layout[:] = h5py.VirtualSource(str(other), "params/ln_f.bias", shape=(16,))
        crc = f["params"]["ln_f.bias"].attrs["crc32"]
        del f["params"]["ln_f.bias"]
        f["params"].create_virtual_dataset("ln_f.bias", layout).attrs["crc32"] = crc
        with h5py.File(other, "r") as o:        # the crc32 of what it points to: it would load, were it not refused
            f["params"]["ln_f.bias"].attrs["crc32"] = o["params"]["ln_f.bias"].attrs["crc32"]

    def external_storage():
        """params/wpe stored in another file, which is then replaced by a FIFO: reading it would block."""
        path = h5("external", replace("params", "wpe", external=[(str(d / "wpe.bin"), 0, 16 * 16 * 4)]),
                  sealed=False)
        (d / "wpe.bin").unlink(missing_ok=True)
        os.mkfifo(d / "wpe.bin")
        return path

    hp = json.loads((FIXTURE / "hparams.json").read_text())
    tiny_tf = dict(n_vocab=50, n_ctx=16, n_embd=8, n_head=2, n_layer=1)
    index = d / "index-deep"
    shutil.copytree(hf, index)
    (index / "model.safetensors").rename(index / "model-00001-of-00001.safetensors")
    (index / "model.safetensors.index.json").write_text(deep)
    shards_deep = copy_with(shards, d / "shards-deep", c_manifest__json=deep)
    def jl(name, data: bytes) -> Path:
        (d / name).write_bytes(data)
        return d / name
    hs = lambda name, text: jl(name, text.encode())
    (d / "folder-of-zero").mkdir()
    (d / "folder-of-zero" / "a.txt").symlink_to(zero)
    bad_name = d / os.fsdecode(b"\xff\xfe-bad.txt")
    bad_name.write_bytes(b"caf\xe9 \xff\xfe\n")
    checkpoint_cmds = lambda p: {"resume": ["train", "--resume", str(p), "--out", str(d / "run"), "--no-progress"],
                                 "generate": ["generate", "--checkpoint", str(p), "--prompt", "Hi"]}

    c = {
        # deep nesting, every JSON and TOML reader
        "safetensors header nested": (conv(safetensors_with(st, d / "deep.safetensors", lambda h: deep.encode())),
                                      "deep.safetensors"),
        "safetensors header of 17 MiB": (conv(jl("big.safetensors", struct.pack("<Q", 17 << 20) + b"{" + b" " * (
            (17 << 20) - 2) + b"}")), "big.safetensors"),
        "npgpt_config metadata nested": (conv(safetensors_with(st, d / "meta.safetensors", lambda h: {
            **h, "__metadata__": {"format": "pt", "npgpt_config": deep}})), "meta.safetensors"),
        "config.json nested": (["generate", "--pretrained", str(copy_with(hf, d / "hf-deep", config__json=deep)),
                                "--prompt", "Hi"], "hf-deep"),
        "hparams.json nested": (conv(copy_with(FIXTURE, d / "oa-deep", hparams__json=deep)), "oa-deep"),
        "safetensors index nested": (conv(index), "model.safetensors.index.json"),
        "shard manifest nested": (["train", "--data", str(shards_deep), "--max-steps", "1", "--preset", "tiny",
                                   "--out", str(d / "r1"), "--no-progress"], "c_manifest.json"),
        "prepare jsonl nested": (["prepare", str(jl("deep.jsonl", deep.encode())), "--out", str(d / "p1"),
                                  "--no-progress"], "deep.jsonl"),
        "hellaswag nested": (["eval", "--checkpoint", str(ckpt), "--hellaswag", str(hs("hs-deep.jsonl", deep))],
                             "hs-deep.jsonl"),
        "--config TOML nested": (["train", "--config", str(hs("deep.toml", "a = " + deep))], "deep.toml"),
        ".h5 config nested": (conv(h5("config-deep", lambda f: f.attrs.__setitem__("config", np.bytes_(deep)))),
                              "config-deep.h5"),
        # huge counts
        "config.json n_layer 2**40": (conv(copy_with(hf, d / "hf-layers", config__json=json.dumps(
            {**json.loads((hf / "config.json").read_text()), "n_layer": 2**40}))), "hf-layers"),
        "hparams.json n_layer 2**40": (conv(copy_with(FIXTURE, d / "oa-layers", hparams__json=json.dumps(
            {**hp, "n_layer": 2**40}))), "oa-layers"),
        "npgpt_config n_layers 2**40": (conv(safetensors_with(st, d / "layers.safetensors", lambda h: {
            **h, "__metadata__": {"npgpt_config": json.dumps({**cfg.to_dict(), "n_layers": 2**40})}})),
            "layers.safetensors"),
        ".h5 config n_layers 2**40": (conv(h5("layers", config_attr(n_layers=2**40))), "layers.h5"),
        "hparams.json n_vocab 2**31-1": (conv(copy_with(FIXTURE, d / "oa-vocab", hparams__json=json.dumps(
            {**hp, "n_vocab": 2**31 - 1}))), "oa-vocab"),
        # sizes declared, not present
        "TF tensors aliasing one offset": (conv(tf_bundle(d / "tf-alias", dict(tiny_tf, n_embd=64, n_layer=300,
                                                                                n_head=1))), "tf-alias"),
        "TF tensor past the data file": (conv(tf_bundle(d / "tf-past", tiny_tf, offset=lambda i: 1 << 20)),
                                         "model.ckpt.data"),
        "TF offset 2**63": (conv(tf_bundle(d / "tf-2-63", tiny_tf, offset=lambda i: 2**63 + i)), "model.ckpt.data"),
        ".pth stride-0 rows 2**26": (conv(book_pth(d / "rows26.pth", 2**26)), "rows26.pth"),
        ".pth stride-0 rows 2**20": (conv(book_pth(d / "rows20.pth", 2**20)), "rows20.pth"),
        ".h5 dataset without storage": (conv(h5("nodata", replace("params", "wte"), sealed=False)), "nodata.h5"),
        ".h5 chunked dataset without data": (conv(h5("chunked", replace("params", "wte", chunks=(1, 16)),
                                                     sealed=False)), "chunked.h5"),
        # other numbers: compressed members, data from outside the file
        ".pth with DEFLATE members": (conv(book_pth(d / "zipped.pth", 50, C=64, rezip=True)), "zipped.pth"),
        ".h5 external link": (conv(h5("extlink", external_link)), "extlink.h5"),
        ".h5 soft link": (conv(h5("softlink", soft_link)), "softlink.h5"),
        ".h5 virtual dataset": (conv(h5("virtual", virtual)), "virtual.h5"),
        ".h5 external storage (a FIFO)": (conv(external_storage()), "external.h5"),
        # special files where a regular file belongs
        "--config /dev/zero": (["train", "--config", str(zero)], "/dev/zero"),
        "--config FIFO": (["train", "--config", str(d / "fifo")], "fifo"),
        "--config folder": (["train", "--config", str(d / "corpus")], "corpus"),
        "--hellaswag /dev/zero": (["eval", "--checkpoint", str(ckpt), "--hellaswag", str(zero)], "/dev/zero"),
        "--hellaswag FIFO": (["eval", "--checkpoint", str(ckpt), "--hellaswag", str(d / "fifo")], "fifo"),
        "hparams.json FIFO": (conv(copy_with(FIXTURE, d / "oa-fifo", hparams__json="fifo")), "hparams.json"),
        "hparams.json -> /dev/zero": (conv(copy_with(FIXTURE, d / "oa-zero", hparams__json=zero)), "hparams.json"),
        "model.ckpt.index -> /dev/zero": (conv(copy_with(FIXTURE, d / "oa-index", model__ckpt__index=zero)),
                                          "oa-index"),
        "weights /dev/zero": (conv(zero), "/dev/zero"),
        "weights FIFO": (conv(d / "fifo"), "fifo"),
        "checkpoint FIFO": (checkpoint_cmds(d / "fifo")["resume"], "fifo"),
        "prepare folder with a.txt -> /dev/zero": (["prepare", str(d / "folder-of-zero"), "--out", str(d / "p2"),
                                                    "--no-progress"], "a.txt"),
        "prepare FIFO.jsonl": (["prepare", str(d / "pipe.jsonl"), "--out", str(d / "p3"), "--no-progress"],
                               "pipe.jsonl"),
        "train --data FIFO": (["train", "--data", str(d / "fifo"), "--preset", "tiny", "--out", str(d / "r2"),
                               "--no-progress"], "fifo"),
        # not UTF-8, names and contents
        "prepare non-UTF-8 name and text": (["prepare", str(bad_name), "--out", str(d / "p4"), "--no-progress"],
                                            "-bad.txt"),
        "hparams.json not UTF-8": (conv(copy_with(FIXTURE, d / "oa-latin", hparams__json=b'{"n_vocab": "\xe9"}')),
                                   "hparams.json"),
        "safetensors header not UTF-8": (conv(safetensors_with(st, d / "latin.safetensors",
                                                               lambda h: b'{"\xe9": 1}')), "latin.safetensors"),
        "TF name not UTF-8": (conv(tf_bundle(d / "tf-latin", tiny_tf, keys=[(b"model/\xff", field(1, 1))])),
                              "tf-latin"),
        "TF footer damaged": (conv(copy_with(FIXTURE, d / "oa-footer", model__ckpt__index=(
            FIXTURE / "model.ckpt.index").read_bytes()[:-48] + b"\xff" * 40 + struct.pack("<Q", 0xDB4775248B80FB57))),
            "oa-footer"),
        # Python's 4,300-digit limit, NaN and -1 where integers belong
        "prepare jsonl 5000-digit int": (["prepare", str(jl("int.jsonl", b'{"text": ' + HUGE_INT.encode() + b"}\n")),
                                          "--out", str(d / "p5"), "--no-progress"], "int.jsonl"),
        "hellaswag 5000-digit label": (["eval", "--checkpoint", str(ckpt), "--hellaswag", str(hs(
            "hs-int.jsonl", '{"ctx": "a", "endings": ["b", "c", "d", "e"], "label": ' + HUGE_INT + "}\n"))],
            "hs-int.jsonl"),
        "config.json 5000-digit n_layer": (conv(copy_with(hf, d / "hf-int", config__json='{"n_layer": '
                                                          + HUGE_INT + "}")), "hf-int"),
        "--config 5000-digit value": (["train", "--config", str(hs("int.toml", "epochs = " + HUGE_INT))], "int.toml"),
        ".h5 optimizer step NaN": (checkpoint_cmds(h5("step-nan", lambda f: f["optimizer"].attrs.__setitem__(
            "step", np.nan)))["resume"], "step-nan.h5"),
        ".h5 RNG state -1": (checkpoint_cmds(h5("rng", rng_minus_one))["generate"], "rng.h5"),
        "train --init-from nested .h5": (["train", "--init-from", str(d / "config-deep.h5"), "--out", str(d / "r3"),
                                          "--no-progress"], "config-deep.h5"),
    }
    return c, d


@pytest.fixture(scope="module")
def outcomes(cases):
    """Every case through npgpt's main() in one subprocess under the memory limit, each under an alarm."""
    c, d = cases
    (d / "cases.json").write_text(json.dumps({k: argv for k, (argv, _) in c.items()}))
    runner = """
import contextlib, io, json, signal, sys, traceback
from npgpt.cli import main

class Hang(BaseException):
    pass

def alarm(*_):
    raise Hang()

signal.signal(signal.SIGALRM, alarm)
results = {}
for name, argv in json.load(open(sys.argv[1])).items():
    err = io.StringIO()
    signal.alarm(int(sys.argv[2]))
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(argv)
    except SystemExit as e:
        code = e.code
    except Hang:
        code = "ran past the time limit"
    except BaseException:
        code = "raised: " + traceback.format_exc()
    finally:
        signal.alarm(0)
    results[name] = [code, err.getvalue()]
json.dump(results, open(sys.argv[3], "w"))
"""
    env = {**os.environ, "PYTHONPATH": str(REPO), "NPGPT_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", runner, str(d / "cases.json"), str(CASE_SECONDS),
                           str(d / "results.json")], preexec_fn=limited, env=env, cwd=d, capture_output=True,
                          text=True, timeout=CASE_SECONDS * len(c))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((d / "results.json").read_text())


CASE_NAMES = ["safetensors header nested", "safetensors header of 17 MiB", "npgpt_config metadata nested",
              "config.json nested",
              "hparams.json nested", "safetensors index nested", "shard manifest nested", "prepare jsonl nested",
              "hellaswag nested", "--config TOML nested", ".h5 config nested", "config.json n_layer 2**40",
              "hparams.json n_layer 2**40", "npgpt_config n_layers 2**40", ".h5 config n_layers 2**40",
              "hparams.json n_vocab 2**31-1", "TF tensors aliasing one offset", "TF tensor past the data file",
              "TF offset 2**63", ".pth stride-0 rows 2**26", ".pth stride-0 rows 2**20", ".h5 dataset without storage",
              ".h5 chunked dataset without data", ".pth with DEFLATE members", ".h5 external link", ".h5 soft link",
              ".h5 virtual dataset", ".h5 external storage (a FIFO)", "--config /dev/zero", "--config FIFO",
              "--config folder", "--hellaswag /dev/zero", "--hellaswag FIFO", "hparams.json FIFO",
              "hparams.json -> /dev/zero", "model.ckpt.index -> /dev/zero", "weights /dev/zero", "weights FIFO",
              "checkpoint FIFO", "prepare folder with a.txt -> /dev/zero", "prepare FIFO.jsonl", "train --data FIFO",
              "prepare non-UTF-8 name and text", "hparams.json not UTF-8", "safetensors header not UTF-8",
              "TF name not UTF-8", "TF footer damaged", "prepare jsonl 5000-digit int", "hellaswag 5000-digit label",
              "config.json 5000-digit n_layer", "--config 5000-digit value", ".h5 optimizer step NaN",
              ".h5 RNG state -1", "train --init-from nested .h5"]


@pytest.mark.parametrize("case", CASE_NAMES)
def test_hostile_file_is_refused_in_one_line_naming_it(cases, outcomes, case):
    c, _ = cases
    argv, name = c[case]
    code, err = outcomes[case]
    assert code == 2, f"{case}: exit {code!r}, stderr {err!r}"
    lines = err.splitlines()
    assert len(lines) == 1 and "Traceback" not in err, f"{case}: {err!r}"
    assert lines[0].startswith(f"npgpt {argv[0]}: error: "), lines[0]
    shown = name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    assert name in lines[0] or shown in lines[0], f"{case}: {lines[0]!r} does not name {name!r}"


def test_every_generated_case_is_checked(cases):
    assert sorted(cases[0]) == sorted(CASE_NAMES)


def test_the_cli_as_a_process_refuses_in_one_line(cases, tmp_path):
    """Representative cases as `python -m npgpt`: exit 2 and one line on stderr, nothing on stdout."""
    c, _ = cases
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for case in ("safetensors header nested", "--config FIFO", "prepare folder with a.txt -> /dev/zero"):
        argv, name = c[case]
        proc = subprocess.run([sys.executable, "-m", "npgpt", *argv], preexec_fn=limited, env=env,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and proc.stdout == "", (case, proc.returncode, proc.stdout)
        assert len(proc.stderr.splitlines()) == 1 and name in proc.stderr, (case, proc.stderr)
