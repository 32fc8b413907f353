"""layers.py takes the shapes its reference.py twins take, and keeps to its own word.

For every public function: (a) a (2, 3, ...) leading shape gives the (6, ...) result reshaped, bit
for bit, and the reshapes are views, not copies; (b) a wrong shape raises ValueError naming the
argument and the shape it expected; (c) no argument is changed except those the first line of the
docstring says are written in place; (d) the docstring names a twin that reference.py has.
Blocks are shrunk so that these small arrays are really cut into blocks and drawn in jumps.
"""
import inspect

import numpy as np
import pytest

from npgpt.numpy_backend import layers as L
from npgpt.numpy_backend import softmax_layers as S
from npgpt.numpy_backend import reference as R
from npgpt.numpy_backend import threads

C, COUT, V, T, NH, TMAX = 5, 7, 11, 4, 2, 9       # none of them 6, the number of rows: see leaves_match


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    """48-byte row blocks, every product cut, 8 numbers a random block, and two threads."""
    monkeypatch.setattr(threads, "BLOCK_BYTES", 48)
    monkeypatch.setattr(threads, "MATMUL_MIN_MACS", 1)
    monkeypatch.setattr(threads, "RANDOM_BLOCK", 8)
    before = threads.num_threads()
    threads.set_num_threads(2)
    yield
    threads.set_num_threads(before)


def rnd(*shape, seed=0, dtype=np.float64):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def cases(dtype):
    """name -> (function, args(lead), names of the arguments written in place). args(lead) builds
    the arguments for the leading shape lead from the same numbers, for lead (6,) and (2, 3)."""
    w, b = rnd(C, seed=1, dtype=dtype), rnd(C, seed=2, dtype=dtype)
    lw, lb = rnd(COUT, C, seed=3, dtype=dtype), rnd(COUT, seed=4, dtype=dtype)
    wte, wpe = rnd(V, C, seed=5, dtype=dtype), rnd(TMAX, C, seed=6, dtype=dtype)

    def x(lead, *tail, seed=7):
        tail = tail or (C,)
        return rnd(6, *tail, seed=seed, dtype=dtype).reshape(*lead, *tail)

    def mask(lead, *tail):
        tail = tail or (C,)
        return R.dropout_mask(np.random.default_rng(8), (6, *tail), 0.3, dtype).reshape(*lead, *tail)

    targets = lambda lead: np.random.default_rng(9).integers(0, V, 6).reshape(lead)
    idx = lambda lead: np.random.default_rng(10).integers(0, V, (6, T)).reshape(*lead, T)
    qkv = lambda lead: x(lead, T, 12)                 # (..., T, 3C): C = 4, two heads of 2
    att_mask = lambda lead: mask(lead, NH, T, T)
    return {
        "embedding_forward": (L.embedding_forward, lambda lead: (idx(lead), wte, wpe), set()),
        "embedding_backward": (L.embedding_backward, lambda lead: (
            x(lead, T, C), idx(lead), np.zeros((V, C), dtype), np.zeros((TMAX, C), dtype)),
            {"dwte", "dwpe"}),
        "dropout_mask": (L.dropout_mask, lambda lead: (np.random.default_rng(11), (*lead, C), 0.3, dtype),
                         {"rng"}),
        "dropout_forward": (L.dropout_forward, lambda lead: (x(lead), mask(lead)), set()),
        "dropout_backward": (L.dropout_backward, lambda lead: (x(lead, seed=12), mask(lead)), set()),
        "linear_forward": (L.linear_forward, lambda lead: (x(lead), lw, lb), set()),
        "linear_backward": (L.linear_backward, lambda lead: (
            x(lead, COUT, seed=12), L.linear_forward(x(lead), lw, lb)[1], np.zeros((COUT, C), dtype),
            np.zeros(COUT, dtype)), {"dw", "db"}),
        "layernorm_forward": (L.layernorm_forward, lambda lead: (x(lead), w, b), set()),
        "layernorm_backward": (L.layernorm_backward, lambda lead: (
            x(lead, seed=12), L.layernorm_forward(x(lead), w, b)[1], np.zeros(C, dtype),
            np.zeros(C, dtype)), {"dw", "db"}),
        "gelu_forward": (L.gelu_forward, lambda lead: (x(lead),), set()),
        "gelu_backward": (L.gelu_backward, lambda lead: (
            x(lead, seed=12), L.gelu_forward(x(lead))[1]), set()),
        "softmax_inplace": (L.softmax_inplace, lambda lead: (x(lead) * 3,), {"x"}),
        "attention_forward": (L.attention_forward, lambda lead: (qkv(lead), NH, att_mask(lead)), set()),
        "attention_backward": (L.attention_backward, lambda lead: (
            x(lead, T, 4, seed=12), L.attention_forward(qkv(lead), NH, att_mask(lead))[1]), set()),
        "cross_entropy_forward": (L.cross_entropy_forward, lambda lead: (x(lead, V) * 3, targets(lead)),
                                  {"logits"}),
        "cross_entropy_loss": (L.cross_entropy_loss, lambda lead: (x(lead, V) * 3, targets(lead)),
                               {"logits"}),
        "cross_entropy_backward": (L.cross_entropy_backward, lambda lead: (
            L.cross_entropy_forward(x(lead, V) * 3, targets(lead))[1],), {"cache"}),
    }


