"""HellaSwag scoring against an independent computation of the same definition: transformers'
GPT2LMHeadModel loaded with the same weights (npgpt.export_hf), each ending run alone (no padding,
no mask), its token losses from torch.nn.functional.cross_entropy, then the argmins of their sum
and mean. The examples are written here in the dataset's jsonl form, with the labels chosen so
that acc and acc_norm differ: scoring by the sum where the mean is meant (or the reverse) fails."""
import json
import subprocess
import sys

import numpy as np
import pytest

import npgpt
from npgpt.cli import main
from npgpt.hellaswag import ending_losses, hellaswag, load_examples, render

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
F = torch.nn.functional

C = 64                                           # the tiny preset's context length
RTOL, ATOL = 1e-5, 1e-5                          # float32 logits, float64 sums

EXAMPLES = [
    ("A man is sitting on a roof. He", ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                                        "is holding a rubik's cube.", "starts pulling up roofing on a roof."]),
    ("A woman is outside with a bucket and a dog. The dog", ["runs.", "is running after a ball that the woman "
                                                             "throws across the whole yard again and again.",
                                                             "gets into a bath tub.", "sits down and waits."]),
    ("The chef slices the onions and", ["cries.", "puts them in a pan with butter and lets them brown slowly.",
                                       "walks away from the kitchen without a word to anyone.", "sings a song."]),
    ("Two boys are playing chess in the park. One of them", ["wins.", "moves a knight.",
                                                             "knocks the board over and every piece falls into "
                                                             "the grass below the bench.", "laughs loudly."]),
    ("She opens the laptop,", ["types a letter to her aunt in Spain about the summer holidays.", "sleeps.",
                               "closes it again.", "reads the news."]),
    # longer than the model's context: cut from the left
    (" ".join(f"Step {i}: the worker lifts another heavy box onto the truck." for i in range(12)) + " Then he",
     ["rests.", "drives the truck to the warehouse across the town.", "drinks some water.", "waves goodbye."]),
    ("The cat jumps onto the table and", ["knocks over a glass of milk that spills onto the floor.", "purrs.",
                                         "eats the fish.", "looks out of the window at the birds."]),
]


def reference_scores(hf, enc, ctx, endings):
    """Per ending, alone: (sum, mean) of F.cross_entropy over its tokens given the context, the
    context's last C + 1 - (longest ending) tokens where it is too long."""
    ctx_ids = enc.encode(ctx)
    end_ids = [enc.encode(" " + e) for e in endings]
    ctx_ids = ctx_ids[-(C + 1 - max(map(len, end_ids))):]
    sums, means = [], []
    for end in end_ids:
        ids = torch.tensor(ctx_ids + end)
        with torch.no_grad():
            logits = hf(ids[None, :-1]).logits[0]                             # (L-1, V)
        losses = F.cross_entropy(logits.double(), ids[1:], reduction="none")[len(ctx_ids) - 1:]
        assert len(losses) == len(end)
        sums.append(float(losses.sum()))
        means.append(float(losses.mean()))
    return np.array(sums), np.array(means)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, one_thread):
    """A tiny model (float32), its Hugging Face export, the reference scores, and a jsonl file whose
    labels make acc and acc_norm differ."""
    folder = tmp_path_factory.mktemp("hellaswag")
    model = npgpt.build_model(npgpt.GPTConfig.preset("tiny"), seed=3).eval()
    npgpt.export_hf(model, folder / "hf")
    npgpt.save_checkpoint(folder / "model.h5", model)
    hf = transformers.GPT2LMHeadModel.from_pretrained(folder / "hf").eval()
    enc = npgpt.get_tokenizer()
    scores = [reference_scores(hf, enc, ctx, ends) for ctx, ends in EXAMPLES]
    by_sum = [int(np.argmin(s)) for s, _ in scores]
    by_mean = [int(np.argmin(m)) for _, m in scores]
    differ = [i for i in range(len(EXAMPLES)) if by_sum[i] != by_mean[i]]
    assert len(differ) >= 4, f"the examples should tell sum from mean: {by_sum} vs {by_mean}"
    for s, m in scores:              # no near-ties: float32 noise cannot flip an argmin
        assert np.diff(np.sort(s))[0] > 1e-3 and np.diff(np.sort(m))[0] > 1e-4
    # label: the sum's choice on two of the examples where they differ, the mean's on the others
    labels = [by_sum[i] if i in differ[:2] else by_mean[i] for i in range(len(EXAMPLES))]
    acc = np.mean([by_sum[i] == labels[i] for i in range(len(EXAMPLES))])
    acc_norm = np.mean([by_mean[i] == labels[i] for i in range(len(EXAMPLES))])
    assert 0 < acc < 1 and 0 < acc_norm < 1 and acc != acc_norm
    path = folder / "hellaswag_val.jsonl"
    with open(path, "w") as f:
        for i, ((ctx, ends), label) in enumerate(zip(EXAMPLES, labels)):
            f.write(json.dumps({"ind": i, "activity_label": "Testing", "ctx_a": ctx, "ctx_b": "", "ctx": ctx,
                                "split": "val", "split_type": "indomain", "label": label, "endings": ends,
                                "source_id": f"test~{i}"}) + "\n")
    return {"folder": folder, "path": path, "model": model, "scores": scores, "labels": labels,
            "acc": acc, "acc_norm": acc_norm}


