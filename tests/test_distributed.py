"""DDP: the shard sampler, gathered predictions, and real 2-process runs with the gloo backend on the CPU.

Tolerance of the loss comparison: the DDP run and the single-process run see the same images in every step
(same permutation, same global batch; in the last, incomplete one the ranks' losses are weighted by their share
and a rank without an image reads a stand-in weighted 0), so with BatchNorm replaced by identity and no dropout they compute the
same gradients up to float32 summation order (the gradient all-reduce averages two half-batch means instead
of one full-batch mean). That differs by a few ulps per step; after a few AdamW steps we allow a relative error
of 1e-4 on the losses and 1e-4 (absolute) on the parameters. With BatchNorm in training mode the per-process
batch statistics differ from the global batch's and the runs legitimately diverge (SyncBatchNorm, CUDA only,
removes that difference).
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from finescope.distributed import ShardSampler
from finescope.engine import Predictions, merge_predictions

SRC = Path(__file__).resolve().parents[1] / "src"


# -- sampler ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n,G", [(37, 8), (40, 8), (5, 8), (64, 12), (41, 8), (3, 8)])
@pytest.mark.parametrize("world", [1, 2, 4])
def test_shard_sampler_train_visits_each_image_once_in_single_process_steps(n, G, world):
    """Every image once per epoch, the last incomplete global batch included; every step of N ranks reads the
    single-process step's images; the loss factors make the ranks' average the global batch's mean."""
    if G % world:
        pytest.skip("global batch not divisible")
    single = ShardSampler(n, True, 3, G, True, rank_=0, world=1)
    shards = [ShardSampler(n, True, 3, G, True, rank_=r, world=world) for r in range(world)]
    assert sorted(single) == list(range(n)) and single.step_scales == [1.0] * math.ceil(n / G)
    steps = math.ceil(n / G)
    b = G // world
    rank_steps = []
    for s in shards:
        items = list(s)
        assert len(s.step_scales) == steps  # every rank runs every step
        rank_steps.append([items[i * b : (i + 1) * b] for i in range(steps - 1)] + [items[(steps - 1) * b :]])
    seen = []
    losses = np.random.default_rng(0).random(n)  # a loss per image
    for i in range(steps):
        real = [rank_steps[r][i] for r in range(world) if shards[r].step_scales[i] > 0]
        together = sorted(j for part in real for j in part)
        assert together == sorted(list(single)[i * G : (i + 1) * G])  # the single-process step
        seen += together
        # DDP averages the ranks' scaled mean losses: that must be the mean over the global batch
        ddp = sum(shards[r].step_scales[i] * losses[rank_steps[r][i]].mean() for r in range(world)) / world
        assert ddp == pytest.approx(losses[together].mean())
    assert sorted(seen) == list(range(n)), "each image exactly once per epoch"
    # tagged, each key carries the epoch and its global step, the step it has in the single process
    single_step = {i: k // G for k, i in enumerate(single)}
    for r in range(world):
        keys = list(ShardSampler(n, True, 3, G, True, rank_=r, world=world, tag_epoch=True))
        assert [i for i, _, _ in keys] == [i for part in rank_steps[r] for i in part]
        assert [step for _, _, step in keys] == [k for k, part in enumerate(rank_steps[r]) for _ in part]
        assert all(e == 0 and (shards[r].step_scales[step] == 0 or single_step[i] == step) for i, e, step in keys)
    dropped = [ShardSampler(n, True, 3, G, True, drop_tail=True, rank_=r, world=world) for r in range(world)]
    kept = sum(len(d) - (d.step_scales[-1:] == [0.0]) for d in dropped)  # a stand-in is no image
    assert kept == ((n // G) * G if n > G else n)  # train.compile: only the last incomplete global batch dropped
    assert len({len(d.step_scales) for d in dropped}) == 1


def test_shard_sampler_eval_no_padding_whole_batches():
    shards = [list(ShardSampler(11, False, 0, rank_=r, world=3)) for r in range(3)]
    assert sorted(i for s in shards for i in s) == list(range(11))
    # an evaluation batch of 4 per process: each rank reads whole single-process batches, so an image has the
    # batch-mates (and the padding) it has in one process
    assert [list(ShardSampler(11, False, 0, 4, rank_=r, world=2)) for r in range(2)] == [
        [0, 1, 2, 3, 8, 9, 10], [4, 5, 6, 7]]
    assert list(ShardSampler(11, False, 0, 4, rank_=2, world=3)) == [8, 9, 10]
    assert list(ShardSampler(11, True, 5, rank_=0, world=1)) == torch.randperm(
        11, generator=torch.Generator().manual_seed(5)).tolist()


def test_shape_pool_batches_like_shapes_and_keeps_every_image_once():
    """data.shape_pool: each run of pool global batches is sorted by key and its batches shuffled; every item
    once an epoch, the tail untouched, DDP shards the single-process global batches, and the order moves with
    the epoch."""
    n, G, world = 37, 4, 2
    keys = [(i * 7) % 5 for i in range(n)]
    single = ShardSampler(n, True, 3, G, True, rank_=0, world=1, shape_keys=keys, pool=3)
    order = list(single)
    assert sorted(order) == list(range(n))
    assert order[36:] == torch.randperm(n, generator=torch.Generator().manual_seed(3)).tolist()[36:]  # the tail
    batches = [order[k : k + G] for k in range(0, 36, G)]
    for run in range(3):  # within a run of 3 batches, the keys of the batches do not interleave
        spans = sorted((min(keys[i] for i in b), max(keys[i] for i in b)) for b in batches[3 * run : 3 * run + 3])
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False))
    shards = [list(ShardSampler(n, True, 3, G, True, rank_=r, world=world, shape_keys=keys, pool=3))
              for r in range(world)]
    for step, batch in enumerate(batches):
        assert batch == shards[0][2 * step : 2 * step + 2] + shards[1][2 * step : 2 * step + 2]
    single.set_epoch(1)
    assert list(single) != order


def test_shape_pool_leaves_images_of_unknown_shape_where_the_shuffle_put_them():
    """Images whose header could not be read (key None, mostly unreadable files) were sorted last, together:
    they filled whole global batches, skipped when read, steps of no image that still moved the weights."""
    n, G = 32, 4
    unknown = {3, 10, 17, 24, 31}
    keys = [None if i in unknown else (i * 7) % 5 for i in range(n)]
    for seed in range(5):
        raw = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
        pooled = list(ShardSampler(n, True, seed, G, True, rank_=0, world=1, shape_keys=keys, pool=8))
        assert sorted(pooled) == list(range(n))

        def per_batch(order):
            return sorted(sum(i in unknown for i in order[k : k + G]) for k in range(0, n, G))

        assert per_batch(pooled) == per_batch(raw)  # as spread over the batches as the shuffle left them
        known = [i for i in pooled if i not in unknown]
        batches = [[i for i in pooled[k : k + G] if i not in unknown] for k in range(0, n, G)]
        spans = sorted((min(keys[i] for i in b), max(keys[i] for i in b)) for b in batches if b)
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False)) and len(known) == n - 5


