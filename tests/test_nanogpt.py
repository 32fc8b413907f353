"""nanoGPT's files into npgpt, and the bias=False architecture on the torch side.

The reference is nanoGPT's GPT written out again here from its published model.py layout (nn.Linear
weights (out, in), a LayerNorm whose bias is optional, a tied head, names transformer.wte.weight,
transformer.h.N.attn.c_attn.weight, ..., lm_head.weight); its files are made with torch.save the
way nanoGPT's train.py writes ckpt.pt: {"model", "optimizer", "model_args", "iter_num",
"best_val_loss", "config"}, names prefixed "_orig_mod." after torch.compile. One difference is kept
out on purpose: nanoGPT's MLP uses nn.GELU() (erf), GPT-2 and npgpt the tanh form, so the reference
takes GELU's form as an argument and the exact comparisons use tanh's.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

import npgpt
from npgpt.cli import main
from npgpt.data.shards import TokenDir
from npgpt.weights.checkpoint import read_checkpoint
from npgpt.weights.pretrained import detect_format
from parity.helpers import assert_close

torch = pytest.importorskip("torch")
nn, F = torch.nn, torch.nn.functional


class LayerNorm(nn.Module):            # nanoGPT's: nn.LayerNorm with an optional bias
    def __init__(self, C, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(C))
        self.bias = nn.Parameter(torch.zeros(C)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class Block(nn.Module):
    def __init__(self, C, NH, bias, gelu):
        super().__init__()
        self.NH, self.gelu = NH, gelu
        self.ln_1, self.ln_2 = LayerNorm(C, bias), LayerNorm(C, bias)
        self.attn = nn.Module()
        self.attn.c_attn, self.attn.c_proj = nn.Linear(C, 3 * C, bias=bias), nn.Linear(C, C, bias=bias)
        self.mlp = nn.Module()
        self.mlp.c_fc, self.mlp.c_proj = nn.Linear(C, 4 * C, bias=bias), nn.Linear(4 * C, C, bias=bias)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.attn.c_attn(self.ln_1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.NH, C // self.NH).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(C // self.NH)
        att = att.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
        x = x + self.attn.c_proj((att @ v).transpose(1, 2).reshape(B, T, C))
        return x + self.mlp.c_proj(F.gelu(self.mlp.c_fc(self.ln_2(x)), approximate=self.gelu))


class NanoGPT(nn.Module):
    def __init__(self, a, gelu="tanh"):
        super().__init__()
        C = a["n_embd"]
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(a["vocab_size"], C), wpe=nn.Embedding(a["block_size"], C),
            h=nn.ModuleList(Block(C, a["n_head"], a["bias"], gelu) for _ in range(a["n_layer"])),
            ln_f=LayerNorm(C, a["bias"])))
        self.lm_head = nn.Linear(C, a["vocab_size"], bias=False)
        self.lm_head.weight = self.transformer.wte.weight               # tied, as nanoGPT's
        torch.manual_seed(0)
        with torch.no_grad():
            for p in self.parameters():
                p.normal_(0.0, 0.3)

    def forward(self, idx):
        x = self.transformer.wte(idx) + self.transformer.wpe(torch.arange(idx.shape[1]))
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x))


def model_args(bias, n_embd=32, n_head=4):
    return dict(n_layer=2, n_head=n_head, n_embd=n_embd, block_size=16, bias=bias, vocab_size=300, dropout=0.0)


def save_ckpt(path, ref, args, compiled=False):
    """ckpt.pt as nanoGPT's train.py saves it, its AdamW state included."""
    opt = torch.optim.AdamW(ref.parameters(), lr=6e-4, betas=(0.9, 0.95))
    ref(torch.zeros(1, 4, dtype=torch.long)).sum().backward()
    opt.step()
    state = {("_orig_mod." if compiled else "") + k: v for k, v in ref.state_dict().items()}
    torch.save({"model": state, "optimizer": opt.state_dict(), "model_args": args, "iter_num": 2000,
                "best_val_loss": torch.tensor(3.1), "config": {"dataset": "openwebtext", "bias": args["bias"]}},
               path)


