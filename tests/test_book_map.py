"""docs/book.md maps chapter 5 of the book to npgpt. Here: every file, name and command the page
cites exists (the commands run where they need no download, on the tiny OpenAI fixture), and what
each exercise's command rests on is checked against an independent computation or the book's own
code (llms_from_scratch, where installed): sampled_token_counts (5.1), temperature with top-k
(5.2), the deterministic settings (5.3), `npgpt eval`'s train and val losses (5.5), the GPT-2
sizes (5.6), the parameter-name table, and the backward that needs no zero_grad."""
from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import json
import math
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import npgpt
from npgpt.cli import build_parser, main
from npgpt.params import param_shapes
from npgpt.sampling import sample
from npgpt.weights.names import book_source, openai_source

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "book.md"
OPENAI = ROOT / "tests" / "fixtures" / "openai-tiny"
TF_VALUES = ROOT / "tests" / "fixtures" / "openai-tiny-tf-values.npz"
HP = json.loads((OPENAI / "hparams.json").read_text())
PROMPT = "Every effort moves you"

# the book's toy next-token logits of section 5.3 and its nine-word vocabulary (pizza is id 6)
BOOK_LOGITS = [4.51, 0.89, -1.90, 6.75, 1.63, -1.62, -1.89, 6.28, 1.79]
BOOK_VOCAB = "closer every effort forward inches moves pizza toward you".split()

pytestmark = pytest.mark.usefixtures("one_thread")   # see conftest.py


# ---- reading the page ----

FENCE = re.compile(r"```(\w*)\n(.*?)```", re.S)


def doc_text() -> str:
    return DOC.read_text(encoding="utf-8")


def prose(text: str) -> str:
    return FENCE.sub("", text)


def code_blocks(text: str) -> list[tuple[str, str]]:
    return FENCE.findall(text)


def spans(text: str) -> list[str]:
    return re.findall(r"`([^`\n]+)`", text)


def tables(text: str) -> list[tuple[str, list[list[str]]]]:
    """(header line, rows of cells) of every markdown table outside code blocks."""
    out = []
    for line in prose(text).splitlines():
        if not line.startswith("|"):
            header = None
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if header is None:
            header = line.strip()
            out.append((header, []))
        elif not set("".join(cells)) <= set("- "):
            out[-1][1].append(cells)
    return out


def section_rows(text: str) -> list[list[str]]:
    return [row for header, rows in tables(text) if header.startswith("| § |") for row in rows]


def name_rows(text: str) -> list[list[str]]:
    (rows,) = [rows for header, rows in tables(text) if header.startswith("| the book's `GPTModel`")]
    return rows


def module_of(path: str):
    return importlib.import_module(path.removesuffix(".py").replace("/", "."))


def resolve(obj, dotted: str):
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def npgpt_definitions() -> dict[str, set[str]]:
    """Class name -> its methods, and "" -> every top-level function name, over npgpt/ (no imports)."""
    defs: dict[str, set[str]] = {"": set()}
    for path in (ROOT / "npgpt").rglob("*.py"):
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.ClassDef):
                defs.setdefault(node.name, set()).update(
                    n.name for n in node.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)))
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                defs[""].add(node.name)
    return defs


def commands(text: str) -> list[list[str]]:
    """Every `npgpt ...` command of the page, inline or a line of a code block, as argv."""
    lines = [s for s in spans(prose(text)) if s.startswith("npgpt ")]
    lines += [line for _, block in code_blocks(text) for line in block.splitlines() if line.startswith("npgpt ")]
    return [shlex.split(line, comments=True)[1:] for line in lines]


# ---- the page cannot rot ----

def test_every_cited_file_exists():
    paths = [s for s in spans(prose(doc_text())) if re.fullmatch(r"(npgpt|tests|docs)/[\w/.-]+\.\w+", s)]
    assert len(paths) >= 15
    missing = [p for p in paths if not (ROOT / p).is_file()]
    assert not missing, f"docs/book.md cites files that do not exist: {missing}"


