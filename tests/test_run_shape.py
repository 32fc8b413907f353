"""`npgpt train`'s model shape and starting point: the shape flags over a preset, --init-from
pretrained weights with a new optimizer and schedule, evaluation in --grad-accum micro-batches,
a resume that keeps the torch options and accepts another number of processes with the same
windows a step, and `npgpt eval`'s defaults from the checkpoint. Every refusal is one line, exit
code 2, before a model is built."""
import struct
from array import array
from pathlib import Path

import h5py
import numpy as np
import pytest

import npgpt
from npgpt.cli import main
from npgpt.weights.checkpoint import read_checkpoint
from npgpt.weights.pretrained import load_tokenizer

FIXTURE = Path(__file__).parent / "fixtures" / "openai-tiny"          # n_vocab 321, n_ctx 16, C 8, 2 heads, 2 layers
pytestmark = pytest.mark.usefixtures("one_thread")   # see conftest.py


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """An llm.c-format folder: 600 val and 3,000 train tokens below 1,000."""
    folder = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(7)
    for name, n in (("s_val_000000.bin", 600), ("s_train_000001.bin", 3000)):
        tokens = rng.integers(0, 1000, n).tolist()
        (folder / name).write_bytes(struct.pack("<256i", 20240520, 1, n, *[0] * 253) + array("H", tokens).tobytes())
    return folder


def train(shards, out, *extra):
    return main(["train", "--data", str(shards), "--max-steps", "3", "--eval-every", "2", "--eval-iter", "1",
                 "--batch-size", "2", "--max-length", "8", "--no-progress", "--out", str(out), *extra])


