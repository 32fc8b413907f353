"""GPT-2's names (--init-from gpt2, ...) resolved in a local Hugging Face cache, never over the network:
a fake cache laid out as huggingface_hub lays one out (models--gpt2/refs/main, snapshots/<rev>/) holds
a tiny model written here."""
from __future__ import annotations

import numpy as np
import pytest

import npgpt
from npgpt.cli import main


@pytest.fixture
def no_caches(tmp_path, monkeypatch):
    """Every cache location pointed inside tmp_path, empty."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_HOME", raising=False)
    return tmp_path


def cache_model(root, repo="models--gpt2", rev="0123abcd", seed=1, vocab_size=300):
    cfg = npgpt.GPTConfig.preset("tiny", vocab_size=vocab_size, context_length=16, qkv_bias=True, tie_weights=True)
    model = npgpt.build_model(cfg, seed=seed)
    npgpt.export_hf(model, root / repo / "snapshots" / rev)
    (root / repo / "refs").mkdir(parents=True, exist_ok=True)
    (root / repo / "refs" / "main").write_text(rev)
    return model


@pytest.mark.parametrize("where", ["HF_HUB_CACHE", "HF_HOME", "HOME"])
def test_gpt2_is_found_in_each_cache(no_caches, monkeypatch, where):
    root = {"HF_HUB_CACHE": no_caches / "hub-cache", "HF_HOME": no_caches / "hf-home" / "hub",
            "HOME": no_caches / "home" / ".cache" / "huggingface" / "hub"}[where]
    if where != "HOME":
        monkeypatch.setenv(where, str(root if where == "HF_HUB_CACHE" else root.parent))
    model = cache_model(root)
    loaded = npgpt.load_pretrained("gpt2")
    for name, p in model.params().items():
        assert np.array_equal(loaded.params()[name], p), name


def test_refs_main_picks_the_snapshot_and_the_moved_repository_is_found(no_caches, monkeypatch):
    root = no_caches / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    cache_model(root, rev="old", seed=1)
    newer = cache_model(root, rev="new", seed=2)
    assert np.array_equal(npgpt.load_pretrained("gpt2").params()["wte"], newer.params()["wte"])
    xl = cache_model(root, repo="models--openai-community--gpt2-xl", seed=3)
    assert np.array_equal(npgpt.load_pretrained("gpt2-xl").params()["wte"], xl.params()["wte"])


def test_a_name_not_cached_says_where_it_looked_and_how_to_get_it(no_caches, capsys, monkeypatch):
    monkeypatch.chdir(no_caches)
    with pytest.raises(FileNotFoundError) as e:
        npgpt.load_pretrained("gpt2-medium")
    message = str(e.value)
    assert "\n" not in message and "huggingface-cli download gpt2-medium" in message
    assert str(no_caches / "home" / ".cache" / "huggingface" / "hub") in message
    with pytest.raises(FileNotFoundError, match="weights not found: gpt3"):      # not a GPT-2 name
        npgpt.load_pretrained("gpt3")
    assert main(["train", "--init-from", "gpt2", "--max-steps", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "gpt2: GPT-2's weights are not in a local Hugging Face cache" in err[0]


def test_cli_convert_and_init_from_take_the_name(no_caches, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(no_caches / "hf"))
    model = cache_model(no_caches / "hf" / "hub", vocab_size=50257)      # the run's tokenizer's ids
    monkeypatch.chdir(tmp_path)
    (tmp_path / "text.txt").write_text("Every effort moves you forward, one small step at a time. " * 12)
    assert main(["convert", "gpt2", str(tmp_path / "m.h5")]) == 0
    assert np.array_equal(npgpt.load_pretrained(tmp_path / "m.h5").params()["wpe"], model.params()["wpe"])
    assert main(["train", "--init-from", "gpt2", "--data", "text.txt", "--epochs", "1", "--out",
                 str(tmp_path / "run"), "--eval-iter", "1", "--no-progress"]) == 0
