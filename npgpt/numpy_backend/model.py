"""GPT-2 in NumPy, the model behind build_model(backend="numpy"): two forms of one network.

kernels="reference" runs gpt2.py (GPT-2's forward and backward written with reference.py's
layers, the form a reader follows); its gradients come back as a dict of new arrays.
kernels="fast" (the default) runs the same network on layers.py, below: the layers' backwards
write the gradients straight into one flat buffer with a named view per tensor (llm.c's layout),
and AdamW and clipping then work on whole buffers. tests/test_reference.py proves the two equal.

The parameters live in one flat array with a named view per tensor in both forms. Shapes as in
layers.py: B batch, T time, C channels, NH heads, V vocabulary, N = B * T.
"""
from __future__ import annotations

import contextlib
import functools

import numpy as np

from ..base import Backend
from ..config import GPTConfig, check_token_ids
from ..memory import keep_freed_memory
from ..params import check_params, param_shapes
from ..sampling import KVCache
from . import gpt2
from . import layers as L
from . import reference as R
from . import reference_optim
from .generate import forward_cached, sampler
from .threads import one_blas_thread, parallel_map


KERNELS = ("fast", "reference")
NORM_BLOCK = 1 << 18        # gradients a block of grad_norm: 2 MiB widened to float64; of 16K to 1M,
                            # the fastest here (30 ms over GPT-2's 124M on 2 cores, 50 before at 64K)


def on_the_pool(method):
    """With the fast kernels, BLAS runs one thread per call while the method runs: npgpt's pool
    shares out the products and the elementwise work alike (threads.py). The reference kernels
    are plain NumPy, and BLAS keeps its own threads."""
    @functools.wraps(method)
    def run(self, *args, **kwargs):
        with one_blas_thread() if self.kernels == "fast" else contextlib.nullcontext():
            return method(self, *args, **kwargs)
    return run


def flat_views(flat: np.ndarray, shapes: dict[str, tuple]) -> dict[str, np.ndarray]:
    """Named, contiguous views into one flat array, in the order of shapes."""
    views, offset = {}, 0
    for name, shape in shapes.items():
        size = int(np.prod(shape))
        views[name] = flat[offset:offset + size].reshape(shape)
        offset += size
    return views