def test_every_table_name_is_defined_in_its_file():
    """Each row of the section tables: the names in the last column live in one of the files of the
    third; a backticked identifier in parentheses after a name is one of its parameters."""
    rows = section_rows(doc_text())
    assert len(rows) >= 30
    for section, book, files, names in rows:
        files = spans(files)
        assert files and all(f.endswith(".py") and (ROOT / f).is_file() for f in files), (section, files)
        modules = [module_of(f) for f in files]
        cited = re.findall(r"`([^`]+)`((?:\s*\([^)]*\))?)", names)
        assert cited, (section, book)
        for name, note in cited:
            if name.startswith("npgpt "):
                continue                                            # a command: checked below
            found = [resolve(m, name) for m in modules if _has(m, name)]
            assert found, f"{section} {book}: `{name}` is not defined in {files}"
            for arg in re.findall(r"`(\w+)(?:=[^`]*)?`", note):
                assert arg in inspect.signature(found[0]).parameters, f"{section}: {name} has no parameter {arg!r}"


def _has(module, dotted: str) -> bool:
    try:
        resolve(module, dotted)
        return True
    except AttributeError:
        return False


def test_every_name_in_the_prose_exists():
    """`npgpt.X` and `llms_from_scratch.X` resolve; `Class.method` of an npgpt class exists; a name
    written "`name` in `npgpt/file.py`" is defined in that file."""
    text = prose(doc_text())
    for dotted in [s for s in spans(text) if re.fullmatch(r"(npgpt|llms_from_scratch)(\.\w+)+", s)]:
        top, rest = dotted.split(".", 1)
        if top == "llms_from_scratch":
            pytest.importorskip("llms_from_scratch.ch05", reason="pip install llms-from-scratch --no-deps")
        module, parts = importlib.import_module(top), rest.split(".")
        while parts and hasattr(module, "__path__") and importlib.util.find_spec(f"{module.__name__}.{parts[0]}"):
            module = importlib.import_module(f"{module.__name__}.{parts.pop(0)}")
        assert parts and _has(module, ".".join(parts)), f"`{dotted}` does not resolve"
    defs = npgpt_definitions()
    methods = [s for s in spans(text) if re.fullmatch(r"[A-Z]\w*\.\w+", s) and s.split(".")[0] in defs]
    assert {"Backend.train_step", "NumpyGPT.forward_backward", "TorchGPT._forward_backward"} <= set(methods)
    for cited in methods:
        cls, method = cited.split(".")
        assert method in defs[cls], f"`{cited}`: {cls} has no method {method}"
    placed = re.findall(r"((?:`\w+`(?:, | and ))*`\w+`) in `(npgpt/[\w/]+\.py)`", text)
    assert len(placed) >= 3
    for names, path in placed:
        module = module_of(path)
        for name in spans(names):
            assert _has(module, name), f"`{name}` is not defined in {path}"


def test_every_command_parses():
    argvs = commands(doc_text())
    assert {argv[0] for argv in argvs} >= {"train", "generate", "eval", "gradcheck"}
    parser = build_parser()
    for argv in argvs:
        try:
            parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f"docs/book.md: `npgpt {shlex.join(argv)}` does not parse (see the usage above)")


def test_generate_and_eval_commands_run_on_the_fixture(tmp_path, capsys):
    """Each generate / eval command of the page, with gpt2/SIZE replaced by the tiny OpenAI folder and
    runs/npgpt/checkpoint.h5 by an untrained tiny model's checkpoint."""
    ckpt = npgpt.save_checkpoint(tmp_path / "checkpoint.h5", npgpt.build_model(npgpt.GPTConfig.preset("tiny")))
    runnable = [argv for argv in commands(doc_text()) if argv[0] in ("generate", "eval")]
    assert len(runnable) >= 7
    for argv in runnable:
        argv = [str(OPENAI) if re.fullmatch(r"gpt2/\w+", a) else str(ckpt) if a == "runs/npgpt/checkpoint.h5"
                else a for a in argv]
        assert main(argv) == 0, shlex.join(argv)
        assert capsys.readouterr().out.strip()


def test_python_one_liners_print_what_the_page_shows():
    """A `python -c` line in a code block runs; a text block right after it is its exact output."""
    text = doc_text()
    blocks = code_blocks(text)
    ran = 0
    for i, (_, block) in enumerate(blocks):
        for line in block.splitlines():
            if not line.startswith("python -c "):
                continue
            argv = shlex.split(line)
            done = subprocess.run([sys.executable, *argv[1:]], capture_output=True, text=True, cwd=ROOT, timeout=120)
            assert done.returncode == 0, done.stderr
            if i + 1 < len(blocks) and blocks[i + 1][0] == "text":
                assert done.stdout.strip() == blocks[i + 1][1].strip()
            ran += 1
    assert ran >= 1