def test_shard_sampler_eval_follows_a_given_order_in_whole_batches():
    """An evaluation order (images of one shape together): batches are cut from it and dealt to the ranks as
    from the identity order, every item once; an order that is not a permutation is refused."""
    order = [9, 3, 7, 1, 0, 2, 4, 5, 6, 8, 10]
    assert list(ShardSampler(11, False, 0, 4, rank_=0, world=1, order=order)) == order
    shards = [list(ShardSampler(11, False, 0, 4, rank_=r, world=2, order=order)) for r in range(2)]
    assert shards == [order[:4] + order[8:], order[4:8]]
    with pytest.raises(ValueError, match="permutation"):
        ShardSampler(3, False, 0, order=[0, 0, 1])



def test_shard_sampler_eval_gives_each_item_of_unknown_key_its_own_batch():
    """An item whose key is None (an unreadable header: its shape is unknown) shares no batch, not even with
    another of unknown key, which could be of another shape and padded to it; every item is still read once, by
    one rank, in the batch it has in one process."""
    keys = [(4, 6), None, None, (4, 6), None, (4, 6), (6, 4), None]
    order = [0, 3, 5, 6, 1, 2, 4, 7]
    single = ShardSampler(8, False, 0, 4, rank_=0, world=1, order=order, batch_keys=keys)
    assert single.batches == [[0, 3, 5], [6], [1], [2], [4], [7]]
    for world in (2, 3):
        shards = [ShardSampler(8, False, 0, 4, rank_=r, world=world, order=order, batch_keys=keys)
                  for r in range(world)]
        assert sorted(i for s in shards for i in s) == list(range(8))
        assert sorted(b for s in shards for b in s.batches) == sorted(single.batches)


def test_merge_predictions_counts_each_index_once():
    a = Predictions(np.array([0, 2, 4]), np.array([0, 1, 0]), np.eye(2)[[0, 1, 0]], loss=1.0, loss_count=3)
    b = Predictions(np.array([1, 3, 0]), np.array([1, 1, 0]), np.eye(2)[[1, 1, 0]], loss=2.0, loss_count=3)
    m = merge_predictions([a, b])
    assert m.indices.tolist() == [0, 1, 2, 3, 4]
    assert m.labels.tolist() == [0, 1, 1, 1, 0]
    assert m.loss == pytest.approx(1.5) and m.loss_count == 6


# -- 2 processes, gloo -------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cfg(root: Path, extra: tuple[str, ...] = (), **train):
    from finescope.config import load_config

    sets = [*extra, f"data.root={root}", "data.synthetic_per_class=24", "data.synthetic_size=64", "data.num_workers=0",
            "data.augment=none", "model.backbone=tiny", "model.global_size=32", "model.local_size=32",
            "model.num_crops=2", "model.dropout=0", "model.proj_dim=16", "model.attn_dim=8",
            "train.device=cpu", "train.batch_size=8", "train.grad_clip=1.0"]
    return load_config(overrides=sets + [f"train.{k}={v}" for k, v in train.items()])


def _strip_bn(model: torch.nn.Module) -> None:
    for name, child in list(model.named_children()):
        if isinstance(child, torch.nn.BatchNorm2d):
            setattr(model, name, torch.nn.Identity())
        else:
            _strip_bn(child)


def _fit(rank: int, root: Path, out: Path, world: int, port: int, extra: tuple[str, ...] = ()) -> None:
    """Two epochs of fusion training through the trainer's loader and engine; rank 0 saves losses and weights."""
    import torch.distributed as td

    from finescope import distributed as dist
    from finescope import trainer
    from finescope.data import load_samples
    from finescope.engine import train_one_epoch

    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        td.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    cfg = _cfg(root, extra)
    sample_set = load_samples(cfg.data)
    torch.manual_seed(0)
    model = trainer.build_model(cfg, len(sample_set.class_names), torch.device("cpu"))
    _strip_bn(model)
    opt = trainer.build_optimizer(model, cfg, torch.device("cpu"))
    fit = trainer._fit_model(model, cfg, torch.device("cpu"), 0)
    idx = np.arange(41)  # 5 global batches of 8 and 1 image: rank 1 reads a stand-in in the last step
    losses, seen = [], []
    warmup = cfg.train.crop_warmup_epochs
    for epoch in range(2):
        model.crops_active = epoch >= warmup  # as the trainer: the crops join after the warm-up, in a new DDP
        if epoch == warmup > 0:
            fit = trainer._fit_model(model, cfg, torch.device("cpu"), epoch)
        loader = trainer.make_loader(sample_set, idx, cfg, train=True, epoch=epoch)
        items = [int(i) for i, _, _ in loader.sampler]
        if loader.sampler.step_scales[-1] == 0:  # the stand-in: not this rank's image
            items = items[:-1]
        seen.append(items)
        stats = train_one_epoch(fit, loader, opt, None, torch.device("cpu"), aux_weight=cfg.train.aux_weight,
                                grad_clip=1.0, progress=False)
        losses.append(stats["loss"])
    everyone = dist.all_gather(seen)
    if dist.is_main():
        flat = torch.cat([p.detach().flatten() for p in model.parameters()])
        torch.save({"losses": losses, "params": flat, "seen": everyone}, out)
    dist.cleanup()


@pytest.mark.slow
@pytest.mark.parametrize("extra, params_atol", [
    (("model.selection_components=grid",), 1e-4),
    ((), None),
    (("model.image_feature=avg", "train.aux_weight=0"), 1e-4),
    (("model.selection_components=grid", "train.crop_warmup_epochs=1"), 1e-4),
], ids=["fusion", "fusion-exact", "unused", "stage-wise"])
def test_ddp_two_processes_match_single_process(tmp_path, extra, params_atol):
    """Also with parameters that never get a gradient (the attention with image_feature=avg, the global head
    with aux_weight=0), which stopped DDP at its second step while they were reachable from the outputs, and
    across the end of a stage-wise warm-up, where DDP is built again.

    The weights are compared where the boxes are piecewise constant in the attention (the grid's components,
    or an attention that never learns): the two runs differ by float rounding (DDP sums the gradients in
    another order), which such boxes do not follow. Exact components' boxes move with the attention
    continuously, by as little as it moves, and AdamW's normalised steps turn the crops' tiny differences into
    up to 1e-3 on weights whose gradient is near 0; there the losses are compared (they agree to 1e-4)."""
    import torch.multiprocessing as mp

    from finescope.data.synthetic import ensure_synthetic

    root = tmp_path / "data"
    ensure_synthetic(root, per_class=24, size=64)  # 48 images, of which _fit trains on 41
    _fit(0, root, tmp_path / "single.pt", 1, 0, extra)
    mp.spawn(_fit, args=(root, tmp_path / "ddp.pt", 2, _free_port(), extra), nprocs=2, join=True)
    single, ddp = torch.load(tmp_path / "single.pt"), torch.load(tmp_path / "ddp.pt")
    for epoch_seen in zip(*ddp["seen"], strict=True):  # each epoch: the ranks' images are disjoint, all 41 once
        together = [i for rank_seen in epoch_seen for i in rank_seen]
        assert sorted(together) == list(range(41))
    np.testing.assert_allclose(ddp["losses"], single["losses"], rtol=1e-4)
    if params_atol is not None:
        torch.testing.assert_close(ddp["params"], single["params"], rtol=0, atol=params_atol)


