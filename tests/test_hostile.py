"""Hostile and damaged files through the command line: every reader refuses them in one line that
names the file, exit 2, without a traceback, within a memory and a time limit.

The cases are generated here, each file written by the test's own means (h5py, struct, a
LevelDB table and protobuf written by hand below, torch.save re-zipped by zipfile): JSON and
TOML nested 100,000 deep, counts such as n_layer 2**40, sizes declared but absent, offsets past
2**63, compressed zip members, HDF5 links and storage outside the file, FIFOs, /dev/zero and
folders where a file belongs, bytes that are not UTF-8, integers beyond Python's 4,300 digits, a
NaN optimizer step and an RNG state of -1. All cases run in ONE subprocess (importing torch costs
seconds) under RLIMIT_AS and a per-case alarm; a few run as `python -m npgpt` of their own.
"""
import gzip
import json
import os
import resource
import shutil
import struct
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest

import npgpt
from npgpt.params import param_shapes
from npgpt.weights.checkpoint import _digest
from npgpt.weights.names import openai_source

REPO = Path(__file__).resolve().parent.parent
FIXTURE = REPO / "tests" / "fixtures" / "openai-tiny"
MEMORY_LIMIT = 3 << 29              # 1.5 GiB of address space for the whole run
CASE_SECONDS = 20
DEEP = 100_000
HUGE_INT = "9" * 5000               # past Python's 4,300-digit limit on int("...")


def limited():
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


# ---- an independent writer of TensorFlow's table and protobuf ----