# ---- exercise 5.1: sampled_token_counts ----

def test_sampled_token_counts_are_samples_draws():
    logits = np.random.default_rng(0).normal(0, 2, 40)
    for kwargs in ({"temperature": 0.7}, {"temperature": 1.3, "top_k": 5}, {"temperature": 1.0, "top_p": 0.8}):
        probs = npgpt.next_token_probs(logits, **kwargs)
        want = np.bincount(sample(np.tile(probs, (3000, 1)), np.random.default_rng(7)), minlength=40)
        got = npgpt.sampled_token_counts(logits, n=3000, seed=7, **kwargs)
        np.testing.assert_array_equal(got, want, err_msg=str(kwargs))
        assert got.dtype == np.int64 and got.sum() == 3000


def softmax_with_temperature(logits, T):
    """Written out in plain Python, independently of npgpt."""
    top = max(logits)
    e = [math.exp((x - top) / T) for x in logits]
    return [x / sum(e) for x in e]


@pytest.mark.parametrize("T", [1.0, 0.1, 5.0])
def test_sampled_frequencies_match_the_softmax_with_temperature(T):
    n = 200_000
    counts = npgpt.sampled_token_counts(BOOK_LOGITS, T, n=n, seed=1)
    p = np.array(softmax_with_temperature(BOOK_LOGITS, T))
    np.testing.assert_allclose(npgpt.next_token_probs(BOOK_LOGITS, T), p, rtol=1e-12, atol=1e-300)
    bound = 6 * np.sqrt(n * p * (1 - p)) + 1                   # six standard deviations of a binomial count
    for word, c, expected, b in zip(BOOK_VOCAB, counts, n * p, bound):
        assert abs(c - expected) <= b, f"T={T} {word}: {c} draws, expected {expected:.1f} +- {b:.1f}"
    torch = pytest.importorskip("torch")
    ref = torch.softmax(torch.tensor(BOOK_LOGITS, dtype=torch.float64) / T, dim=0).numpy()
    np.testing.assert_allclose(npgpt.next_token_probs(BOOK_LOGITS, T), ref, rtol=1e-12, atol=1e-300)


def test_the_books_printed_counts_and_pizza():
    """docs/book.md quotes the book's counts of pizza (torch's RNG, one draw at a time) and its
    exact probabilities."""
    torch = pytest.importorskip("torch")
    pizza = []
    for T in (1, 0.1, 5):
        probs = torch.softmax(torch.tensor(BOOK_LOGITS) / T, dim=0)
        torch.manual_seed(123)
        draws = [torch.multinomial(probs, num_samples=1).item() for _ in range(1000)]
        pizza.append(draws.count(BOOK_VOCAB.index("pizza")))
    assert pizza == [0, 0, 32]
    p = [npgpt.next_token_probs(BOOK_LOGITS, T)[6] for T in (1, 0.1, 5)]
    assert f"{p[0]:.2%}, {p[1]:.0e} and {p[2]:.1%}" == "0.01%, 3e-38 and 4.3%"
    assert "0.01%,\n3e-38 and 4.3%" in doc_text() and "the book's torch RNG: 0, 0 and 32" in doc_text()


def test_sampled_token_counts_edge_cases():
    assert npgpt.sampled_token_counts(BOOK_LOGITS, 0.0, n=50).tolist() == [0, 0, 0, 50, 0, 0, 0, 0, 0]
    assert npgpt.sampled_token_counts(BOOK_LOGITS, 1.0, n=0).sum() == 0
    same_seed = [npgpt.sampled_token_counts(BOOK_LOGITS, seed=5) for _ in range(2)]
    assert np.array_equal(*same_seed)
    with pytest.raises(ValueError, match=r"expected one row of shape \(V,\), got shape \(2, 9\)"):
        npgpt.sampled_token_counts([BOOK_LOGITS, BOOK_LOGITS])
    with pytest.raises(ValueError, match="n must be an integer >= 0, got -1"):
        npgpt.sampled_token_counts(BOOK_LOGITS, n=-1)
    with pytest.raises(ValueError, match="temperature"):
        npgpt.sampled_token_counts(BOOK_LOGITS, -1.0)


