"""Gradient accumulation on the NumPy backend: a batch run as k micro-batches gives the loss and
the gradients of the whole batch in one forward and backward (float64), for k = 2 and 4, with
either kernels; a training step with it equals the single-batch step; a batch that does not
split into k equal parts is refused naming both numbers."""
import numpy as np
import pytest

import npgpt

pytestmark = pytest.mark.usefixtures("one_thread")   # see conftest.py
CFG = npgpt.GPTConfig(vocab_size=50, context_length=8, emb_dim=16, n_heads=2, n_layers=2, drop_rate=0.0)


def batch(n=8, seed=0):
    ids = np.random.default_rng(seed).integers(0, CFG.vocab_size, (n, CFG.context_length + 1))
    return ids[:, :-1], ids[:, 1:]


@pytest.mark.parametrize("kernels", ["fast", "reference"])
@pytest.mark.parametrize("k", [2, 4])
def test_accumulated_gradients_equal_the_whole_batch(kernels, k):
    whole = npgpt.build_model(CFG, dtype="float64", kernels=kernels)
    parts = npgpt.build_model(CFG, dtype="float64", kernels=kernels, grad_accum=k)
    x, y = batch()
    loss, grads = whole.loss_and_grads(x, y)                 # one forward and backward over all 8 rows
    loss_k, grads_k = parts.loss_and_grads(x, y)
    assert abs(loss_k - loss) <= 1e-13 * abs(loss)
    for name, g in grads.items():
        np.testing.assert_allclose(grads_k[name], g, rtol=1e-10, atol=1e-14, err_msg=name)


def test_a_step_with_accumulation_equals_the_single_batch_step():
    models = [npgpt.build_model(CFG, dtype="float64", grad_accum=k) for k in (1, 4)]
    opts = [npgpt.AdamW(m, lr=1e-2) for m in models]
    for s in range(3):
        x, y = batch(seed=s)
        losses = [m.train_step(x, y, o, clip_norm=1.0) for m, o in zip(models, opts)]
        assert abs(losses[0] - losses[1]) <= 1e-12
    for name, p in models[0].params().items():
        np.testing.assert_allclose(models[1].params()[name], p, rtol=1e-9, atol=1e-12, err_msg=name)


def test_bad_accumulation_is_refused():
    model = npgpt.build_model(CFG, grad_accum=3)
    with pytest.raises(ValueError, match="batch of 8 sequences does not split into grad_accum=3"):
        model.loss_and_grads(*batch())
    with pytest.raises(ValueError, match="grad_accum must be a positive integer, got 0"):
        npgpt.build_model(CFG, grad_accum=0)