def test_a_context_longer_than_the_model_is_cut(setup):
    tokens, mask = render(load_examples(setup["path"])[5], npgpt.get_tokenizer(), C)
    assert tokens.shape[1] == C + 1 and mask[:, -1].any()             # inputs fill the context exactly


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_both_backends_match_the_reference(setup, backend):
    model = npgpt.build_model(setup["model"].cfg, backend=backend).eval()
    model.load_params(setup["model"].params())
    enc = npgpt.get_tokenizer()
    for i, example in enumerate(load_examples(setup["path"])):
        sums, means = ending_losses(model, *render(example, enc, C))
        ref_sums, ref_means = setup["scores"][i]
        for name, got, ref in (("sum", sums, ref_sums), ("mean", means, ref_means)):
            diff = np.abs(got - ref).max()
            assert np.all(np.abs(got - ref) <= ATOL + RTOL * np.abs(ref)), f"example {i} {name}: max diff {diff:.3g}"
    result = hellaswag(model, setup["path"], enc)
    assert result["n"] == len(EXAMPLES)
    assert result["acc"] == setup["acc"] and result["acc_norm"] == setup["acc_norm"]


def test_training_mode_dropout_and_ranks(setup):
    cfg = npgpt.GPTConfig.preset("tiny", drop_rate=0.5)
    model = npgpt.build_model(cfg).train()
    model.load_params(setup["model"].params())
    enc, examples = npgpt.get_tokenizer(), load_examples(setup["path"])
    result = hellaswag(model, examples, enc)
    assert model.training                                             # put back as it was
    assert (result["acc"], result["acc_norm"]) == (setup["acc"], setup["acc_norm"])   # dropout was off
    parts = [hellaswag(model, examples, enc, rank=r, world_size=3) for r in range(3)]
    for key in ("n", "correct", "correct_norm"):
        assert sum(p[key] for p in parts) == result[key]
    assert hellaswag(model, examples, enc, limit=2)["n"] == 2


def expected_line(setup, n=None):
    if n is None:
        acc, acc_norm, n = setup["acc"], setup["acc_norm"], len(EXAMPLES)
    else:
        s = [int(np.argmin(x)) for x, _ in setup["scores"][:n]]
        m = [int(np.argmin(x)) for _, x in setup["scores"][:n]]
        acc = np.mean([a == b for a, b in zip(s, setup["labels"])])
        acc_norm = np.mean([a == b for a, b in zip(m, setup["labels"])])
    return f"hellaswag: {n} examples, acc {acc:.4f}, acc_norm {acc_norm:.4f}"