# ---- exercise 5.2: temperature and top-k as the book's generate applies them ----

def book_ch05():
    return pytest.importorskip("llms_from_scratch.ch05", reason="pip install llms-from-scratch --no-deps")


def book_draws(logits, n, temperature, top_k, seed=0):
    """n next tokens from the book's own generate(), on a model whose logits are always `logits`."""
    ch05 = book_ch05()
    import torch

    class FixedLogits(torch.nn.Module):
        def forward(self, idx):                                     # (B, T) -> (B, T, V)
            return torch.tensor(logits, dtype=torch.float32).expand(*idx.shape, len(logits))

    def draw(batch):
        out = ch05.generate(FixedLogits(), torch.zeros(batch, 1, dtype=torch.long), max_new_tokens=1,
                            context_size=1, temperature=temperature, top_k=top_k)
        return out[:, -1].numpy()
    torch.manual_seed(seed)
    # the book's top-k compares logits (B, V) with min_val (B,): right only for one row at a time
    draws = draw(n) if top_k is None else np.concatenate([draw(1) for _ in range(n)])
    return np.bincount(draws, minlength=len(logits))


@pytest.mark.parametrize("temperature, top_k", [(1.4, 3), (0.5, 5), (5.0, None)])
def test_temperature_and_top_k_sample_as_the_books_generate(temperature, top_k):
    stats = pytest.importorskip("scipy.stats")
    n = 50_000 if top_k is None else 10_000
    book = book_draws(BOOK_LOGITS, n, temperature, top_k)
    ours = npgpt.sampled_token_counts(BOOK_LOGITS, temperature, top_k=top_k, n=n, seed=3)
    probs = npgpt.next_token_probs(BOOK_LOGITS, temperature, top_k=top_k)
    assert (book[probs == 0] == 0).all() and (ours[probs == 0] == 0).all()
    kept = (book + ours) > 0
    p = stats.chi2_contingency(np.stack([book[kept], ours[kept]])).pvalue
    assert p > 1e-4, f"the book's draws {book.tolist()} and npgpt's {ours.tolist()} differ (p = {p:.1e})"


# ---- exercise 5.3: the settings that make generation deterministic ----

def book_params_from_tf_values():
    """The nested dict the book's load_gpt2_params_from_tf_ckpt builds, from what TensorFlow read back."""
    values = np.load(TF_VALUES)
    params = {"blocks": [{} for _ in range(HP["n_layer"])]}
    for name in values.files:
        parts = name.split("/")[1:]                                # model/h0/attn/c_attn/w -> h0 attn c_attn w
        target = params["blocks"][int(parts[0][1:])] if re.fullmatch(r"h\d+", parts[0]) else params
        for key in parts[1:-1]:
            target = target.setdefault(key, {})
        target[parts[-1]] = np.squeeze(values[name])
    return params


def book_gpt():
    """The book's GPTModel with the fixture's weights, loaded the book's way."""
    book_ch05()
    from llms_from_scratch.ch04 import GPTModel
    from llms_from_scratch.ch05 import load_weights_into_gpt
    cfg = {"vocab_size": HP["n_vocab"], "context_length": HP["n_ctx"], "emb_dim": HP["n_embd"],
           "n_heads": HP["n_head"], "n_layers": HP["n_layer"], "drop_rate": 0.1, "qkv_bias": True}
    gpt = GPTModel(cfg)
    load_weights_into_gpt(gpt, book_params_from_tf_values())
    return gpt.eval()


def cli_output(capsys, *argv):
    assert main(list(argv)) == 0
    return capsys.readouterr().out


