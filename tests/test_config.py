"""GPTConfig (defaults, presets, validation, serialisation) and the parameters made from it
(names, shapes, counts checked by arithmetic, GPT-2's initialisation statistics, strict checks)."""
import dataclasses
import json
import math

import numpy as np
import pytest

import npgpt
from npgpt import GPTConfig
from npgpt.params import check_params

# The book's chapter 4/5 configuration.
GPT_CONFIG_124M = {"vocab_size": 50257, "context_length": 256, "emb_dim": 768, "n_heads": 12,
                   "n_layers": 12, "drop_rate": 0.1, "qkv_bias": False}


def count_by_hand(V, T, C, L, qkv_bias, tied):
    """Parameter count of GPT-2, written out from the architecture."""
    block = (2 * C                                   # ln_1 weight, bias
             + 3 * C * C + (3 * C if qkv_bias else 0)  # attn.c_attn
             + C * C + C                             # attn.c_proj
             + 2 * C                                 # ln_2
             + 4 * C * C + 4 * C                     # mlp.c_fc
             + 4 * C * C + C)                        # mlp.c_proj
    return V * C + T * C + L * block + 2 * C + (0 if tied else V * C)


# ---------------------------------------------------------------- config

def test_defaults_are_the_books_124m():
    cfg = GPTConfig()
    for key, value in GPT_CONFIG_124M.items():
        assert getattr(cfg, key) == value, key
    assert cfg.tie_weights is False
    assert cfg.head_dim == 64


GPT2_SIZES = {"gpt2-small": (768, 12, 12), "gpt2-medium": (1024, 24, 16),
              "gpt2-large": (1280, 36, 20), "gpt2-xl": (1600, 48, 25)}


@pytest.mark.parametrize("name", sorted(GPT2_SIZES))
def test_gpt2_presets(name):
    cfg = GPTConfig.preset(name)
    assert (cfg.emb_dim, cfg.n_layers, cfg.n_heads) == GPT2_SIZES[name]
    assert cfg.vocab_size == 50257
    assert cfg.context_length == 1024
    assert cfg.qkv_bias is True
    assert cfg.tie_weights is True
    assert cfg.head_dim * cfg.n_heads == cfg.emb_dim


def test_book_and_tiny_presets():
    assert GPTConfig.preset("book-124m") == GPTConfig()
    tiny = GPTConfig.preset("tiny")
    assert tiny.vocab_size == 50257
    assert npgpt.num_params(tiny) < 5_000_000
    assert set(npgpt.PRESETS) == {"book-124m", "gpt2-small", "gpt2-medium", "gpt2-large", "gpt2-xl", "tiny"}


def test_unknown_preset_lists_the_valid_names():
    with pytest.raises(ValueError) as excinfo:
        GPTConfig.preset("gpt3")
    message = str(excinfo.value)
    assert "gpt3" in message
    for name in ("book-124m", "gpt2-small", "gpt2-medium", "gpt2-large", "gpt2-xl", "tiny"):
        assert name in message


def test_preset_overrides():
    cfg = GPTConfig.preset("gpt2-small", drop_rate=0.0)
    assert cfg.drop_rate == 0.0
    assert (cfg.emb_dim, cfg.n_layers, cfg.context_length) == (768, 12, 1024)
    assert GPTConfig.preset("gpt2-small").drop_rate == 0.1  # the preset itself is unchanged
    with pytest.raises(ValueError, match="emb_dim"):
        GPTConfig.preset("gpt2-small", emb_dim=100)  # overrides are validated too
    with pytest.raises(TypeError):
        GPTConfig.preset("gpt2-small", dropout=0.0)


def test_num_params_known_counts():
    # The book: 163,009,536 for GPT_CONFIG_124M with context 1024 (untied head, no qkv bias).
    assert npgpt.num_params(GPTConfig(context_length=1024)) == 163_009_536
    assert count_by_hand(50257, 1024, 768, 12, qkv_bias=False, tied=False) == 163_009_536
    # OpenAI's GPT-2 small and medium, as counted by transformers' GPT2LMHeadModel.
    assert npgpt.num_params(GPTConfig.preset("gpt2-small")) == 124_439_808
    assert count_by_hand(50257, 1024, 768, 12, qkv_bias=True, tied=True) == 124_439_808
    assert npgpt.num_params(GPTConfig.preset("gpt2-medium")) == 354_823_168
    assert count_by_hand(50257, 1024, 1024, 24, qkv_bias=True, tied=True) == 354_823_168


