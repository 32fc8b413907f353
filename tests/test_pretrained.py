"""Weight loading and export, each checked against an independent reference:
  OpenAI's format  - a tiny checkpoint written by real TensorFlow (tests/fixtures/openai-tiny) and the
                     values TensorFlow read back from it; the book's GPTModel loaded the book's way
  Hugging Face     - transformers.GPT2LMHeadModel: its save_pretrained files in, its logits to match
  the book's .pth  - the book's GPTModel (llms_from_scratch, and a re-implementation of chapter 4)
"""
from __future__ import annotations

import json
import math
import re
import shutil
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

import npgpt
from npgpt.cli import main
from npgpt.weights.pretrained import detect_format, load_tokenizer
from npgpt.weights.safetensors import write_safetensors
from npgpt.weights.tfbundle import crc32c, read_table, unmask_crc
from parity.helpers import assert_close

torch = pytest.importorskip("torch")
nn = torch.nn

FIXTURES = Path(__file__).resolve().parent / "fixtures"
OPENAI = FIXTURES / "openai-tiny"
TF_VALUES = FIXTURES / "openai-tiny-tf-values.npz"
HP = json.loads((OPENAI / "hparams.json").read_text())


pytestmark = pytest.mark.usefixtures("one_thread")   # see conftest.py


LOGITS_ATOL = 1e-5            # float32 logits of two implementations of the same weights