NAMES = list(cases(np.float64))


def leaves(obj):
    """The values inside a result or an argument (nested tuples flattened, but not a shape), in order."""
    if isinstance(obj, (tuple, list)) and not all(isinstance(n, int) for n in obj):
        return [leaf for item in obj for leaf in leaves(item)]
    return [obj]


def snapshot(obj):
    """Copies of the values inside obj: arrays copied, a Generator by its state."""
    return [np.array(a, copy=True) if isinstance(a, np.ndarray)
            else a.bit_generator.state if isinstance(a, np.random.Generator) else a for a in leaves(obj)]


def unchanged(obj, before):
    return all(np.array_equal(a, b, equal_nan=True) if isinstance(b, np.ndarray) else a == b
               for a, b in zip(snapshot(obj), before))


def leaves_match(flat, lead):
    """lead's values are flat's reshaped, bit for bit (same dtype). Arrays with 6 rows (the row
    count) must have the leading shape (2, 3), except in a cache, which may keep the (6, C) view."""
    f_leaves, l_leaves = leaves(flat), leaves(lead)
    assert len(f_leaves) == len(l_leaves)
    for i, (f, l) in enumerate(zip(f_leaves, l_leaves)):
        if isinstance(f, np.random.Generator):
            assert f.bit_generator.state == l.bit_generator.state
        elif isinstance(f, np.ndarray):
            if f.shape[:1] == (6,) and (i == 0 or l.shape != f.shape):
                assert l.shape == (2, 3) + f.shape[1:], (i, l.shape, f.shape)
            np.testing.assert_array_equal(l.reshape(f.shape), f, strict=True)
        elif isinstance(f, tuple) and f[:1] == (6,):                    # a shape (dropout_mask's)
            assert l == (2, 3) + f[1:]
        else:
            assert l == f


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("name", NAMES)
def test_leading_shape_gives_the_rows_result_bit_for_bit(name, dtype):
    fn, make, _ = cases(dtype)[name]
    flat_args, lead_args = make((6,)), make((2, 3))
    arrays = [a for a in leaves(flat_args) if isinstance(a, np.ndarray) and a.dtype.kind == "f"]
    assert not arrays or len(threads.row_blocks(arrays[0])) > 1      # blocks really cut
    flat, lead = fn(*flat_args), fn(*lead_args)
    leaves_match(flat, lead)                                          # the results
    leaves_match(flat_args, lead_args)                                # the arguments written