def _diverge_on_rank_0(rank: int, out: Path, port: int) -> None:
    """One training step on each of 2 ranks, after which rank 0's BatchNorm statistics turn NaN (DDP sends rank
    0's buffers at the start of a step: rank 1 keeps finite ones). Each rank saves what its epoch reported."""
    import torch.distributed as td

    from finescope import distributed as dist
    from finescope.config import ModelConfig
    from finescope.data import Batch
    from finescope.engine import train_one_epoch
    from finescope.models import create_model

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    td.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = create_model(ModelConfig(variant="global", backbone="tiny", global_size=32, local_size=32), 2)
    bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    batch = Batch(torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8), torch.tensor([[64, 64]] * 2),
                  torch.tensor([0, 1]), torch.arange(2))

    def loader():
        yield batch
        if rank == 0:  # after the step: rank 0's own statistics only
            bn.running_var.fill_(float("nan"))

    fit = dist.wrap_model(model, torch.device("cpu"))
    stats = train_one_epoch(fit, loader(), torch.optim.SGD(model.parameters(), lr=0.1), None, torch.device("cpu"),
                            progress=False)
    finite_here = bool(torch.isfinite(bn.running_var).all())
    torch.save({"diverged": stats["diverged"], "finite_here": finite_here}, out / f"rank{rank}.pt")
    dist.cleanup()


def test_every_rank_learns_of_non_finite_weights_on_any_rank(tmp_path):
    """The end-of-epoch check of the weights is summed over the ranks with the epoch's statistics: a rank whose
    own state is finite sees another's NaN and stops too, instead of waiting in a collective for a rank that
    stopped."""
    import torch.multiprocessing as mp

    mp.spawn(_diverge_on_rank_0, args=(tmp_path, _free_port()), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert [r["finite_here"] for r in ranks] == [False, True]
    assert ranks[0]["diverged"] == ranks[1]["diverged"] == 1


def _scan_fails_on_rank_1(rank: int, out: Path, port: int) -> None:
    """rank0_first of a scan that rank 0 passes and rank 1 fails (its machine lacks data.root); each rank saves
    what it raised, after a collective that shows that none was left waiting."""
    import torch.distributed as td

    from finescope import distributed as dist
    from finescope.errors import FinescopeError

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    td.init_process_group("gloo", rank=rank, world_size=2)

    def scan():
        if rank == 1:
            raise FinescopeError("data.root '/elsewhere' does not exist; set data.root")
        return "samples"

    try:
        said = f"returned {dist.rank0_first(scan)}"
    except FinescopeError as e:
        said = str(e)
    everyone = dist.all_gather(said)
    if dist.is_main():
        torch.save(everyone, out)
    dist.cleanup()


def test_a_scan_that_another_rank_fails_after_rank_0_stops_every_rank(tmp_path):
    """Rank 0 found the data and went on to write config.yaml and splits.json while rank 1, whose machine lacked
    data.root, stopped: the run folder kept them, though an error at the start must leave no file. Every rank
    now stops there, rank 0 naming the rank that failed and its error."""
    import torch.multiprocessing as mp

    mp.spawn(_scan_fails_on_rank_1, args=(tmp_path / "said.pt", _free_port()), nprocs=2, join=True)
    assert torch.load(tmp_path / "said.pt") == [
        "another process of the run (rank 1) failed where this one did not: data.root '/elsewhere' does not exist; "
        "set data.root",
        "data.root '/elsewhere' does not exist; set data.root"]


def _save_what_each_said(base: Path, act) -> None:
    """``act()``'s word (what it returns, or the FinescopeError it raised) and the host of every rank, saved by
    rank 0 to ``base/said.pt`` after a collective that shows that none was left waiting."""
    import socket as sockets

    from finescope import distributed as dist
    from finescope.errors import FinescopeError

    try:
        said = act()
    except FinescopeError as e:
        said = str(e)
    everyone = dist.all_gather((said, sockets.gethostname()))
    if dist.is_main():
        torch.save(everyone, base / "said.pt")
    dist.cleanup()


def _lock_from_own_folder(rank: int, base: Path, port: int) -> None:
    """Each rank takes the run lock of a relative --out from a working folder of its own (as on machines whose
    --out is not shared); each saves what it raised (:func:`_save_what_each_said`)."""
    import torch.distributed as td

    from finescope import trainer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    td.init_process_group("gloo", rank=rank, world_size=2)
    (base / f"cwd{rank}").mkdir()
    os.chdir(base / f"cwd{rank}")

    def lock() -> str:
        trainer._RunLock(Path("run")).release()
        return "locked"

    _save_what_each_said(base, lock)


def test_an_out_that_another_rank_does_not_see_is_refused_on_every_rank_at_the_start(tmp_path):
    """--out relative to working folders that differ, or not on a filesystem every machine shares: rank 0 trained
    the whole run into its folder and the other ranks then failed to find best.pt for the test ('checkpoint
    not found; pass a run directory'). Every rank now refuses it at the start, and rank 0 leaves no folder."""
    import torch.multiprocessing as mp

    mp.spawn(_lock_from_own_folder, args=(tmp_path, _free_port()), nprocs=2, join=True)
    (said0, host), (said1, _) = torch.load(tmp_path / "said.pt")
    assert said0 == said1 == (
        f"--out 'run' is not one folder for every process: rank 1 ({host}) does not see the one rank 0 ({host}) "
        "made (a relative --out read from another working folder, or a folder that not every machine shares); give "
        "an --out on a filesystem every machine sees, as an absolute path")
    assert not (tmp_path / "cwd0" / "run").exists() and not (tmp_path / "cwd1" / "run").exists()


def _train_as_its_machine_says(rank: int, base: Path, port: int, case: str) -> None:
    """Each rank trains with the config its machine gave it, and saves what it raised
    (:func:`_save_what_each_said`). ``own_config``: rank 1's copy has another learning rate (and its data and
    its cache in other folders, which a machine may have). ``run_inside_data``: rank 1's machine keeps its data
    in a folder that holds the run's --out (data.root may differ between machines). ``own_synthetic``: each
    rank's data.root is a folder of its own that does not exist yet."""
    import datetime

    import torch.distributed as td

    from finescope import trainer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    td.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60))
    if case == "own_config":
        cfg = _cfg(base / f"data{rank}", extra=(f"data.cache_dir={base / f'cache{rank}'}",),
                   **({"lr": 0.01} if rank else {}))
    elif case == "own_synthetic":  # machines without a shared disk: each makes the synthetic set on its own
        cfg = _cfg(base / f"data{rank}", epochs=1)
    else:  # rank 0's data.root is never read: every rank stops before the data
        cfg = _cfg(base / "data0" if rank == 0 else base, extra=("data.source=folder",))

    def train() -> str:
        trainer.train(cfg, base / "run", progress=False)
        return "trained"

    _save_what_each_said(base, train)