def inputs(vocab, T, n=3, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, (2, t)) for t in (T, T // 2 + 1, 1)][:n]


# ---- the book's GPTModel (chapter 4), written out as a second reference ----

class BookLayerNorm(nn.Module):
    def __init__(self, C):
        super().__init__()
        self.eps, self.scale, self.shift = 1e-5, nn.Parameter(torch.ones(C)), nn.Parameter(torch.zeros(C))

    def forward(self, x):
        var = x.var(dim=-1, keepdim=True, unbiased=False)
        return self.scale * (x - x.mean(dim=-1, keepdim=True)) / torch.sqrt(var + self.eps) + self.shift


class BookGELU(nn.Module):
    def forward(self, x):
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


class BookMHA(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        C, self.nh = cfg["emb_dim"], cfg["n_heads"]
        self.W_query, self.W_key, self.W_value = (nn.Linear(C, C, bias=cfg["qkv_bias"]) for _ in range(3))
        self.out_proj = nn.Linear(C, C)
        self.dropout = nn.Dropout(cfg["drop_rate"])
        T = cfg["context_length"]
        self.register_buffer("mask", torch.triu(torch.ones(T, T), diagonal=1))

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = (w(x).view(B, T, self.nh, C // self.nh).transpose(1, 2)      # (B, nh, T, hs)
                   for w in (self.W_query, self.W_key, self.W_value))
        att = (q @ k.transpose(2, 3)).masked_fill(self.mask.bool()[:T, :T], -torch.inf)
        att = self.dropout(torch.softmax(att / k.shape[-1] ** 0.5, dim=-1))
        return self.out_proj((att @ v).transpose(1, 2).reshape(B, T, C))


class BookBlock(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        C = cfg["emb_dim"]
        self.att = BookMHA(cfg)
        self.ff = nn.Module()
        self.ff.layers = nn.Sequential(nn.Linear(C, 4 * C), BookGELU(), nn.Linear(4 * C, C))
        self.norm1, self.norm2 = BookLayerNorm(C), BookLayerNorm(C)
        self.drop_resid = nn.Dropout(cfg["drop_rate"])

    def forward(self, x):
        x = x + self.drop_resid(self.att(self.norm1(x)))
        return x + self.drop_resid(self.ff.layers(self.norm2(x)))


class BookGPT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.tok_emb = nn.Embedding(cfg["vocab_size"], cfg["emb_dim"])
        self.pos_emb = nn.Embedding(cfg["context_length"], cfg["emb_dim"])
        self.drop_emb = nn.Dropout(cfg["drop_rate"])
        self.trf_blocks = nn.Sequential(*[BookBlock(cfg) for _ in range(cfg["n_layers"])])
        self.final_norm = BookLayerNorm(cfg["emb_dim"])
        self.out_head = nn.Linear(cfg["emb_dim"], cfg["vocab_size"], bias=False)

    def forward(self, idx):
        x = self.drop_emb(self.tok_emb(idx) + self.pos_emb(torch.arange(idx.shape[1])))
        return self.out_head(self.final_norm(self.trf_blocks(x)))


def book_load_weights_into_gpt(gpt, params):
    """Chapter 5's load_weights_into_gpt, from the params dict of gpt_download.py."""
    def assign(left, right):
        if left.shape != tuple(right.shape):
            raise ValueError(f"Shape mismatch. Left: {left.shape}, Right: {right.shape}")
        return nn.Parameter(torch.tensor(right))
    gpt.pos_emb.weight = assign(gpt.pos_emb.weight, params["wpe"])
    gpt.tok_emb.weight = assign(gpt.tok_emb.weight, params["wte"])
    for b, block in enumerate(params["blocks"]):
        att, blk = block["attn"], gpt.trf_blocks[b]
        for lin, w, bias in zip((blk.att.W_query, blk.att.W_key, blk.att.W_value),
                                np.split(att["c_attn"]["w"], 3, axis=-1), np.split(att["c_attn"]["b"], 3, axis=-1)):
            lin.weight, lin.bias = assign(lin.weight, w.T), assign(lin.bias, bias)
        blk.att.out_proj.weight = assign(blk.att.out_proj.weight, att["c_proj"]["w"].T)
        blk.att.out_proj.bias = assign(blk.att.out_proj.bias, att["c_proj"]["b"])
        for lin, key in ((blk.ff.layers[0], "c_fc"), (blk.ff.layers[2], "c_proj")):
            lin.weight = assign(lin.weight, block["mlp"][key]["w"].T)
            lin.bias = assign(lin.bias, block["mlp"][key]["b"])
        for norm, key in ((blk.norm1, "ln_1"), (blk.norm2, "ln_2")):
            norm.scale, norm.shift = assign(norm.scale, block[key]["g"]), assign(norm.shift, block[key]["b"])
    gpt.final_norm.scale = assign(gpt.final_norm.scale, params["g"])
    gpt.final_norm.shift = assign(gpt.final_norm.shift, params["b"])
    gpt.out_head.weight = assign(gpt.out_head.weight, params["wte"])


def book_params_from_tf_values(values, n_layer):
    """gpt_download.py's load_gpt2_params_from_tf_ckpt, fed with the values TensorFlow read back."""
    params = {"blocks": [{} for _ in range(n_layer)]}
    for name in values.files:
        parts = name.split("/")[1:]
        target = params
        if parts[0].startswith("h"):
            target = params["blocks"][int(parts[0][1:])]
        for key in parts[1:-1]:
            target = target.setdefault(key, {})
        target[parts[-1]] = np.squeeze(values[name])
    return params


def llms_from_scratch():
    return pytest.importorskip("llms_from_scratch.ch04", reason="pip install llms-from-scratch --no-deps")


@pytest.fixture(params=["reimplementation", "llms_from_scratch"])
def book(request):
    """(GPTModel class, load_weights_into_gpt) of the book."""
    if request.param == "reimplementation":
        return BookGPT, book_load_weights_into_gpt
    ch04 = llms_from_scratch()
    from llms_from_scratch.ch05 import load_weights_into_gpt
    return ch04.GPTModel, load_weights_into_gpt


def book_cfg(**overrides):
    return {"vocab_size": 300, "context_length": 16, "emb_dim": 32, "n_heads": 2, "n_layers": 2,
            "drop_rate": 0.1, "qkv_bias": False, **overrides}


# ---- OpenAI's checkpoint folder, read without TensorFlow ----

def test_crc32c_matches_the_standard_and_a_bytewise_loop():
    assert crc32c(b"123456789") == 0xE3069283                      # RFC 3720's check value
    assert crc32c(b"") == 0
    table = [0] * 256
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table[i] = c
    rng = np.random.default_rng(1)
    for n in (1, 5, 63, 64, 65, 1000, 70001):
        data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        c = 0xFFFFFFFF
        for b in data:
            c = table[(c ^ b) & 0xFF] ^ (c >> 8)
        assert crc32c(data) == c ^ 0xFFFFFFFF, n
    crc = 0x12345678
    masked = (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF
    assert unmask_crc(masked) == crc


def test_index_table_lists_every_tensor_tensorflow_saved():
    values = np.load(TF_VALUES)
    table = read_table(OPENAI / "model.ckpt.index")
    assert sorted(table) == sorted([""] + values.files)            # "" is the bundle header


def test_openai_folder_loads_the_values_tensorflow_reads_back():
    values = np.load(TF_VALUES)
    model = npgpt.load_pretrained(OPENAI)
    cfg = model.cfg
    assert (cfg.vocab_size, cfg.context_length, cfg.emb_dim, cfg.n_heads, cfg.n_layers) == \
        tuple(HP[k] for k in ("n_vocab", "n_ctx", "n_embd", "n_head", "n_layer"))
    assert cfg.qkv_bias and cfg.tie_weights
    p = model.params()
    assert np.array_equal(p["wte"], values["model/wte"]) and np.array_equal(p["wpe"], values["model/wpe"])
    for i in range(HP["n_layer"]):
        h, t = f"h.{i}.", f"model/h{i}/"
        for ours, theirs in (("attn.c_attn", "attn/c_attn"), ("attn.c_proj", "attn/c_proj"),
                             ("mlp.c_fc", "mlp/c_fc"), ("mlp.c_proj", "mlp/c_proj")):
            assert np.array_equal(p[h + ours + ".weight"], values[t + theirs + "/w"][0].T)
            assert np.array_equal(p[h + ours + ".bias"], values[t + theirs + "/b"])
        for ln in ("ln_1", "ln_2"):
            assert np.array_equal(p[h + ln + ".weight"], values[t + ln + "/g"])
            assert np.array_equal(p[h + ln + ".bias"], values[t + ln + "/b"])
    assert np.array_equal(p["ln_f.weight"], values["model/ln_f/g"])


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_openai_logits_equal_the_books_model_loaded_the_books_way(book, backend):
    GPTModel, load_weights_into_gpt = book
    cfg = {"vocab_size": HP["n_vocab"], "context_length": HP["n_ctx"], "emb_dim": HP["n_embd"],
           "n_heads": HP["n_head"], "n_layers": HP["n_layer"], "drop_rate": 0.1, "qkv_bias": True}
    gpt = GPTModel(cfg).eval()
    load_weights_into_gpt(gpt, book_params_from_tf_values(np.load(TF_VALUES), HP["n_layer"]))
    model = npgpt.load_pretrained(OPENAI, backend=backend).eval()
    for ids in inputs(HP["n_vocab"], HP["n_ctx"]):
        with torch.no_grad():
            ref = gpt(torch.from_numpy(ids)).numpy()
        assert_close(f"logits {ids.shape}", model.logits(ids), ref, atol=LOGITS_ATOL)


def test_openai_data_corruption_is_caught_by_crc32c(tmp_path):
    folder = tmp_path / "gpt2"
    shutil.copytree(OPENAI, folder)
    data = folder / "model.ckpt.data-00000-of-00001"
    raw = bytearray(data.read_bytes())
    raw[100] ^= 0x01
    data.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="crc32c"):
        npgpt.load_pretrained(folder)
    assert npgpt.load_pretrained(folder, verify=False).cfg.n_layers == HP["n_layer"]


def test_openai_mismatches_name_what_was_found_and_expected(tmp_path):
    folder = tmp_path / "gpt2"
    shutil.copytree(OPENAI, folder)
    (folder / "hparams.json").write_text(json.dumps({**HP, "n_layer": 3}))
    with pytest.raises(ValueError, match=r"missing \['model/h2/ln_1/g'"):
        npgpt.load_pretrained(folder)
    (folder / "hparams.json").write_text(json.dumps({**HP, "n_embd": 16}))
    with pytest.raises(ValueError, match=r"model/wte \(npgpt wte\): expected shape \(321, 16\), got \(321, 8\)"):
        npgpt.load_pretrained(folder)
    (folder / "hparams.json").unlink()
    with pytest.raises(ValueError, match="found .*expected an OpenAI GPT-2 folder"):
        npgpt.load_pretrained(folder)


# ---- the tokenizer of an OpenAI folder ----

def bundled_ranks():
    return npgpt.get_tokenizer()._mergeable_ranks


def test_folder_tokenizer_is_gpt2s_cut_at_its_vocabulary():
    tok = load_tokenizer(OPENAI)
    n_mergeable = HP["n_vocab"] - 1
    assert tok._mergeable_ranks == {t: r for t, r in bundled_ranks().items() if r < n_mergeable}
    assert tok._special_tokens == {"<|endoftext|>": n_mergeable}
    # GPT-2's own ids: 'er' 263, ' the' 262, ' of' 286, ' m' 285, 'ou' 280
    assert tok.encode("Every effort moves you") == [36, 85, 263, 88, 304, 69, 69, 273, 83, 285, 78, 85, 274, 220,
                                                    88, 280]
    assert tok.encode("end of the story<|endoftext|>", allowed_special="all")[-4:] == [262, 264, 83, 273, 88, 320][-4:]


def test_full_size_tokenizer_files_give_the_bundled_gpt2_tokenizer(tmp_path, verdict_text):
    """encoder.json + vocab.bpe in OpenAI's format, rebuilt for all 50,000 merges: what the real
    files load into must be the bundled tokenizer, id for id."""
    sys.path.insert(0, str(FIXTURES))
    try:
        import make_openai_fixture as fx
    finally:
        sys.path.remove(str(FIXTURES))
    monkey = pytest.MonkeyPatch()
    monkey.setitem(fx.HPARAMS, "n_vocab", 50257)
    monkey.setattr(fx, "N_MERGES", 50000)
    try:
        fx.write_tokenizer(tmp_path)
    finally:
        monkey.undo()
    tok, bundled = load_tokenizer(tmp_path), npgpt.get_tokenizer()
    assert tok._mergeable_ranks == bundled._mergeable_ranks and tok._special_tokens == bundled._special_tokens
    assert tok.encode(verdict_text) == bundled.encode(verdict_text)


def write_openai_tokenizer(folder, encoder, merges):
    (folder / "encoder.json").write_text(json.dumps(encoder, ensure_ascii=False), encoding="utf-8")
    (folder / "vocab.bpe").write_text("\n".join(merges) + "\n", encoding="utf-8")


def fixture_tokenizer_files():
    """(encoder.json as a dict, vocab.bpe's lines, header first) of the OpenAI fixture."""
    return (json.loads((OPENAI / "encoder.json").read_text(encoding="utf-8")),
            (OPENAI / "vocab.bpe").read_text(encoding="utf-8").splitlines())


def test_tokenizer_files_rewritten_in_place_give_the_new_tokenizer(tmp_path, monkeypatch):
    """tiktoken's loader (data_gym_to_mergeable_bpe_ranks) caches the files by path, by default under
    /tmp/data-gym-cache, and so returned the first merges for files rewritten at the same path."""
    monkeypatch.delenv("TIKTOKEN_CACHE_DIR", raising=False)            # caching on, as for a user
    monkeypatch.delenv("DATA_GYM_CACHE_DIR", raising=False)
    encoder, merges = fixture_tokenizer_files()
    write_openai_tokenizer(tmp_path, encoder, merges)
    first = load_tokenizer(tmp_path)
    dropped = "".join(merges[-1].split())                              # the last merge's token, id 319
    encoder = {t: i for t, i in encoder.items() if t != dropped} | {"<|endoftext|>": encoder[dropped]}
    write_openai_tokenizer(tmp_path, encoder, merges[:-1])
    second = load_tokenizer(tmp_path)
    assert len(second._mergeable_ranks) == len(first._mergeable_ranks) - 1
    assert second._special_tokens == {"<|endoftext|>": HP["n_vocab"] - 2}
    word = first.decode([HP["n_vocab"] - 2])
    assert first.encode(word) == [HP["n_vocab"] - 2] and len(second.encode(word)) == 2


@pytest.mark.parametrize("damage, error", [
    (lambda e, m: (e, m[1:]), r"vocab.bpe: expected a '#version' line first"),
    (lambda e, m: (e, m + ["Ġt qqq"]), r"vocab.bpe line 66: expected a merge of two tokens of encoder.json"),
    (lambda e, m: (e, [m[0], m[2], m[1], *m[3:]]), r"vocab.bpe line 3: .* the merges must come in the order"),
    (lambda e, m: (e, m[:-1]), r"encoder.json: tokens \['.*'\] are made by no merge"),
    (lambda e, m: ({**e, "<|endoftext|>": 5}, m), r"encoder.json: the ids are not 0..320, each once"),
    (lambda e, m: ({**e, "a b": len(e)}, m), r"encoder.json: token 'a b' is not spelled in GPT-2's byte alphabet"),
])
def test_inconsistent_tokenizer_files_are_a_value_error_naming_the_file(tmp_path, damage, error):
    write_openai_tokenizer(tmp_path, *damage(*fixture_tokenizer_files()))
    with pytest.raises(ValueError, match=error):
        load_tokenizer(tmp_path)


# ---- Hugging Face ----

@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """A random tiny GPT2LMHeadModel saved by transformers, and renamed-key variants of its files."""
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import save_file
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=300, n_positions=16, n_embd=16, n_layer=2, n_head=4,
                                     bos_token_id=None, eos_token_id=None)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():                          # larger than GPT-2's init, so that logits differ
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    root = tmp_path_factory.mktemp("hf")
    model.save_pretrained(root / "saved")          # model.safetensors, names transformer.*
    model.save_pretrained(root / "sharded", max_shard_size="10KB")
    assert (root / "sharded" / "model.safetensors.index.json").is_file()
    state = model.state_dict()                     # what save_pretrained wrote as pytorch_model.bin before v5
    (root / "bin").mkdir()
    shutil.copy(root / "saved" / "config.json", root / "bin")
    torch.save(state, root / "bin" / "pytorch_model.bin")
    # the hub's openai-community/gpt2 layout: no transformer. prefix, attn.bias / masked_bias buffers
    hub = {k.removeprefix("transformer."): v.contiguous() for k, v in state.items() if k != "lm_head.weight"}
    for i in range(config.n_layer):
        hub[f"h.{i}.attn.bias"] = torch.tril(torch.ones(16, 16)).view(1, 1, 16, 16)
        hub[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    for name, write in (("hub", lambda d: save_file(hub, d / "model.safetensors", metadata={"format": "pt"})),
                        ("hub-bin", lambda d: torch.save(hub, d / "pytorch_model.bin",     # torch's old format
                                                         _use_new_zipfile_serialization=False))):
        (root / name).mkdir()
        shutil.copy(root / "saved" / "config.json", root / name)
        write(root / name)
    return transformers, model, root


@pytest.mark.parametrize("variant", ["saved", "sharded", "bin", "hub", "hub-bin", "saved/model.safetensors"])
@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_hf_weights_give_transformers_logits(hf, variant, backend):
    _, reference, root = hf
    model = npgpt.load_pretrained(root / variant, backend=backend).eval()
    assert model.cfg.tie_weights and model.cfg.n_heads == 4 and model.cfg.context_length == 16
    for ids in inputs(300, 16):
        with torch.no_grad():
            ref = reference(torch.from_numpy(ids)).logits.numpy()
        assert_close(f"{variant} logits {ids.shape}", model.logits(ids), ref, atol=LOGITS_ATOL)


def test_hf_config_npgpt_cannot_run_is_refused(hf, tmp_path):
    _, _, root = hf
    shutil.copytree(root / "saved", tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, "activation_function": "gelu"}))
    with pytest.raises(ValueError, match="activation_function is 'gelu'"):
        npgpt.load_pretrained(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, "n_positions": 32}))
    with pytest.raises(ValueError, match=r"transformer.wpe.weight \(npgpt wpe\): expected shape \(32, 16\), "
                                         r"got \(16, 16\)"):
        npgpt.load_pretrained(tmp_path / "m")