@pytest.mark.parametrize("name", sorted(npgpt.PRESETS))
def test_num_params_matches_arithmetic(name):
    c = GPTConfig.preset(name)
    assert npgpt.num_params(c) == count_by_hand(c.vocab_size, c.context_length, c.emb_dim, c.n_layers,
                                                c.qkv_bias, c.tie_weights)


@pytest.mark.parametrize("field, value", [
    ("vocab_size", 0), ("context_length", -1), ("emb_dim", 0), ("n_heads", 0), ("n_layers", -3),
    ("n_layers", 2.0), ("emb_dim", "768"), ("n_heads", True),
    ("drop_rate", 1.0), ("drop_rate", -0.1), ("drop_rate", float("nan")), ("drop_rate", "0.1"),
    ("qkv_bias", 1), ("qkv_bias", "yes"), ("tie_weights", None),
])
def test_invalid_fields(field, value):
    with pytest.raises(ValueError, match=field):
        GPTConfig(**{field: value})


def test_emb_dim_must_divide_by_heads():
    with pytest.raises(ValueError, match="emb_dim") as excinfo:
        GPTConfig(emb_dim=768, n_heads=10)
    assert "n_heads" in str(excinfo.value)


def test_drop_rate_edges_accepted():
    assert GPTConfig(drop_rate=0.0).drop_rate == 0.0
    assert GPTConfig(drop_rate=0).drop_rate == 0
    assert GPTConfig(drop_rate=0.999).drop_rate == 0.999


@pytest.mark.parametrize("name", sorted(npgpt.PRESETS))
def test_dict_round_trip(name):
    cfg = GPTConfig.preset(name)
    d = cfg.to_dict()
    assert isinstance(d, dict) and set(d) == {f.name for f in dataclasses.fields(GPTConfig)}
    assert GPTConfig.from_dict(d) == cfg
    assert GPTConfig.from_dict(json.loads(cfg.to_json())) == cfg


def test_from_dict_unknown_key():
    d = GPTConfig().to_dict()
    d["dropout"] = 0.1
    with pytest.raises(ValueError, match="dropout"):
        GPTConfig.from_dict(d)


def test_from_dict_partial_uses_defaults():
    assert GPTConfig.from_dict({"emb_dim": 64, "n_heads": 4}) == GPTConfig(emb_dim=64, n_heads=4)


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        GPTConfig().emb_dim = 10


# ---------------------------------------------------------------- parameter names and shapes

SMALL = GPTConfig(vocab_size=1000, context_length=32, emb_dim=64, n_heads=4, n_layers=3, qkv_bias=True)


@pytest.mark.parametrize("qkv_bias", [False, True])
@pytest.mark.parametrize("tied", [False, True])
def test_param_shapes_names(qkv_bias, tied):
    cfg = dataclasses.replace(SMALL, qkv_bias=qkv_bias, tie_weights=tied)
    V, T, C, L = 1000, 32, 64, 3
    shapes = npgpt.param_shapes(cfg)
    expected = {"wte": (V, C), "wpe": (T, C), "ln_f.weight": (C,), "ln_f.bias": (C,)}
    for i in range(L):
        expected.update({
            f"h.{i}.ln_1.weight": (C,), f"h.{i}.ln_1.bias": (C,),
            f"h.{i}.attn.c_attn.weight": (3 * C, C),
            f"h.{i}.attn.c_proj.weight": (C, C), f"h.{i}.attn.c_proj.bias": (C,),
            f"h.{i}.ln_2.weight": (C,), f"h.{i}.ln_2.bias": (C,),
            f"h.{i}.mlp.c_fc.weight": (4 * C, C), f"h.{i}.mlp.c_fc.bias": (4 * C,),
            f"h.{i}.mlp.c_proj.weight": (C, 4 * C), f"h.{i}.mlp.c_proj.bias": (C,),
        })
        if qkv_bias:
            expected[f"h.{i}.attn.c_attn.bias"] = (3 * C,)
    if not tied:
        expected["lm_head.weight"] = (V, C)
    assert {k: tuple(v) for k, v in shapes.items()} == expected
    assert list(shapes)[:2] == ["wte", "wpe"]  # model order


# ---------------------------------------------------------------- initialisation

