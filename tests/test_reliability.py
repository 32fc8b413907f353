"""Nothing a user saved is lost, and every bad weight file gets one line that names it.

Crafted weight files (safetensors offsets that point outside their data or into each other,
tensors of integer or bool dtype behind valid checksums, JSON of the wrong shape, 0-byte or
pickled .pth files) are refused with a ValueError naming the file, which the command line
prints as one line (exit 2). Saves clean up after killed saves without touching a live writer's
file, and write the NumPy backend's buffers without copying them; gradient clipping sums in
float64."""
from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import npgpt
from npgpt.cli import main
from npgpt.files import STALE_AFTER_S, _host_tag, atomic_write
from npgpt.weights.checkpoint import CheckpointError, _crc32, _digest
from npgpt.weights.safetensors import SafetensorsReader, write_safetensors

PACKAGE_ROOT = Path(npgpt.__file__).resolve().parent.parent
CHILD_ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1",
             "PYTHONPATH": os.pathsep.join([str(PACKAGE_ROOT), os.environ.get("PYTHONPATH", "")])}
SMALL = npgpt.GPTConfig.preset("tiny", vocab_size=300, context_length=16)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A small model as a Hugging Face folder and as a checkpoint with optimizer state."""
    d = tmp_path_factory.mktemp("saved")
    model = npgpt.build_model(SMALL, seed=1)
    npgpt.export_hf(model, d / "hf")
    opt = npgpt.AdamW(model)
    x = np.array([[1, 2, 3, 4]])
    model.train_step(x, x, opt)
    npgpt.save_checkpoint(d / "c.h5", model, opt, run={"data": "x.txt"})
    return {"dir": d, "hf": d / "hf", "h5": d / "c.h5", "model": model}


def read_header(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write_header(path: Path, header, data: bytes) -> Path:
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return path


def expect_one_line(argv, fragments, capsys):
    """The command line: exit 2, one line naming the file, no traceback, never advice to unpickle."""
    code = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, (code, err)
    assert all(f in lines[0] for f in fragments), (lines[0], fragments)
    assert "weights_only=False" not in err and "add_safe_globals" not in err, err


# ---- safetensors offsets: checked against the data section ----

LN = "transformer.ln_f.weight"           # (32,) float32: 128 bytes
C_FC = "transformer.h.0.mlp.c_fc.weight"


def _offsets_case(header, case):
    s, e = header[LN]["data_offsets"]
    if case == "negative, into the header":          # the red team's file: the header's bytes as weights
        header[LN]["data_offsets"] = [-(e - s) - 8, -8]
    elif case == "end before start":
        header[LN]["data_offsets"] = [e, s]
    elif case == "past the data":
        total = max(t["data_offsets"][1] for k, t in header.items() if k != "__metadata__")
        header[LN]["data_offsets"] = [total, total + (e - s)]
    elif case == "overlapping":                      # ln_f.weight reads the first 128 bytes of c_fc
        a = header[C_FC]["data_offsets"][0]
        header[LN]["data_offsets"] = [a, a + (e - s)]
    elif case == "too short for the shape":
        header[LN]["data_offsets"] = [s, e - 4]
    elif case == "floats":
        header[LN]["data_offsets"] = [float(s), float(e)]
    elif case == "negative shape":                   # (-4, -8) has 32 elements too
        header[LN]["shape"] = [-4, -8]
    return header


OFFSET_CASES = {"negative, into the header": "data_offsets [-136, -8]", "end before start": "data_offsets",
                "past the data": "run past the data section", "overlapping": "overlap",
                "too short for the shape": "needs 128 bytes", "floats": "data_offsets",
                "negative shape": "shape [-4, -8]"}


@pytest.mark.parametrize("case", OFFSET_CASES)
def test_safetensors_offsets_must_lie_in_the_data_and_not_overlap(saved, tmp_path, capsys, case):
    header, data = read_header(saved["hf"] / "model.safetensors")
    bad = write_header(tmp_path / "bad.safetensors", _offsets_case(header, case), data)
    with pytest.raises(ValueError) as e:
        npgpt.load_pretrained(bad)
    assert str(bad) in str(e.value) and OFFSET_CASES[case] in str(e.value), str(e.value)
    expect_one_line(["convert", str(bad), str(tmp_path / "out.h5")], [str(bad)], capsys)
    assert not (tmp_path / "out.h5").exists()


def test_safetensors_with_valid_offsets_in_any_order_still_loads(saved, tmp_path):
    """The checks refuse nothing a valid file has: entries listed in another order than their
    data, a gap between two tensors' data (unused bytes), zero-size tensors sharing an offset."""
    header, data = read_header(saved["hf"] / "model.safetensors")
    meta = header.pop("__metadata__")
    shifted = {k: {**t, "data_offsets": [t["data_offsets"][0] + 8, t["data_offsets"][1] + 8]}
               for k, t in reversed(list(header.items()))}
    path = write_header(tmp_path / "ok.safetensors", {"__metadata__": meta, **shifted,
                                                     "empty.a": {"dtype": "F32", "shape": [0], "data_offsets": [8, 8]},
                                                     "empty.b": {"dtype": "F32", "shape": [0, 3],
                                                                 "data_offsets": [8, 8]}},
                        b"\0" * 8 + data)
    readers = [SafetensorsReader(path), SafetensorsReader(saved["hf"] / "model.safetensors")]
    try:
        for name in header:
            assert np.array_equal(readers[0].read(name), readers[1].read(name)), name
    finally:
        for reader in readers:
            reader.close()


