"""The configs that say they are llm.c's or nanoGPT's recipe are: each is read and resolved as `npgpt train`
resolves it (under torchrun's 8 processes where the recipe runs 8), and the run's settings checked
against the values those projects publish, written here from their files:
  llm.c   scripts/run_gpt2_124M.sh: mpirun -np 8 ./train_gpt2cu -v 250 -s 20000 -g 144 -h 1 -b 64 -t 1024
          -d 524288 -r 0 -z 1 -c 0.1 -l 0.0006 -q 0.0 -u 700 -n 5000 -y 1 -e "d12"; 18,865 steps; Vp 50,304
  nanoGPT train.py's defaults under config/train_gpt2.py (torchrun, 8 processes): batch_size 12, block_size
          1024, gradient_accumulation_steps 5 * 8, max_iters = lr_decay_iters = 600000, warmup_iters 2000,
          learning_rate 6e-4, min_lr 6e-5, weight_decay 0.1, beta1 0.9, beta2 0.95, grad_clip 1.0,
          dropout 0.0, bias False, vocab 50304, eval_interval 1000, eval_iters 200
  nanoGPT config/finetune_shakespeare.py: init_from 'gpt2-xl', batch_size 1, gradient_accumulation_steps
          32, max_iters 20, learning_rate 3e-5, decay_lr False, eval_interval 5, eval_iters 40, dropout 0.0
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import npgpt
from npgpt.cli import build_parser, config_file
from npgpt.cli.resolve import resolve

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def resolved(name, data, world=1, monkeypatch=None):
    """The run's settings as npgpt train resolves them from the config file and --data."""
    if world > 1:
        monkeypatch.setenv("RANK", "0")
        monkeypatch.setenv("WORLD_SIZE", str(world))
    parser = build_parser()
    args = parser.parse_args(["train", "--config", str(CONFIGS / name), "--data", str(data)])
    return resolve(args, config_file.load_config(CONFIGS / name, parser.subcommands["train"]))


def shards(folder):
    from npgpt.data.shards import write_shard
    folder.mkdir()
    write_shard(folder / "fineweb_val_000000.bin", np.arange(3000) % 50257)
    write_shard(folder / "fineweb_train_000001.bin", np.arange(9000) % 50257)
    return folder


def nanogpt_data(folder):
    folder.mkdir()
    (np.arange(9000) % 50257).astype(np.uint16).tofile(folder / "train.bin")
    (np.arange(3000) % 50257).astype(np.uint16).tofile(folder / "val.bin")
    return folder


def test_llmc_gpt2_124m_is_run_gpt2_124M_sh(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)                 # the config names HellaSwag's file where llm.c's script puts it
    hellaswag = tmp_path / "dev" / "data" / "hellaswag" / "hellaswag_val.jsonl"
    hellaswag.parent.mkdir(parents=True)
    hellaswag.write_text('{"ctx": "A man", "endings": ["a", "b", "c", "d"], "label": 0}\n')
    a = resolved("llmc-gpt2-124m.toml", shards(tmp_path / "fineweb10B"), world=8, monkeypatch=monkeypatch)
    cfg = a.cfg
    assert (cfg.n_layers, cfg.emb_dim, cfg.n_heads, cfg.context_length) == (12, 768, 12, 1024)     # -e d12
    assert cfg.vocab_size == 50304 and cfg.tie_weights and cfg.bias and cfg.qkv_bias and cfg.drop_rate == 0.0
    assert a.world_size * a.batch_size * a.grad_accum * a.max_length == a.tokens_per_step == 524288  # -d
    assert a.batch_size == 64 and a.grad_accum == 1 and a.max_length == 1024                      # -b, -t
    assert a.max_steps == 18865
    assert (a.lr, a.warmup, a.cosine, a.min_lr) == (6e-4, 700, True, 0.0)                          # -l -u -q
    assert (a.weight_decay, a.decay) == (0.1, "matrices")                                          # -c
    assert (a.beta1, a.beta2, a.eps, a.clip) == (0.9, 0.95, 1e-8, 1.0)
    assert a.eval_every == 250 and a.eval_iter == 20                                               # -v, -m
    assert a.hellaswag and a.save_every == 5000                                                    # -h 1, -n
    assert a.keep_every == 5000 and a.keep_last == 0                                               # -nk 0: all kept
    assert (a.sample_every, a.sample_tokens) == (20000, 144)                                       # -s, -g
    assert a.resume is None      # -y 1: resume = "auto" in the file, and --out holds no checkpoint yet: a new run
    assert config_file.load_config(CONFIGS / "llmc-gpt2-124m.toml", build_parser().subcommands["train"])["resume"] == "auto"
    assert a.lr_decay_steps is None                            # the cosine ends at the run's last step
    assert (a.backend, a.autocast) == ("torch", "bf16")