def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def masked(data: bytes) -> bytes:
    c = crc32c(data)
    return ((((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF).to_bytes(4, "little")


def varint(n: int) -> bytes:
    out = b""
    while n >= 0x80:
        out += bytes([n & 0x7F | 0x80])
        n >>= 7
    return out + bytes([n])


def field(number: int, value) -> bytes:
    if isinstance(value, int):
        return varint(number << 3) + varint(value)
    return varint(number << 3 | 2) + varint(len(value)) + value


def block(entries) -> bytes:
    body = b"".join(varint(0) + varint(len(k)) + varint(len(v)) + k + v for k, v in entries)
    return body + struct.pack("<II", 0, 1)          # one restart point, at 0


def table(entries) -> bytes:
    """A LevelDB table of sorted (key, value) byte pairs: one data block, the index block, the footer."""
    data = block(entries)
    out = data + b"\0" + masked(data + b"\0")
    index = block([(entries[-1][0], varint(0) + varint(len(data)))])
    footer = (varint(0) + varint(0) + varint(len(out)) + varint(len(index))).ljust(40, b"\0")
    return out + index + b"\0" + masked(index + b"\0") + footer + struct.pack("<Q", 0xDB4775248B80FB57)


def tf_bundle(folder: Path, hparams: dict, offset=lambda i: 0, data_bytes=1 << 16, keys=None) -> Path:
    """An OpenAI-style folder whose index lists every tensor of hparams' model as float32 at offset(i)
    of a data file of data_bytes zeros."""
    folder.mkdir()
    (folder / "hparams.json").write_text(json.dumps(hparams))
    cfg = npgpt.GPTConfig(vocab_size=hparams["n_vocab"], context_length=hparams["n_ctx"], emb_dim=hparams["n_embd"],
                          n_heads=hparams["n_head"], n_layers=hparams["n_layer"], qkv_bias=True, tie_weights=True)
    entries = []
    for i, (name, shape) in enumerate(param_shapes(cfg).items()):
        (source,), kind = openai_source(name)
        shape = (1, *shape[::-1]) if kind == "conv1d" else shape
        dims = b"".join(field(2, field(1, d)) for d in shape)
        entry = field(1, 1) + field(2, dims) + field(3, 0) + field(4, offset(i)) + field(5, 4 * int(np.prod(shape)))
        entries.append((source.encode(), entry))
    entries = sorted(keys or entries)
    (folder / "model.ckpt.index").write_bytes(table([(b"", field(1, 1))] + entries))
    (folder / "model.ckpt.data-00000-of-00001").write_bytes(bytes(data_bytes))
    return folder


# ---- the cases ----

def reseal(src: Path, dst: Path, change) -> Path:
    """A copy of the checkpoint src changed by change(f) and given a matching root checksum, as a
    crafted file would be (the checksum is a crc32, not a signature)."""
    shutil.copy(src, dst)
    with h5py.File(dst, "r+") as f:
        change(f)
        f.attrs["checksum"] = _digest(f)
    return dst


def copy_with(src: Path, dst: Path, **files) -> Path:
    shutil.copytree(src, dst)
    for name, content in files.items():
        name = name.replace("__", ".")
        (dst / name).unlink(missing_ok=True)
        if isinstance(content, Path):
            (dst / name).symlink_to(content)
        elif content == "fifo":
            os.mkfifo(dst / name)
        else:
            (dst / name).write_bytes(content.encode() if isinstance(content, str) else content)
    return dst


def safetensors_with(src: Path, dst: Path, change) -> Path:
    raw = src.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = change(json.loads(raw[8:8 + n]))
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    dst.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n:])
    return dst


def book_pth(path: Path, rows: int, C: int = 64, rezip: bool = False) -> Path:
    """The book's GPTModel state_dict of one block, every tensor a stride-0 view of one element
    (torch saves the element, not the rows), tok_emb and out_head of `rows` rows."""
    import torch
    one = torch.zeros(1)
    shapes = {"tok_emb.weight": (rows, C), "pos_emb.weight": (16, C), "out_head.weight": (rows, C),
              "final_norm.scale": (C,), "final_norm.shift": (C,)}
    b = "trf_blocks.0."
    for w in ("W_query", "W_key", "W_value"):
        shapes[f"{b}att.{w}.weight"] = (C, C)
    shapes.update({f"{b}att.out_proj.weight": (C, C), f"{b}att.out_proj.bias": (C,),
                   f"{b}ff.layers.0.weight": (4 * C, C), f"{b}ff.layers.0.bias": (4 * C,),
                   f"{b}ff.layers.2.weight": (C, 4 * C), f"{b}ff.layers.2.bias": (C,),
                   f"{b}norm1.scale": (C,), f"{b}norm1.shift": (C,), f"{b}norm2.scale": (C,), f"{b}norm2.shift": (C,)})
    if rezip:                                       # real tensors, their zip members then compressed
        state = {k: torch.full(s, 0.5) for k, s in shapes.items()}
    else:
        state = {k: one.expand(*s) for k, s in shapes.items()}
    torch.save(state, path)
    if rezip:
        packed = path.with_suffix(".zip")
        with zipfile.ZipFile(path) as src, zipfile.ZipFile(packed, "w", zipfile.ZIP_DEFLATED) as dst:
            for info in src.infolist():
                dst.writestr(info.filename, src.read(info.filename))
        packed.replace(path)
    return path


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


CASE_NAMES = ["safetensors header nested", "npgpt_config metadata nested", "config.json nested",
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


def test_prepare_keeps_memory_bounded_on_a_document_without_a_place_to_cut(tmp_path):
    """A .txt.gz holding one run of a single letter (nothing to cut at: no newline, no space, no
    punctuation), 8 million characters from a 10 kB file, in a subprocess under a memory limit
    with the piece sizes scaled down 64 times: the run is cut into pieces of MAX_PIECE_CHARS, and
    the shards hold tiktoken's tokens of each piece. Encoded whole, as before the cut, the run
    grew the process by about 400 MB (16 million: 763 MB and 22 s)."""
    n = 8_000_000
    path = tmp_path / "run.txt.gz"
    with gzip.open(path, "wb") as f:
        for _ in range(n // 1_000_000):
            f.write(b"a" * 1_000_000)
    assert path.stat().st_size < 50_000
    code = f"""
import resource, sys
import numpy as np
from npgpt.data import sources
sources.PIECE_CHARS, sources.MAX_PIECE_CHARS = 1 << 14, 1 << 16
from npgpt.data.prepare import prepare
from npgpt.data.shards import TokenDir
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
m = prepare({str(path)!r}, {str(tmp_path / 'out')!r}, val_fraction=0.01, progress=False)
grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
tokens = TokenDir({str(tmp_path / 'out')!r})
ids = np.concatenate(tokens.val + tokens.train)
print(grew // 1024, m["tokens"]["total"], int(ids[0]), len(set(ids[1:].tolist())))
"""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", code], preexec_fn=limited, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    grew_mb, total, first, kinds = map(int, proc.stdout.split())
    enc = npgpt.get_tokenizer()                 # tiktoken's GPT-2 encoding
    piece, rest = enc.encode_ordinary("a" * (1 << 16)), enc.encode_ordinary("a" * (n % (1 << 16)))
    assert first == 50256 and total == 1 + n // (1 << 16) * len(piece) + len(rest)
    assert kinds <= 4                            # runs of "a" are tokens of a few lengths of "a"s
    assert grew_mb < 150, f"prepare grew by {grew_mb} MB"


def test_a_jsonl_line_longer_than_the_bound_is_refused_with_its_size(tmp_path, capsys):
    from npgpt.cli import main
    from npgpt.data.sources import MAX_LINE_BYTES
    path = tmp_path / "long.jsonl.gz"
    with gzip.open(path, "wb", compresslevel=1) as f:
        f.write(b'{"text": "')
        for _ in range(MAX_LINE_BYTES // (1 << 20) + 1):
            f.write(b"a" * (1 << 20))
        f.write(b'"}\n')
    assert main(["prepare", str(path), "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err == (f"npgpt prepare: error: {path} line 1: longer than {MAX_LINE_BYTES:,} bytes; a .jsonl document "
                   "must be smaller (put a longer one in a .txt file of its own)\n")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_a_forced_cut_at_a_space_keeps_the_tokens():
    """Words and single spaces with no newline or punctuation (safe_cut finds nothing): pieces cut
    at forced_cut's spaces encode, one by one, to the tokens of the whole text."""
    from npgpt.data.sources import pieces
    rng = np.random.default_rng(0)
    words = ["".join(rng.choice(list("abcdeé1 "), size=rng.integers(1, 9))) for _ in range(3000)]
    text = " ".join(words)                  # runs of several spaces come too, where no cut is taken
    enc = npgpt.get_tokenizer()
    cut = list(pieces([text], size=256, most=512))
    assert "".join(cut) == text and len(cut) > 20 and max(map(len, cut)) < 512 + 256
    assert [t for piece in cut for t in enc.encode_ordinary(piece)] == enc.encode_ordinary(text)