def test_a_rank_given_another_config_is_refused_on_every_rank_before_any_file(tmp_path):
    """Each torchrun process reads its own --config and --set: a machine with another copy of the config file
    trained other settings than rank 0 without a word. Every rank now refuses it at the start, naming the rank,
    its host and the first key that differs (where the data and its cache are may differ)."""
    import torch.multiprocessing as mp

    mp.spawn(_train_as_its_machine_says, args=(tmp_path, _free_port(), "own_config"), nprocs=2, join=True)
    (said0, host), (said1, _) = torch.load(tmp_path / "said.pt")
    assert said0 == said1 == (
        f"rank 1 ({host}) was given another config than rank 0 ({host}): train.lr (rank 0: 0.0003, rank 1: 0.01); "
        "give every process the same --config file and --set options (only data.root, data.num_workers, "
        "data.cache and data.cache_dir may differ between machines)")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_ranks_without_a_shared_disk_each_make_the_same_synthetic_set_and_train(tmp_path):
    """The synthetic source makes its images where data.root points; on machines without a shared disk every
    rank makes its own copy. Each copy must hold the same images, byte for byte, or the ranks would train on
    different data under one split."""
    import torch.multiprocessing as mp

    mp.spawn(_train_as_its_machine_says, args=(tmp_path, _free_port(), "own_synthetic"), nprocs=2, join=True)
    (said0, _), (said1, _) = torch.load(tmp_path / "said.pt")
    assert said0 == said1 == "trained"
    copies = [{p.relative_to(tmp_path / f"data{r}"): p.read_bytes() for p in sorted((tmp_path / f"data{r}").rglob("*"))
               if p.is_file()} for r in (0, 1)]
    assert len(copies[0]) > 48 and copies[0] == copies[1]
    assert (tmp_path / "run" / "metrics.json").is_file()


def test_an_out_inside_one_ranks_data_is_refused_on_every_rank_before_any_file(tmp_path):
    """The refusal of an --out inside data.root ran on each process alone: where only one machine's data.root
    holds the run folder, that rank stopped and the others went on to wait for it in their first collective.
    Every rank now refuses it before any file is written, the others naming the rank."""
    import torch.multiprocessing as mp

    mp.spawn(_train_as_its_machine_says, args=(tmp_path, _free_port(), "run_inside_data"), nprocs=2,
             join=True)
    (said0, _), (said1, _) = torch.load(tmp_path / "said.pt")
    assert said1.startswith(f"--out '{tmp_path / 'run'}' lies inside data.root '{tmp_path}'"), said1
    assert said0 == f"another process of the run (rank 1) failed where this one did not: {said1}"
    assert not (tmp_path / "run").exists()


def _orders_with_one_unread_header(rank: int, out: Path, port: int) -> None:
    """Each rank's evaluation and data.shape_pool training items, when rank 1 cannot read one file's header."""
    import torch.distributed as td

    from finescope import distributed as dist
    from finescope import trainer
    from finescope.config import load_config
    from finescope.data import dataset as ds
    from finescope.data.records import Sample, SampleSet

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    td.init_process_group("gloo", rank=rank, world_size=2)
    shapes = [(460, 700), (700, 460), (460, 460), (300, 700), (460, 700), (500, 600), (460, 700), (700, 460),
              (200, 300), (300, 200)]
    sizes = {f"/img/{i}.png": s for i, s in enumerate(shapes)}
    # rank 1 cannot read the first header (an EIO, a stale NFS handle): _header_size gives None there only
    ds._header_size = lambda path: None if rank == 1 and path == "/img/0.png" else sizes[path]
    sample_set = SampleSet([Sample(p, 0, p) for p in sizes], ["a"])
    cfg = load_config(overrides=["data.num_workers=0", "train.device=cpu", "train.batch_size=4",
                                 "train.eval_batch_size=2", "data.shape_pool=2"])
    idx = list(range(len(shapes)))
    evaluation = list(trainer.make_loader(sample_set, idx, cfg, train=False).batch_sampler.sampler)
    training = [i for i, _, _ in trainer.make_loader(sample_set, idx, cfg, train=True).sampler]
    everyone = dist.all_gather((evaluation, training))
    if dist.is_main():
        torch.save(everyone, out)
    dist.cleanup()


def test_ranks_order_by_the_same_headers_when_one_rank_cannot_read_one(tmp_path):
    """The evaluation order (shape_order) and the data.shape_pool keys come from the file headers: a header that
    one rank alone fails to read (None there) must not give that rank another order, which read some images
    twice and others never (counted as skipped)."""
    import torch.multiprocessing as mp

    mp.spawn(_orders_with_one_unread_header, args=(tmp_path / "orders.pt", _free_port()), nprocs=2, join=True)
    (eval0, train0), (eval1, train1) = torch.load(tmp_path / "orders.pt")
    assert sorted(eval0 + eval1) == list(range(10))
    assert sorted(train0 + train1) == list(range(10))


def _torchrun(nproc: int, out: Path, root: Path, epochs: int, resume: bool = False,
              extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_port",
           str(_free_port()), "-m", "finescope", "train", "--config", str(root / "cfg.yaml"), "--out", str(out),
           "--quiet", "--set", f"train.epochs={epochs}", *extra]
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd + (["--resume"] if resume else []), capture_output=True, text=True, env=env,
                          timeout=300)


def _fusion_run_config(root: Path, per_class: int, epochs: int, **train) -> None:
    """A synthetic set of ``per_class`` images per class under ``root`` and a fusion config at root/cfg.yaml."""
    import yaml

    from finescope.config import to_dict
    from finescope.data.synthetic import ensure_synthetic

    cfg = to_dict(_cfg(root, epochs=epochs))
    cfg["data"].update(synthetic_per_class=per_class, test_fraction=0.35, val_fraction=0.2)
    cfg["model"].update(variant="fusion")
    cfg["train"].update(train)
    ensure_synthetic(root, per_class=per_class, size=64)
    (root / "cfg.yaml").write_text(yaml.safe_dump(cfg))


