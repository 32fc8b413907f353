"""GPT-2's whole forward and backward in reference.py's words: the model kernels="reference" trains.

Read reference.py first: every call here is one of its layers, as it is there. gpt2_forward runs
the layers in order and keeps each one's cache; gpt2_backward calls their backwards in reverse,
each under a comment quoting the forward line it undoes, as llm.c's gpt2_forward and gpt2_backward
do. A backward returns the gradient of its input and then of its parameters, (dx, dw, db); the
parameters' gradients are collected in a new dict under their GPT-2 names.

Shapes: B batch, T time (tokens), C channels (emb_dim), NH heads, V vocabulary; every activation
is the book's (B, T, C) (or (B, T, 3C), (B, T, 4C), (B, T, V)). params: {GPT-2 name: array}, in
PyTorch's (out, in) layout. A model without biases (GPT-2's config bias=False, as nanoGPT's) has no
`*.bias` entries: params.get(...) gives None, and the layers then add no bias and return db None.
"""
from __future__ import annotations

from . import reference as R


def no_dropout(name, shape):
    """The mask function when dropout is off (evaluation, or drop_rate 0): no mask anywhere."""
    return None


def gpt2_forward(params, cfg, idx, targets=None, mask=no_dropout):
    """idx (B, T) int, targets (B, T) int or None -> (logits (B, T, V), loss or None, cache).

    mask(name, shape) -> a scaled dropout mask of that shape (reference.dropout_mask), or None;
    the names are "emb", then "h.<i>.attn", "h.<i>.resid_1", "h.<i>.resid_2" for each block.
    """
    p = params
    B, T = idx.shape
    C = cfg.emb_dim
    x, emb = R.embedding_forward(idx, p["wte"], p["wpe"])                     # (B, T, C)
    x, drop = R.dropout_forward(x, mask("emb", (B, T, C)))                   # (B, T, C)
    blocks = []
    for i in range(cfg.n_layers):
        x, block = block_forward(p, f"h.{i}.", x, cfg.n_heads, mask)          # (B, T, C)
        blocks.append(block)
    x, lnf = R.layernorm_forward(x, p["ln_f.weight"], p.get("ln_f.bias"))    # (B, T, C)
    head_weight = p["wte"] if cfg.tie_weights else p["lm_head.weight"]       # (V, C)
    logits, head = R.linear_forward(x, head_weight)                          # (B, T, V)
    loss, ce = None, None
    if targets is not None:
        loss, ce = R.cross_entropy_forward(logits, targets)                  # a float: the mean
    return logits, loss, (emb, drop, blocks, lnf, head, ce, cfg.tie_weights)


def block_forward(p, h, x, n_heads, mask):
    """One transformer block, its parameters named h + "...": x (B, T, C) -> (x (B, T, C), cache).

    x = x + dropout(c_proj(attention(c_attn(ln_1(x)))));  x = x + dropout(c_proj(gelu(c_fc(ln_2(x)))))
    """
    B, T, C = x.shape
    w = lambda name: p[h + name + ".weight"]        # noqa: E731  this block's parameters, by name
    b = lambda name: p.get(h + name + ".bias")      # noqa: E731  None in a model without biases
    c = {}
    a, c["ln_1"] = R.layernorm_forward(x, w("ln_1"), b("ln_1"))                          # (B, T, C)
    a, c["attn.c_attn"] = R.linear_forward(a, w("attn.c_attn"), b("attn.c_attn"))       # (B, T, 3C)
    a, c["attn"] = R.attention_forward(a, n_heads, mask(h + "attn", (B, n_heads, T, T)))  # (B, T, C)
    a, c["attn.c_proj"] = R.linear_forward(a, w("attn.c_proj"), b("attn.c_proj"))       # (B, T, C)
    a, c["drop_1"] = R.dropout_forward(a, mask(h + "resid_1", (B, T, C)))                 # (B, T, C)
    x, _ = R.residual_forward(x, a)                                                       # x + a
    m, c["ln_2"] = R.layernorm_forward(x, w("ln_2"), b("ln_2"))                          # (B, T, C)
    m, c["mlp.c_fc"] = R.linear_forward(m, w("mlp.c_fc"), b("mlp.c_fc"))                 # (B, T, 4C)
    m, c["gelu"] = R.gelu_forward(m)                                                      # (B, T, 4C)
    m, c["mlp.c_proj"] = R.linear_forward(m, w("mlp.c_proj"), b("mlp.c_proj"))           # (B, T, C)
    m, c["drop_2"] = R.dropout_forward(m, mask(h + "resid_2", (B, T, C)))                 # (B, T, C)
    x, _ = R.residual_forward(x, m)                                                       # x + m
    return x, c


