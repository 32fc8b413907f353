"""llm.c's GPT-2 model files, read and written, against a writer and a reader in this file packed with
struct and NumPy from llm.c's published layout (train_gpt2.c's gpt2_build_from_checkpoint,
train_gpt2.py's write_model): 256 int32 [20240326, version, maxT, V, L, NH, C, Vp, 0...], then wte
(Vp, C) with zero rows after V, wpe, and per-layer stacks ln1w ln1b qkvw qkvb attprojw attprojb ln2w
ln2b fcw fcb fcprojw fcprojb (weights (out, in)), lnfw lnfb; float32 (version 3) or bfloat16 (5).
llm.c's C trainer is not built here (its source is not on this machine)."""
from __future__ import annotations

import struct

import numpy as np
import pytest

import npgpt
from npgpt.cli import main
from npgpt.data.shards import read_shard
from npgpt.weights.llmc import write_llmc
from parity.helpers import assert_close

torch = pytest.importorskip("torch")

V, Vp, maxT, L, NH, C = 300, 384, 16, 2, 4, 32
ORDER = [("wte", (Vp, C)), ("wpe", (maxT, C)), ("ln1w", (L, C)), ("ln1b", (L, C)), ("qkvw", (L, 3 * C, C)),
         ("qkvb", (L, 3 * C)), ("attprojw", (L, C, C)), ("attprojb", (L, C)), ("ln2w", (L, C)), ("ln2b", (L, C)),
         ("fcw", (L, 4 * C, C)), ("fcb", (L, 4 * C)), ("fcprojw", (L, C, 4 * C)), ("fcprojb", (L, C)),
         ("lnfw", (C,)), ("lnfb", (C,))]
NPGPT = {"ln1w": "ln_1.weight", "ln1b": "ln_1.bias", "qkvw": "attn.c_attn.weight", "qkvb": "attn.c_attn.bias",
         "attprojw": "attn.c_proj.weight", "attprojb": "attn.c_proj.bias", "ln2w": "ln_2.weight",
         "ln2b": "ln_2.bias", "fcw": "mlp.c_fc.weight", "fcb": "mlp.c_fc.bias", "fcprojw": "mlp.c_proj.weight",
         "fcprojb": "mlp.c_proj.bias", "lnfw": "ln_f.weight", "lnfb": "ln_f.bias"}


def bf16_bits(a):
    return torch.from_numpy(np.ascontiguousarray(a, np.float32)).to(torch.bfloat16).view(torch.int16).numpy()


def write_file(path, tensors, version=3, header=None):
    """llm.c's model file from {llm.c name: array}, its header overridable field by field."""
    fields = {**dict(magic=20240326, version=version, maxT=maxT, V=V, L=L, NH=NH, C=C, Vp=Vp), **(header or {})}
    with open(path, "wb") as f:
        f.write(struct.pack("<8i", *fields.values()) + bytes(4 * 248))
        for name, _ in ORDER:
            a = tensors[name]
            f.write(bf16_bits(a).tobytes() if version == 5 else np.asarray(a, "<f4").tobytes())


def read_file(path):
    """(header ints, {llm.c name: float32 array}) of a model file, read with struct and NumPy."""
    data = open(path, "rb").read()
    head = struct.unpack("<256i", data[:1024])
    itemsize = 4 if head[1] == 3 else 2
    vp, t, layers, c = head[7], head[2], head[4], head[6]
    shapes = [(n, s) for n, s in ORDER]
    sizes = {"wte": (vp, c), "wpe": (t, c)}
    out, offset = {}, 1024
    for name, shape in shapes:
        shape = sizes.get(name, (layers, *shape[1:]) if len(shape) > 1 and name not in ("lnfw", "lnfb") else shape)
        n = int(np.prod(shape))
        raw = np.frombuffer(data, "<f4" if itemsize == 4 else "<u2", n, offset)
        out[name] = (raw if itemsize == 4 else (raw.astype(np.uint32) << 16).view(np.float32)).reshape(shape)
        offset += n * itemsize
    assert offset == len(data)
    return head, out


def random_tensors(seed=0):
    rng = np.random.default_rng(seed)
    t = {name: rng.standard_normal(shape).astype(np.float32) * 0.2 for name, shape in ORDER}
    t["wte"][V:] = 0.0                                    # llm.c pads with zero rows
    return t


def as_npgpt(t, rows=V):
    """{npgpt name: array} of llm.c's tensors, wte cut to rows."""
    out = {"wte": t["wte"][:rows], "wpe": t["wpe"], "ln_f.weight": t["lnfw"], "ln_f.bias": t["lnfb"]}
    for name, target in NPGPT.items():
        if not name.startswith("lnf"):
            for i in range(L):
                out[f"h.{i}.{target}"] = t[name][i]
    return out