@pytest.mark.parametrize("source", ["openai", "untied-no-qkv-bias"])
def test_export_hf_loads_in_transformers_with_the_same_logits(hf, tmp_path, source):
    transformers, _, _ = hf
    if source == "openai":
        model = npgpt.load_pretrained(OPENAI).eval()
    else:                                          # the book's 124M shape: own head, no qkv bias
        cfg = npgpt.GPTConfig.preset("tiny", vocab_size=300, context_length=16, emb_dim=16)
        assert not cfg.tie_weights and not cfg.qkv_bias
        model = npgpt.build_model(cfg, seed=5).eval()
    npgpt.export_hf(model, tmp_path / "out")
    loaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "out").eval()
    tied = loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()
    assert tied == model.cfg.tie_weights
    for ids in inputs(model.cfg.vocab_size, 16):
        with torch.no_grad():
            ref = loaded(torch.from_numpy(ids)).logits.numpy()
        assert_close(f"{source} logits {ids.shape}", model.logits(ids), ref, atol=LOGITS_ATOL)
    back = npgpt.load_pretrained(tmp_path / "out").params()           # and npgpt reads it back exactly
    for name, p in model.params().items():
        assert np.array_equal(back[name], p), name


# ---- the book's .pth ----

@pytest.mark.parametrize("qkv_bias, emb_dim, n_heads", [(False, 32, 2), (True, 128, None)])
@pytest.mark.parametrize("wrapped", [False, True])
def test_book_state_dict_gives_the_books_logits(book, tmp_path, qkv_bias, emb_dim, n_heads, wrapped):
    GPTModel, _ = book
    torch.manual_seed(1)
    cfg = book_cfg(qkv_bias=qkv_bias, emb_dim=emb_dim)
    gpt = GPTModel(cfg).eval()
    state = gpt.state_dict()
    assert "trf_blocks.0.att.mask" in state                    # real files carry the mask buffer
    if wrapped:                                               # the book's model_and_optimizer.pth
        opt = torch.optim.AdamW(gpt.parameters(), lr=5e-4, weight_decay=0.1)
        state = {"model_state_dict": state, "optimizer_state_dict": opt.state_dict()}
    torch.save(state, tmp_path / "model.pth")
    model = npgpt.load_pretrained(tmp_path / "model.pth", n_heads=n_heads).eval()
    assert model.cfg.n_heads == 2 and model.cfg.qkv_bias == qkv_bias and not model.cfg.tie_weights
    for ids in inputs(300, 16):
        with torch.no_grad():
            ref = gpt(torch.from_numpy(ids)).numpy()
        assert_close(f"logits {ids.shape}", model.logits(ids), ref, atol=LOGITS_ATOL)