json_values = st.recursive(st.none() | st.booleans() | st.integers(-2**66, 2**66) | st.floats() | st.text(max_size=4),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner,
                                                                                        max_size=3), max_leaves=6)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_safetensors_headers_load_or_are_one_value_error(saved, tmp_path, data):
    """Any JSON in place of one field of one entry (or of __metadata__, or of an entry): the file
    loads or is refused with a ValueError naming it; no other exception."""
    header, raw = read_header(saved["hf"] / "model.safetensors")
    name = data.draw(st.sampled_from(sorted(header)), label="entry")
    field = data.draw(st.sampled_from([None, "dtype", "shape", "data_offsets"]), label="field")
    value = data.draw(json_values | st.lists(st.integers(-300, 200_000), min_size=1, max_size=3), label="value")
    if field is None or name == "__metadata__":
        header[name] = value
    else:
        header[name][field] = value
    path = write_header(tmp_path / "fuzzed.safetensors", header, raw)
    try:
        npgpt.load_pretrained(path)
    except ValueError as e:
        assert str(path) in str(e), str(e)


# ---- tensors of other dtypes: refused, never cast ----

def _retyped_checkpoint(src, dst, dataset, dtype):
    """A copy of src with one tensor stored in another dtype, its crc32 and the root checksum valid:
    a crafted file, not a damaged one."""
    shutil.copyfile(src, dst)
    with h5py.File(dst, "r+") as f:
        group, name = dataset.rsplit("/", 1)
        data = f[dataset][()].astype(dtype)
        del f[dataset]
        f[group].create_dataset(name, data=data).attrs["crc32"] = _crc32(data)
        f.attrs["checksum"] = _digest(f)
    return dst


@pytest.mark.parametrize("dataset", ["params/ln_f.weight", "optimizer/exp_avg_sq/h.0.ln_1.bias"])
@pytest.mark.parametrize("dtype", ["int32", "bool", "float16"])
def test_checkpoint_tensors_of_another_dtype_are_refused(saved, tmp_path, dataset, dtype):
    path = _retyped_checkpoint(saved["h5"], tmp_path / "typed.h5", dataset, dtype)
    with pytest.raises(CheckpointError, match=rf"typed\.h5: .*{dataset.split('/')[-1]}.*{dtype}"):
        npgpt.load_checkpoint(path)


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("dtype", [np.complex64, object, np.int64, np.bool_])
def test_load_params_refuses_arrays_that_are_not_floating_point(backend, dtype):
    if backend == "torch":
        pytest.importorskip("torch")
    model = npgpt.build_model(SMALL, backend=backend, seed=1)
    before = model.params()
    bad = {**before, "wpe": before["wpe"].astype(dtype)}
    with pytest.raises(ValueError, match=rf"wpe: dtype {np.dtype(dtype)}; expected a floating-point array"):
        model.load_params(bad)
    with pytest.raises(ValueError, match="wpe: dtype"):
        npgpt.build_model(SMALL, backend=backend, params=bad)
    assert all(np.array_equal(model.params()[n], p) for n, p in before.items())


