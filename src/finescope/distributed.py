"""Process-group helpers so that one training loop serves a single process and DDP under torchrun.

Without ``torchrun`` (no ``WORLD_SIZE`` in the environment) every helper degrades to the single-process case.

Conventions of a distributed run (``torchrun --nproc_per_node=N -m finescope train ...``):

- ``train.batch_size`` is the GLOBAL batch: each of the N processes reads ``batch_size / N`` images per step, so
  the sample order, the steps per epoch and the learning-rate schedule do not depend on N, and a checkpoint
  resumes with another number of processes.
- :class:`ShardSampler` cuts one seeded permutation into per-rank blocks of every global batch: each training
  image is visited exactly once per epoch, the last incomplete global batch included (split over the ranks,
  its loss weighted so that the step equals the single-process one), and every rank runs the same number of
  steps. Under ``train.compile`` the last incomplete global batch is dropped instead, so that every step has
  one shape. Evaluation shards whole batches, each of one input shape (no image is padded, so an image's
  prediction does not depend on its batch-mates), and the last batch is not filled up; :func:`all_gather`
  brings every rank's predictions together, so each image is counted once.
- Only rank 0 writes files and prints progress (:func:`is_main`).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.distributed as torch_dist
from torch.utils.data import Sampler

from finescope.errors import FinescopeError, FinescopeWarning, path_error_line


def is_distributed() -> bool:
    """True inside an initialised process group with more than one process."""
    return torch_dist.is_available() and torch_dist.is_initialized() and torch_dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 in a single process)."""
    return torch_dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Number of processes (1 in a single process)."""
    return torch_dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """True on rank 0 (and in a single process): the only rank that writes files and prints progress."""
    return rank() == 0


# how long a collective waits for a process that does not answer (frozen, or its machine gone) before it fails:
# a process of the run then ends with a line of its own (finescope.cli), not after a hang without end
TIMEOUT_MINUTES = 30.0


def init_from_env(device: str = "auto", timeout_minutes: float = TIMEOUT_MINUTES) -> bool:
    """Join the process group torchrun describes in the environment; return True when distributed.

    CUDA runs use NCCL with one GPU per process (``LOCAL_RANK``); CPU runs (or ``train.device=cpu``) use gloo.
    """
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:  # not a number: not torchrun (as the command line reads it)
        world = 1
    if is_distributed() or world <= 1:
        return is_distributed()
    missing = [name for name in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
    if missing:  # WORLD_SIZE inherited from another job's environment, not set by a launcher
        raise FinescopeError(f"WORLD_SIZE is {world} in the environment but {', '.join(missing)} "
                             f"{'is' if len(missing) == 1 else 'are'} not set: launch train with torchrun, which sets "
                             "them all, or unset WORLD_SIZE to train in one process")
    if device.startswith("cuda:"):  # every process would take that one GPU (NCCL refuses, or hangs)
        raise FinescopeError(f"train.device is '{device}', one GPU for every process; under torchrun each process "
                             "takes its own (LOCAL_RANK): use train.device=cuda, and CUDA_VISIBLE_DEVICES to choose "
                             "the GPUs")
    use_cuda = torch.cuda.is_available() and device != "cpu"
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise FinescopeError(
                f"LOCAL_RANK {local} but only {torch.cuda.device_count()} GPUs; lower torchrun --nproc_per_node"
            )
        torch.cuda.set_device(local)
    torch_dist.init_process_group(
        "nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=timeout_minutes)
    )
    return True


def cleanup() -> None:
    """Leave the process group (no-op in a single process)."""
    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if is_distributed():
        torch_dist.barrier()


def per_rank_batch(global_batch: int, resume: bool = False) -> int:
    """The batch one process reads: ``global_batch / world_size``; it must divide evenly. With ``resume`` the
    error names the process counts that do, since ``--resume`` keeps the run's batch."""
    n = world_size()
    if global_batch % n:
        counts = ", ".join(str(k) for k in range(1, global_batch + 1) if global_batch % k == 0)
        fix = (f"--resume keeps the run's batch: resume it with a number of processes that divides {global_batch} "
               f"({counts})") if resume else f"use a multiple of {n}"
        raise FinescopeError(
            f"train.batch_size {global_batch} is the global batch and must be divisible by the {n} processes; {fix}"
        )
    return global_batch // n