def test_reshapes_are_views():
    """The (..., C) input reaches the kernel as a view: the caches hold the caller's memory, and
    what is written in place is the caller's array."""
    x, qkv, logits = rnd(2, 3, C), rnd(2, 3, T, 12), rnd(2, 3, V)
    assert np.shares_memory(L.linear_forward(x, rnd(COUT, C))[1][0], x)
    assert np.shares_memory(L.gelu_forward(x)[1][0], x)
    assert np.shares_memory(L.attention_forward(qkv, NH)[1][0], qkv)
    _, (probs, _) = L.cross_entropy_forward(logits, np.zeros((2, 3), int))
    assert probs is logits and np.allclose(logits.sum(axis=-1), 1)
    assert L.cross_entropy_backward((probs, np.zeros((2, 3), int))) is logits
    rows = rnd(6, C)                                                   # the model's (N, C): untouched
    assert L.layernorm_forward(rows, rnd(C), rnd(C))[0].shape == (6, C)
    assert L.linear_forward(rows, rnd(COUT, C))[1][0].base is rows


def test_entry_by_entry_layers_take_a_scalar():
    x = np.array(0.7)
    out, cache = L.gelu_forward(x)
    ref, ref_cache = R.gelu_forward(x)
    assert out.shape == () and np.array_equal(out, ref)
    assert np.array_equal(L.gelu_backward(np.array(1.3), cache), R.gelu_backward(np.array(1.3), ref_cache))
    assert np.array_equal(L.dropout_forward(x, np.array(2.0))[0], 1.4)


@pytest.mark.parametrize("name", NAMES)
def test_only_what_the_first_docstring_line_names_is_written(name):
    fn, make, written = cases(np.float64)[name]
    params = list(inspect.signature(fn).parameters)
    args = make((2, 3))
    before = [snapshot(a) for a in args]
    fn(*args)
    first_line = inspect.getdoc(fn).splitlines()[0]
    assert ("in place" in first_line) == bool(written), first_line
    for pname, arg, old in zip(params, args, before):
        if pname in written:
            assert pname in first_line, f"{name}: its first docstring line does not name {pname}"
            assert not unchanged(arg, old), f"{name} documents {pname} as written, but left it unchanged"
        else:
            assert unchanged(arg, old), f"{name} changed its argument {pname}"


def test_in_place_arrays_must_reshape_to_a_view():
    logits = rnd(V, 6).T.reshape(2, 3, V)[:, ::-1]                     # non-contiguous: a reshape copies
    with pytest.raises(ValueError, match=r"^logits: expected an array whose \(N, V\) rows are a view"):
        L.cross_entropy_forward(logits, np.zeros((2, 3), int))


