"""The spike guard (llm.c's outlier detector): z-scores against numpy's own mean and population
std of the last 128 values; no decision while the window fills; a planted loss spike and a
planted gradient-norm spike skipped in a real training loop on both backends, the parameters
and the optimizer's step count untouched by them, the skip in the log records and in
state.skipped_steps; the windows saved in a checkpoint and read back so that a resumed guard
decides as the uninterrupted one."""
import math

import numpy as np
import pytest

import npgpt
from npgpt.run_state import TrainState
from npgpt.training.guard import WINDOW, SpikeGuard, z_score
from npgpt.weights.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")   # see conftest.py
CFG = npgpt.GPTConfig(vocab_size=64, context_length=8, emb_dim=16, n_heads=2, n_layers=1, drop_rate=0.0)
SPIKE = WINDOW + 4                         # the step planted with a spike: the window is full by then


def test_z_score_against_numpy():
    rng = np.random.default_rng(0)
    values = rng.normal(3.0, 0.2, WINDOW)
    expected = (3.9 - values.mean()) / values.std()          # numpy's population std (ddof=0)
    assert math.isclose(z_score(list(values), 3.9), expected, rel_tol=1e-12)
    assert math.isnan(z_score(list(values[:-1]), 3.9))          # a window not yet full decides nothing


def test_decisions_and_window_round_trip():
    rng = np.random.default_rng(1)
    guard = SpikeGuard(loss_z=5, grad_z=None)
    decisions = [guard.skip(3 + 0.01 * rng.standard_normal(), 1.0) for _ in range(WINDOW)]
    assert decisions == [None] * WINDOW                           # filling: never a skip, even loss_z=5
    assert guard.skip(3.0 + 0.2, 100.0).startswith("loss z")     # 20 sigma; the norm is not checked
    assert guard.skip(3.0, 100.0) is None
    again = SpikeGuard(loss_z=5, losses=guard.window()[0], norms=guard.window()[1])
    for value in (3.5, 3.0, 3.01, 4.0):                          # the same decisions from the saved windows
        assert again.skip(value, 1.0) == guard.skip(value, 1.0)
    with pytest.raises(ValueError, match="loss_z must be a positive number"):
        SpikeGuard(loss_z=0)


class Batches:
    """train_steps' batches: step s's windows depend on s alone."""
    world_size = 1

    def batch(self, step):
        rng = np.random.default_rng(step)
        ids = rng.integers(0, CFG.vocab_size, (2, CFG.context_length + 1))
        return ids[:, :-1], ids[:, 1:]


def plant(model, backend, spike, monkeypatch, first_step=0):
    """The spike: step SPIKE's loss, or its gradients, 1000 times what they are."""
    real = model.batch_gradients
    step_of = [first_step]

    def planted(inputs, targets):
        loss = real(inputs, targets)
        if step_of[0] == SPIKE:
            if spike == "loss":
                loss *= 1000
            else:
                grads = model.flat_grads if backend == "numpy" else None
                if grads is not None:
                    grads *= 1000
                else:
                    for p in model.module.parameters():
                        p.grad.mul_(1000)
        step_of[0] += 1
        return loss
    monkeypatch.setattr(model, "batch_gradients", planted)


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("spike", ["loss", "grad"])
def test_a_planted_spike_is_skipped_before_the_update(backend, spike, monkeypatch):
    model = npgpt.build_model(CFG, backend=backend, dtype="float64")
    opt = npgpt.AdamW(model, lr=1e-3)
    plant(model, backend, spike, monkeypatch)
    params, records = {}, []
    state = TrainState()
    npgpt.train_steps(model, Batches(), [Batches().batch(0)], opt, SPIKE + 3, 10_000, "!", npgpt.get_tokenizer(),
                      state=state, progress=False, print_fn=lambda *_: None, on_log=records.append,
                      on_step=lambda s: params.__setitem__(s.global_step, model.params()),
                      **({"skip_loss_z": 6} if spike == "loss" else {"skip_grad_z": 6}))
    assert state.skipped_steps == [SPIKE]
    for name, p in params[SPIKE].items():
        np.testing.assert_array_equal(p, params[SPIKE - 1][name], err_msg=name)
    assert any(not np.array_equal(p, params[SPIKE][n]) for n, p in params[SPIKE + 1].items())
    assert opt.state()["step"] == SPIKE + 3 - 1                   # every step but the skipped one
    steps = {r["step"]: r for r in records if r["kind"] == "step"}
    assert steps[SPIKE]["skipped"].startswith("loss z" if spike == "loss" else "grad norm z")
    assert "skipped" not in steps[SPIKE - 1] and "skipped" not in steps[SPIKE + 1]
    assert len(state.guard_losses) == WINDOW and state.guard_losses[-1] == steps[SPIKE + 2]["loss"]


def test_a_resumed_run_makes_the_same_decisions(tmp_path, monkeypatch):
    """Whole: SPIKE + 3 steps. Resumed: stopped after 61 steps (the window half full), saved,
    loaded, continued: the same skipped step and bit-identical parameters (float64)."""
    def run(model, opt, state, steps):
        npgpt.train_steps(model, Batches(), [Batches().batch(0)], opt, steps, 10_000, "!", npgpt.get_tokenizer(),
                          state=state, progress=False, print_fn=lambda *_: None, skip_loss_z=6)
        return state
    whole = npgpt.build_model(CFG, dtype="float64")
    plant(whole, "numpy", "loss", monkeypatch)
    whole_state = run(whole, npgpt.AdamW(whole, lr=1e-3), TrainState(), SPIKE + 3)
    first = npgpt.build_model(CFG, dtype="float64")
    opt = npgpt.AdamW(first, lr=1e-3)
    save_checkpoint(tmp_path / "c.h5", first, opt, state=run(first, opt, TrainState(), 61))
    model, opt, state = load_checkpoint(tmp_path / "c.h5")
    assert len(state.guard_losses) == 61
    plant(model, "numpy", "loss", monkeypatch, first_step=61)
    run(model, opt, state, SPIKE + 3)
    assert state.skipped_steps == whole_state.skipped_steps == [SPIKE]
    assert state.guard_losses == whole_state.guard_losses
    for name, p in whole.params().items():
        np.testing.assert_array_equal(model.params()[name], p, err_msg=name)


def test_the_windows_and_skips_are_saved_and_read_back(tmp_path):
    model = npgpt.build_model(CFG)
    rng = np.random.default_rng(2)
    state = TrainState(global_step=200, guard_losses=list(rng.normal(3, 0.1, WINDOW)),
                       guard_norms=list(rng.normal(1, 0.1, WINDOW)), skipped_steps=[17, 150])
    save_checkpoint(tmp_path / "c.h5", model, npgpt.AdamW(model), state=state)
    back = read_checkpoint(tmp_path / "c.h5")["state"]
    assert (back.guard_losses, back.guard_norms, back.skipped_steps) == \
        (state.guard_losses, state.guard_norms, state.skipped_steps)
