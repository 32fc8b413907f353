"""What an npgpt checkpoint must not be, checked before anything in it is trusted or read: another
tool's file (named, with the command to run instead), or an HDF5 file whose data the checksums
would not cover (links, data stored in other files, chunked or filtered datasets) or whose
datasets declare more bytes than they store. checkpoint.py's open_checkpoint runs these first."""
from __future__ import annotations

import math
from pathlib import Path

import h5py


class CheckpointError(ValueError):
    """A file that is not a checkpoint this npgpt reads: damaged, another format, or newer."""



def check_layout(f: h5py.File, path: Path, file_bytes: int) -> None:
    """Refuse, before any data is read, what npgpt never writes and its checksums would not cover:
    any link but a hard one (a soft link, an external link to another file), a dataset whose data
    lies elsewhere (external storage, a virtual dataset), chunked, filtered or variable-length
    data; and a dataset that declares more bytes than it stores, or more in all than the file holds."""
    groups, datasets = [("", f)], []          # visititems goes by hard links, each object once
    f.visititems(lambda name, obj: (groups if isinstance(obj, h5py.Group) else datasets).append((name, obj)))
    for name, group in groups:
        for key in group:
            link = group.get(key, getlink=True)
            if not isinstance(link, h5py.HardLink):
                kind = {h5py.ExternalLink: "an external link", h5py.SoftLink: "a soft link"}.get(type(link), "a link")
                raise CheckpointError(f"{path}: /{name + '/' if name else ''}{key} is {kind}; npgpt's checkpoints hold "
                                      "no links, and the checksum does not cover what one points to")
    total = 0
    for name, ds in datasets:
        if not isinstance(ds, h5py.Dataset):
            raise CheckpointError(f"{path}: /{name} is a {type(ds).__name__}; expected groups and datasets")
        dcpl = ds.id.get_create_plist()
        if ds.is_virtual or dcpl.get_external_count():
            raise CheckpointError(f"{path}: /{name} keeps its data in other files (a virtual dataset or external "
                                  "storage); npgpt's checkpoints hold all their data")
        if dcpl.get_layout() not in (h5py.h5d.CONTIGUOUS, h5py.h5d.COMPACT) or dcpl.get_nfilters():
            raise CheckpointError(f"{path}: /{name} is chunked or compressed; npgpt writes plain contiguous "
                                  "datasets and reads only those")
        if ds.dtype.kind not in "biuf":
            raise CheckpointError(f"{path}: /{name} holds {ds.dtype}; npgpt's datasets hold numbers")
        stored, declared = ds.id.get_storage_size(), math.prod(ds.shape or ()) * ds.dtype.itemsize
        if stored < declared:
            raise CheckpointError(f"{path}: /{name} of shape {ds.shape} declares {declared:,} bytes and stores "
                                  f"{stored:,}; the checkpoint is damaged or crafted")
        total += stored
    if total > file_bytes:
        raise CheckpointError(f"{path}: its datasets claim {total:,} bytes, more than the file's {file_bytes:,}; "
                              "the checkpoint is damaged or crafted")


def foreign_file(path: Path) -> str | None:
    """What another tool's file given as npgpt's checkpoint is, and what to run instead; None if unknown."""
    from .llmc import MAGIC, is_llmc_file
    from .nanogpt import is_checkpoint
    with open(path, "rb") as f:
        head = f.read(4)
    if int.from_bytes(head, "little") == MAGIC:
        return (f"an llm.c model file, not an npgpt checkpoint: npgpt cannot continue llm.c's optimizer and "
                f"schedule; start a new run from its weights with --init-from {path}")
    if is_llmc_file(path):
        return "an llm.c token shard, not an npgpt checkpoint: give its folder to --data"
    if head[:2] != b"PK":                           # torch.save's zip archive
        return None
    from .lazy import torch_file
    try:
        is_nanogpt = is_checkpoint(torch_file(path))
    except ValueError:
        return None
    what = "nanoGPT's ckpt.pt" if is_nanogpt else "a PyTorch file"
    return (f"{what}, not an npgpt checkpoint: npgpt cannot continue its optimizer and schedule; start a new "
            f"run from its weights with --init-from {path}")