def test_cli_checkpoint_and_pretrained(setup, capsys):
    folder = setup["folder"]
    assert main(["eval", "--checkpoint", str(folder / "model.h5"), "--hellaswag", str(setup["path"])]) == 0
    assert capsys.readouterr().out.splitlines() == [expected_line(setup)]          # HellaSwag alone
    assert main(["eval", "--pretrained", str(folder / "hf"), "--backend", "torch", "--hellaswag",
                 str(setup["path"]), "--hellaswag-limit", "3"]) == 0
    assert capsys.readouterr().out.splitlines() == [expected_line(setup, 3)]
    text = folder / "text.txt"
    text.write_text("some words to read again and again. " * 40)
    assert main(["eval", "--checkpoint", str(folder / "model.h5"), "--data", str(text), "--max-length", "16",
                 "--hellaswag", str(setup["path"])]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["train", "val", "hellaswag:"]
    assert lines[-1] == expected_line(setup)


GOOD = {"ctx": "He", "endings": ["a", "b", "c", "d"], "label": 0}


@pytest.mark.parametrize("line, message", [
    ('{"ctx": "He", "endings": ["a"', "line 2: not JSON (Expecting ',' delimiter at column 30)"),
    ('["ctx"]', 'line 2: expected a JSON object with "ctx", "endings" and "label", got an array'),
    (json.dumps({"endings": ["a"] * 4, "label": 0}), 'line 2: no "ctx" field (fields: endings, label)'),
    (json.dumps({**GOOD, "ctx": 7}), 'line 2: "ctx" is a number, expected a string'),
    (json.dumps({**GOOD, "endings": ["a", "b", "c"]}), 'line 2: "endings" has 3 items, expected 4'),
    (json.dumps({**GOOD, "endings": "abcd"}), 'line 2: "endings" is a string, expected an array of 4 strings'),
    (json.dumps({**GOOD, "endings": ["a", None, "c", "d"]}), 'line 2: "endings" item 1 is null, expected a string'),
    (json.dumps({**GOOD, "label": 4}), 'line 2: "label" is 4, expected 0, 1, 2 or 3'),
    (json.dumps({**GOOD, "label": "1"}), 'line 2: "label" is "1", expected 0, 1, 2 or 3'),
    (json.dumps({k: v for k, v in GOOD.items() if k != "label"}),
     'line 2: no "label" field (fields: ctx, endings) (hellaswag_test.jsonl has no labels: use hellaswag_val.jsonl)'),
])
def test_bad_input_is_one_line_naming_file_and_line(setup, tmp_path, capsys, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + line + "\n")
    with pytest.raises(ValueError) as e:
        load_examples(path)
    assert str(e.value) == f"{path} {message}"
    assert main(["eval", "--checkpoint", str(setup["folder"] / "model.h5"), "--hellaswag", str(path)]) == 2
    assert capsys.readouterr().err == f"npgpt eval: error: {path} {message}\n"


def test_other_refusals(setup, tmp_path, capsys):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(ValueError, match="empty.jsonl: no examples"):
        load_examples(tmp_path / "empty.jsonl")
    long_ending = {**GOOD, "endings": [" ".join(["word"] * 70), "a", "b", "c"]}
    with pytest.raises(ValueError, match=r"example 1: an ending of 70 tokens leaves no context in the model's "
                                         r"context_length of 64"):
        hellaswag(setup["model"], [GOOD, long_ending], npgpt.get_tokenizer())
    assert main(["eval", "--checkpoint", str(setup["folder"] / "model.h5"), "--hellaswag-limit", "3"]) == 2
    assert "--hellaswag-limit 3: expected a positive number of examples of a --hellaswag FILE" in capsys.readouterr().err


def test_importing_it_does_not_import_torch():
    code = "import sys, npgpt.hellaswag; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