def ids(seed=0):
    return np.random.default_rng(seed).integers(0, 300, (2, 16))


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("compiled", [False, True])
def test_ckpt_pt_gives_nanogpts_logits(tmp_path, capsys, bias, compiled):
    args = model_args(bias)
    ref = NanoGPT(args).double()
    save_ckpt(tmp_path / "ckpt.pt", ref, args, compiled)
    assert detect_format(tmp_path / "ckpt.pt") == "nanogpt"
    model = npgpt.load_pretrained(tmp_path / "ckpt.pt", backend="torch", dtype="float64").eval()
    assert model.cfg.bias is bias and model.cfg.qkv_bias is bias and model.cfg.tie_weights
    assert (model.cfg.n_layers, model.cfg.n_heads, model.cfg.emb_dim, model.cfg.context_length) == (2, 4, 32, 16)
    assert len(model.params()) == (28 if bias else 15)       # 6 biases a block (LayerNorm, Linear), ln_f's
    with torch.no_grad():
        expected = ref(torch.from_numpy(ids())).numpy()
    assert_close("logits", model.logits(ids()), expected, atol=1e-10)
    err = capsys.readouterr().err
    assert "nanoGPT checkpoint at iter_num 2000" in err and "optimizer state and iteration count are not" in err


def test_erf_gelu_of_nanogpt_differs_from_gpt2s_tanh_by_little(tmp_path):
    """What a user moving from nanoGPT should know: its MLP's exact GELU and GPT-2's tanh form give
    logits that differ by about 1e-3 on these weights, not bit for bit."""
    args = model_args(False)
    ref = NanoGPT(args, gelu="none").double()
    save_ckpt(tmp_path / "ckpt.pt", ref, args)
    model = npgpt.load_pretrained(tmp_path / "ckpt.pt", backend="torch", dtype="float64").eval()
    with torch.no_grad():
        expected = ref(torch.from_numpy(ids())).numpy()
    gap = np.abs(model.logits(ids()) - expected).max()
    assert 1e-6 < gap < 0.1


def test_bare_state_dict_is_told_from_hugging_faces_by_shape(tmp_path):
    args = model_args(False, n_embd=128, n_head=2)
    ref = NanoGPT(args).double()
    torch.save(ref.state_dict(), tmp_path / "model.pt")
    assert detect_format(tmp_path / "model.pt") == "nanogpt"
    with pytest.raises(ValueError, match="n_embd 32 is not a multiple of 64"):
        small = NanoGPT(model_args(False))
        torch.save(small.state_dict(), tmp_path / "small.pt")
        npgpt.load_pretrained(tmp_path / "small.pt")
    model = npgpt.load_pretrained(tmp_path / "model.pt", backend="torch", dtype="float64", n_heads=2).eval()
    assert not model.cfg.bias and model.cfg.drop_rate == 0.0 and model.cfg.n_heads == 2
    with torch.no_grad():
        expected = ref(torch.from_numpy(ids())).numpy()
    assert_close("logits", model.logits(ids()), expected, atol=1e-10)


def test_torch_bias_false_trains_like_the_reference(tmp_path):
    """Gradients of npgpt's bias=False torch model equal autograd's through the reference module."""
    args = model_args(False)
    ref = NanoGPT(args).double()
    torch.save(ref.state_dict(), tmp_path / "m.pt")
    model = npgpt.load_pretrained(tmp_path / "m.pt", backend="torch", dtype="float64", n_heads=4)
    x, y = ids(1), ids(2)
    loss, grads = model.loss_and_grads(x, y)
    logits = ref(torch.from_numpy(x))
    ref_loss = F.cross_entropy(logits.flatten(0, 1), torch.from_numpy(y).flatten())
    ref_loss.backward()
    assert abs(loss - ref_loss.item()) < 1e-12
    named = dict(ref.named_parameters())
    assert_close("wte grad", grads["wte"], named["transformer.wte.weight"].grad.numpy(), atol=1e-12, rtol=1e-9)
    assert_close("c_fc grad", grads["h.1.mlp.c_fc.weight"],
                 named["transformer.h.1.mlp.c_fc.weight"].grad.numpy(), atol=1e-12, rtol=1e-9)


def test_bias_field_defaults_true_for_configs_saved_before_it():
    old = npgpt.GPTConfig.preset("gpt2-small").to_dict()
    del old["bias"]
    assert npgpt.GPTConfig.from_dict(old).bias is True
    with pytest.raises(ValueError, match="qkv_bias=True needs bias=True"):
        npgpt.GPTConfig.preset("gpt2-small", bias=False)
    names = npgpt.param_shapes(npgpt.GPTConfig.preset("tiny", bias=False))
    assert not [n for n in names if n.endswith(".bias")] and "wte" in names and "wpe" in names


