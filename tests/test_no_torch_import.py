"""Importing npgpt and using the NumPy backend never imports torch: a subprocess in which torch
cannot be imported trains and generates with the NumPy backend."""
import os
import subprocess
import sys
from pathlib import Path


REPO = Path(__file__).resolve().parent.parent

SCRIPT = """
import sys
import numpy as np
import npgpt
cfg = npgpt.GPTConfig.preset("tiny", vocab_size=100, context_length=16)
model = npgpt.build_model(cfg, backend="numpy", seed=1)
opt = npgpt.AdamW(model, lr=1e-3)
rng = np.random.default_rng(0)
inputs, targets = rng.integers(0, 100, (2, 2, 16))
loss = model.train_step(inputs, targets, opt, clip_norm=1.0)
assert np.isfinite(loss), loss
out = npgpt.generate(model, inputs[:, :4], max_new_tokens=5, temperature=1.0, top_k=10, seed=0)
assert out.shape == (2, 9), out.shape
assert "torch" not in sys.modules, sorted(m for m in sys.modules if m.startswith("torch"))
print("ok without torch")
"""


def run_without_torch(tmp_path, script):
    blocker = tmp_path / "torch"            # shadows the real torch: importing it fails loudly
    blocker.mkdir()
    (blocker / "__init__.py").write_text('raise ImportError("torch is blocked in this test")\n')
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(REPO), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)


def test_numpy_backend_without_torch(tmp_path):
    result = run_without_torch(tmp_path, SCRIPT)
    assert result.returncode == 0, result.stderr
    assert "ok without torch" in result.stdout


def test_the_blocker_blocks(tmp_path):
    """The same setup does stop torch, so the test above would catch an import."""
    result = run_without_torch(tmp_path, "import npgpt\nnpgpt.build_model(npgpt.GPTConfig.preset('tiny'), backend='torch')")
    assert result.returncode != 0 and "torch is blocked in this test" in result.stderr


def test_the_layers_a_reader_opens_first_load_numpy_and_nothing_heavier():
    """`import npgpt.numpy_backend.reference` loads NumPy and nothing else of npgpt's; then layers (and
    `import npgpt`) pull in no tokenizer, HDF5, plotting, progress bar or torch: npgpt's own modules,
    NumPy, the standard library and threadpoolctl (a small pure-Python module that sets BLAS's thread
    count) only."""
    reference = subprocess.run([sys.executable, "-c", "import sys, npgpt.numpy_backend.reference; print(' '.join("
                                "sorted(m for m in sys.modules if m.startswith('npgpt'))))"],
                               capture_output=True, text=True, check=True, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert set(reference.stdout.split()) == {"npgpt", "npgpt.numpy_backend", "npgpt.numpy_backend.reference"}, \
        reference.stdout
    script = ("import sys; import npgpt; import npgpt.numpy_backend.layers\n"
              "print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))")
    before = subprocess.run([sys.executable, "-c", "import sys, numpy; print(' '.join(sorted({m.split('.')[0] "
                             "for m in sys.modules})))"], capture_output=True, text=True, check=True, cwd=REPO)
    after = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=REPO,
                           env=dict(os.environ, PYTHONPATH=str(REPO)))
    extra = set(after.stdout.split()) - set(before.stdout.split()) - set(sys.stdlib_module_names)
    assert extra - {"threadpoolctl"} == {"npgpt"}, extra