def test_integer_weights_in_a_weight_file_are_refused(saved, tmp_path):
    header, data = read_header(saved["hf"] / "model.safetensors")
    tensors = {}
    reader = SafetensorsReader(saved["hf"] / "model.safetensors")
    try:
        tensors = {name: reader.read(name) for name in header if name != "__metadata__"}
    finally:
        reader.close()
    tensors[LN] = tensors[LN].astype(np.int32)
    path = write_safetensors(tmp_path / "ints.safetensors", tensors, header["__metadata__"])
    with pytest.raises(ValueError, match=rf"ints\.safetensors: {LN} \(npgpt ln_f.weight\) holds int32; "
                                         "expected floating-point weights"):
        npgpt.load_pretrained(path)


# ---- files that were a traceback: now one line naming the file ----

class Payload:
    """Any class: torch.load(weights_only=True) refuses to build it."""


def _bad_file(saved, d: Path, case: str) -> Path:
    torch = pytest.importorskip("torch")
    if case == "0-byte .pth":
        (d / "empty.pth").write_bytes(b"")
        return d / "empty.pth"
    if case == "0-byte pytorch_model.bin":
        (d / "hf").mkdir()
        shutil.copyfile(saved["hf"] / "config.json", d / "hf" / "config.json")
        (d / "hf" / "pytorch_model.bin").write_bytes(b"")
        return d / "hf"
    if case == "not a PyTorch file":
        (d / "junk.pth").write_bytes(b"hello world, not a pickle")
        return d / "junk.pth"
    if case == "pickled objects":
        torch.save({"tok_emb.weight": torch.zeros(3, 2), "x": Payload()}, d / "evil.pth")
        return d / "evil.pth"
    if case in ("safetensors entry not an object", "__metadata__ not an object", "header a list"):
        header, data = read_header(saved["hf"] / "model.safetensors")
        if case == "safetensors entry not an object":
            header[LN] = [1, 2]
        elif case == "__metadata__ not an object":
            header["__metadata__"] = ["format", "pt"]
        else:
            header = [header]
        return write_header(d / "bad.safetensors", header, data)
    if case in ("config.json a list", "config.json not JSON", "index without weight_map", "index outside"):
        shutil.copytree(saved["hf"], d / "hf")
        if case == "config.json a list":
            (d / "hf" / "config.json").write_text("[1, 2]")
        elif case == "config.json not JSON":
            (d / "hf" / "config.json").write_text("{'n_embd': 32")
        elif case == "index without weight_map":
            (d / "hf" / "model.safetensors.index.json").write_text('{"metadata": {}}')
        else:
            (d / "hf" / "model.safetensors.index.json").write_text(json.dumps(
                {"weight_map": {LN: "../hf/model.safetensors"}}))
        return d / "hf"
    key = case.split()[1]                           # "checkpoint rng a list" -> rng
    path = d / f"{key}.h5"
    shutil.copyfile(saved["h5"], path)
    with h5py.File(path, "r+") as f:
        f["train_state"].attrs[key] = np.bytes_(b"[1, 2]")
        f.attrs["checksum"] = _digest(f)
    return path


TRACEBACK_CASES = {
    "0-byte .pth": "the file is empty (0 bytes)",
    "0-byte pytorch_model.bin": "pytorch_model.bin: the file is empty",
    "not a PyTorch file": "not a PyTorch state_dict npgpt can read",
    "pickled objects": "holds objects other than tensors",
    "safetensors entry not an object": f"the header entry of {LN} is [1, 2]",
    "__metadata__ not an object": "its __metadata__ is",
    "header a list": "its header is a JSON list",
    "config.json a list": "config.json: holds a JSON list",
    "config.json not JSON": "config.json: not valid JSON",
    "index without weight_map": "model.safetensors.index.json: its weight_map is null",
    "index outside": "a file beside the index",
    "checkpoint rng a list": "rng.h5: train_state's rng attribute holds a JSON list",
    "checkpoint run a list": "run.h5: train_state's run attribute holds a JSON list",
}


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("case", TRACEBACK_CASES)
def test_bad_weight_files_are_one_line_naming_the_file(saved, tmp_path, capsys, case):
    path = _bad_file(saved, tmp_path, case)
    load = npgpt.load_checkpoint if path.suffix == ".h5" else npgpt.load_pretrained
    with pytest.raises(ValueError) as e:
        load(path)
    message = str(e.value)
    assert str(path) in message and TRACEBACK_CASES[case] in message, message
    expect_one_line(["convert", str(path), str(tmp_path / "out.h5")], [TRACEBACK_CASES[case]], capsys)
    if case == "pickled objects":
        assert "npgpt never unpickles untrusted data" in message and "weights_only=False" not in message