def gpt2_backward(cache):
    """-> {name: gradient}: dL/d(every parameter) of the loss gpt2_forward computed with targets.

    The gradient starts at the loss itself: dL/dL = 1, which is why cross_entropy_backward takes
    no dout. Then each forward line, last to first.
    """
    emb, drop, blocks, lnf, head, ce, tied = cache
    g = {}
    # loss = cross_entropy(logits, targets)
    dlogits = R.cross_entropy_backward(ce)                                   # (B, T, V)
    # logits = x @ head_weight.T
    dx, dhead, _ = R.linear_backward(dlogits, head)                          # (B, T, C), (V, C)
    # x = ln_f(x)
    dx, g["ln_f.weight"], g["ln_f.bias"] = R.layernorm_backward(dx, lnf)     # (B, T, C)
    # for each block, x = block(x)
    for i in reversed(range(len(blocks))):
        dx = block_backward(dx, blocks[i], f"h.{i}.", g)                     # (B, T, C)
    # x = dropout(x)
    dx = R.dropout_backward(dx, drop)                                        # (B, T, C)
    # x = wte[idx] + wpe[:T]
    dwte_lookup, g["wpe"] = R.embedding_backward(dx, emb)                    # (V, C), (context_length, C)
    if tied:    # wte was used twice, as the lookup table and as the head: its two gradients add
        g["wte"] = dwte_lookup + dhead                                       # (V, C)
    else:
        g["wte"], g["lm_head.weight"] = dwte_lookup, dhead
    return {name: grad for name, grad in g.items() if grad is not None}     # no bias, no gradient


def block_backward(dx, c, h, g):
    """dx (B, T, C), the gradient at the block's output -> the gradient at its input (B, T, C);
    the block's parameter gradients go into g under their names (h + "ln_1.weight", ...)."""
    gb = {}                                         # this block's, by the names after h
    # x = x + m:  both x and m get dx
    dx, dm = R.residual_backward(dx, None)                                                 # (B, T, C) x 2
    # m = dropout(m)
    dm = R.dropout_backward(dm, c["drop_2"])                                               # (B, T, C)
    # m = mlp.c_proj(m)
    dm, gb["mlp.c_proj.weight"], gb["mlp.c_proj.bias"] = R.linear_backward(dm, c["mlp.c_proj"])  # (B, T, 4C)
    # m = gelu(m)
    dm = R.gelu_backward(dm, c["gelu"])                                                    # (B, T, 4C)
    # m = mlp.c_fc(m)
    dm, gb["mlp.c_fc.weight"], gb["mlp.c_fc.bias"] = R.linear_backward(dm, c["mlp.c_fc"])  # (B, T, C)
    # m = ln_2(x)
    dm, gb["ln_2.weight"], gb["ln_2.bias"] = R.layernorm_backward(dm, c["ln_2"])           # (B, T, C)
    dx = dx + dm            # x fed the residual and ln_2: its two gradients add
    # x = x + a:  both x and a get dx
    dx, da = R.residual_backward(dx, None)                                                 # (B, T, C) x 2
    # a = dropout(a)
    da = R.dropout_backward(da, c["drop_1"])                                               # (B, T, C)
    # a = attn.c_proj(a)
    da, gb["attn.c_proj.weight"], gb["attn.c_proj.bias"] = R.linear_backward(da, c["attn.c_proj"])  # (B, T, C)
    # a = attention(a)
    da = R.attention_backward(da, c["attn"])                                               # (B, T, 3C)
    # a = attn.c_attn(a)
    da, gb["attn.c_attn.weight"], gb["attn.c_attn.bias"] = R.linear_backward(da, c["attn.c_attn"])  # (B, T, C)
    # a = ln_1(x)
    da, gb["ln_1.weight"], gb["ln_1.bias"] = R.layernorm_backward(da, c["ln_1"])           # (B, T, C)
    g.update({h + name: grad for name, grad in gb.items()})
    return dx + da          # x fed the residual and ln_1: its two gradients add