@pytest.mark.slow
def test_torchrun_train_rank0_files_gathered_metrics_and_resume_with_other_world(tmp_path):
    root = tmp_path / "data"
    _fusion_run_config(root, per_class=20, epochs=1)
    out = tmp_path / "run"
    afile = tmp_path / "afile"
    afile.write_text("")
    first = _torchrun(2, out, root, epochs=1, extra=("data.cache=disk", f"data.cache_dir={afile}"))
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stdout.count("run written to") == 1  # rank 0 prints, rank 1 does not
    assert first.stderr.count("cannot write the image cache") == 1  # met alike by every rank: rank 0 says it
    # validation saw the saved model: rank 0's BatchNorm statistics on every rank, single-process batches
    from finescope.trainer import evaluate

    logged = json.loads((out / "history.jsonl").read_text().splitlines()[0])
    again = evaluate(out / "checkpoints" / "last.pt", split="val", out=tmp_path / "ev" / "metrics_val.json",
                     device="cpu", overrides=["data.cache=none"])
    assert again["loss"] == pytest.approx(logged["val_loss"], rel=1e-6, abs=0)
    assert again["auc"] == pytest.approx(logged["val_auc"], abs=1e-12)
    resumed = _torchrun(1, out, root, epochs=2, resume=True)  # 2 processes -> 1 process
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    history = [json.loads(r) for r in (out / "history.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in history] == [0, 1]  # one line per epoch: only rank 0 wrote
    counts = json.loads((out / "splits.json").read_text())["counts"]
    n_train, n_test = counts["train"], counts["test"]
    for row in history:  # summed over ranks: each training image once, the last incomplete global batch too
        assert row["train_images"] == n_train
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_images"] == n_test  # every test image counted once
    rows = (out / "predictions_test.csv").read_text().splitlines()[1:]
    assert len(rows) == n_test == len({r.split(",")[0] for r in rows})


@pytest.mark.slow
def test_torchrun_refuses_a_batch_the_processes_cannot_share_before_writing(tmp_path):
    root = tmp_path / "data"
    _fusion_run_config(root, per_class=6, epochs=1)
    out = tmp_path / "run"
    done = _torchrun(2, out, root, epochs=1, extra=("train.batch_size=5",))
    assert done.returncode != 0
    ours = [line for line in done.stderr.splitlines() if line.startswith("finescope: ")]
    assert sorted(ours) == sorted(["finescope: error: train.batch_size 5 is the global batch and must be divisible "
                                   "by the 2 processes; use a multiple of 2",
                                   "finescope: error (rank 1): train.batch_size 5 is the global batch and must be "
                                   "divisible by the 2 processes; use a multiple of 2"])
    assert not out.exists()  # refused before any file


@pytest.mark.slow
def test_torchrun_rank0_start_errors_are_every_ranks_line_before_any_file(tmp_path):
    """A wrong data path (found by rank 0's scan), an --out under a file (rank 0's lock) and train.sync_bn on
    the CPU: one line per process, no gloo traceback of a rank left waiting, no file written."""
    root = tmp_path / "data"
    _fusion_run_config(root, per_class=6, epochs=1)
    afile = tmp_path / "afile"
    afile.write_text("")
    cases = [(tmp_path / "r1", ("data.source=csv", f"data.root={tmp_path / 'none.csv'}"), "does not exist"),
             (afile / "run", (), "Not a directory"),
             (tmp_path / "r3", ("train.sync_bn=true",), "train.sync_bn needs CUDA GPUs")]
    for out, extra, says in cases:
        done = _torchrun(2, out, root, epochs=1, extra=extra)
        assert done.returncode != 0
        ours = [line for line in done.stderr.splitlines() if line.startswith("finescope: ")]
        assert len(ours) == 2 and all(says in line for line in ours), done.stderr[-3000:]
        assert sorted(line.split(":")[1] for line in ours) == [" error", " error (rank 1)"]
        assert "gloo" not in done.stderr and "Connection reset" not in done.stderr, done.stderr[-3000:]
        assert not out.exists()


def _unreadable_first_image_of_rank_1(tmp_path: Path) -> tuple[Path, str]:
    """A 1-epoch fusion run's data in ``tmp_path / 'data'`` whose first training image of rank 1 (of 2) is not an
    image: the data folder and that image's path."""
    from finescope.config import load_config
    from finescope.data import load_samples, split_groups

    root = tmp_path / "data"
    _fusion_run_config(root, per_class=10, epochs=1)
    cfg = load_config(root / "cfg.yaml")
    s = load_samples(cfg.data)
    train = split_groups(s.labels, s.groups, cfg.data.test_fraction, cfg.data.val_fraction, cfg.seed)["train"]
    first = list(ShardSampler(len(train), True, cfg.seed, cfg.train.batch_size, True, rank_=1, world=2))[0]
    bad = s.samples[train[first]].path
    Path(bad).write_bytes(b"not an image")
    return root, bad


@pytest.mark.slow
def test_torchrun_an_image_only_rank_1_cannot_read_is_its_line_and_rank_0_says_it_stopped_with_it(tmp_path):
    """Rank 1 stops on an unreadable training image (data.on_error=raise): its one line; rank 0, waiting for it in
    a collective, printed gloo's 'Connection closed by peer' traceback instead of a line of its own."""
    root, bad = _unreadable_first_image_of_rank_1(tmp_path)
    done = _torchrun(2, tmp_path / "run", root, epochs=1)
    assert done.returncode != 0
    ours = [line for line in done.stderr.splitlines() if line.startswith("finescope: ")]
    assert ours[0].startswith(f"finescope: error (rank 1): cannot read image '{bad}'"), done.stderr[-3000:]
    # (torchrun may end rank 0 before it notices)
    assert ours[1:] in ([], ["finescope: error: another process of the run (rank 1) stopped (see its error or exit "
                             "status), so this one stopped too; no epoch had finished: start it again (without "
                             "--resume)"], ["finescope: error: stopped by SIGTERM (torchrun sends it to every process of "
                             "the run when one of them ends, or when it is stopped itself: its report says which); no "
                             "epoch had finished: start it again (without --resume)"]), done.stderr[-3000:]
    assert "[rank0]" not in done.stderr and "Connection closed by peer" not in done.stderr


@pytest.mark.slow
def test_torchrun_an_unreadable_image_read_by_a_worker_ends_the_run(tmp_path):
    """The same unreadable image, read by a DataLoader worker (data.num_workers, 2 by default): rank 1 printed its
    line and then never ended (at exit multiprocessing terminated its worker with SIGTERM, which the workers
    ignore, and waited for it forever: torch re-raises a worker's error from a frame that holds it, a cycle that
    kept the loader alive), and rank 0 waited for it in a collective for 30 minutes."""
    import signal

    root, bad = _unreadable_first_image_of_rank_1(tmp_path)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(_free_port()),
           "-m", "finescope", "train", "--config", str(root / "cfg.yaml"), "--out", str(tmp_path / "run"), "--quiet",
           "--set", "data.num_workers=1"]
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        _, err = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun's processes run in sessions of their own: end them too
        for pid in subprocess.run(["pgrep", "-f", str(tmp_path / "run")], capture_output=True, text=True).stdout.split():
            os.kill(int(pid), signal.SIGKILL)
        pytest.fail("the run did not end after rank 1's error")
    assert proc.returncode != 0
    ours = [line for line in err.splitlines() if line.startswith("finescope: ")]
    assert ours[0].startswith(f"finescope: error (rank 1): cannot read image '{bad}'"), err[-3000:]


@pytest.mark.slow
def test_torchrun_refuses_a_run_another_process_trains_on_every_rank(tmp_path):
    import fcntl

    root = tmp_path / "data"
    _fusion_run_config(root, per_class=6, epochs=1)
    out = tmp_path / "run"
    out.mkdir()
    with open(out / ".lock", "w") as held:
        held.write("pid 7 on elsewhere")
        held.flush()
        fcntl.flock(held, fcntl.LOCK_EX)
        done = _torchrun(2, out, root, epochs=1)
    assert done.returncode != 0
    ours = [line for line in done.stderr.splitlines() if line.startswith("finescope: ")]
    message = (f"'{out}' is being trained by another process (pid 7 on elsewhere); wait for it to end or stop it, "
               "then --resume, or choose another --out")
    assert sorted(ours) == [f"finescope: error (rank 1): {message}", f"finescope: error: {message}"]


@pytest.mark.slow
def test_torchrun_a_diverged_run_stops_on_every_rank_in_one_line(tmp_path):
    """train.lr=1e30: both ranks find the NaN weights after the first epoch and stop with the same line, before
    any checkpoint; none is left waiting for the other."""
    root = tmp_path / "data"
    _fusion_run_config(root, per_class=20, epochs=2)
    out = tmp_path / "run"
    done = _torchrun(2, out, root, epochs=2, extra=("--set", "train.lr=1e30"))
    assert done.returncode != 0
    ours = [line for line in done.stderr.splitlines() if line.startswith("finescope: ")]
    assert sorted(line.split(":")[1] for line in ours) == [" error", " error (rank 1)"], done.stderr[-3000:]
    assert all("training diverged in epoch 1 of 2" in line and "no checkpoint was written" in line for line in ours), ours
    assert "[rank" not in done.stderr and "gloo" not in done.stderr, done.stderr[-3000:]  # torchrun's own is there
    assert not list((out / "checkpoints").glob("*.pt"))


@pytest.mark.slow
def test_torchrun_stage_wise_warmup(tmp_path):
    """Crop warm-up epochs leave the fusion head without gradients; DDP must accept that. Once the crops join,
    every parameter gets one: DDP no longer looks for unused ones, which printed torch's warning that it found
    none from every rank; nor does it in a resume after the warm-up."""
    root = tmp_path / "data"
    _fusion_run_config(root, per_class=12, epochs=2, crop_warmup_epochs=1)
    run = _torchrun(2, tmp_path / "run", root, epochs=2)
    assert run.returncode == 0, run.stderr[-3000:]
    assert len((tmp_path / "run" / "history.jsonl").read_text().splitlines()) == 2
    resumed = _torchrun(2, tmp_path / "run", root, epochs=3, resume=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert len((tmp_path / "run" / "history.jsonl").read_text().splitlines()) == 3
    for out in (run, resumed):
        assert "find_unused_parameters" not in out.stdout + out.stderr, out.stderr[-3000:]


def test_sync_bn_conversion_keeps_the_state_and_is_refused_on_the_cpu(monkeypatch):
    """train.sync_bn: every BatchNorm becomes a SyncBatchNorm with the same state dict (keys and values), in
    the caller's model, once (a second wrap keeps them); on the CPU, where SyncBatchNorm has no kernel, DDP refuses it with a one-line error."""
    from finescope import distributed as dist
    from finescope.config import ModelConfig
    from finescope.errors import FinescopeError
    from finescope.models import create_model

    model = create_model(ModelConfig(variant="fusion", backbone="tiny", global_size=32, local_size=32), 2)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)  # non-trivial statistics, so that the copy is checked
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dist._convert_sync_bn_inplace(model)
    assert not any(type(m) is torch.nn.BatchNorm2d for m in model.modules())
    assert sum(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules()) > 0
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    synced = [m for m in model.modules() if isinstance(m, torch.nn.SyncBatchNorm)]
    dist._convert_sync_bn_inplace(model)  # wrapped again when a stage-wise warm-up ends: the same layers
    assert [m for m in model.modules() if isinstance(m, torch.nn.SyncBatchNorm)] == synced
    monkeypatch.setattr(dist, "is_distributed", lambda: True)
    with pytest.raises(FinescopeError, match="train.sync_bn needs CUDA"):
        dist.wrap_model(model, torch.device("cpu"), sync_bn=True)


def test_a_resume_with_processes_the_run_cannot_use_names_what_resumes_it(tmp_path, monkeypatch):
    """--resume of a run with train.batch_size 5 under 2 processes said 'use a multiple of 2', and of a run with
    train.sync_bn under torchrun on the CPU 'set it to false': --resume then refused the changed config. Both
    now say what resumes the run (a number of processes that divides the batch; CUDA, or one process)."""
    from finescope import distributed as dist
    from finescope import trainer
    from finescope.errors import FinescopeError

    monkeypatch.setattr(dist, "world_size", lambda: 2)
    with pytest.raises(FinescopeError, match=r"must be divisible by the 2 processes; --resume keeps the run's batch: "
                                             r"resume it with a number of processes that divides 5 \(1, 5\)$"):
        trainer.train(_cfg(tmp_path / "data", batch_size=5), tmp_path / "run", resume=True)
    with pytest.raises(FinescopeError, match="use a multiple of 2$"):  # a new run may change it
        dist.per_rank_batch(5)
    monkeypatch.setattr(dist, "is_distributed", lambda: True)
    with pytest.raises(FinescopeError, match=r"no CPU kernel\); --resume keeps the run's setting: resume it on CUDA "
                                             r"GPUs, or in one process \(where it changes nothing\)$"):
        dist.check_sync_bn(True, torch.device("cpu"), resume=True)
    assert not (tmp_path / "run").exists()


def test_unreadable_batch_under_ddp_runs_a_step_that_adds_nothing(monkeypatch):
    """data.on_error=skip can leave a rank an empty batch. In one process it is skipped; under DDP the rank runs
    its previous batch weighted 0 (the other ranks wait for its gradients), which the statistics do not count;
    an empty first batch runs the next readable one weighted 0 (it stopped the run, under data.on_error=skip, in
    whichever epoch one unreadable image fell in a rank's first batch); a rank with no readable batch is a
    one-line error, not a hang."""
    from finescope import distributed as dist
    from finescope.config import ModelConfig
    from finescope.data import Batch
    from finescope.engine import train_one_epoch
    from finescope.errors import FinescopeError
    from finescope.models import create_model

    torch.manual_seed(0)
    model = create_model(ModelConfig(variant="fusion", backbone="tiny", global_size=32, local_size=32), 2)
    full = Batch(torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8), torch.tensor([[64, 64]] * 2),
                 torch.tensor([0, 1]), torch.arange(2))
    empty = Batch(torch.zeros(0, 3, 0, 0), torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, dtype=torch.long),
                  torch.zeros(0, dtype=torch.long))
    calls = []
    model.backbone.register_forward_hook(lambda module, args, out: calls.append(out.shape[0]))
    cpu = torch.device("cpu")

    def run():
        calls.clear()
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        return train_one_epoch(model, [full, empty], opt, None, cpu, progress=False)

    assert run()["images"] == 2 and len(calls) == 2  # one process: the empty batch is skipped (2 passes: view, crops)
    monkeypatch.setattr(dist, "is_distributed", lambda: True)
    monkeypatch.setattr(dist, "all_reduce_sum", lambda t: t)
    monkeypatch.setattr(dist, "rank", lambda: 1)
    stats = run()
    assert stats["images"] == 2 and len(calls) == 4  # the previous batch ran again, and was not counted
    lrs = []
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lrs.append(step) or 0.0)
    calls.clear()
    stats = train_one_epoch(model, [empty, empty, full], opt, scheduler, cpu, progress=False)
    assert stats["images"] == 2 and len(calls) == 6 and lrs == [0, 1, 2, 3]  # every step ran, the batch counted once
    with pytest.raises(FinescopeError, match="every training image of rank 1 in this epoch is unreadable"):
        train_one_epoch(model, [empty, empty], torch.optim.SGD(model.parameters(), lr=0.0), None, cpu,
                        progress=False)