# ---- stale temporary files of killed saves ----

HOLDER = """
import sys, time
from npgpt.files import atomic_write
def write(tmp):
    open(tmp, "wb").write(b"x" * 1000)
    print(tmp, flush=True)
    sys.stdin.readline()                  # hold the temporary file until told to go on
    open(tmp, "ab").write(b"done")
atomic_write(sys.argv[1], write)
"""


def _holder(target):
    """A writer in the middle of atomic_write(target): -> (process, its temporary file)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(target)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=CHILD_ENV)
    return proc, Path(proc.stdout.readline().strip())


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _age(path: Path, seconds: float) -> None:
    t = time.time() - seconds
    os.utime(path, (t, t))


def test_the_next_save_removes_what_killed_saves_left_and_nothing_else(tmp_path):
    target = tmp_path / "checkpoint.h5"
    killed, killed_tmp = _holder(target)                         # SIGKILL mid-save, as in the issue
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=60)
    live, live_tmp = _holder(target)                            # a concurrent writer, still writing
    try:
        dead, host, old = _dead_pid(), _host_tag(), 2 * STALE_AFTER_S
        kept = {"live writer": live_tmp,
                "dead writer, just now": tmp_path / f".checkpoint.h5.{dead}_{host}_fresh.tmp",
                "other host": tmp_path / f".checkpoint.h5.{dead}_{int(host, 16) ^ 1:08x}_remote.tmp",
                "other target": tmp_path / f".history.json.{dead}_{host}_other.tmp",
                "not npgpt's naming": tmp_path / ".checkpoint.h5.k2j3h4l5.tmp",
                "user's file": tmp_path / f"checkpoint.h5.{dead}_{host}_mine.tmp"}
        for label, path in kept.items():
            if label != "live writer":
                path.write_bytes(b"keep")
            if label != "dead writer, just now":
                _age(path, old)
        _age(killed_tmp, old)
        assert killed_tmp.exists() and killed_tmp.name.startswith(f".checkpoint.h5.{killed.pid}_{host}_")

        npgpt.save_checkpoint(target, npgpt.build_model(SMALL, seed=1))
        assert not killed_tmp.exists()
        assert {label: p.exists() for label, p in kept.items()} == {label: True for label in kept}

        live.stdin.write("go on\n")                              # the live writer finishes its save
        live.stdin.flush()
        assert live.wait(timeout=60) == 0
        assert target.read_bytes() == b"x" * 1000 + b"done" and not live_tmp.exists()
    finally:
        live.kill()
        live.wait(timeout=60)


def test_temporary_names_carry_the_writers_pid_and_host(tmp_path):
    seen = []
    atomic_write(tmp_path / "f.txt", lambda tmp: seen.append(Path(tmp).name) or Path(tmp).write_text("x"))
    assert seen[0].startswith(f".f.txt.{os.getpid()}_{_host_tag()}_") and seen[0].endswith(".tmp")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.txt"]


# ---- saving without copies ----

SAVE_MEMORY = """
import re, sys
import numpy as np
import npgpt

def kib(field):
    return int(re.search(rf"{field}:\\s+(\\d+)", open("/proc/self/status").read()).group(1))

cfg = npgpt.GPTConfig(vocab_size=50257, context_length=256, emb_dim=256, n_heads=4, n_layers=4)
model = npgpt.build_model(cfg, seed=1)
opt = npgpt.AdamW(model)
npgpt.save_checkpoint(sys.argv[1], npgpt.build_model(npgpt.GPTConfig.preset("tiny", vocab_size=100)))
buffers = [model.flat_params, model.flat_grads, opt.exp_avg, opt.exp_avg_sq]
for b in buffers[1:]:
    b[...] = 0.5                                    # every page resident, as after a training step