def test_temperature_zero_and_top_k_one_are_deterministic_and_the_books(capsys):
    ch05 = book_ch05()
    import torch
    from npgpt.weights.pretrained import load_tokenizer
    base = ["generate", "--pretrained", str(OPENAI), "--prompt", PROMPT, "--max-new-tokens", "30"]
    greedy = {cli_output(capsys, *base, "--temperature", "0", "--seed", s) for s in ("1", "2")}
    top1 = {cli_output(capsys, *base, "--temperature", "1.4", "--top-k", "1", "--seed", s) for s in ("1", "2")}
    assert len(greedy) == 1 and greedy == top1
    sampled = {cli_output(capsys, *base, "--temperature", "1.4", "--seed", s) for s in ("1", "2")}
    assert len(sampled) == 2                     # sampling does follow the seed: the equalities above mean something
    (text,) = greedy
    tok, gpt = load_tokenizer(OPENAI), book_gpt()
    ids = torch.tensor([tok.encode(PROMPT)])
    for kwargs in ({"temperature": 0.0}, {"temperature": 1.4, "top_k": 1}):
        with torch.no_grad():
            out = ch05.generate(gpt, ids, max_new_tokens=30, context_size=HP["n_ctx"], **kwargs)
        assert text == tok.decode(out[0].tolist()) + "\n", kwargs


# ---- exercise 5.5: train and val loss the book's way ----

def test_eval_reports_the_books_train_and_val_losses(capsys, verdict_text):
    """The book: split The Verdict 90/10 by characters, windows of max_length with stride max_length
    (256, cut here to the fixture's context of 16), batch 2, the train loader shuffled without its last
    partial batch, calc_loss_loader over every batch."""
    calc_loss_loader = book_ch05().calc_loss_loader
    import torch
    from torch.utils.data import DataLoader
    from llms_from_scratch.ch02 import GPTDatasetV1
    from npgpt.weights.pretrained import load_tokenizer
    out = cli_output(capsys, "eval", "--pretrained", str(OPENAI))
    got = dict(re.findall(r"^(train|val) loss (\d+\.\d{4})  perplexity", out, re.M))
    assert set(got) == {"train", "val"}, out
    tok, T, gpt = load_tokenizer(OPENAI), HP["n_ctx"], book_gpt()
    split = int(0.90 * len(verdict_text))
    torch.manual_seed(123)
    train = DataLoader(GPTDatasetV1(verdict_text[:split], tok, T, T), batch_size=2, shuffle=True, drop_last=True)
    val = DataLoader(GPTDatasetV1(verdict_text[split:], tok, T, T), batch_size=2, shuffle=False, drop_last=False)
    assert len(train.dataset) % 2 == 0           # else drop_last would drop a window that depends on the order
    with torch.no_grad():
        book = {"train": calc_loss_loader(train, gpt, "cpu"), "val": calc_loss_loader(val, gpt, "cpu")}
    for part in ("train", "val"):
        assert abs(float(got[part]) - book[part]) <= 5e-5 + 1e-5, \
            f"{part}: npgpt {got[part]}, the book {book[part]:.6f}"
        ppl = float(re.search(rf"^{part} loss \S+  perplexity (\S+)", out, re.M).group(1))
        assert ppl == pytest.approx(math.exp(book[part]), abs=0.005 + 1e-5 * ppl)


# ---- exercise 5.6: the larger GPT-2 models ----

def test_gpt2_presets_are_the_books_sizes():
    """The book's model_configs (chapter 5) and GPT-2's published parameter counts (tied head)."""
    book = {"gpt2-small": (768, 12, 12, 124_439_808), "gpt2-medium": (1024, 24, 16, 354_823_168),
            "gpt2-large": (1280, 36, 20, 774_030_080), "gpt2-xl": (1600, 48, 25, 1_557_611_200)}
    for name, (emb_dim, n_layers, n_heads, count) in book.items():
        cfg = npgpt.PRESETS[name]
        assert (cfg.emb_dim, cfg.n_layers, cfg.n_heads, cfg.context_length, cfg.qkv_bias) == \
            (emb_dim, n_layers, n_heads, 1024, True), name
        assert npgpt.num_params(cfg) == count, name


# ---- the parameter-name table ----

TABLE_CFG = npgpt.GPTConfig(vocab_size=50, context_length=12, emb_dim=8, n_heads=2, n_layers=1, qkv_bias=True)