@pytest.mark.parametrize("version", [3, 5])
@pytest.mark.parametrize("rows", [V, Vp])
def test_an_llmc_file_reads_tensor_for_tensor(tmp_path, version, rows):
    t = random_tensors()
    write_file(tmp_path / "gpt2.bin", t, version)
    model = npgpt.load_pretrained(tmp_path / "gpt2.bin", vocab_size=None if rows == V else Vp)
    cfg = model.cfg
    assert (cfg.vocab_size, cfg.context_length, cfg.n_layers, cfg.n_heads, cfg.emb_dim) == (rows, maxT, L, NH, C)
    assert cfg.tie_weights and cfg.qkv_bias and cfg.bias
    expected = as_npgpt(t if version == 3 else read_file(tmp_path / "gpt2.bin")[1], rows)
    params = model.params()
    assert sorted(params) == sorted(expected)
    for name, a in expected.items():
        assert np.array_equal(params[name], a), name
    if version == 5:                                      # the values are bf16's, not float32's
        assert not np.array_equal(params["wpe"], t["wpe"])
        assert_close("bf16 wpe", params["wpe"], t["wpe"], rtol=2 ** -8)


def test_the_loss_is_llmcs_own_over_the_first_V_logits(tmp_path):
    """llm.c's forward takes the logits of the first V rows of wte; dropping the padding computes that."""
    t = random_tensors(1)
    t["wte"][V:] = 5.0                                    # padding that would move a softmax over Vp
    write_file(tmp_path / "gpt2.bin", t)
    dropped = npgpt.load_pretrained(tmp_path / "gpt2.bin", backend="torch", dtype="float64")
    kept = npgpt.load_pretrained(tmp_path / "gpt2.bin", backend="torch", dtype="float64", vocab_size=Vp)
    x = np.random.default_rng(0).integers(0, V, (2, maxT))
    assert_close("first V logits", dropped.logits(x), kept.logits(x)[..., :V], atol=1e-12)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_npgpt_writes_what_the_independent_reader_reads(tmp_path, dtype):
    cfg = npgpt.GPTConfig.preset("gpt2-small", vocab_size=V, context_length=maxT, n_layers=L, n_heads=NH, emb_dim=C)
    model = npgpt.build_model(cfg, seed=4)
    p = model.params()
    p["h.1.ln_2.bias"][:] = 0.25                         # an entry init_params leaves zero
    model.load_params(p)
    write_llmc(model, tmp_path / "m.bin", dtype=dtype)
    head, t = read_file(tmp_path / "m.bin")
    assert head[:8] == (20240326, 3 if dtype == "float32" else 5, maxT, V, L, NH, C, Vp) and not any(head[8:])
    assert np.array_equal(t["wte"][V:], np.zeros((Vp - V, C)))
    for name, a in as_npgpt(t).items():
        want = p[name] if dtype == "float32" else (bf16_bits(p[name]).astype(np.uint16).astype(np.uint32)
                                                   << 16).view(np.float32)
        assert np.array_equal(a, want), name
    back = npgpt.load_pretrained(tmp_path / "m.bin").params()            # and round trip
    for name in p:
        assert np.array_equal(back[name], p[name] if dtype == "float32" else as_npgpt(t)[name]), name


def test_models_without_biases_are_written_with_zeros_and_an_untied_head_is_refused(tmp_path):
    cfg = npgpt.GPTConfig.preset("tiny", vocab_size=V, context_length=maxT, bias=False, tie_weights=True)
    model = npgpt.build_model(cfg, backend="torch", seed=2)
    write_llmc(model, tmp_path / "m.bin")
    _, t = read_file(tmp_path / "m.bin")
    assert not any(t[n].any() for n in ("ln1b", "qkvb", "attprojb", "ln2b", "fcb", "fcprojb", "lnfb"))
    back = npgpt.load_pretrained(tmp_path / "m.bin", backend="torch")
    x = np.random.default_rng(0).integers(0, V, (2, maxT))
    assert_close("logits", back.logits(x), model.logits(x), atol=1e-5)
    untied = npgpt.build_model(npgpt.GPTConfig.preset("tiny", vocab_size=V), seed=1)
    with pytest.raises(ValueError, match="llm.c's GPT-2 has a tied head"):
        write_llmc(untied, tmp_path / "u.bin")
    assert not (tmp_path / "u.bin").exists()