def test_nanogpt_gpt2_124m_is_train_gpt2_py(tmp_path, monkeypatch):
    a = resolved("nanogpt-gpt2-124m.toml", nanogpt_data(tmp_path / "openwebtext"), world=8, monkeypatch=monkeypatch)
    cfg = a.cfg
    assert (cfg.n_layers, cfg.emb_dim, cfg.n_heads, cfg.context_length, cfg.vocab_size) == (12, 768, 12, 1024, 50304)
    assert not cfg.bias and not cfg.qkv_bias and cfg.tie_weights and cfg.drop_rate == 0.0
    assert cfg.emb_init_std == 0.02                            # nanoGPT's N(0, 0.02) embeddings
    assert a.batch_size == 12 and a.max_length == 1024
    assert a.world_size * a.grad_accum == 5 * 8
    assert a.world_size * a.step_windows * a.max_length == a.tokens_per_step == 12 * 1024 * 40 == 491520
    assert (a.max_steps, a.lr_decay_steps, a.warmup) == (600000, 600000, 2000)
    assert (a.lr, a.min_lr, a.cosine) == (6e-4, 6e-5, True)
    assert (a.weight_decay, a.decay, a.beta1, a.beta2, a.clip) == (0.1, "matrices", 0.9, 0.95, 1.0)
    assert a.eval_every == 1000
    assert a.eval_iter * a.world_size * a.step_windows == 200 * 12                    # eval_iters x batch_size
    assert a.sampling == "random" and (a.backend, a.autocast, a.compile) == ("torch", "bf16", True)


def test_nanogpt_finetune_is_finetune_shakespeare_py(tmp_path, monkeypatch):
    hub = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    cfg = npgpt.GPTConfig.preset("tiny", vocab_size=50257, context_length=1024, qkv_bias=True, tie_weights=True)
    npgpt.export_hf(npgpt.build_model(cfg, seed=0), hub / "models--gpt2-xl" / "snapshots" / "r")
    a = resolved("nanogpt-finetune-shakespeare.toml", nanogpt_data(tmp_path / "shakespeare"))
    assert a.init_from and a.cfg.drop_rate == 0.0 and a.cfg.context_length == 1024     # gpt2-xl's, found
    assert a.batch_size == 1 and a.step_windows * a.max_length == a.tokens_per_step == 32768
    assert (a.max_steps, a.lr, a.warmup, a.cosine) == (20, 3e-5, 0, False)            # decay_lr False
    assert (a.weight_decay, a.decay, a.beta1, a.beta2, a.clip) == (0.1, "matrices", 0.9, 0.95, 1.0)
    assert a.eval_every == 5


@pytest.mark.parametrize("name", ["gpt2-124m-1gpu.toml", "gpt2-124m-8gpu.toml", "finetune-gpt2.toml"])
def test_npgpts_own_configs_claim_no_recipe(name):
    head = (CONFIGS / name).read_text().split("\n\n")[0].lower()
    assert "the recipe" not in head and "as nanogpt's" not in head and "npgpt's own" in head


@pytest.mark.parametrize("name, world, micro, accum", [("gpt2-124m-1gpu.toml", 1, 16, 32),
                                                       ("gpt2-124m-8gpu.toml", 8, 16, 4)])
def test_half_a_million_tokens_a_step_on_any_number_of_processes(tmp_path, monkeypatch, name, world, micro, accum):
    """The configs' 0.5M tokens a step (2**19, their comments' 524,288), the accumulation derived
    from --tokens-per-step on the processes there are."""
    a = resolved(name, shards(tmp_path / "fineweb10B"), world=world, monkeypatch=monkeypatch)
    assert (a.batch_size, a.grad_accum, a.world_size) == (micro, accum, world)
    assert micro * accum * world * 1024 == a.tokens_per_step == 2**19 == 524288
