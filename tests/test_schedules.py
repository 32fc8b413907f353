"""llm.c's four schedules (constant, cosine, linear, wsd) after a warmup: the learning rate at
chosen steps against values written out here from the formulas (llm.c's schedulers.h), a
Schedule of each kind saved in a checkpoint and read back equal, an old file's schedule
(`cosine: true`, no kind) still read, and the loop's train_steps following a wsd schedule
across a resume exactly."""
import json
import math

import numpy as np
import pytest

import npgpt
from npgpt.run_state import Schedule, TrainState
from npgpt.training.stepper import run_schedule
from npgpt.training.schedule import scheduled_lr
from npgpt.weights.checkpoint import read_checkpoint, save_checkpoint

PEAK, MIN = 1e-3, 1e-4


def close(a, b):
    assert math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-15), (a, b)


def test_constant_holds_the_peak_after_warmup():
    s = Schedule(PEAK, warmup_steps=4)
    close(scheduled_lr(s, 0), PEAK * 1 / 5)          # nanoGPT's warmup: peak (s+1)/(w+1)
    close(scheduled_lr(s, 3), PEAK * 4 / 5)
    for step in (4, 50, 10_000):
        close(scheduled_lr(s, step), PEAK)


def test_cosine_from_peak_to_floor():
    s = Schedule(PEAK, warmup_steps=10, kind="cosine", decay_steps=110, min_lr=MIN)
    close(scheduled_lr(s, 10), PEAK)
    close(scheduled_lr(s, 60), (PEAK + MIN) / 2)     # half-way: cos(pi/2) = 0
    close(scheduled_lr(s, 35), MIN + (PEAK - MIN) * (1 + math.sqrt(0.5)) / 2)     # a quarter: cos(pi/4)
    close(scheduled_lr(s, 110), MIN)
    close(scheduled_lr(s, 500), MIN)


def test_linear_from_peak_to_floor():
    s = Schedule(PEAK, warmup_steps=10, kind="linear", decay_steps=110, min_lr=MIN)
    close(scheduled_lr(s, 10), PEAK)
    close(scheduled_lr(s, 35), PEAK - 0.25 * (PEAK - MIN))
    close(scheduled_lr(s, 85), PEAK - 0.75 * (PEAK - MIN))
    close(scheduled_lr(s, 110), MIN)
    close(scheduled_lr(s, 111), MIN)


def test_wsd_holds_then_decays_as_one_minus_sqrt_over_its_last_fraction():
    # 100 steps, the last 20% decaying: stable from 5 to 79, decay over 80..100
    s = Schedule(PEAK, warmup_steps=5, kind="wsd", decay_steps=100, min_lr=MIN, decay_fraction=0.2)
    assert s.decay_start == 80
    close(scheduled_lr(s, 4), PEAK * 5 / 6)
    for step in (5, 40, 79):
        close(scheduled_lr(s, step), PEAK)
    close(scheduled_lr(s, 80), PEAK)
    close(scheduled_lr(s, 85), MIN + (1 - math.sqrt(5 / 20)) * (PEAK - MIN))
    close(scheduled_lr(s, 95), MIN + (1 - math.sqrt(15 / 20)) * (PEAK - MIN))
    close(scheduled_lr(s, 100), MIN)
    close(scheduled_lr(s, 250), MIN)


def test_old_cosine_flag_and_kind_agree():
    old = Schedule(PEAK, 3, None, True, 12, MIN)           # the positional order from before kind
    assert old.kind == "cosine" and old == Schedule(PEAK, 3, kind="cosine", decay_steps=12, min_lr=MIN)
    assert Schedule.from_dict({"peak_lr": PEAK, "warmup_steps": 3, "initial_lr": None, "cosine": True,
                               "decay_steps": 12, "min_lr": MIN}) == old          # a version-3 file's dict
    assert Schedule(PEAK).kind == "constant" and not Schedule(PEAK).scheduled


@pytest.mark.parametrize("bad, message", [
    (dict(kind="step"), "kind must be one of"),
    (dict(kind="linear", cosine=True, decay_steps=5, min_lr=MIN), "contradicts"),
    (dict(kind="linear", min_lr=MIN), "decay_steps must be a positive integer"),
    (dict(kind="wsd", decay_steps=10, min_lr=MIN), "decay_fraction must be a number in"),
    (dict(kind="wsd", decay_steps=10, min_lr=MIN, decay_fraction=1.5), "decay_fraction must be a number in"),
    (dict(kind="wsd", warmup_steps=5, decay_steps=10, min_lr=MIN, decay_fraction=0.8), "inside the warmup"),
    (dict(kind="cosine", decay_steps=10, min_lr=MIN, decay_fraction=0.2), "decay_fraction is wsd's"),
    (dict(kind="linear", decay_steps=10, min_lr=2 * PEAK), "min_lr must be a number in"),
])
def test_bad_schedules_are_refused_naming_the_field(bad, message):
    with pytest.raises(ValueError, match=message):
        Schedule(PEAK, **bad)


@pytest.mark.parametrize("kind", ["constant", "cosine", "linear", "wsd"])
def test_each_kind_is_saved_and_read_back(tmp_path, kind):
    model = npgpt.build_model(npgpt.GPTConfig(vocab_size=32, context_length=8, emb_dim=8, n_heads=2, n_layers=1))
    state = TrainState(global_step=4)
    opt = npgpt.AdamW(model, lr=PEAK)
    run_schedule(state, opt, 40, 3, False, None, None, None, schedule=kind)
    save_checkpoint(tmp_path / "c.h5", model, opt, state=state)
    saved = read_checkpoint(tmp_path / "c.h5")["state"].schedule
    assert saved == state.schedule and saved.kind == kind
    assert [scheduled_lr(saved, s) for s in range(45)] == [scheduled_lr(state.schedule, s) for s in range(45)]
    if kind == "wsd":
        assert saved.decay_fraction == 0.2 and saved.decay_start == 32
