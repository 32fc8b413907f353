"""HellaSwag at scale: several examples a forward (batch_losses, padded on the right) give each
example's sums and means of the plain one-example scoring (ending_losses) on both backends; the
torch backend's device path (masked_loss_sums) equals the same math on the host; the counts of
hellaswag() do not depend on batch_examples; sharded over ranks (r::W) they add up to one
process's, and reduce=True sums them through torch.distributed's all_reduce (a stand-in here)."""
import sys
import types

import numpy as np
import pytest

import npgpt
from npgpt.base import Backend
from npgpt.hellaswag import batch_losses, ending_losses, hellaswag, render

pytestmark = pytest.mark.usefixtures("one_thread")   # see conftest.py
CTX = ["A man is sitting on a roof. He", "The chef slices the onions and", "She opens the laptop,",
       "Two boys are playing chess in the park. One of them", "The cat jumps onto the table and",
       " ".join(f"Step {i}: the worker lifts another heavy box." for i in range(12)) + " Then he", "It rains."]
ENDS = ["rests.", "drives the truck to the warehouse across the town.", "is ripping level tiles off.", "sings."]
EXAMPLES = [{"ctx": c, "endings": ENDS[i % 4:] + ENDS[:i % 4], "label": i % 4, "where": f"example {i}"}
            for i, c in enumerate(CTX)]


@pytest.fixture(scope="module")
def params():
    return npgpt.init_params(npgpt.GPTConfig.preset("tiny"), 3, "float32")


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_batched_equals_one_example_at_a_time(params, backend):
    model = npgpt.build_model(npgpt.GPTConfig.preset("tiny"), backend=backend, params=params).eval()
    enc = npgpt.get_tokenizer()
    rendered = [render(ex, enc, model.cfg.context_length) for ex in EXAMPLES]
    assert len({t.shape[1] for t, _ in rendered}) > 3               # lengths differ: the padding is exercised
    for i, (sums, means) in enumerate(batch_losses(model, rendered)):
        ref_sums, ref_means = ending_losses(model, *rendered[i])
        np.testing.assert_allclose(sums, ref_sums, rtol=1e-5, err_msg=f"example {i}")
        np.testing.assert_allclose(means, ref_means, rtol=1e-5, err_msg=f"example {i}")
    counts = [hellaswag(model, EXAMPLES, enc, batch_examples=b) for b in (1, 3, 8)]
    assert counts[0] == counts[1] == counts[2]
    expected = sum(int(ending_losses(model, *r)[0].argmin() == ex["label"]) for r, ex in zip(rendered, EXAMPLES))
    assert counts[0]["correct"] == expected


def test_the_device_path_equals_the_host_math(params):
    model = npgpt.build_model(npgpt.GPTConfig.preset("tiny"), backend="torch", params=params).eval()
    enc = npgpt.get_tokenizer()
    tokens, mask = render(EXAMPLES[0], enc, model.cfg.context_length)
    np.testing.assert_allclose(model.masked_loss_sums(tokens, mask), Backend.masked_loss_sums(model, tokens, mask),
                               rtol=1e-12)


def test_ranks_add_up_and_reduce_sums_them(params, monkeypatch):
    model = npgpt.build_model(npgpt.GPTConfig.preset("tiny"), params=params)
    enc = npgpt.get_tokenizer()
    whole = hellaswag(model, EXAMPLES, enc, batch_examples=2)
    parts = [hellaswag(model, EXAMPLES, enc, rank=r, world_size=3, batch_examples=2) for r in range(3)]
    assert [p["n"] for p in parts] == [3, 2, 2]                      # examples r, r + 3, ...
    for key in ("n", "correct", "correct_norm"):
        assert sum(p[key] for p in parts) == whole[key]
    others = [sum(p[k] for p in parts[1:]) for k in ("n", "correct", "correct_norm")]

    def all_reduce(t):                                                # ranks 1 and 2's counts arrive
        t += torch.tensor(others)
    torch = pytest.importorskip("torch")
    fake = types.SimpleNamespace(is_available=lambda: True, is_initialized=lambda: True, all_reduce=all_reduce)
    monkeypatch.setitem(sys.modules, "torch.distributed", fake)
    reduced = hellaswag(model, EXAMPLES, enc, rank=0, world_size=3, batch_examples=2, reduce=True)
    assert reduced == whole