def test_a_stand_in_step_leaves_the_batchnorm_statistics_as_they_were(monkeypatch):
    """The batch a rank runs weighted 0 in place of an unreadable one (data.on_error=skip) moved its BatchNorm
    running statistics all the same, a second update from the same images; rank 0's are broadcast, validated and
    saved. After a stand-in step they are those of the steps that counted, as in a single process."""
    from finescope import distributed as dist
    from finescope.config import ModelConfig
    from finescope.data import Batch
    from finescope.engine import train_one_epoch
    from finescope.models import create_model

    full = Batch(torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8), torch.tensor([[64, 64]] * 2),
                 torch.tensor([0, 1]), torch.arange(2))
    empty = Batch(torch.zeros(0, 3, 0, 0), torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, dtype=torch.long),
                  torch.zeros(0, dtype=torch.long))
    monkeypatch.setattr(dist, "all_reduce_sum", lambda t: t)

    def statistics(distributed: bool) -> dict:
        monkeypatch.setattr(dist, "is_distributed", lambda: distributed)
        torch.manual_seed(0)
        model = create_model(ModelConfig(variant="fusion", backbone="tiny", global_size=32, local_size=32), 2)
        train_one_epoch(model, [full, empty], torch.optim.SGD(model.parameters(), lr=0.0), None,
                        torch.device("cpu"), progress=False)
        return {k: v for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}

    single, ddp = statistics(False), statistics(True)
    assert single.keys() == ddp.keys() and len(single) > 0
    assert all(torch.equal(single[k], ddp[k]) for k in single)