class NumpyGPT(Backend):
    """GPT-2 with a hand-written forward, backward and AdamW in NumPy.

    Process-wide choices: freed memory is kept for reuse, from when a model is built
    (npgpt.memory.keep_freed_memory; a step reuses its activations' memory instead of faulting
    it in again). The work runs on npgpt's thread pool, one thread per CPU (threads.py;
    threads.set_num_threads or $NPGPT_NUM_THREADS; results do not depend on it), and while the
    model computes, NumPy's BLAS runs one thread per call (on_the_pool). With kernels="reference"
    the model runs gpt2.py on reference.py's layers: whole arrays, no pool, BLAS with its own
    threads, and self.g is the dict of gradients gpt2_backward returned.
    """

    backend = "numpy"

    def __init__(self, cfg: GPTConfig, params: dict[str, np.ndarray] | None = None, dtype="float32",
                 seed: int = 123, kernels: str = "fast", grad_accum: int = 1):
        """params: arrays by GPT-2 name, copied in; None leaves every parameter zero, for a loader
        that then writes each tensor straight into param_views(). kernels: "fast" (layers.py) or
        "reference" (gpt2.py's forward and backward, reference_optim.py's clipping and AdamW; see the
        kernels property). grad_accum: a training batch runs as this many micro-batches
        (batch_gradients)."""
        if isinstance(grad_accum, bool) or not isinstance(grad_accum, int) or grad_accum < 1:
            raise ValueError(f"grad_accum must be a positive integer, got {grad_accum!r}")
        self.grad_accum = grad_accum
        keep_freed_memory()
        self.cfg = cfg
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.float32, np.float64):
            raise ValueError(f"dtype must be float32 or float64, got {dtype!r}")
        self.shapes = param_shapes(cfg)
        n = sum(int(np.prod(s)) for s in self.shapes.values())
        self.flat_params = np.zeros(n, self.dtype)
        self.flat_grads = np.zeros(n, self.dtype)
        self.p = flat_views(self.flat_params, self.shapes)
        self.kernels = kernels      # sets self.g
        if params is not None:
            self.load_params(params)
        self.training = True
        self.rng = np.random.default_rng(seed)   # dropout masks
        self.dropout_masks = None                # tests: callable(name, shape) -> bool keep-mask

    @property
    def kernels(self) -> str:
        """"fast" or "reference": which form of the layers the model runs (settable, e.g. after a
        checkpoint is loaded); npgpt.AdamW's step follows the model's choice."""
        return self._kernels

    @kernels.setter
    def kernels(self, name: str) -> None:
        if name not in KERNELS:
            raise ValueError(f"unknown kernels {name!r}; expected one of {KERNELS}")
        self._kernels = name
        # the fast form writes into the flat buffer's views; the reference form's backward
        # returns a dict of new arrays, which replaces this one (zeros until the first backward)
        self.g = flat_views(self.flat_grads, self.shapes)

    # ---- the interface shared with the torch backend ----

    def train(self):
        self.training = True
        return self

    def eval(self):
        self.training = False
        return self

    def params(self) -> dict[str, np.ndarray]:
        return {name: p.copy() for name, p in self.p.items()}

    def param_views(self) -> dict[str, np.ndarray]:
        """The parameters themselves, by name: writable views into flat_params, so writes go
        straight into the model (params() returns copies)."""
        return dict(self.p)

    def load_params(self, params: dict[str, np.ndarray]) -> None:
        check_params(params, self.shapes)
        for name, p in self.p.items():
            p[...] = params[name]

    def logits(self, idx) -> np.ndarray:
        logits, _ = self.forward(idx)
        return logits

    def loss(self, inputs, targets) -> float:
        loss, _ = self.forward(inputs, targets, for_backward=False)
        return loss

    def loss_and_grads(self, inputs, targets):
        loss = self.batch_gradients(inputs, targets)
        return loss, {name: self.g[name].copy() for name in self.shapes}

    def batch_gradients(self, inputs, targets) -> float:
        """The batch's mean loss and its gradients in self.g, the batch run as grad_accum equal
        micro-batches (activations for one at a time): the mean of equal parts' means is the
        whole's mean, so the loss and the gradients are each part's summed, times 1/grad_accum."""
        k = self.grad_accum
        if k == 1:
            return self.forward_backward(inputs, targets)
        inputs, targets = np.asarray(inputs), np.asarray(targets)
        if len(inputs) % k or len(targets) != len(inputs):
            raise ValueError(f"batch of {len(inputs)} sequences does not split into grad_accum={k} equal parts")
        # each forward_backward replaces self.g: the fast form's views into flat_grads, the
        # reference form's new dict; the sum is written back into the last part's arrays
        total, summed = 0.0, {name: np.zeros_like(g) for name, g in self.g.items()}
        for x, y in zip(np.split(inputs, k), np.split(targets, k)):
            total += self.forward_backward(x, y)
            for name, g in summed.items():
                g += self.g[name]
        for name, g in summed.items():
            np.multiply(g, self.dtype.type(1.0 / k), out=self.g[name])
        return total / k

    def clip_grad_norm(self, max_norm: float) -> float:
        """Scale all gradients so their global L2 norm (grad_norm's, in float64) is at most max_norm
        (torch's clip_grad_norm_); -> the norm before scaling."""
        if self.kernels == "reference":
            self.g, norm = reference_optim.clip_grad_norm(self.g, max_norm)
            return norm
        norm = self.grad_norm()
        coef = max_norm / (norm + 1e-6)
        if coef < 1.0:
            g, scale = self.flat_grads, self.dtype.type(coef)
            with one_blas_thread():
                parallel_map(lambda start: np.multiply(g[start:start + NORM_BLOCK], scale,
                                                       out=g[start:start + NORM_BLOCK]), range(0, g.size, NORM_BLOCK))
        return norm

    def grad_norm(self) -> float:
        """The global L2 norm of all gradients: their squares summed in float64 (a float32 sum over
        GPT-2's 124M gradients is off by up to 6e-4, relative, and the error grows with the size),
        a block of NORM_BLOCK at a time on every core, the blocks' sums added in order: the same
        bits for any number of threads. With the reference kernels: tensor by tensor."""
        if self.kernels == "reference":
            return float(np.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in self.g.values())))
        g = self.flat_grads

        def squares(start):
            b = g[start:start + NORM_BLOCK].astype(np.float64)
            return float(np.dot(b, b))
        with one_blas_thread():
            return float(np.sqrt(sum(parallel_map(squares, range(0, g.size, NORM_BLOCK)))))

    def rng_state(self) -> dict:
        """The dropout RNG's state (JSON-serialisable), saved in checkpoints for exact resumes."""
        return self.rng.bit_generator.state

    def set_rng_state(self, state: dict) -> None:
        self.rng.bit_generator.state = state

    # ---- generation: what npgpt.sampling's loop asks of a backend ----

    def new_kv_cache(self, batch_size: int, capacity: int) -> KVCache:
        return KVCache(self.cfg, batch_size, capacity, lambda shape: np.zeros(shape, self.dtype))

    @on_the_pool
    def next_logits(self, ids, cache: KVCache | None) -> np.ndarray:
        """ids (B, Tn) -> logits of the last position (B, V); with a cache, ids continue its positions.
        Without one, the window runs through a cache of its own, so that only its last position
        goes through the head (as the torch backend's last=True)."""
        if cache is None:
            cache = self.new_kv_cache(ids.shape[0], ids.shape[1])
        return forward_cached(self, ids, cache)

    def sampler(self, seed):
        return sampler(seed)

    # ---- forward and backward ----

    def _mask(self, name, shape, p, as_shape=None):
        """A scaled dropout mask, or None when dropout is off. Tests may fix the masks by setting
        self.dropout_masks = fn(name, shape) -> bool keep-mask (the torch backend asks the same)."""
        if not self.training or p == 0.0:
            return None
        if self.dropout_masks is not None:
            keep = np.asarray(self.dropout_masks(name, shape), dtype=bool)
            if keep.shape != shape:
                raise ValueError(f"dropout mask {name}: expected shape {shape}, got {keep.shape}")
            mask = keep.astype(self.dtype) * self.dtype.type(1.0 / (1.0 - p))
        else:
            draw = L.dropout_mask if self.kernels == "fast" else R.dropout_mask   # the same numbers
            mask = draw(self.rng, shape, p, self.dtype)
        return mask if as_shape is None else mask.reshape(as_shape)

    def check_batch(self, idx, targets):
        cfg = self.cfg
        idx = check_token_ids(idx, cfg.vocab_size, "inputs", cfg.context_length)
        if targets is not None:
            targets = check_token_ids(targets, cfg.vocab_size, "targets", cfg.context_length)
            if targets.shape != idx.shape:
                raise ValueError(f"targets: shape {targets.shape} does not match the inputs' {idx.shape}")
        return idx, targets

    def masks(self, name, shape):
        """gpt2.py's mask(name, shape): this model's dropout mask for that activation, or None."""
        return self._mask(name, shape, self.cfg.drop_rate)

    @on_the_pool            # the pool shares out products and elementwise work alike (threads.py)
    def forward(self, idx, targets=None, for_backward=True):
        """idx (B, T) -> (logits (B, T, V), caches); with targets -> (mean loss, caches).
        for_backward=False (evaluation) keeps no layer's cache: each is freed as the next runs
        (the fast form; the reference form keeps them, as gpt2.py's forward always does)."""
        idx, targets = self.check_batch(idx, targets)
        if self.kernels == "reference":
            logits, loss, cache = gpt2.gpt2_forward(self.p, self.cfg, idx, targets, self.masks)
            return (logits, cache) if targets is None else (loss, cache)
        cfg, p = self.cfg, self.p
        B, T = idx.shape
        C, NH, N, drop = cfg.emb_dim, cfg.n_heads, B * T, cfg.drop_rate
        x, emb_cache = L.embedding_forward(idx, p["wte"], p["wpe"])            # (B, T, C)
        x, drop_cache = L.dropout_forward(x, self._mask("emb", (B, T, C), drop))
        x = x.reshape(N, C)
        blocks = []
        for i in range(cfg.n_layers):
            h = f"h.{i}."
            c = {}
            # x = x + dropout(c_proj(attention(c_attn(ln_1(x)))))
            a, c["ln_1"] = L.layernorm_forward(x, p[h + "ln_1.weight"], p.get(h + "ln_1.bias"))
            a, c["c_attn"] = L.linear_forward(a, p[h + "attn.c_attn.weight"], p.get(h + "attn.c_attn.bias"))
            a, c["attn"] = L.attention_forward(a.reshape(B, T, 3 * C), NH,
                                               self._mask(h + "attn", (B, NH, T, T), drop))
            a, c["attn.c_proj"] = L.linear_forward(a.reshape(N, C), p[h + "attn.c_proj.weight"],
                                                   p.get(h + "attn.c_proj.bias"))
            a, c["drop_1"] = L.dropout_forward(a, self._mask(h + "resid_1", (B, T, C), drop, (N, C)))
            x = x + a                                                           # (N, C)
            # x = x + dropout(c_proj(gelu(c_fc(ln_2(x)))))
            m, c["ln_2"] = L.layernorm_forward(x, p[h + "ln_2.weight"], p.get(h + "ln_2.bias"))
            m, c["c_fc"] = L.linear_forward(m, p[h + "mlp.c_fc.weight"], p.get(h + "mlp.c_fc.bias"))   # (N, 4C)
            m, c["gelu"] = L.gelu_forward(m)
            m, c["mlp.c_proj"] = L.linear_forward(m, p[h + "mlp.c_proj.weight"], p.get(h + "mlp.c_proj.bias"))
            m, c["drop_2"] = L.dropout_forward(m, self._mask(h + "resid_2", (B, T, C), drop, (N, C)))
            x = x + m
            if for_backward:
                blocks.append(c)
        x, lnf_cache = L.layernorm_forward(x, p["ln_f.weight"], p.get("ln_f.bias"))
        logits, head_cache = L.linear_forward(x, self.head_weight())           # (N, V)
        caches = (idx, emb_cache, drop_cache, blocks, lnf_cache, head_cache)
        if targets is None:
            return logits.reshape(B, T, -1), caches
        if not for_backward:
            return L.cross_entropy_loss(logits, targets.reshape(N)), None
        loss, ce_cache = L.cross_entropy_forward(logits, targets.reshape(N))
        return loss, caches + (ce_cache,)

    def head_weight(self):
        return self.p["wte"] if self.cfg.tie_weights else self.p["lm_head.weight"]

    @on_the_pool
    def forward_backward(self, inputs, targets) -> float:
        """Mean cross-entropy of one batch; its gradients go to self.g (reference: a new dict from
        gpt2.gpt2_backward; fast: written into the flat buffer's views, in reverse layer order)."""
        loss, caches = self.forward(inputs, targets)
        if self.kernels == "reference":
            self.g = gpt2.gpt2_backward(caches)
            return loss
        idx, emb_cache, drop_cache, blocks, lnf_cache, head_cache, ce_cache = caches
        B, T = idx.shape
        C, N, g = self.cfg.emb_dim, B * T, self.g
        dlogits = L.cross_entropy_backward(ce_cache)                            # (N, V)
        tied = self.cfg.tie_weights
        dx = L.linear_backward(dlogits, head_cache, g["wte"] if tied else g["lm_head.weight"])
        if not tied:
            g["wte"][...] = 0                       # embedding_backward adds into it
        dx = L.layernorm_backward(dx, lnf_cache, g["ln_f.weight"], g.get("ln_f.bias"))     # (N, C)
        for i in reversed(range(self.cfg.n_layers)):
            h, c = f"h.{i}.", blocks[i]
            # x = x + dropout(c_proj(gelu(c_fc(ln_2(x))))): the residual passes dx through unchanged
            dm = L.dropout_backward(dx, c["drop_2"])
            dm = L.linear_backward(dm, c["mlp.c_proj"], g[h + "mlp.c_proj.weight"], g.get(h + "mlp.c_proj.bias"))
            dm = L.gelu_backward(dm, c["gelu"])
            dm = L.linear_backward(dm, c["c_fc"], g[h + "mlp.c_fc.weight"], g.get(h + "mlp.c_fc.bias"))
            dx = dx + L.layernorm_backward(dm, c["ln_2"], g[h + "ln_2.weight"], g.get(h + "ln_2.bias"))
            # x = x + dropout(c_proj(attention(c_attn(ln_1(x)))))
            da = L.dropout_backward(dx, c["drop_1"])
            da = L.linear_backward(da, c["attn.c_proj"], g[h + "attn.c_proj.weight"], g.get(h + "attn.c_proj.bias"))
            da = L.attention_backward(da.reshape(B, T, C), c["attn"]).reshape(N, 3 * C)
            da = L.linear_backward(da, c["c_attn"], g[h + "attn.c_attn.weight"], g.get(h + "attn.c_attn.bias"))
            dx = dx + L.layernorm_backward(da, c["ln_1"], g[h + "ln_1.weight"], g.get(h + "ln_1.bias"))
        dx = L.dropout_backward(dx.reshape(B, T, C), drop_cache)
        L.embedding_backward(dx, emb_cache, g["wte"], g["wpe"])
        return loss