BAD_HEADERS = [
    (dict(magic=20240520), "magic 20240520, an llm.c GPT-2 token shard"),
    (dict(magic=20240801), "magic 20240801, an llm.c Llama 3 token shard"),
    (dict(version=1), "version 1; npgpt reads llm.c's versions 3 (float32) and 5"),
    (dict(version=4), "version 4;"),
    (dict(maxT=0), "maxT 0 in the header"),
    (dict(V=-3), "V -3 in the header"),
    (dict(L=0), "L 0 in the header"),
    (dict(NH=0), "NH 0 in the header"),
    (dict(NH=5), "C 32 is not divisible by NH 5"),
    (dict(C=-32), "C -32 in the header"),
    (dict(Vp=0), "Vp 0 in the header"),
    (dict(Vp=299, V=300), "Vp 299 is smaller than V 300"),
    (dict(L=3), r"154112 bytes; its header (maxT 16, Vp 384, L 3, C 32, float32) declares 204928"),
    (dict(L=2**31 - 1, NH=1, C=2**31 - 1), "154112 bytes; its header"),   # refused before anything is allocated
]


@pytest.mark.parametrize("header,message", BAD_HEADERS)
def test_every_wrong_header_field_is_named_with_its_value(tmp_path, header, message):
    write_file(tmp_path / "bad.bin", random_tensors(), header=header)
    with pytest.raises(ValueError, match="bad.bin: " + message.replace("(", r"\(").replace(")", r"\)")) as e:
        npgpt.load_pretrained(tmp_path / "bad.bin")
    assert "\n" not in str(e.value)


def test_a_truncated_file_and_a_nonzero_header_tail_are_refused(tmp_path):
    write_file(tmp_path / "m.bin", random_tensors())
    data = (tmp_path / "m.bin").read_bytes()
    (tmp_path / "short.bin").write_bytes(data[:-2])
    with pytest.raises(ValueError, match=r"short.bin: \d+ bytes; its header .* declares \d+"):
        npgpt.load_pretrained(tmp_path / "short.bin")
    (tmp_path / "tail.bin").write_bytes(data[:40] + struct.pack("<i", 7) + data[44:])
    with pytest.raises(ValueError, match="header int 10 is 7"):
        npgpt.load_pretrained(tmp_path / "tail.bin")
    with pytest.raises(ValueError, match="vocab_size 320; this llm.c file has V 300 and Vp 384"):
        npgpt.load_pretrained(tmp_path / "m.bin", vocab_size=320)


def test_cli_convert_writes_and_reads_llmc_files(tmp_path, capsys):
    write_file(tmp_path / "gpt2.bin", random_tensors())
    assert main(["convert", str(tmp_path / "gpt2.bin"), str(tmp_path / "run.h5")]) == 0
    assert main(["convert", str(tmp_path / "run.h5"), str(tmp_path / "out.bin")]) == 0
    assert (tmp_path / "out.bin").read_bytes() == (tmp_path / "gpt2.bin").read_bytes()
    assert main(["convert", str(tmp_path / "run.h5"), str(tmp_path / "bf16.bin"), "--dtype", "bfloat16"]) == 0
    assert read_file(tmp_path / "bf16.bin")[0][1] == 5
    assert main(["convert", str(tmp_path / "gpt2.bin"), str(tmp_path / "pad.h5"), "--vocab-size", str(Vp)]) == 0
    assert npgpt.load_pretrained(tmp_path / "pad.h5").cfg.vocab_size == Vp
    capsys.readouterr()
    assert main(["train", "--resume", str(tmp_path / "gpt2.bin")]) == 2
    assert "an llm.c model file, not an npgpt checkpoint" in capsys.readouterr().err


def test_model_files_and_shards_given_for_each_other_are_named(tmp_path):
    write_file(tmp_path / "gpt2.bin", random_tensors())
    with pytest.raises(ValueError, match="an llm.c model file .*not a token shard; give it to --init-from"):
        read_shard(tmp_path / "gpt2.bin")
    header = np.zeros(256, "<i4")
    header[:3] = 20240801, 7, 10                          # data_common.py's "llama-3": uint32 tokens
    (tmp_path / "llama_val.bin").write_bytes(header.tobytes() + np.arange(10, dtype="<u4").tobytes())
    with pytest.raises(ValueError, match="an llm.c Llama 3 token shard \\(magic 20240801, version 7"):
        read_shard(tmp_path / "llama_val.bin")
    header[:3] = 20240520, 1, 10
    (tmp_path / "gpt2_val.bin").write_bytes(header.tobytes() + np.arange(10, dtype="<u2").tobytes())
    with pytest.raises(ValueError, match="magic 20240520, an llm.c GPT-2 token shard \\(give its folder to --data"):
        npgpt.load_pretrained(tmp_path / "gpt2_val.bin")