def test_main_speaks_for_the_work_every_rank_does_alike(monkeypatch):
    """Warnings of work every rank does alike (the data scan, the split) are shown by rank 0 only; outside
    that block every rank shows its own (an image only it reads)."""
    import warnings

    from finescope import distributed as dist
    from finescope.errors import FinescopeWarning

    for main, shown in ((True, 1), (False, 0)):
        monkeypatch.setattr(dist, "is_main", lambda main=main: main)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            with dist.main_speaks():
                warnings.warn("the scan's", FinescopeWarning, stacklevel=1)
            warnings.warn("its own image's", FinescopeWarning, stacklevel=1)
        assert [str(w.message) for w in seen] == ["the scan's"] * shown + ["its own image's"]


def test_one_named_gpu_for_every_process_is_refused_before_joining(monkeypatch):
    """train.device=cuda:N under torchrun put every process on that GPU (NCCL's duplicate-GPU error or a hang)."""
    from finescope import distributed as dist
    from finescope.errors import FinescopeError

    for name, value in {"WORLD_SIZE": "2", "RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(dist.torch_dist, "init_process_group", lambda *a, **k: pytest.fail("joined"))
    with pytest.raises(FinescopeError, match="train.device is 'cuda:1', one GPU for every process; under torchrun"):
        dist.init_from_env("cuda:1")


def test_a_world_size_without_a_launcher_is_one_line_not_a_traceback(monkeypatch):
    """WORLD_SIZE inherited from another job's environment: torch's env:// rendezvous raised a ValueError (RANK
    expected), and a WORLD_SIZE that is not a number a ValueError of int(); the command line reads that as one
    process."""
    from finescope import distributed as dist
    from finescope.errors import FinescopeError

    monkeypatch.setattr(dist.torch_dist, "init_process_group", lambda *a, **k: pytest.fail("joined"))
    for name in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_PORT", "29500")
    with pytest.raises(FinescopeError, match="WORLD_SIZE is 2 in the environment but RANK, MASTER_ADDR are not "
                                             "set: launch train with torchrun"):
        dist.init_from_env("cpu")
    monkeypatch.setenv("WORLD_SIZE", "x")
    assert dist.init_from_env("cpu") is False


@pytest.mark.parametrize("main", [True, False])
def test_an_unwritable_cache_folder_is_said_once_by_rank_0(tmp_path, monkeypatch, main):
    """Every rank makes its loaders and met the unwritable data.cache_dir alike: each printed the warning."""
    import warnings

    from finescope import distributed as dist
    from finescope import trainer
    from finescope.data import load_samples
    from finescope.data.dataset import DiskCache
    from finescope.data.synthetic import ensure_synthetic

    root = tmp_path / "data"
    ensure_synthetic(root, per_class=3, size=64)
    cfg = _cfg(root, ("data.cache=disk", f"data.cache_dir={tmp_path / 'afile'}"))
    (tmp_path / "afile").write_text("")
    sample_set = load_samples(cfg.data)
    monkeypatch.setattr(DiskCache, "_unwritable", set())
    monkeypatch.setattr(dist, "is_main", lambda: main)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        trainer._make_loaders(sample_set, {"train": np.arange(4), "val": np.arange(4, 6)}, cfg)
    assert sum("cannot write the image cache" in str(w.message) for w in seen) == (1 if main else 0)


@pytest.mark.slow
def test_torchrun_the_process_left_when_rank_0_is_killed_says_so_in_one_line(tmp_path):
    """kill -9 of rank 0 mid-run: torchrun ended rank 1 with SIGTERM and rank 1 died without a word (only
    torchrun's own report). It now ends at once with one line saying why and how to go on, and the last
    checkpoint rank 0 wrote still loads."""
    import signal
    import time

    from finescope.checkpoint import load_checkpoint

    root = tmp_path / "data"
    _fusion_run_config(root, per_class=40, epochs=20)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(_free_port()),
           "-m", "finescope", "train", "--config", str(root / "cfg.yaml"), "--out", str(out), "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 240
        while not (out / "checkpoints" / "last.pt").is_file() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert (out / "checkpoints" / "last.pt").is_file(), proc.communicate(timeout=60)[1][-3000:]
        rank0 = int((out / ".lock").read_text().split()[1])  # "pid N on HOST": rank 0 holds the run's lock
        os.kill(rank0, signal.SIGKILL)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    ours = [line for line in err.splitlines() if line.startswith("finescope: ")]
    assert len(ours) == 1, err[-3000:]
    # rank 1 learns it from torchrun's SIGTERM, or first from gloo when it waited for rank 0 in a collective
    assert ours[0].startswith(("finescope: error (rank 1): stopped by SIGTERM (torchrun sends it to every process "
                               "of the run when one of them ends", "finescope: error (rank 1): another process of the run "
                               "(rank 0) stopped")), ours
    assert ours[0].endswith("; the run's last checkpoint is kept: continue it with the same command and --resume"), ours
    assert "[rank1]" not in err and "Connection closed by peer" not in err, err[-3000:]  # torchrun's report is there
    assert "model" in load_checkpoint(out / "checkpoints" / "last.pt")


@pytest.mark.parametrize("rank", [0, 1])
def test_a_process_that_stops_answering_ends_the_others_in_one_line(tmp_path, monkeypatch, capsys, rank):
    """A process frozen, or its machine gone: the others waited in gloo for train's timeout (30 minutes), then
    ended in gloo's RuntimeError traceback. Now one line, naming the wait, and how to go on."""
    from finescope import cli

    def waited(args):
        args.run_dir = str(tmp_path / "run")
        raise RuntimeError("[../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting "
                           "1800000ms for recv operation to complete")

    monkeypatch.setattr(cli, "cmd_train", waited)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", str(rank))
    assert cli.main(["train", "--config", "configs/demo.yaml", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    who = "finescope: error: " if rank == 0 else "finescope: error (rank 1): "
    assert err == [f"{who}another process of the run (rank {1 - rank}) did not answer for 30 minutes (it stopped, or "
                   "its machine is unreachable), so this one stopped; no epoch had finished: start it again (without "
                   "--resume)"]


@pytest.mark.parametrize("world", [2, 3])
def test_a_process_that_lost_another_of_more_than_two_says_where_its_rank_is_named(tmp_path, monkeypatch, capsys,
                                                                                  world):
    """With 3 or more processes gloo's error names a socket address, not the rank that ended, and a survivor's line
    said only '(see its error or exit status)'; it now says that torchrun's report names it (its 'Root Cause')."""
    from finescope import cli

    def lost(args):
        args.run_dir = str(tmp_path / "run")
        raise RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:545] Read error [127.0.0.1]:20378: "
                           "Connection reset by peer. This is typically caused by a remote worker hanging")

    monkeypatch.setattr(cli, "cmd_train", lost)
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("RANK", "1")
    assert cli.main(["train", "--config", "configs/demo.yaml", "--out", str(tmp_path / "run")]) == 2
    which = "(rank 0) stopped (see its error or exit status)" if world == 2 else \
        "stopped (torchrun's report says which, under 'Root Cause')"
    assert capsys.readouterr().err.strip().splitlines() == [
        f"finescope: error (rank 1): another process of the run {which}, so this one stopped too; no epoch had "
        "finished: start it again (without --resume)"]


@pytest.mark.parametrize("checkpoint", [False, True])
def test_torchruns_sigterm_ends_a_process_in_one_line(tmp_path, monkeypatch, capsys, checkpoint):
    """torchrun ends the other processes of a run with SIGTERM when one ends (rank 0 killed): a process busy
    outside a collective then died without a word. It now says so in one line, with what to do, and the
    handler of SIGTERM that the caller had is back after the command."""
    import signal
    import time

    from finescope import cli, trainer
    from finescope import distributed as dist

    class Unhandled(Exception):
        pass

    def callers(signum, frame):
        raise Unhandled("SIGTERM reached the caller's handler during train")

    def train(cfg, out, **kwargs):
        if checkpoint:
            (Path(out) / "checkpoints").mkdir(parents=True)
            (Path(out) / "checkpoints" / "last.pt").write_bytes(b"")
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the signal arrives here
        pytest.fail("SIGTERM did not stop train")

    monkeypatch.setattr(trainer, "train", train)
    monkeypatch.setattr(dist, "init_from_env", lambda device: True)
    monkeypatch.setattr(dist, "is_main", lambda: False)
    monkeypatch.setattr(dist, "cleanup", lambda: None)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    before = signal.signal(signal.SIGTERM, callers)
    try:
        assert cli.main(["train", "--config", "configs/demo.yaml", "--out", str(tmp_path / "run")]) == 143
        assert signal.getsignal(signal.SIGTERM) is callers
    finally:
        signal.signal(signal.SIGTERM, before)
    then = ("the run's last checkpoint is kept: continue it with the same command and --resume" if checkpoint
            else "no epoch had finished: start it again (without --resume)")
    assert capsys.readouterr().err.strip().splitlines() == [
        "finescope: error (rank 1): stopped by SIGTERM (torchrun sends it to every process of the run when one of "
        f"them ends, or when it is stopped itself: its report says which); {then}"]


@pytest.mark.slow
def test_torchrun_ctrl_c_is_reported_once_by_rank_0(tmp_path):
    """Ctrl-C in a terminal: the SIGINT reaches torchrun (its processes run in sessions of their own), which
    sends it on to every process; as the README says, rank 0 alone reports the interruption, in one line, and
    the last checkpoint still loads."""
    import signal
    import time

    from finescope.checkpoint import load_checkpoint

    root = tmp_path / "data"
    _fusion_run_config(root, per_class=20, epochs=200, patience=1000)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(_free_port()),
           "-m", "finescope", "train", "--config", str(root / "cfg.yaml"), "--out", str(out), "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    # a session of its own, as a terminal's foreground job: Ctrl-C sends SIGINT to its process group
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not (out / "checkpoints" / "last.pt").is_file() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert (out / "checkpoints" / "last.pt").is_file(), proc.communicate(timeout=60)[1][-3000:]
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0
    ours = [line for line in err.splitlines() if line.startswith("finescope: ")]
    assert ours == ["finescope: interrupted; continue it with the same command and --resume"], err[-3000:]
    assert "SignalException" in err and "KeyboardInterrupt" not in err, err[-3000:]  # torchrun's traceback only
    assert "model" in load_checkpoint(out / "checkpoints" / "last.pt")


def _two_nodes(root: Path, out: Path, extra: tuple[str, ...] = ()) -> list[subprocess.CompletedProcess]:
    """README's two-machine command run as written, as 2 'machines' of 1 process each on this one: HOST0 is
    127.0.0.1, --nproc_per_node 1, and the run's own config and --out."""
    import re
    import shlex

    readme = (SRC.parent / "README.md").read_text()
    found = re.search(r"^torchrun (--nnodes=2 .*?) \\\n +-m finescope train (.*)$", readme, flags=re.M)
    assert found, "README's two-machine torchrun command is gone: test the one it gives now"
    flags = [f.replace("HOST0:29500", f"127.0.0.1:{_free_port()}").replace("--nproc_per_node=8", "--nproc_per_node=1")
             for f in shlex.split(found[1])]
    assert flags[0] == "--nnodes=2" and "--nproc_per_node=1" in flags and any("127.0.0.1" in f for f in flags)
    assert shlex.split(found[2])[0::2] == ["--config", "--out"]
    cmd = [sys.executable, "-m", "torch.distributed.run", *flags, "-m", "finescope", "train", "--config",
           str(root / "cfg.yaml"), "--out", str(out), "--quiet", *extra]
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    try:
        outputs = [p.communicate(timeout=300) for p in procs]
        return [subprocess.CompletedProcess(cmd, p.returncode, *o) for p, o in zip(procs, outputs, strict=True)]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


@pytest.mark.slow
def test_readmes_two_machine_command_runs_with_one_rank_0_and_a_line_per_process(tmp_path):
    """The --nnodes/--rdzv flags of the README, two torchrun launchers meeting at one c10d endpoint: a wrong
    data.root is one line per process, wherever each runs; the run trains, and only rank 0 (on either
    'machine': the rendezvous gives the ranks) prints and writes its files."""
    root = tmp_path / "data"
    _fusion_run_config(root, per_class=8, epochs=1)
    done = _two_nodes(root, tmp_path / "bad", ("--set", "data.source=csv", f"data.root={tmp_path / 'none.csv'}"))
    ours = [line for d in done for line in d.stderr.splitlines() if line.startswith("finescope: ")]
    assert all(d.returncode != 0 for d in done)
    assert sorted(line.split(":")[1] for line in ours) == [" error", " error (rank 1)"], ours
    assert all("does not exist" in line for line in ours) and not (tmp_path / "bad").exists()
    out = tmp_path / "run"
    done = _two_nodes(root, out)
    assert [d.returncode for d in done] == [0, 0], [d.stderr[-3000:] for d in done]
    assert sum(d.stdout.count("run written to") for d in done) == 1
    assert (out / "metrics.json").is_file() and len((out / "history.jsonl").read_text().splitlines()) == 1
