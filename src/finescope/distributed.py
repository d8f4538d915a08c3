"""Process-group helpers so that one training loop serves a single process and DDP under torchrun.

Without ``torchrun`` (no ``WORLD_SIZE`` in the environment) every helper degrades to the single-process case.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as torch_dist
from torch.utils.data import Dataset, DistributedSampler, RandomSampler, SequentialSampler


def is_distributed() -> bool:
    return torch_dist.is_available() and torch_dist.is_initialized()


def rank() -> int:
    return torch_dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return torch_dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """True on rank 0 (and in a single process): the only rank that writes files and prints progress."""
    return rank() == 0


def init_from_env(device: str = "auto") -> bool:
    """Join the process group torchrun describes in the environment; return True when distributed."""
    if is_distributed() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return is_distributed()
    use_cuda = torch.cuda.is_available() and device != "cpu"
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    torch_dist.init_process_group("nccl" if use_cuda else "gloo")
    return True


def make_sampler(dataset: Dataset, shuffle: bool, seed: int):
    """A sampler that visits each item once per epoch; distributed runs shard it across ranks.

    ``seed`` already includes the epoch, so shuffling is a function of (seed, epoch) alone (resumable).
    """
    if is_distributed():
        return DistributedSampler(dataset, shuffle=shuffle, seed=seed, drop_last=False)
    if not shuffle:
        return SequentialSampler(dataset)
    return RandomSampler(dataset, generator=torch.Generator().manual_seed(seed))


def wrap_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel around ``model`` when distributed, else the model itself."""
    if not is_distributed():
        return model
    ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