def test_bias_false_checkpoint_and_hf_export_round_trip(tmp_path):
    cfg = npgpt.GPTConfig.preset("tiny", vocab_size=300, context_length=16, bias=False, tie_weights=True)
    model = npgpt.build_model(cfg, backend="torch", seed=3)
    npgpt.save_checkpoint(tmp_path / "m.h5", model)
    back, _, _ = npgpt.load_checkpoint(tmp_path / "m.h5", backend="torch")
    assert back.cfg == cfg
    npgpt.export_hf(model, tmp_path / "hf")               # GPT-2's format: zeros for the biases
    again = npgpt.load_pretrained(tmp_path / "hf", backend="torch")
    x = ids()
    assert_close("logits via HF", again.logits(x), model.logits(x), atol=1e-5)


def test_cli_convert_and_init_from_read_a_ckpt_pt_and_resume_refuses_it(tmp_path, capsys):
    args = model_args(False)
    save_ckpt(tmp_path / "ckpt.pt", NanoGPT(args), args, compiled=True)
    assert main(["convert", str(tmp_path / "ckpt.pt"), str(tmp_path / "m.h5")]) == 0
    assert "its optimizer state and iteration count are not" in capsys.readouterr().err
    assert npgpt.load_pretrained(tmp_path / "m.h5").cfg.bias is False
    assert main(["train", "--resume", str(tmp_path / "ckpt.pt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nanoGPT's ckpt.pt, not an npgpt checkpoint" in err[0]
    assert f"--init-from {tmp_path / 'ckpt.pt'}" in err[0]


def test_meta_pkl_beside_train_bin_is_refused_unread(tmp_path, capsys):
    np.arange(500, dtype=np.uint16).tofile(tmp_path / "train.bin")
    np.arange(300, dtype=np.uint16).tofile(tmp_path / "val.bin")
    (tmp_path / "meta.pkl").write_bytes(b"not a pickle at all")      # unpickling it would fail otherwise
    with pytest.raises(ValueError, match="meta.pkl: nanoGPT's character-level vocabulary"):
        TokenDir(tmp_path)
    assert main(["train", "--data", str(tmp_path), "--max-steps", "1", "--preset", "tiny"]) == 2
    assert "character-level vocabulary" in capsys.readouterr().err


def test_train_no_bias_flag_trains_and_saves_the_shape(tmp_path, capsys):
    (tmp_path / "t.txt").write_text("Every effort moves you forward, one small step at a time. " * 12)
    assert main(["train", "--backend", "torch", "--preset", "tiny", "--no-bias", "--data", str(tmp_path / "t.txt"),
                 "--epochs", "1", "--max-length", "16", "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    assert "--no-bias" in capsys.readouterr().err
    cfg = npgpt.load_checkpoint(tmp_path / "run" / "checkpoint.h5", backend="torch")[0].cfg
    assert cfg.bias is False and not [n for n in npgpt.param_shapes(cfg) if n.endswith(".bias")]
    assert main(["train", "--backend", "torch", "--preset", "gpt2-small", "--no-bias"]) == 2
    assert "--no-bias needs --no-qkv-bias" in capsys.readouterr().err


def test_init_from_a_ckpt_pt_starts_a_new_run_from_its_weights(tmp_path, capsys):
    args = {**model_args(False), "vocab_size": 50304}                 # nanoGPT's padded vocabulary
    ref = NanoGPT(args)
    save_ckpt(tmp_path / "ckpt.pt", ref, args, compiled=True)
    (tmp_path / "t.txt").write_text("Every effort moves you forward, one small step at a time. " * 12)
    assert main(["train", "--backend", "torch", "--init-from", str(tmp_path / "ckpt.pt"), "--data",
                 str(tmp_path / "t.txt"), "--epochs", "1", "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "nanoGPT checkpoint at iter_num 2000" in err and "--vocab-size 50304 --no-qkv-bias --no-bias" in err
    ckpt = read_checkpoint(tmp_path / "run" / "checkpoint.h5")
    assert ckpt["optimizer"]["step"] >= 1 and ckpt["config"].bias is False