class ShardSampler(Sampler):
    """One seeded permutation of ``n`` items, sharded across ranks; the same order for any number of ranks.

    Training (``train=True``): the permutation is cut into global batches of ``global_batch`` items; rank r
    takes items ``[r*b, (r+1)*b)`` of every full global batch (b = ``global_batch / world``), so a step of N
    processes sees exactly the images of the single-process step with the same global batch. The last
    incomplete global batch (R items) is split over the ranks as evenly as possible; a rank left without an
    item (R < N) reads the epoch's first item as a stand-in whose loss counts 0, so that every rank runs the
    same steps. :attr:`step_scales` gives, per step of this rank, the factor of its mean loss that makes the
    average over ranks (DDP's gradient) the mean over the whole global batch: ``n_r * N / R`` in that last step
    (0 for a stand-in), 1 in every full one. With ``drop_tail`` the last incomplete global batch is dropped when
    ``n > global_batch`` (every step then has one shape, for ``torch.compile``).
    Evaluation (``train=False``, usually ``shuffle=False``): the order is cut into batches of at most
    ``global_batch`` items (the evaluation batch of every process), and also wherever ``batch_keys`` changes,
    and rank r takes batches r, r+N, r+2N, ... (:attr:`batches`; :class:`EvalBatches` hands them to a
    DataLoader) with no padding, so every item is read by exactly one rank, in the batch it has in a single
    process. With the key of the model input's shape, no image is padded to a larger batch-mate's (whose zero
    padding the backbone's receptive field would read, which changes the attention and so, through the
    threshold, the boxes), so an image's prediction does not depend on which images it is evaluated with, nor
    on the number of processes. An ``order`` (a permutation of ``range(n)``) replaces the identity order there:
    images of one shape batched together (:func:`finescope.data.dataset.shape_order`).

    One sampler serves every epoch of a run (so a DataLoader with persistent workers can be kept):
    :meth:`set_epoch` reseeds the permutation with ``seed + epoch``.

    Args:
        n: dataset length.
        shuffle: permute with ``torch.randperm`` seeded by ``seed + epoch``.
        seed: the permutation's base seed.
        global_batch: items per step over all ranks (training).
        train: training mode as described above.
        drop_tail: in training, drop the last incomplete global batch.
        rank_: this rank (default: from the process group).
        world: number of ranks (default: from the process group).
        tag_epoch: yield ``(index, epoch, step)`` triples instead of indices, so that a dataset in a persistent
            worker knows the epoch (:class:`~finescope.data.dataset.ImageDataset` seeds its augmentation with it)
            and the global step of the item in its epoch, the same for any number of ranks (the dataset draws
            one orientation per step with it, ``data.one_orientation``).
        order: evaluation without ``shuffle``: the order of the items (default: ``range(n)``).
        batch_keys: evaluation: a key per item (the shape it enters the model with); a batch holds items of one
            key. An item whose key is None (shape unknown) is a batch of its own: two such items may differ in
            shape, and batched together one would be padded to the other.
        shape_keys: training with ``pool`` > 1: a sortable key per item (:func:`~finescope.data.dataset.aspect_key`),
            or None where unknown.
            Each run of ``pool`` full global batches of the epoch's permutation is sorted by it, cut into global
            batches, and those are shuffled (``data.shape_pool``): the images of a step are of like shape, so
            fewer of their pixels are padding and fewer batch shapes occur, while every image is still read once
            an epoch, in an order that depends on (seed, epoch) alone. The last incomplete global batch is left as
            it is.
        pool: see ``shape_keys``.
    """

    def __init__(
        self,
        n: int,
        shuffle: bool,
        seed: int,
        global_batch: int = 1,
        train: bool = False,
        drop_tail: bool = False,
        rank_: int | None = None,
        world: int | None = None,
        tag_epoch: bool = False,
        order: Sequence[int] | None = None,
        shape_keys: Sequence | None = None,
        pool: int = 0,
        batch_keys: Sequence | None = None,
    ) -> None:
        if batch_keys is not None and len(batch_keys) != n:
            raise ValueError(f"batch_keys must have one key per item ({n}), got {len(batch_keys)}")
        self.batch_keys = batch_keys
        if order is not None and sorted(order) != list(range(n)):
            raise ValueError(f"order must be a permutation of range({n})")
        if shape_keys is not None and len(shape_keys) != n:
            raise ValueError(f"shape_keys must have one key per item ({n}), got {len(shape_keys)}")
        self.shape_keys, self.pool = shape_keys, pool
        self.n, self.shuffle, self.seed = n, shuffle, seed
        self.order = None if order is None else torch.as_tensor(list(order), dtype=torch.long)
        self.global_batch, self.train, self.drop_tail = global_batch, train, drop_tail
        self.rank = rank() if rank_ is None else rank_
        self.world = world_size() if world is None else world
        self.tag_epoch = tag_epoch
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        """Use the permutation of ``epoch`` from the next iteration on."""
        self.epoch = epoch
        self.dropped: list[int] = []  # training with drop_tail: the items of the epoch's dropped global batch
        self.batches: list[list[int]] = []  # evaluation: this rank's batches
        self._order, self.step_scales = self._indices()
        # the global step of each of this rank's items: b = global_batch / world of them in every full global
        # batch, then its share of the last, incomplete one
        b, full = max(1, self.global_batch // self.world), self.n // max(1, self.global_batch)
        self._steps = [min(k // b, full) if self.train else 0 for k in range(len(self._order))]

    def _indices(self) -> tuple[list[int], list[float]]:
        seed = self.seed + self.epoch
        generator = torch.Generator().manual_seed(seed)
        order = torch.randperm(self.n, generator=generator) if self.shuffle \
            else torch.arange(self.n) if self.order is None else self.order
        if self.train and self.shape_keys is not None and self.pool > 1:
            order = self._pooled(order, generator)
        if not self.train:
            B, keys, batches = max(1, self.global_batch), self.batch_keys, []
            for i in order.tolist():
                # an item of unknown key (None: its shape is unknown) joins no batch, nor does one join it
                if batches and len(batches[-1]) < B and (keys is None or keys[i] is not None
                                                         and keys[i] == keys[batches[-1][0]]):
                    batches[-1].append(i)
                else:
                    batches.append([i])
            self.batches = batches[self.rank :: self.world]
            return [i for batch in self.batches for i in batch], []
        G, N, r = self.global_batch, self.world, self.rank
        b = G // N
        full = (self.n // G) * G
        mine = order[:full].view(-1, G)[:, r * b : (r + 1) * b].reshape(-1).tolist()
        scales = [1.0] * (self.n // G)
        tail = order[full:]
        if len(tail) == 0 or (self.drop_tail and full > 0):
            self.dropped = tail.tolist()
            return mine, scales
        R = len(tail)
        share, extra = divmod(R, N)
        start = r * share + min(r, extra)
        size = share + (r < extra)
        if size:
            return mine + tail[start : start + size].tolist(), scales + [size * N / R]
        return mine + [int(order[0])], scales + [0.0]  # a stand-in: every rank must run the step

    def _pooled(self, order: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """``order`` with each run of ``pool`` full global batches sorted by ``shape_keys``, cut into global
        batches, and these shuffled within their run. Items whose key is None (an unreadable header, likely an
        unreadable image) keep their shuffled places: sorted together, they would fill whole batches with
        images that are then skipped (under DDP, stand-in steps of no image that still move the weights through
        weight decay and momentum)."""
        G = max(1, self.global_batch)
        full, span = (self.n // G) * G, self.pool * G
        items, out = order.tolist(), []
        for start in range(0, full, span):
            run = items[start : min(start + span, full)]
            known = [k for k, i in enumerate(run) if self.shape_keys[i] is not None]  # the others keep their place
            for k, i in zip(known, sorted((run[k] for k in known), key=lambda i: self.shape_keys[i]), strict=True):
                run[k] = i
            batches = [run[k : k + G] for k in range(0, len(run), G)]
            for b in torch.randperm(len(batches), generator=generator).tolist():
                out += batches[b]
        return torch.tensor(out + items[full:], dtype=torch.long)

    def __iter__(self) -> Iterator:
        if self.tag_epoch:
            return iter([(i, self.epoch, step) for i, step in zip(self._order, self._steps)])
        return iter(self._order)

    def __len__(self) -> int:
        return len(self._order)


class EvalBatches(Sampler):
    """An evaluation :class:`ShardSampler`'s batches (:attr:`ShardSampler.batches`) as a DataLoader's
    ``batch_sampler``: batches of at most the evaluation batch size, of one shape each."""

    def __init__(self, sampler: ShardSampler) -> None:
        self.sampler = sampler

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.sampler.batches)

    def __len__(self) -> int:
        return len(self.sampler.batches)


def make_sampler(
    n: int, shuffle: bool, seed: int, global_batch: int = 1, train: bool = False, drop_tail: bool = False,
    tag_epoch: bool = False, order: Sequence[int] | None = None, shape_keys: Sequence | None = None, pool: int = 0,
    batch_keys: Sequence | None = None,
) -> ShardSampler:
    """A :class:`ShardSampler` for this process (in a single process: all items, ``randperm`` order, or
    ``order`` in evaluation).

    Shuffling is a function of (seed, epoch) alone (:meth:`ShardSampler.set_epoch`), so a run resumes exactly.
    """
    return ShardSampler(n, shuffle, seed, global_batch, train, drop_tail, tag_epoch=tag_epoch, order=order,
                        shape_keys=shape_keys, pool=pool, batch_keys=batch_keys)


def all_gather(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` in a single process."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    torch_dist.all_gather_object(out, obj)
    return out


def from_main(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (``obj`` itself in a single process): for what every rank computes from
    files and must agree on, where one rank's read can fail alone (a transient I/O error)."""
    if not is_distributed():
        return obj
    box = [obj]
    torch_dist.broadcast_object_list(box, src=0)
    return box[0]


def rank0_first(fn: Callable[[], Any], others: bool = True) -> Any:
    """``fn()`` on rank 0, then (with ``others``) on the other ranks, which wait for it: rank 0 scans or makes
    what they read, or holds what they share (``None`` for them without ``others``). An error of ``fn``, a
    :class:`FinescopeError` or an ``OSError`` (a wrong path), is raised on every rank, so that none is left
    waiting in a collective for a process that has gone, nor goes on to write the run's files: rank 0's
    everywhere; that of another rank (its machine lacks the data rank 0 found) on that rank, and on the others
    as that rank's, named."""
    result, error, text = _attempt(fn) if is_main() else (None, None, None)
    text = next((t for t in all_gather(text) if t), None)
    if error is not None:
        raise error
    if text:
        raise FinescopeError(text)
    if not others:
        return result
    if not is_main():
        with main_speaks():  # rank 0 has said what it found
            result, error, text = _attempt(fn)
    failed = next(((r, t) for r, t in enumerate(all_gather(text)) if t), None)
    if error is not None:
        raise error
    if failed:
        raise FinescopeError(f"another process of the run (rank {failed[0]}) failed where this one did not: "
                             f"{failed[1]}")
    return result


def _attempt(fn: Callable[[], Any]) -> tuple[Any, BaseException | None, str | None]:
    """``(fn(), None, None)``, or ``(None, error, its line)`` for a :class:`FinescopeError` or an ``OSError``."""
    try:
        return fn(), None, None
    except (FinescopeError, OSError) as e:
        return None, e, path_error_line(e) if isinstance(e, OSError) and e.filename else str(e)


@contextlib.contextmanager
def main_speaks() -> Iterator[None]:
    """Inside: the :class:`~finescope.errors.FinescopeWarning` of ranks other than 0 are not shown, for work
    every rank does the same (scanning the data, drawing the split), which rank 0 reports once. Warnings of a
    rank's own work (an image only it reads) are shown by that rank."""
    with warnings.catch_warnings():
        if not is_main():
            warnings.simplefilter("ignore", FinescopeWarning)
        yield


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Rank 0's buffers (BatchNorm's running statistics) on every rank. DDP sends them at the start of each
    training step, so after an epoch's last step every rank holds its own; validation and the checkpoint must
    see the same."""
    if is_distributed():
        for buffer in module.buffers():
            torch_dist.broadcast(buffer, src=0)


def check_sync_bn(sync_bn: bool, device: torch.device, resume: bool = False) -> None:
    """Refuse ``train.sync_bn`` off CUDA under torchrun (in a single process it changes nothing). With ``resume``
    the error says where the run can go on, since ``--resume`` keeps the run's setting."""
    if sync_bn and is_distributed() and device.type != "cuda":
        fix = ("--resume keeps the run's setting: resume it on CUDA GPUs, or in one process (where it changes "
               "nothing)") if resume else "set it to false"
        raise FinescopeError(f"train.sync_bn needs CUDA GPUs (SyncBatchNorm has no CPU kernel); {fix}")


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over ranks, in place (no-op in a single process)."""
    if is_distributed():
        torch_dist.all_reduce(t, op=torch_dist.ReduceOp.SUM)
    return t


def wrap_model(
    model: torch.nn.Module, device: torch.device, sync_bn: bool = False, partial_steps: bool = False
) -> torch.nn.Module:
    """DistributedDataParallel around ``model`` when distributed, else the model itself.

    Args:
        model: the model, already on ``device``.
        device: its device; CUDA runs pin DDP to that GPU.
        sync_bn: convert BatchNorm layers to SyncBatchNorm first (CUDA only): batch statistics over the global
            batch instead of each process's share. The conversion happens in place, so the caller's ``model``
            (used for checkpoints) holds the synchronised layers too; their state dict keys are unchanged.
        partial_steps: some steps leave parameters without a gradient (stage-wise crop warm-up), so DDP must
            look for unused parameters. When that ends, wrap ``model`` again without it (the earlier wrapper,
            dropped, no longer reduces gradients): a search that finds none costs a traversal of the autograd
            graph every step, and torch warns about it on every rank.
    """
    if not is_distributed():
        return model
    check_sync_bn(sync_bn, device)
    if sync_bn:
        _convert_sync_bn_inplace(model)
    ids = [device.index] if device.type == "cuda" else None
    # parameters without a gradient: with image_feature=avg the attention only picks crops (under no_grad), and
    # with train.aux_weight=0 the loss leaves the global head of a crop variant out (the model detaches those
    # outputs in training, so that DDP's search does not count their parameters as used)
    avg_only = getattr(model, "use_attention", False) and getattr(model, "image_feature", "") == "avg"
    no_aux = getattr(model, "use_crops", False) and not getattr(model, "global_in_loss", True)
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids,
                                                     find_unused_parameters=partial_steps or avg_only or no_aux)


def _convert_sync_bn_inplace(model: torch.nn.Module) -> None:
    """Replace every BatchNorm child of ``model`` by SyncBatchNorm, keeping parameters and buffers."""
    if any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules()):  # converted when first wrapped
        return
    for name, child in list(model.named_children()):
        converted = torch.nn.SyncBatchNorm.convert_sync_batchnorm(child)
        if converted is not child:
            setattr(model, name, converted)