def test_init_keys_shapes_dtype():
    shapes = npgpt.param_shapes(SMALL)
    for dtype in ("float32", "float64"):
        params = npgpt.init_params(SMALL, seed=1, dtype=dtype)
        assert list(params) == list(shapes)
        for name, p in params.items():
            assert isinstance(p, np.ndarray)
            assert p.shape == tuple(shapes[name]), name
            assert p.dtype == np.dtype(dtype), name


def test_init_deterministic_per_seed():
    a = npgpt.init_params(SMALL, seed=123)
    b = npgpt.init_params(SMALL, seed=123)
    c = npgpt.init_params(SMALL, seed=124)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    for name in ("wte", "wpe", "h.0.attn.c_attn.weight", "h.2.mlp.c_proj.weight", "lm_head.weight"):
        assert not np.array_equal(a[name], c[name]), name
    # different tensors are not copies of one draw
    assert not np.array_equal(a["h.0.mlp.c_fc.weight"], a["h.1.mlp.c_fc.weight"])


def test_float64_init_is_float32_init_cast():
    p32 = npgpt.init_params(SMALL, seed=5, dtype="float32")
    p64 = npgpt.init_params(SMALL, seed=5, dtype="float64")
    for name in p32:
        assert p64[name].dtype == np.float64
        np.testing.assert_array_equal(p64[name], p32[name].astype(np.float64), err_msg=name)


def _close(value, target, rel):
    return abs(value - target) <= rel * target


@pytest.mark.parametrize("preset, std", [("tiny", 1.0), ("gpt2-small", 0.02)])
def test_embedding_init(preset, std):
    """The book's presets keep nn.Embedding's N(0, 1) embeddings, GPT-2's use N(0, 0.02)."""
    cfg = GPTConfig.preset(preset, n_layers=1)
    params = npgpt.init_params(cfg, seed=0)
    for name in ("wte", "wpe"):
        p = params[name].astype(np.float64)
        assert _close(p.std(), std, 0.05), (name, p.std())
        assert abs(p.mean()) < std * 0.05


def test_init_statistics():
    big = GPTConfig(vocab_size=512, context_length=64, emb_dim=256, n_heads=4, n_layers=4,
                    qkv_bias=True, tie_weights=False, emb_init_std=0.02)
    params = npgpt.init_params(big, seed=0)
    residual = 0.02 / math.sqrt(2 * big.n_layers)
    for name, p in params.items():
        p = p.astype(np.float64)
        if name.endswith(".bias"):
            assert np.all(p == 0), name
        elif ".ln_" in name or name.startswith("ln_f."):
            assert np.all(p == 1), name
        elif name.endswith("attn.c_proj.weight") or name.endswith("mlp.c_proj.weight"):
            assert _close(p.std(), residual, 0.05), (name, p.std(), residual)
        else:
            assert _close(p.std(), 0.02, 0.05), (name, p.std())
            assert abs(p.mean()) < 0.02 * 0.05, name
    # the c_proj weights really are the scaled ones: their spread is 1/sqrt(2L) of the others
    ratio = params["h.0.mlp.c_proj.weight"].std() / params["h.0.mlp.c_fc.weight"].std()
    assert _close(ratio, 1 / math.sqrt(8), 0.05)


# ---------------------------------------------------------------- strict checks

def test_check_params_accepts_matching():
    check_params(npgpt.init_params(SMALL, seed=0), npgpt.param_shapes(SMALL))


def test_check_params_wrong_shape():
    shapes = npgpt.param_shapes(SMALL)
    params = npgpt.init_params(SMALL, seed=0)
    params["h.1.attn.c_attn.weight"] = params["h.1.attn.c_attn.weight"].T.copy()
    with pytest.raises(ValueError) as excinfo:
        check_params(params, shapes)
    message = str(excinfo.value)
    assert "h.1.attn.c_attn.weight" in message
    assert "(192, 64)" in message and "(64, 192)" in message


def test_check_params_missing_name():
    shapes = npgpt.param_shapes(SMALL)
    params = npgpt.init_params(SMALL, seed=0)
    del params["h.2.ln_2.bias"]
    with pytest.raises(ValueError, match=r"h\.2\.ln_2\.bias"):
        check_params(params, shapes)


def test_check_params_extra_name():
    tied = dataclasses.replace(SMALL, tie_weights=True)
    params = npgpt.init_params(SMALL, seed=0)  # untied: has lm_head.weight
    with pytest.raises(ValueError, match=r"lm_head\.weight"):
        check_params(params, npgpt.param_shapes(tied))
