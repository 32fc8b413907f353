"""GPT-2's names (gpt2, gpt2-medium, gpt2-large, gpt2-xl) resolved to weights already on this machine,
in a Hugging Face hub cache, without a network call.

The cache (what `huggingface-cli download gpt2` or transformers' from_pretrained leave) holds a model
as models--gpt2/snapshots/<revision>/ (config.json, model.safetensors, ...), refs/main naming the
revision downloaded last; the repository moved to openai-community/gpt2, cached as
models--openai-community--gpt2. The caches looked in, in huggingface_hub's order: $HF_HUB_CACHE,
$HF_HOME/hub, ~/.cache/huggingface/hub.
"""
from __future__ import annotations

import os
from pathlib import Path

GPT2_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def hub_caches() -> list[Path]:
    """The hub caches this machine may have, in the order they are looked in."""
    roots = []
    if os.environ.get("HF_HUB_CACHE"):
        roots.append(Path(os.environ["HF_HUB_CACHE"]))
    if os.environ.get("HF_HOME"):
        roots.append(Path(os.environ["HF_HOME"]) / "hub")
    roots.append(Path.home() / ".cache" / "huggingface" / "hub")
    return list(dict.fromkeys(roots))


def _complete(snapshot: Path) -> bool:
    return (snapshot / "config.json").is_file() and any((snapshot / f).is_file() for f in WEIGHT_FILES)


def _snapshot(model: Path) -> Path | None:
    """The snapshot refs/main names, else the newest complete one; None if there is none."""
    ref = model / "refs" / "main"
    if ref.is_file():
        snapshot = model / "snapshots" / ref.read_text(encoding="utf-8").strip()
        if _complete(snapshot):
            return snapshot
    found = [s for s in (model / "snapshots").glob("*") if _complete(s)] if (model / "snapshots").is_dir() else []
    return max(found, key=lambda s: s.stat().st_mtime, default=None)


def resolve_name(name: str) -> Path | None:
    """The cached snapshot folder of a GPT-2 name (or openai-community/NAME); None for any other name.
    FileNotFoundError, in one line saying where it looked and how to get the weights, when not cached."""
    short = name.removeprefix("openai-community/")
    if short not in GPT2_NAMES:
        return None
    caches = hub_caches()
    for root in caches:
        for repo in (f"models--{short}", f"models--openai-community--{short}"):
            snapshot = _snapshot(root / repo)
            if snapshot is not None:
                return snapshot
    raise FileNotFoundError(f"{name}: GPT-2's weights are not in a local Hugging Face cache (looked for "
                            f"models--{short}/snapshots/*/ with config.json and model.safetensors in "
                            f"{', '.join(map(str, caches))}); on a machine with network run "
                            f"`huggingface-cli download {short}` and copy its cache here (or set HF_HOME), or "
                            "give the weights' folder as the path; npgpt never downloads")


def weights_path(path) -> Path:
    """path, or where a GPT-2 name (gpt2, ..., gpt2-xl) is in a local Hugging Face cache."""
    path = Path(path)
    if path.exists():
        return path
    # the command line hands over --init-from as an absolute path: ./gpt2 is the name gpt2 there too
    name = path.name if path.parent.resolve() == Path.cwd().resolve() else str(path)
    return resolve_name(name) or path