def test_book_state_dict_without_head_count_or_with_a_wrong_shape(tmp_path):
    gpt = BookGPT(book_cfg(emb_dim=32))
    torch.save(gpt.state_dict(), tmp_path / "model.pth")
    with pytest.raises(ValueError, match="pass n_heads"):
        npgpt.load_pretrained(tmp_path / "model.pth")
    state = gpt.state_dict()
    state["trf_blocks.1.ff.layers.0.weight"] = torch.zeros(32, 128)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"trf_blocks.1.ff.layers.0.weight \(npgpt h.1.mlp.c_fc.weight\): "
                                         r"expected shape \(128, 32\), got \(32, 128\)"):
        npgpt.load_pretrained(tmp_path / "bad.pth", n_heads=2)


class Payload:
    """Any class: torch.load(weights_only=True) must refuse to build it."""


def test_pickled_objects_are_refused_not_run(tmp_path):
    torch.save({"tok_emb.weight": torch.zeros(3, 2), "extra": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="weights_only"):
        npgpt.load_pretrained(tmp_path / "evil.pth")


# ---- npgpt's own file, detection, memory ----

def test_npgpt_checkpoint_loads_as_pretrained_in_any_dtype(tmp_path):
    model = npgpt.build_model(npgpt.GPTConfig.preset("tiny", vocab_size=300, context_length=16), dtype="float64")
    npgpt.save_checkpoint(tmp_path / "m.h5", model)
    assert detect_format(tmp_path / "m.h5") == "npgpt"
    same = npgpt.load_pretrained(tmp_path / "m.h5", dtype="float64")
    for name, p in model.params().items():
        assert np.array_equal(same.params()[name], p), name
    f32 = npgpt.load_pretrained(tmp_path / "m.h5", backend="torch")
    assert np.array_equal(f32.params()["wte"], model.params()["wte"].astype(np.float32))


def test_unknown_input_is_a_value_error_that_lists_the_files(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match=r"found \['notes.txt'\]\); expected an OpenAI GPT-2 folder"):
        npgpt.load_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not a weight file"):
        npgpt.load_pretrained(tmp_path / "notes.txt")
    with pytest.raises(FileNotFoundError):
        npgpt.load_pretrained(tmp_path / "missing.safetensors")


@pytest.mark.parametrize("fmt", ["safetensors", "h5"])
def test_loading_holds_one_copy_of_the_weights(tmp_path, fmt):
    """Peak memory of load_pretrained (NumPy allocations, tracked by tracemalloc): the model's own
    parameter and gradient buffers, and not a second copy of the weights."""
    cfg = npgpt.GPTConfig.preset("tiny", n_layers=6)
    model = npgpt.build_model(cfg)
    path = tmp_path / f"m.{fmt}"
    if fmt == "h5":
        npgpt.save_checkpoint(path, model)
    else:
        from npgpt.weights.export import save_safetensors
        save_safetensors(model, path)
    weights = npgpt.num_params(cfg) * 4
    del model
    tracemalloc.start()
    try:
        loaded = npgpt.load_pretrained(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # flat_params + flat_grads (2 x weights), one tensor in flight at most (wte: 49% of this model)
    assert peak < 2 * weights + 0.6 * weights, f"peak {peak / weights:.2f} x the weights' size"
    assert loaded.cfg == cfg


def test_safetensors_writer_is_read_by_the_safetensors_package(tmp_path):
    from safetensors.numpy import load_file
    tensors = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(5, np.float64),
               "c": np.zeros((0, 4), np.float32)}
    write_safetensors(tmp_path / "t.safetensors", tensors, {"format": "pt"})
    back = load_file(tmp_path / "t.safetensors")
    assert sorted(back) == sorted(tensors)
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and np.array_equal(back[name], t)


# ---- the command line ----

def test_cli_convert_between_formats(tmp_path):
    ref = npgpt.load_pretrained(OPENAI).params()
    for out in ("m.h5", "m.safetensors", "hf"):
        assert main(["convert", str(OPENAI), str(tmp_path / out)]) == 0
        back = npgpt.load_pretrained(tmp_path / out)
        assert back.cfg == npgpt.load_pretrained(OPENAI).cfg
        for name, p in ref.items():
            assert np.array_equal(back.params()[name], p), (out, name)
    assert (tmp_path / "hf" / "vocab.json").read_bytes() == (OPENAI / "encoder.json").read_bytes()
    assert load_tokenizer(tmp_path / "hf")._mergeable_ranks == load_tokenizer(OPENAI)._mergeable_ranks


def book_fixture_model():
    gpt = BookGPT({"vocab_size": HP["n_vocab"], "context_length": HP["n_ctx"], "emb_dim": HP["n_embd"],
                   "n_heads": HP["n_head"], "n_layers": HP["n_layer"], "drop_rate": 0.1, "qkv_bias": True}).eval()
    book_load_weights_into_gpt(gpt, book_params_from_tf_values(np.load(TF_VALUES), HP["n_layer"]))
    return gpt


def test_cli_generate_greedy_from_the_openai_folder(capsys):
    prompt = "Every effort moves you"
    assert main(["generate", "--pretrained", str(OPENAI), "--prompt", prompt, "--max-new-tokens", "6",
                 "--temperature", "0"]) == 0
    out = capsys.readouterr().out.rstrip("\n")
    gpt, tok = book_fixture_model(), load_tokenizer(OPENAI)
    ids = tok.encode(prompt)[-HP["n_ctx"]:]
    for _ in range(6):
        with torch.no_grad():
            ids.append(int(gpt(torch.tensor([ids[-HP["n_ctx"]:]]))[0, -1].argmax()))
    assert out == tok.decode(ids)


def test_cli_eval_reports_loss_and_perplexity_of_every_window(capsys, verdict_text):
    assert main(["eval", "--pretrained", str(OPENAI)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    got = {m.group(1): (float(m.group(2)), float(m.group(3)))
           for m in map(re.compile(r"^(train|val) loss (\d+\.\d{4})  perplexity (\d+\.\d{2})$").match, lines)}
    gpt, tok = book_fixture_model(), load_tokenizer(OPENAI)
    # the book's settings: windows of 256 (here the context, 16) with stride = length, batch 2, ratio 0.9
    loaders = npgpt.make_loaders(verdict_text, tok, batch_size=2, max_length=HP["n_ctx"], stride=HP["n_ctx"])
    for name, loader in zip(("train", "val"), loaders):
        losses = []
        with torch.no_grad():
            for x, y in loader:
                logits = gpt(torch.from_numpy(x))                                       # (B, T, V)
                targets = torch.from_numpy(y).flatten()
                losses.append(torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets).item())
        assert got[name][0] == pytest.approx(sum(losses) / len(losses), abs=1e-4), name
        assert got[name][1] == pytest.approx(math.exp(got[name][0]), rel=1e-3)


def test_cli_refuses_a_tokenizer_larger_than_the_model(tmp_path, capsys):
    assert main(["convert", str(OPENAI), str(tmp_path / "m.h5")]) == 0       # the .h5 has no tokenizer
    assert main(["generate", "--pretrained", str(tmp_path / "m.h5"), "--prompt", "Hi"]) == 2
    assert "321 token embeddings" in capsys.readouterr().err
