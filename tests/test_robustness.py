"""Bad input fails early with an error that names it; numerical faults stop training without
touching what was saved. hypothesis throws arbitrary arguments at the public functions: the
only outcomes allowed are a result or the documented exceptions."""
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import npgpt

CFG = npgpt.GPTConfig(vocab_size=50, context_length=8, emb_dim=8, n_heads=2, n_layers=1)
MODEL = npgpt.build_model(CFG, seed=1)
anything = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                     st.text(max_size=3), st.lists(st.integers(-3, 60), max_size=3))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(max_new_tokens=anything, temperature=anything, top_k=anything, top_p=anything, eos_id=anything,
       context_size=anything)
def test_generate_arguments_fuzz(max_new_tokens, temperature, top_k, top_p, eos_id, context_size):
    if isinstance(max_new_tokens, int) and not isinstance(max_new_tokens, bool):
        max_new_tokens = max(min(max_new_tokens, 3), -3)           # keep valid calls cheap
    try:
        out = npgpt.generate(MODEL, np.array([[1, 2, 3]]), max_new_tokens=max_new_tokens,
                             temperature=temperature, top_k=top_k, top_p=top_p, eos_id=eos_id,
                             context_size=context_size, seed=0)
    except (ValueError, TypeError):
        return
    assert out.shape[0] == 1 and 3 <= out.shape[1] <= 3 + max_new_tokens
    assert out.min() >= 0 and out.max() < CFG.vocab_size


@settings(max_examples=300, deadline=None)
@given(logits=st.lists(st.floats(allow_nan=False, allow_infinity=True, width=32), min_size=1, max_size=12),
       temperature=anything, top_k=anything, top_p=anything)
def test_next_token_probs_fuzz(logits, temperature, top_k, top_p):
    logits = np.array(logits)
    try:
        probs = npgpt.next_token_probs(logits, temperature, top_k, top_p)
    except (ValueError, TypeError):
        return
    assert probs.shape == logits.shape
    assert np.all(probs >= 0) and probs.sum() == pytest.approx(1.0)
    assert np.all(probs[logits == -np.inf] == 0)


@settings(max_examples=200, deadline=None)
@given(vocab_size=anything, context_length=anything, emb_dim=anything, n_heads=anything, n_layers=anything,
       drop_rate=anything, qkv_bias=anything)
def test_config_fuzz(vocab_size, context_length, emb_dim, n_heads, n_layers, drop_rate, qkv_bias):
    try:
        cfg = npgpt.GPTConfig(vocab_size=vocab_size, context_length=context_length, emb_dim=emb_dim,
                              n_heads=n_heads, n_layers=n_layers, drop_rate=drop_rate, qkv_bias=qkv_bias)
    except ValueError as e:
        assert "GPTConfig." in str(e)                                # the message names the field
        return
    assert cfg.emb_dim % cfg.n_heads == 0 and 0 <= cfg.drop_rate < 1 and min(cfg.vocab_size, cfg.n_layers) > 0


@pytest.mark.parametrize("call, match", [
    (lambda: MODEL.logits(np.array([[1, 50]])), "token id 50 is out of range"),
    (lambda: MODEL.logits(np.array([[-1, 2]])), "token id -1 is out of range"),
    (lambda: MODEL.logits(np.zeros((1, 9), np.int64)), "longer than context_length 8"),
    (lambda: MODEL.loss(np.array([[1, 2]]), np.array([[1, 2, 3]])), "targets"),
    (lambda: npgpt.GPTConfig(emb_dim=10, n_heads=3), "divisible"),
    (lambda: npgpt.GPTConfig.preset("gpt5"), "unknown preset"),
    (lambda: npgpt.build_model(CFG, backend="jax"), "unknown backend"),
    (lambda: npgpt.build_model(CFG, dtype="float16"), "dtype"),
    (lambda: npgpt.AdamW(MODEL, lr=-1.0), "lr"),
    (lambda: npgpt.token_ids_to_text([1, 60000]), "out of range"),
])
def test_bad_input_is_named(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_float_ids_are_a_type_error():
    with pytest.raises(TypeError, match="integers"):
        MODEL.logits(np.array([[1.0, 2.0]]))


def test_prompt_longer_than_the_context_is_cropped():
    """As the book does: generation looks at the last context_length tokens only."""
    model = npgpt.build_model(CFG, seed=1, dtype="float64").eval()
    long_prompt = np.arange(20)[None, :] % CFG.vocab_size
    out = npgpt.generate(model, long_prompt, max_new_tokens=1, temperature=0.0)
    expected = model.logits(long_prompt[:, -CFG.context_length:])[:, -1].argmax(-1)
    assert out.shape == (1, 21) and out[0, -1] == expected[0]


def test_nan_loss_stops_training_and_keeps_the_checkpoint(tmp_path, verdict_text):
    """A NaN loss raises with its step number before any update, and save_checkpoint refuses
    non-finite weights, so the last good checkpoint stays as it was."""
    tok = npgpt.get_tokenizer()
    cfg = npgpt.GPTConfig.preset("tiny")
    train, val = npgpt.make_loaders(verdict_text, tok, batch_size=4, max_length=32, stride=32)
    model = npgpt.build_model(cfg, seed=1)
    opt = npgpt.AdamW(model)
    path = tmp_path / "good.h5"
    npgpt.save_checkpoint(path, model, opt)
    saved = path.read_bytes()

    def poison(state):
        if state.global_step == 2:
            model.p["ln_f.weight"][0] = np.nan                        # the next forward gives NaN
    with pytest.raises(npgpt.TrainingDiverged, match="step 3"):
        npgpt.train_model_simple(model, train, val, opt, 1, 100, 1, "Hi", tok, progress=False, on_step=poison)
    assert opt.step_count == 3                                        # steps 0, 1, 2; not the NaN one
    with pytest.raises(FloatingPointError, match="non-finite"):
        npgpt.save_checkpoint(path, model, opt)
    assert path.read_bytes() == saved
    assert math.isfinite(npgpt.load_checkpoint(path)[0].loss(*next(iter(val))))


def test_the_train_loader_has_at_least_one_batch():
    """It drops a partial last batch, so fewer windows than batch_size would give no batch at all:
    an error that gives the counts, not an epoch that does nothing."""
    tok = npgpt.get_tokenizer()
    text = " a" * 400                                   # 360 train tokens: 22 windows of 16 + 1 tokens
    assert len(npgpt.make_loaders(text, tok, batch_size=22, max_length=16, stride=16)[0]) == 1
    with pytest.raises(ValueError, match=r"one training batch: its 360 tokens make 22 windows of 17 tokens "
                                         r"\(stride 16\), batch_size is 23"):
        npgpt.make_loaders(text, tok, batch_size=23, max_length=16, stride=16)


@pytest.mark.parametrize("content, error", [(None, FileNotFoundError), (b"", ValueError), (b"not hdf5", ValueError),
                                            ("half", ValueError)])
def test_load_checkpoint_raises_only_the_documented_errors(tmp_path, content, error):
    path = tmp_path / "c.h5"
    if content == "half":
        npgpt.save_checkpoint(path, MODEL)
        content = path.read_bytes()[:path.stat().st_size // 2]
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(error, match="c.h5"):
        npgpt.load_checkpoint(path)