before = kib("VmRSS")
open("/proc/self/clear_refs", "w").write("5")       # the peak (VmHWM) starts again from VmRSS
npgpt.save_checkpoint(sys.argv[1], model, opt, epoch=1)
print(sum(b.nbytes for b in buffers), (kib("VmHWM") - before) * 1024, model.flat_params.nbytes)
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc/self/clear_refs")
def test_saving_a_numpy_model_needs_at_most_a_tenth_more_memory(tmp_path):
    """Peak resident memory of a process while it saves a 29M-parameter model (116 MB of weights)
    with AdamW's moments: at most 10% above what the model and optimizer hold. Before, the save
    copied the parameters and both moments: 3x the weights, 75% more."""
    out = subprocess.run([sys.executable, "-c", SAVE_MEMORY, str(tmp_path / "m.h5")], capture_output=True,
                         text=True, env=CHILD_ENV, timeout=300)
    assert out.returncode == 0, out.stderr
    held, extra, weights = map(int, out.stdout.split())
    print(f"save: {extra / 2**20:.1f} MiB above the {held / 2**20:.0f} MiB held ({extra / held:.3f}x)")
    assert extra <= 0.1 * held, f"peak {extra / 2**20:.0f} MiB above the {held / 2**20:.0f} MiB held"
    ckpt = npgpt.weights.checkpoint.read_checkpoint(tmp_path / "m.h5")
    assert (ckpt["optimizer"]["exp_avg"]["wte"] == 0.5).all() and ckpt["params"]["wte"].nbytes < weights


def test_optimizer_state_views_are_the_buffers_and_state_copies():
    model = npgpt.build_model(SMALL, seed=1)
    opt = npgpt.AdamW(model)
    views, copies = opt.state_views(), opt.state()
    assert np.shares_memory(views["exp_avg"]["wte"], opt.exp_avg)
    assert not np.shares_memory(copies["exp_avg"]["wte"], opt.exp_avg)
    assert {k: v for k, v in views.items() if not k.startswith("exp")} == \
        {k: v for k, v in copies.items() if not k.startswith("exp")}


# ---- gradient clipping in float64 ----

def test_clip_grad_norm_matches_a_float64_reference_on_17m_float32_gradients():
    """17.6M float32 gradients of 0.1 (0.01 is inexact in binary, so a float32 running sum rounds
    the same way at every step): the float32 dot was off by 4e-4."""
    cfg = npgpt.GPTConfig(vocab_size=65536, context_length=8, emb_dim=256, n_heads=4, n_layers=1, tie_weights=True)
    model = npgpt.build_model(cfg, seed=1)
    model.flat_grads[...] = 0.1
    model.flat_grads[::1000] = 3.0
    ref = float(np.sqrt(np.sum(np.square(model.flat_grads, dtype=np.float64))))
    norm = model.clip_grad_norm(1.0)
    print(f"clip: relative error {abs(norm - ref) / ref:.2g} over {model.flat_grads.size:,} gradients")
    assert abs(norm - ref) <= 1e-12 * ref, f"norm {norm!r}, float64 reference {ref!r}"
    after = float(np.sqrt(np.sum(np.square(model.flat_grads, dtype=np.float64))))
    assert abs(after - 1.0) <= 1e-6, after
    assert model.clip_grad_norm(10.0) == pytest.approx(after, rel=1e-12)       # below max_norm: unchanged


def test_writing_safetensors_holds_one_transposed_tensor_not_a_copy_of_the_model(tmp_path):
    """save_safetensors (convert, export_hf) of a NumPy model: the weights are written from the
    model's own buffer, each Conv1D weight transposed when it is written (c_fc: 7% of this model)."""
    import tracemalloc
    from npgpt.weights.export import save_safetensors
    cfg = npgpt.GPTConfig(vocab_size=1000, context_length=64, emb_dim=128, n_heads=2, n_layers=4, tie_weights=True)
    model = npgpt.build_model(cfg, seed=1)
    weights = model.flat_params.nbytes
    tracemalloc.start()
    try:
        save_safetensors(model, tmp_path / "m.safetensors")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 0.2 * weights, f"peak {peak / weights:.2f} x the weights' size"
    again = npgpt.load_pretrained(tmp_path / "m.safetensors")
    assert all(np.array_equal(again.params()[n], p) for n, p in model.params().items())