def test_wrong_shapes_name_the_argument_and_the_shape_expected():
    x, w, b, lw = rnd(2, 3, C), rnd(C), rnd(C), rnd(COUT, C)
    ids, lv = np.zeros((2, 3), int), rnd(2, 3, V)
    multiple = "(..., T, 3C) with C a multiple of n_heads=2"
    ln_cache, lin_cache = L.layernorm_forward(x, w, b)[1], L.linear_forward(x, lw)[1]
    att_cache = L.attention_forward(rnd(2, 3, T, 12), NH)[1]
    wte, wpe = rnd(V, C), rnd(TMAX, C)
    bad = [  # argument, the expected shape as the message gives it, the call
        ("x", "(..., C)", lambda: L.layernorm_forward(np.float64(1.0), w, b)),
        ("w", "(5,)", lambda: L.layernorm_forward(x, rnd(C + 1), b)),
        ("b", "(5,)", lambda: L.layernorm_forward(x, w, rnd(C, 1))),
        ("dout", "(..., 5) with 6 rows", lambda: L.layernorm_backward(rnd(2, 3, 6), ln_cache, w * 0, b * 0)),
        ("dout", "(..., 5) with 6 rows", lambda: L.layernorm_backward(rnd(7, C), ln_cache, w * 0, b * 0)),
        ("dw", "(5,)", lambda: L.layernorm_backward(x, ln_cache, rnd(C + 1), b * 0)),
        ("db", "(5,)", lambda: L.layernorm_backward(x, ln_cache, w * 0, rnd(1, C))),
        ("x", "(..., 5)", lambda: L.linear_forward(rnd(2, 3, C + 1), lw)),
        ("x", "(..., 5)", lambda: L.linear_forward(np.float64(1.0), lw)),
        ("w", "(Cout, Cin)", lambda: L.linear_forward(x, rnd(COUT))),
        ("b", "(7,)", lambda: L.linear_forward(x, lw, rnd(C))),
        ("dout", "(..., 7) with 6 rows", lambda: L.linear_backward(rnd(2, 3, C), lin_cache, lw * 0)),
        ("dout", "(..., 7) with 6 rows", lambda: L.linear_backward(rnd(4, COUT), lin_cache, lw * 0)),
        ("dw", "(7, 5)", lambda: L.linear_backward(rnd(2, 3, COUT), lin_cache, rnd(C, COUT))),
        ("db", "(7,)", lambda: L.linear_backward(rnd(2, 3, COUT), lin_cache, lw * 0, rnd(C))),
        ("dout", "x's (2, 3, 5)", lambda: L.gelu_backward(rnd(6, C), L.gelu_forward(x)[1])),
        ("mask", "x's (2, 3, 5)", lambda: L.dropout_forward(x, np.ones((6, C)))),
        ("dout", "the mask's (2, 3, 5)", lambda: L.dropout_backward(rnd(6, C), np.ones((2, 3, C)))),
        ("x", "(..., K)", lambda: L.softmax_inplace(np.float64(1.0))),
        ("targets", "logits' leading shape (2, 3)", lambda: L.cross_entropy_forward(lv, np.zeros(6, int))),
        ("targets", "logits' leading shape (2, 3)", lambda: L.cross_entropy_loss(lv, np.zeros((3, 2), int))),
        ("logits", "(..., V)", lambda: L.cross_entropy_loss(np.float64(1.0), np.zeros((), int))),
        ("targets", "the probabilities' leading shape (2, 3)",
         lambda: L.cross_entropy_backward((lv, np.zeros(6, int)))),
        ("qkv", multiple, lambda: L.attention_forward(rnd(12), NH)),
        ("qkv", multiple, lambda: L.attention_forward(rnd(2, 3, 10), NH)),
        ("qkv", multiple, lambda: L.attention_forward(rnd(2, 3, 9), NH)),
        ("att_mask", "(..., NH, T, T) = (2, 2, 3, 3)",
         lambda: L.attention_forward(rnd(2, 3, 12), NH, np.ones((2, 3, 3)))),
        ("dy", "(..., T, C) = (2, 3, 4, 4)", lambda: L.attention_backward(rnd(6, T, 4), att_cache)),
        ("idx", "(..., T) with T <= 9 (the rows of wpe)", lambda: L.embedding_forward(np.array(3), wte, wpe)),
        ("idx", "(..., T) with T <= 9 (the rows of wpe)",
         lambda: L.embedding_forward(np.zeros((2, TMAX + 1), int), wte, wpe)),
        ("dout", "the ids' shape + (C,) = (2, 3, 5)",
         lambda: L.embedding_backward(rnd(6, C), ids, wte * 0, wpe * 0)),
        ("dwte", "(V, C)", lambda: L.embedding_backward(x, ids, rnd(V), wpe * 0)),
        ("dwpe", "(context_length, 5) with context_length >= 3",
         lambda: L.embedding_backward(x, ids, wte * 0, rnd(2, C))),
    ]
    for argument, expected, call in bad:
        with pytest.raises(ValueError) as info:
            call()
        assert str(info.value).startswith(f"{argument}: expected shape {expected}, got "), \
            f"{argument}, {expected}: {info.value}"


def test_every_public_function_is_covered_and_names_its_twin():
    public = {n for n, f in vars(L).items()       # layers.py's own and softmax_layers.py's
              if inspect.isfunction(f) and not n.startswith("_") and f.__module__ in (L.__name__, S.__name__)}
    assert public == set(NAMES), "every public function needs a case above"
    for name in public:
        doc = inspect.getdoc(getattr(L, name)) or ""
        twins = [word.rstrip(".,;)") for word in doc.split() if word.startswith("reference.")]
        assert twins, f"{name}: no 'Twin: reference.<name>' in its docstring"
        for twin in twins:
            assert inspect.isfunction(getattr(R, twin.split(".", 1)[1], None)), f"{name}: {twin} missing"
    assert L.LN_EPS is R.LN_EPS and L.GELU_K is R.GELU_K and L.causal_bias is R.causal_bias
