"""Data-parallel training over processes started by torchrun, on one machine or many.

    torchrun --nproc_per_node=N -m npgpt train --backend torch ...

Every rank (process) holds the whole model and reads its own batches: batches r, r + W, r + 2W, ...
of the global order, for rank r of W. DistributedDataParallel averages the gradients during
backward, so every rank takes the same AdamW step and the weights stay identical; they also start
identical, since the initialisation comes from the seed, in NumPy. One step thus trains on W
consecutive batches of the global order: exactly the batch of one process with W times the batch
size. Losses are averaged over the ranks too, so each rank reports the loss of that global batch,
and rank 0 alone prints and writes files (cli.py). Shapes: B batch per rank, T time, W ranks.
"""
from __future__ import annotations

import atexit
import os

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


class RankLoader:
    """One rank's part of a DataLoader: its batches rank, rank + W, ... of the global order.

    Every rank gets the same number of batches, because each batch is one collective step (a
    gradient or loss all-reduce) that all ranks must join: a training loader (drop_last) drops the
    global batches after the last full round of W, an evaluation loader pads its last round with
    empty (0, T) batches, which weigh nothing in Ranks.mean_loss.
    """

    def __init__(self, loader, rank: int, world_size: int):
        if loader.world_size != 1:
            raise ValueError(f"the loader is already sharded (rank {loader.rank} of {loader.world_size})")
        global_batches = len(loader)
        loader.shard(rank, world_size)
        self.loader, self.rank, self.world_size = loader, rank, world_size
        self.length = global_batches // world_size if loader.drop_last else -(-global_batches // world_size)
        if self.length == 0:
            raise ValueError(f"{global_batches} batches of {loader.batch_size} windows make no step for "
                             f"{world_size} processes; use a longer text, or a smaller batch size or max length")

    def set_epoch(self, epoch: int) -> None:
        self.loader.set_epoch(epoch)

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        empty = np.zeros((0, self.loader.max_length), dtype=np.int64)          # (0, T)
        batches = iter(self.loader)
        for _ in range(self.length):
            yield next(batches, (empty, empty))                                # (B, T) each


def rank_device(device: str | None, local_rank: int) -> torch.device:
    """The device of the process with this LOCAL_RANK: cuda:LOCAL_RANK for any CUDA device (one GPU
    per process on each node; pick the node's GPUs with CUDA_VISIBLE_DEVICES), else the device as
    given. An explicit other index would put several ranks on one GPU, and is refused."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda":
        return device
    if device.index not in (None, local_rank):
        raise ValueError(f"--device {device}: under torchrun each process takes the GPU of its LOCAL_RANK "
                         f"(cuda:{local_rank} for this one); give --device cuda, and choose the GPUs "
                         "with CUDA_VISIBLE_DEVICES")
    return torch.device("cuda", local_rank)


class Ranks:
    """This process's place among torchrun's ranks (from RANK, WORLD_SIZE, LOCAL_RANK), and the
    collectives the training needs. Creating it joins the process group: NCCL when the device is
    CUDA (GPU cuda:LOCAL_RANK), gloo on the CPU."""

    def __init__(self, device: str | None = None):
        self.rank = int(os.environ["RANK"])
        self.world_size = int(os.environ["WORLD_SIZE"])
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.device = device = rank_device(device, self.local_rank)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
        # host-side agreements (agree_max) go through gloo on CPU tensors: an NCCL one would make
        # the host wait for every kernel queued on the GPU
        self._host_group = dist.new_group(backend="gloo") if device.type == "cuda" else None
        atexit.register(self._leave)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wrap(self, model):
        """Make a TorchGPT train data-parallel: its training forward/backward runs through DDP (which
        starts by broadcasting rank 0's weights, identical already), and the losses that loss(),
        loss_and_grads() and train_step() return are averaged over the ranks, so every rank must call
        them together, in the same order. params() and generation keep using the plain module; a NaN
        loss on one rank is NaN on all, so every rank skips that step alike. Dropout: rank r adds r
        to the seed it draws from the model's generator (TorchGPT._compute), so every rank has its
        own masks, rank 0 those of a single process, and the generators stay identical: the one
        state in rank 0's checkpoint resumes every rank exactly."""
        model._step_module = DistributedDataParallel(
            model._step_module, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        model.ranks = self
        return model

    def shard(self, loader) -> RankLoader:
        return RankLoader(loader, self.rank, self.world_size)

    def mean(self, loss: torch.Tensor, n: int) -> torch.Tensor:
        """The mean loss over the windows of every rank, from this rank's mean over its n windows:
        sum(loss_r * n_r) / sum(n_r), in float64, as a 0-dim tensor on the device (the all-reduce is
        queued; nothing waits for it). With equal n_r it is the mean of the ranks' losses; the last
        evaluation batch can leave a rank fewer windows, or none (its loss is then NaN)."""
        local = loss.detach().double() * n if n else torch.zeros((), dtype=torch.float64, device=loss.device)
        total = torch.stack([local, torch.full((), float(n), dtype=torch.float64, device=loss.device)])
        dist.all_reduce(total)
        return total[0] / total[1]

    def mean_loss(self, loss: torch.Tensor, n: int) -> float:
        return float(self.mean(loss, n))

    def agree_max(self, value: int) -> int:
        """The largest of the ranks' values (a signal seen by any rank stops them all at one step),
        agreed on the host: it does not wait for the GPU."""
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self._host_group)
        return int(t.item())

    def finish(self) -> None:
        """Wait for every rank, then leave the process group. Without the barrier about one gloo run
        in four aborted at exit ("terminate called without an active exception")."""
        dist.barrier()
        dist.destroy_process_group()

    def _leave(self) -> None:
        # at exit after an error: leave without the barrier (the other ranks may never reach it);
        # torchrun stops them when this process exits non-zero
        if dist.is_initialized():
            dist.destroy_process_group()