def refused(capsys, argv, *words):
    """argv exits 2 with one line naming each of words."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and all(w in err[0] for w in words), err
    return err[0]


@pytest.fixture
def no_build(monkeypatch):
    """Fail the test if a model is built or loaded."""
    def boom(*a, **k):
        raise AssertionError("a model was built before the options were checked")
    for name in ("build_model", "load_checkpoint"):
        monkeypatch.setattr(npgpt, name, boom)
    monkeypatch.setattr("npgpt.weights.pretrained.load_pretrained", boom)


def test_the_shape_flags_override_the_preset(shards, tmp_path, capsys):
    out = tmp_path / "run"
    assert train(shards, out, "--preset", "tiny", "--n-layer", "3", "--n-head", "4", "--n-embd", "16",
                 "--context-length", "32", "--vocab-size", "50304", "--qkv-bias", "--tie-weights",
                 "--drop-rate", "0.05") == 0
    err = capsys.readouterr().err
    assert ("--n-layer 3 --n-head 4 --n-embd 16 --context-length 32 --vocab-size 50304 --qkv-bias "
            "--bias --tie-weights --drop-rate 0.05") in err
    with h5py.File(out / "checkpoint.h5") as f:                       # shapes as h5py reads them
        shapes = {name: f["params"][name].shape for name in f["params"]}
    assert shapes["wte"] == (50304, 16) and shapes["wpe"] == (32, 16)
    assert shapes["h.2.attn.c_attn.bias"] == (48,) and "h.3.ln_1.weight" not in shapes
    assert "lm_head.weight" not in shapes                             # tied to wte
    ckpt = read_checkpoint(out / "checkpoint.h5")
    assert ckpt["config"].drop_rate == 0.05 and ckpt["config"].emb_init_std == 1.0     # the rest: tiny's


def test_the_book_shape_flags_turn_gpt2s_features_off(shards, tmp_path):
    out = tmp_path / "run"
    assert train(shards, out, "--preset", "tiny", "--n-embd", "8", "--vocab-size", "50257", "--no-qkv-bias",
                 "--no-tie-weights") == 0
    with h5py.File(out / "checkpoint.h5") as f:
        assert "lm_head.weight" in f["params"] and "h.0.attn.c_attn.bias" not in f["params"]


def test_a_sample_of_a_padded_vocabulary_marks_the_padded_ids(monkeypatch, capsys):
    """The padded rows (ids 50257 ..) decode to no text: the sample shows U+FFFD for each."""
    from npgpt.training import loop
    tok = npgpt.get_tokenizer()
    ids = tok.encode("Every effort") + [50300, 50301] + tok.encode(" moves")
    monkeypatch.setattr(loop, "generate", lambda model, idx, **kw: np.array([ids]))
    model = type("M", (), {"cfg": npgpt.GPTConfig(vocab_size=50304)})()
    loop.generate_and_print_sample(model, tok, "Every")
    assert capsys.readouterr().out == "Every effort\ufffd\ufffd moves\n"


@pytest.mark.parametrize("extra, words", [
    (["--n-embd", "30", "--n-head", "4"], ["--n-embd 30", "--n-head 4", "divisible"]),
    (["--n-embd", "31"], ["--n-embd 31", "--n-head 2", "divisible", "preset tiny"]),
    (["--vocab-size", "1000"], ["--vocab-size 1000", "50257"]),
    (["--n-layer", "0"], ["--n-layer", "positive", "0"]),
    (["--drop-rate", "1.5"], ["--drop-rate", "1.5"]),
    (["--context-length", "4"], ["--max-length 8", "context length 4"]),
    (["--batch-size", "4", "--tokens-per-step", "100"], ["--tokens-per-step 100", "--batch-size 4",
                                                         "--max-length 8", "32 tokens"]),
    (["--batch-size", "4", "--tokens-per-step", "64", "--grad-accum", "3"], ["--grad-accum 3", "2 micro-batches"]),
    (["--init-from", str(FIXTURE), "--n-embd", "16"], ["--n-embd 16", "openai-tiny", "emb_dim 8"]),
    (["--init-from", str(FIXTURE), "--no-tie-weights"], ["--no-tie-weights:", "tie_weights on"]),
])
def test_a_bad_shape_is_refused_before_a_model_is_built(shards, tmp_path, capsys, no_build, extra, words):
    argv = ["train", "--preset", "tiny", "--data", str(shards), "--max-steps", "3", "--max-length", "8",
            "--out", str(tmp_path / "run"), *extra]
    if "--init-from" in extra:                                        # the weights give the shape
        argv.remove("--preset"), argv.remove("tiny")
    refused(capsys, argv, *words)
    assert not (tmp_path / "run").exists()


def test_init_from_refuses_a_preset_of_another_shape_and_a_resume(shards, tmp_path, capsys, no_build):
    base = ["train", "--data", str(shards), "--max-steps", "3", "--out", str(tmp_path / "run"),
            "--init-from", str(FIXTURE)]
    refused(capsys, [*base, "--preset", "gpt2-small"], "--preset gpt2-small", "openai-tiny")
    refused(capsys, [*base, "--resume", str(tmp_path / "x.h5")], "--init-from", "--resume", "one of them")


def test_init_from_starts_from_the_weights_with_a_new_optimizer(verdict_start, tmp_path):
    """lr 0 leaves the weights as loaded (AdamW's update and decay both scale with lr): the saved
    parameters are the fixture's, read by npgpt's loader; the optimizer has taken this run's steps
    only, the dropout is the flag's, the rest of the shape the weights'; the text is cut by the
    tokenizer beside them (ids below its 321)."""
    out = tmp_path / "run"
    text = verdict_start(3000)
    assert main(["train", "--init-from", str(FIXTURE), "--data", str(text), "--epochs", "1", "--batch-size", "2",
                 "--lr", "0", "--drop-rate", "0.2", "--eval-freq", "100", "--no-progress", "--out", str(out)]) == 0
    loaded = npgpt.load_pretrained(FIXTURE)
    ckpt = read_checkpoint(out / "checkpoint.h5")
    assert ckpt["config"] == npgpt.GPTConfig(**{**loaded.cfg.to_dict(), "drop_rate": 0.2})
    steps = ckpt["state"].global_step + 1
    assert steps > 0 and ckpt["optimizer"]["step"] == steps and ckpt["run"]["init_from"] == str(FIXTURE)
    for name, p in loaded.params().items():
        np.testing.assert_array_equal(ckpt["params"][name], p, err_msg=name)
    loaders = {name: npgpt.make_loaders(text.read_text(), tok, batch_size=2, max_length=16, stride=16)[0]
               for name, tok in (("fixture", load_tokenizer(FIXTURE)), ("gpt2", npgpt.get_tokenizer()))}
    assert steps == len(loaders["fixture"]) != len(loaders["gpt2"])


def test_the_finetune_config_runs_from_the_weights_it_is_given(tmp_path, verdict_start):
    config = Path(__file__).parent.parent / "configs" / "finetune-gpt2.toml"
    out = tmp_path / "ft"
    assert main(["train", "--config", str(config), "--init-from", str(FIXTURE), "--data", str(verdict_start(3000)),
                 "--epochs", "1", "--max-length", "16", "--no-progress", "--out", str(out)]) == 0
    ckpt = read_checkpoint(out / "checkpoint.h5")
    assert ckpt["config"].emb_dim == 8 and ckpt["optimizer"]["lr"] == 3e-5


def test_evaluation_runs_in_micro_batches(monkeypatch):
    """With grad_accum 4 the torch module never sees more than a micro-batch, in eval as in training,
    and the loss is the whole batch's (float64)."""
    cfg = npgpt.GPTConfig.preset("tiny")
    whole = npgpt.build_model(cfg, backend="torch", dtype="float64", device="cpu")
    micro = npgpt.build_model(cfg, backend="torch", dtype="float64", device="cpu", grad_accum=4)
    seen = []
    micro.module.register_forward_pre_hook(lambda module, args: seen.append(len(args[0])))
    x = np.random.default_rng(0).integers(0, cfg.vocab_size, (8, 16))
    assert micro.loss(x[:, :-1], x[:, 1:]) == pytest.approx(whole.loss(x[:, :-1], x[:, 1:]), rel=1e-12)
    x7 = x[:7]                                                        # a last, smaller val batch: 2 + 2 + 2 + 1
    assert micro.loss(x7[:, :-1], x7[:, 1:]) == pytest.approx(whole.loss(x7[:, :-1], x7[:, 1:]), rel=1e-12)
    assert seen == [2, 2, 2, 2, 2, 2, 2, 1]
    seen.clear()
    micro.train_step(x[:, :-1], x[:, 1:], npgpt.AdamW(micro))
    assert seen == [2, 2, 2, 2]


def test_a_resume_keeps_the_torch_options(shards, tmp_path, capsys):
    out = tmp_path / "run"
    assert train(shards, out, "--preset", "tiny", "--backend", "torch", "--batch-size", "4", "--grad-accum", "2") == 0
    capsys.readouterr()
    assert main(["train", "--resume", str(out / "checkpoint.h5"), "--max-steps", "4", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "npgpt: torch backend" in err and "--grad-accum 2" in err and "--batch-size 4" in err
    assert main(["train", "--resume", str(out / "checkpoint.h5"), "--max-steps", "5", "--no-progress",
                 "--grad-accum", "4"]) == 0
    err = capsys.readouterr().err
    assert "--grad-accum 4 (saved: 2)" in err
    ckpt = read_checkpoint(out / "checkpoint.h5")
    assert ckpt["run"]["grad_accum"] == 4 and ckpt["run"]["backend"] == "torch"
    assert ckpt["run"]["batch_size"] == 2 and "--batch-size 2 (saved: 4)" in err       # 8 windows a step still


def test_a_resume_on_another_number_of_processes_keeps_the_windows_of_a_step(shards, tmp_path, capsys, monkeypatch):
    """Saved by 2 processes x batch 2; resumed by 1 process it takes batch 4 (the same 4 windows of
    each step), by 4 processes batch 1; 3 processes cannot share 4 windows, and a text run refuses."""
    from npgpt.cli.resolve import resolve
    from npgpt.cli import build_parser
    out = tmp_path / "run"
    assert train(shards, out, "--preset", "tiny") == 0
    with h5py.File(out / "checkpoint.h5", "r+") as f:                 # as if 2 torchrun ranks had saved it
        import json
        from npgpt.weights.checkpoint import _digest
        run = json.loads(f["train_state"].attrs["run"])
        f["train_state"].attrs["run"] = np.bytes_(json.dumps({**run, "world_size": 2}))
        f.attrs["checksum"] = _digest(f)

    def resolved(world, *extra):
        monkeypatch.setenv("RANK", "0")
        monkeypatch.setenv("WORLD_SIZE", str(world))
        settings = resolve(build_parser().parse_args(["train", "--resume", str(out / "checkpoint.h5"), "--max-steps", "4", *extra]), {})
        return settings.batch_size, settings.grad_accum, settings.world_size
    # (micro-batch, accumulation, processes): 4 windows a step however many processes share them
    assert resolved(1) == (2, 2, 1) and resolved(4) == (1, 1, 4) and resolved(2) == (2, 1, 2)
    assert resolved(1, "--grad-accum", "4") == (1, 4, 1) and resolved(1, "--batch-size", "4") == (4, 1, 1)
    with pytest.raises(ValueError, match="3 processes cannot share equally"):
        resolved(3)
    with pytest.raises(ValueError, match="= 4 windows a step, 4 on each of 1 process.*product is 4"):
        resolved(1, "--batch-size", "3")
    with pytest.raises(ValueError, match="--tokens-per-step 64: .* = 32 tokens a step; a resumed run must see"):
        resolved(1, "--tokens-per-step", "64")


def test_npgpt_eval_defaults_to_the_checkpoints_context_and_backend(shards, tmp_path, capsys):
    out = tmp_path / "run"
    assert train(shards, out, "--preset", "tiny", "--backend", "torch", "--context-length", "32") == 0
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(out / "checkpoint.h5"), "--data", str(shards)]) == 0
    captured = capsys.readouterr()
    assert "on the torch backend, windows of 32 tokens (stride 32), batch 2" in captured.err
    assert main(["eval", "--checkpoint", str(out / "checkpoint.h5"), "--data", str(shards), "--backend", "torch",
                 "--max-length", "32"]) == 0
    assert capsys.readouterr().out == captured.out