def test_parameter_table_is_the_importers_mapping():
    rows = name_rows(doc_text())
    shapes = param_shapes(TABLE_CFG)                                 # untied: with lm_head.weight
    assert sorted(spans(row[1])[0] for row in rows) == sorted(shapes)
    C, letters = TABLE_CFG.emb_dim, {"V": TABLE_CFG.vocab_size, "context": TABLE_CFG.context_length}
    for book, ours, openai, layout in rows:
        (name,) = spans(ours)
        assert spans(book) == book_source(name)[0], name
        if spans(openai)[0].startswith("model/"):
            assert spans(openai) == openai_source(name)[0], name
        dims = [d.strip() for d in re.match(r"\(([^)]*)\)", layout).group(1).split(",") if d.strip()]
        want = tuple(letters[d] if d in letters else int(d[:-1] or 1) * C for d in dims)   # "4C" -> 4 * C
        assert want == shapes[name], f"{name}: the table says {layout.split(':')[0]}, npgpt's shape is {shapes[name]}"


def test_parameter_table_covers_the_books_model():
    book_ch05()
    from llms_from_scratch.ch04 import GPTModel
    cfg = {"vocab_size": 50, "context_length": 12, "emb_dim": 8, "n_heads": 2, "n_layers": 1, "drop_rate": 0.0,
           "qkv_bias": True}
    book_names = sorted(n for row in name_rows(doc_text()) for n in spans(row[0]))
    assert book_names == sorted(name for name, _ in GPTModel(cfg).named_parameters())


def test_c_attn_stacks_query_key_value_by_rows(tmp_path):
    """The layout column's claim, on a book .pth and on OpenAI's (1, C, 3C) weights."""
    torch = pytest.importorskip("torch")
    book_ch05()
    from llms_from_scratch.ch04 import GPTModel
    cfg = {"vocab_size": 50, "context_length": 12, "emb_dim": 8, "n_heads": 2, "n_layers": 1, "drop_rate": 0.0,
           "qkv_bias": True}
    torch.manual_seed(0)
    gpt = GPTModel(cfg)
    torch.save(gpt.state_dict(), tmp_path / "model.pth")
    p = npgpt.load_pretrained(tmp_path / "model.pth", n_heads=2).params()
    att, C = gpt.trf_blocks[0].att, 8
    for i, w in enumerate((att.W_query, att.W_key, att.W_value)):
        np.testing.assert_array_equal(p["h.0.attn.c_attn.weight"][i * C:(i + 1) * C], w.weight.detach().numpy())
        np.testing.assert_array_equal(p["h.0.attn.c_attn.bias"][i * C:(i + 1) * C], w.bias.detach().numpy())
    w = np.load(TF_VALUES)["model/h0/attn/c_attn/w"]                             # (1, C, 3C)
    np.testing.assert_array_equal(npgpt.load_pretrained(OPENAI).params()["h.0.attn.c_attn.weight"], w[0].T)


# ---- where zero_grad went ----

@pytest.mark.parametrize("kernels", ["fast", "reference"])
@pytest.mark.parametrize("tied", [False, True])
def test_backward_overwrites_every_gradient(tied, kernels):
    """No zero_grad: gradients left in the buffer by anything before do not leak into the next
    backward (the untied model's wte, which embedding_backward adds into, included)."""
    cfg = npgpt.GPTConfig.preset("tiny", vocab_size=60, context_length=12, tie_weights=tied, qkv_bias=True)
    model = npgpt.build_model(cfg, dtype="float64", seed=3, kernels=kernels)
    x, y = (np.random.default_rng(s).integers(0, 60, (2, 12)) for s in (1, 2))
    _, clean = model.loss_and_grads(x, y)
    model.flat_grads[:] = 1e3
    _, again = model.loss_and_grads(x, y)
    for name in clean:
        np.testing.assert_array_equal(again[name], clean[name], err_msg=name)


def test_train_step_is_forward_backward_then_the_optimizer_step():
    cfg = npgpt.GPTConfig.preset("tiny", vocab_size=60, context_length=12)
    a, b = (npgpt.build_model(cfg, dtype="float64", seed=3) for _ in range(2))
    opt_a, opt_b = npgpt.AdamW(a), npgpt.AdamW(b)
    for s in range(3):
        x, y = (np.random.default_rng([s, t]).integers(0, 60, (2, 12)) for t in (0, 1))
        loss_a = a.train_step(x, y, opt_a)
        loss_b = b.forward_backward(x, y)
        opt_b.step()
        assert loss_a == loss_b
    for name, p in a.params().items():
        np.testing.assert_array_equal(p, b.params()[name], err_msg=name)
