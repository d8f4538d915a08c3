"""Wiring: build data, model, optimiser and loops from a :class:`Config`, and write a run directory.

A run directory holds::

    config.yaml            the resolved config with package version and git commit
    splits.json            the grouped split (reusable with data.splits=...)
    history.jsonl          one JSON line per epoch
    checkpoints/last.pt    the full state after the last finished epoch (resume from here)
    checkpoints/best.pt    the state of the best validation epoch
    metrics.json           test metrics of best.pt
    predictions_test.csv   one row per test image
"""

from __future__ import annotations

import contextlib
import csv
import errno
import functools
import math
import os
import random
import re
import shlex
import socket
import sys
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from finescope import distributed as dist
from finescope.checkpoint import (
    best_checkpoint,
    earlier_evaluations,
    evaluated_suffix,
    load_checkpoint,
    read_history,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from finescope.config import (
    DEVICES,
    Config,
    ModelConfig,
    first_difference,
    load_config,
    read_yaml_mapping,
    resolved_dict,
    save_config,
    stored_config,
    to_dict,
)
from finescope.data import (
    ImageDataset,
    SampleSet,
    build_transform,
    collate_padded,
    colour_jitter,
    empty_split_error,
    load_samples,
    load_splits,
    rotates_90,
    save_splits,
    split_groups,
)
from finescope.data.dataset import aspect_key, leave_sigterm_to_main, shape_order, worker_context
from finescope.data.sources import check_outside_data, grouping_doubt, in_class_order
from finescope.data.splits import (
    check_no_leak_of,
    listed_digests,
    own_split_leak,
    rewritten_digests,
    seen_groups,
    split_digest,
    split_digests,
    stored_class_names,
    trained_on,
)
from finescope.engine import (
    Predictions,
    first_diverged,
    make_grad_scaler,
    merge_predictions,
    predict_loader,
    train_one_epoch,
    unwrap,
    warmup_cosine,
    weight_bound,
)
from finescope.errors import FinescopeError, FinescopeWarning, Interrupted, Terminated
from finescope.files import atomic_open, finite_json, json_text, remove_temporaries, write_text
from finescope.metrics import compute_metrics, patient_index, per_magnification_metrics
from finescope.models import create_model
from finescope.models.backbones import depthwise_without_cudnn
from finescope.models.network import FineScopeNet, global_view_size


# -- small builders ----------------------------------------------------------------------------------------
def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda if available else cpu; ``cuda`` without a GPU is an error naming ``train.device``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not re.fullmatch(DEVICES, name):
        raise FinescopeError(f"the device '{name}' (train.device, or --device) is not one finescope runs on; use "
                             "auto, cpu, cuda or cuda:N")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise FinescopeError(f"the device is '{name}' (train.device, or --device) but no CUDA GPU is available; "
                             "use cpu")
    if not has_device(name):  # torch would fail at the first tensor moved there ("invalid device ordinal")
        n = torch.cuda.device_count()
        raise FinescopeError(f"the device is '{name}' (train.device, or --device) but this machine has {n} CUDA "
                             f"GPU{'s' if n != 1 else ''} (cuda:0 to cuda:{n - 1}); use cuda or one of those")
    return torch.device(name)


def has_device(name: str) -> bool:
    """Whether this machine has the device ``name`` (cpu, cuda or cuda:N)."""
    if not name.startswith("cuda"):
        return True
    return torch.cuda.is_available() and int(name.partition(":")[2] or 0) < torch.cuda.device_count()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def min_image_side(cfg: Config) -> int:
    """Crop variants need images at least ``local_size`` on their short side."""
    from finescope.models.registry import variant_switches

    return cfg.model.local_size if variant_switches(cfg.model.variant).get("use_crops") else 0


def view_image_side(cfg: Config) -> int:
    """The short side of the model's global view (``model.global_size``), or 0 for ``global-hires``, which reads
    the image itself."""
    from finescope.models.registry import variant_switches

    return 0 if variant_switches(cfg.model.variant).get("hires") else cfg.model.global_size


def colour_on_device(cfg: Config) -> bool:
    """Whether the colour jitter runs on the training device (``data.colour_on``; ``auto``: on CUDA) instead
    of in the workers. In the workers it takes about 40% of what they deliver (``benchmarks/bench_data.py
    --colour-on workers device``, 2 CPU workers: 407 against 677 images/s); on the device it is one batched
    3x3 product per batch, which the main process pays on a CPU (61 ms per batch of 16 there), so ``auto``
    keeps it in the workers without CUDA."""
    if cfg.data.colour_on == "auto":
        return resolve_device(cfg.train.device).type == "cuda"
    return cfg.data.colour_on == "device"


def make_dataset(sample_set: SampleSet, indices, cfg: Config, train: bool) -> ImageDataset:
    """The images at ``indices`` with the training or evaluation transform of ``cfg``."""
    jitter = colour_jitter(cfg.data.augment, train) if train and colour_on_device(cfg) else None
    return ImageDataset(
        [sample_set.samples[i] for i in indices],
        transform=build_transform(cfg.data.augment, train, colour=jitter is None),
        on_error=cfg.data.on_error,
        min_side=min_image_side(cfg),
        view_side=view_image_side(cfg),
        cache=cfg.data.cache,
        seed=cfg.seed if train else None,
        cache_dir=cfg.data.cache_dir,
        colour=jitter,
        one_orientation=train and one_orientation(cfg),
        bit_depth=cfg.data.bit_depth,
    )


def one_orientation(cfg: Config) -> bool:
    """Whether training batches take one orientation per step (``data.one_orientation``): with an augmentation
    that rotates by 90 degrees, when set ``on``, or ``auto`` under ``train.compile``, where every arrangement of
    portrait and landscape images in a batch would be another graph (on BreakHis, without it, dynamo's
    recompile limit was reached in the first epoch). ``auto`` leaves eager training as it was: in eleven on/off
    pairs on the 18 shared BreakHis patients the image accuracy was lower with it on in 8 (higher in 2), within
    the spread of those near-chance splits (``benchmarks/RESULTS.md``)."""
    mode = cfg.data.one_orientation
    return rotates_90(cfg.data.augment) and (mode == "on" or (mode == "auto" and cfg.train.compile != "off"))


def make_loader(
    sample_set: SampleSet, indices, cfg: Config, train: bool, epoch: int = 0, batch_size: int | None = None,
    dataset: ImageDataset | None = None,
) -> DataLoader:
    """A DataLoader over ``indices`` for this process, meant to serve every epoch of a run.

    Training loaders shuffle with a permutation seeded by (seed, epoch) (call ``loader.sampler.set_epoch``
    before each epoch) and, under DDP, read their share (``batch_size / world``) of each global batch
    (:class:`~finescope.distributed.ShardSampler`: every image once per epoch; under ``train.compile`` the last
    incomplete global batch is dropped, so that every step has one shape); each image's augmentation is seeded
    by (seed, epoch, image), so neither the workers nor a resume change it. Evaluation loaders read whole
    evaluation batches, every ``world``-th one, without padding, with the images ordered so that those of one
    shape share batches (:func:`~finescope.data.dataset.shape_order`, from the file headers), and a batch holds
    images of one model input shape only (:func:`eval_batch_key`): no image is padded to a batch-mate's, so its
    prediction does not depend on the images it is evaluated with; with
    ``data.shape_pool`` training batches are drawn alike from runs of that many shuffled batches. Workers are
    persistent: they start once per run. With ``data.cache=memory`` they are forked (on Linux), so that they
    share the decoded images (:class:`~finescope.data.dataset.SharedMemoryCache`). Pass a ``dataset`` from
    :func:`make_dataset` to share it between loaders.
    """
    dataset = dataset if dataset is not None else make_dataset(sample_set, indices, cfg, train)
    bs = batch_size or (cfg.train.batch_size if train else (cfg.train.eval_batch_size or cfg.train.batch_size))
    pooled = train and cfg.data.shape_pool > 1
    sizes = _rank0_header_sizes(dataset) if pooled or not train else None
    sampler = dist.make_sampler(len(dataset), shuffle=train, seed=cfg.seed, global_batch=bs, train=train,
                                drop_tail=cfg.train.compile != "off", tag_epoch=train,
                                order=None if train else shape_order(sizes),
                                shape_keys=[None if s is None else aspect_key(s) for s in sizes] if pooled else None,
                                pool=cfg.data.shape_pool,
                                batch_keys=None if train else [eval_batch_key(s, cfg.model) for s in sizes])
    sampler.set_epoch(epoch)
    workers = cfg.data.num_workers
    batching = {"batch_size": dist.per_rank_batch(bs), "sampler": sampler} if train \
        else {"batch_sampler": dist.EvalBatches(sampler)}
    return DataLoader(
        dataset,
        **batching,
        num_workers=workers,
        collate_fn=collate_padded,
        pin_memory=torch.cuda.is_available() and cfg.train.device != "cpu",
        persistent_workers=workers > 0,
        multiprocessing_context=worker_context(cfg.data.cache, workers),
        worker_init_fn=leave_sigterm_to_main,  # the main process stops the workers (a scheduler signals them all)
        generator=torch.Generator(),  # worker seeds do not draw from (and shift) the global RNG that dropout uses
    )


def eval_batch_key(size: tuple[int, int] | None, model: ModelConfig) -> tuple[int, int] | None:
    """The shape an image of file size ``size`` (H, W) enters the backbone with: its global view
    (:func:`~finescope.models.network.global_view_size`), or itself for a variant that reads the image itself
    (``hires``: global-hires); None when unknown. Evaluation batches hold images of one such shape; an image
    of unknown shape is a batch of its own."""
    from finescope.models.registry import variant_switches

    if size is None or variant_switches(model.variant).get("hires"):
        return size
    return global_view_size(*size, model.global_size, model.view_multiple)


def _rank0_header_sizes(dataset: ImageDataset) -> list[tuple[int, int] | None]:
    """The (H, W) file headers of ``dataset`` as rank 0 read them, on every rank (each rank calls this): a header
    that only one rank failed to read (None there) would give that rank another evaluation order or
    ``data.shape_pool`` permutation, and the ranks would read some images twice and others never."""
    return dist.from_main(None if dist.is_distributed() and not dist.is_main() else dataset.header_sizes())


@contextlib.contextmanager
def stops_raised():
    """Raise, as the block ends, a Ctrl-C (KeyboardInterrupt) or any other stop that is no error (the CLI's
    SIGTERM) met in a ``__del__`` inside it, which Python only prints ("Exception ignored in ...") before going
    on. torch stops a DataLoader's worker processes in its iterator's ``__del__``: deleting a loader in this
    block, its run stops there instead of going on to its test as if nothing happened."""
    stopped, before = [], sys.unraisablehook

    def hook(unraisable) -> None:
        if isinstance(unraisable.exc_value, BaseException) and not isinstance(unraisable.exc_value, Exception):
            stopped.append(unraisable.exc_value)
        else:
            before(unraisable)

    sys.unraisablehook = hook
    try:
        yield
    finally:
        sys.unraisablehook = before
    if stopped:
        raise stopped[0]


@functools.lru_cache(maxsize=8)
def fused_adamw(device_type: str) -> bool:
    """Whether this torch has a fused AdamW (one kernel over all parameters) for ``device_type``: CUDA, and the
    CPU since torch 2.4, where a step takes less than half the time of the default foreach one
    (``benchmarks/optimizer_cost.py``)."""
    try:
        torch.optim.AdamW([torch.zeros(1, device=device_type, requires_grad=True)], fused=True)
    except (RuntimeError, ValueError, TypeError):
        return False
    return True


def build_optimizer(model: torch.nn.Module, cfg: Config, device: torch.device) -> torch.optim.Optimizer:
    """AdamW, fused where torch has it for the device (:func:`fused_adamw`); no weight decay on biases and norm
    weights; the backbone at ``lr * backbone_lr_scale``."""
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if cfg.train.backbone_lr_scale == 0 and name.split(".")[0] in ("backbone", "crop_backbone"):
            p.requires_grad_(False)  # lr 0 = frozen: skip its gradients altogether (much faster on a CPU)
        if p.requires_grad:
            groups.setdefault((name.split(".")[0] in ("backbone", "crop_backbone"), p.ndim >= 2), []).append(p)
    t = cfg.train
    param_groups = [
        {"params": ps, "weight_decay": t.weight_decay if decay else 0.0, "lr": t.lr * (t.backbone_lr_scale if bb else 1)}
        for (bb, decay), ps in sorted(groups.items())
    ]
    return torch.optim.AdamW(param_groups, lr=t.lr, fused=fused_adamw(device.type))


def checkpoint_model_config(cfg: Config) -> Config:
    """``cfg`` without the backbone's initial weights, for a model whose weights a checkpoint then gives: the
    file of ``model.weights`` need not be there any more, nor a network for ``model.pretrained``."""
    return replace(cfg, model=replace(cfg.model, weights="", pretrained=False))


def as_resumed(cfg: Config, run_dir: Path) -> Config:
    """``cfg`` with the ``data.splits`` that ``run_dir`` (a run a cv or the demo resumes) was trained with: it
    names the run's split file as the output folder was spelled then (relative or absolute, or before the folder
    moved), and a resume reads the run's own ``splits.json`` anyway."""
    if not (run_dir / "config.yaml").is_file():
        return cfg
    stored = read_yaml_mapping(run_dir / "config.yaml").get("data", {}).get("splits", cfg.data.splits)
    return replace(cfg, data=replace(cfg.data, splits=stored))


def build_model(cfg: Config, num_classes: int, device: torch.device) -> FineScopeNet:
    """The model of ``cfg`` on ``device``; with ``train.channels_last`` its weights in the channels-last layout,
    which the convolutions of CUDA and of the CPU (oneDNN) both run faster (the batches follow on CUDA, for
    ``global-hires`` only: :func:`finescope.engine.input_channels_last`); ``train.selection_graph`` sets its
    ``selection_graph``; ``train.cudnn_depthwise: false`` runs its depthwise convolutions without cuDNN
    (:func:`~finescope.models.backbones.depthwise_without_cudnn`; on a CPU the same kernels as with it)."""
    model = create_model(cfg.model, num_classes).to(device)
    if not cfg.train.cudnn_depthwise:
        depthwise_without_cudnn(model)
    model.selection_graph = cfg.train.selection_graph
    model.global_in_loss = cfg.train.aux_weight > 0
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


# -- splits --------------------------------------------------------------------------------------------------
def resolve_splits(cfg: Config, sample_set: SampleSet, run_dir: Path, resume: bool) -> dict[str, np.ndarray]:
    """The run's split: resumed, given by ``data.splits``, preset by a CSV column, or drawn (grouped)."""
    own = run_dir / "splits.json"
    drawn = False  # whether data.test_fraction and data.val_fraction drew it
    if resume and own.is_file():
        splits = load_splits(own, sample_set, fix=OWN_SPLIT_FIX, own=True)
        source = f"the run's {own}"
    elif cfg.data.splits:
        splits, source = load_splits(cfg.data.splits, sample_set), f"data.splits '{cfg.data.splits}'"
    elif sample_set.preset_splits is not None:
        names = np.array(sample_set.preset_splits)
        splits = {side: np.flatnonzero(names == side) for side in ("train", "val", "test")}
        source = f"the split column of '{cfg.data.root}'"
    else:
        splits = split_groups(
            sample_set.labels, sample_set.groups, cfg.data.test_fraction, cfg.data.val_fraction, cfg.seed
        )
        source, drawn = "data.test_fraction and data.val_fraction", True
    if not (resume and own.is_file()):  # a run's own split is what it is (load_splits warned of a leak)
        try:
            check_no_leak_of(splits, sample_set)
        except FinescopeError as e:  # which split: a CSV's split column names no file otherwise
            raise FinescopeError(f"{source}: {e}") from None
    if len(splits.get("train", [])) == 0:
        raise FinescopeError(f"the training split is empty: {source} leaves no image for training; change it, or "
                             "add images")
    if dist.is_main():
        for message in thin_split_warnings(splits, sample_set, cfg, drawn):
            warnings.warn(message, FinescopeWarning, stacklevel=2)
    return splits


def fine_tune_leak(cfg: Config, splits: dict[str, np.ndarray], sample_set: SampleSet) -> str | None:
    """The warning for a run fine-tuned from an earlier one (``model.weights=RUN``) whose test side holds patients
    that run trained or validated on (by its ``splits.json``: :func:`seen_groups`): its backbone has seen them, so
    the test metrics are not those of unseen patients. None when there are none, or when ``model.weights`` is no
    run."""
    weights = Path(cfg.model.weights) if cfg.model.weights else None
    if weights is not None and weights.is_dir():  # RUN or RUN/checkpoints: model.weights reads its best.pt
        weights = best_checkpoint(weights)
    if weights is None:
        return None
    run = run_dir_of({"path": weights})
    if not (run / "splits.json").is_file() or not (run / "checkpoints").is_dir():
        return None
    seen = seen_groups(run / "splits.json", sample_set)
    held = [i for i in np.asarray(splits.get("test", []), dtype=np.int64).tolist()
            if sample_set.samples[i].group in seen]
    if not held:
        return None
    groups = {sample_set.samples[i].group for i in held}
    return (f"model.weights '{cfg.model.weights}' is a run that trained or validated on {len(groups)} of the groups "
            f"(patients) on this run's test side ({len(held)} of its {len(splits['test'])} images, by that run's "
            "splits.json): its backbone has seen them, so the test metrics are not those of unseen patients; "
            + (f"reuse its split with data.splits={run / 'splits.json'}" if not cfg.data.splits else
               "the split given (data.splits, a cv's fold) tests them: fine-tune from a run trained on other "
               "patients, or from ImageNet weights"))


_WARNED_DARK: set[tuple[str, int]] = set()  # (data root, data.bit_depth) warned about in this process (cv: once)


def dark_images_warning(cfg: Config, sample_set: SampleSet, indices) -> str | None:
    """The warning for training images (``indices``) that are 16-bit and read almost black, as a camera's 12- or
    14-bit data in 16-bit files does under ``data.bit_depth=0`` (:func:`~finescope.data.summary.dark_sixteen_bit`:
    up to 8 images' headers, and only 16-bit ones decoded); None when the sampled ones look right, or when this
    process warned about the data already (each fold of a cv)."""
    from finescope.data.summary import dark_advice, dark_sixteen_bit

    key = (sample_set.root, cfg.data.bit_depth)
    found = None if key in _WARNED_DARK else dark_sixteen_bit([sample_set.samples[i].path for i in indices],
                                                              cfg.data.bit_depth)
    if found is None:
        return None
    _WARNED_DARK.add(key)
    return f"the 16-bit image '{found[0]}' reads almost black (brightest value {found[1]} of 255): " + \
        dark_advice(cfg.data.bit_depth) + "; finescope data lists every such file"


def thin_split_warnings(splits: dict[str, np.ndarray], sample_set: SampleSet, cfg: Config, drawn: bool) -> list[str]:
    """What a split cannot do, as messages: a training side without some classes (a drawn split deals each group
    by the class most of its images have, so a class found only in groups mostly of other classes can go to
    validation or test with them), a drawn split whose validation or test side came out empty although
    its fraction asks for one (:func:`~finescope.data.splits.split_groups` gives a class's group to test when
    the class has 2, and to validation when 3 remain after test), a test side that lacks some classes, whose
    metrics then describe the others only, and a validation side of one class under ``train.monitor: auc``,
    which it cannot measure, or (drawn) one without some trained classes, which early stopping then ignores.
    An empty side of a ``folder`` source or CSV manifest whose groups look like no patients
    (:func:`~finescope.data.sources.grouping_doubt`) points at the grouping instead of asking for more data."""
    messages = []
    trained = {sample_set.labels[i] for i in np.asarray(splits.get("train", []), dtype=np.int64).tolist()}
    untrained = [name for c, name in enumerate(sample_set.class_names) if c not in trained]
    if untrained:  # a drawn split deals a group by its majority class: a class only in others' groups follows them
        fix = "change seed to draw another split, or give one with data.splits" if drawn else \
            "give a split whose training side holds every class"
        messages.append(f"the training split holds no image of {', '.join(untrained)} (the groups holding its images "
                        f"are on the validation or test side): the model cannot learn it and is still scored on it; "
                        f"{fix}")
    n_groups = len(set(map(str, sample_set.groups)))
    too_few = (f"{n_groups} groups for {len(sample_set.class_names)} classes are too few to spare one per class "
               "(grouped splits keep each patient on one side)")
    add = "Add data"
    if grouping_doubt(sample_set, cfg.data):  # load_samples warned how the images are grouped and what to do
        whose = "data.source=folder's groups" if cfg.data.source == "folder" else "the CSV manifest's groups"
        too_few += f": the groups look like no patients (see the warning on {whose})"
        add = "Group the images by patient as that warning says"
    elif few := grouping_doubt(sample_set, cfg.data, thin=True):  # few groups of many images: patients or not?
        too_few, add = f"{too_few}; {few}", "Else add data"
    if drawn and cfg.data.val_fraction > 0 and len(splits.get("val", [])) == 0:
        messages.append(f"the validation split is empty at data.val_fraction={cfg.data.val_fraction}: {too_few}; "
                        f"best.pt will be the last epoch and early stopping is off. {add}, or set "
                        "data.val_fraction=0 to train without one")
    test = np.asarray(splits.get("test", []), dtype=np.int64)
    if drawn and cfg.data.test_fraction > 0 and len(test) == 0:
        messages.append(f"the test split is empty at data.test_fraction={cfg.data.test_fraction}: {too_few}")
    elif len(test):
        present = {sample_set.labels[i] for i in test.tolist()}
        missing = [name for c, name in enumerate(sample_set.class_names) if c not in present]
        if missing:
            messages.append(f"the test split holds {len(present)} of {len(sample_set.class_names)} classes (no image "
                            f"of {', '.join(missing)}: split by group, their few groups stayed in training): its "
                            "metrics describe the other classes only")
    val = np.asarray(splits.get("val", []), dtype=np.int64)
    present = sorted({sample_set.labels[i] for i in val.tolist()})
    if cfg.train.monitor == "auc" and len(present) == 1:  # AUC needs two classes; each epoch would score -inf
        messages.append(f"train.monitor is auc, which the validation split cannot measure: it holds images of one "
                        f"class ({sample_set.class_names[present[0]]}); best.pt would stay the first epoch and early "
                        "stopping end the run train.patience epochs later. Set train.monitor to balanced_accuracy "
                        "or loss, or split so that validation holds two classes")
    elif drawn and present and (unjudged := [name for c, name in enumerate(sample_set.class_names)
                                             if c in trained and c not in present]):
        # a class spares a group for validation only with 3 groups left after test (cv's folds say so themselves)
        messages.append(f"the validation split holds no image of {', '.join(unjudged)} (a class spares a group for "
                        "it only with 3 or more groups left after the test side): early stopping and best.pt judge "
                        "the run by the other classes only; add groups (patients) to those classes, or set "
                        "data.val_fraction=0 to train to the last epoch")
    return messages


# -- the run -------------------------------------------------------------------------------------------------
_MONITOR_KEYS = {"accuracy": "image_accuracy"}  # train.monitor names -> keys of the metrics dict


def _score(metrics: dict, monitor: str) -> float:
    """Higher is better; the loss is negated. A metric that is undefined (AUC on a validation side of one
    class) scores -inf: worse than any defined one, never better than the first candidate epoch."""
    value = -metrics["loss"] if monitor == "loss" else metrics.get(_MONITOR_KEYS.get(monitor, monitor))
    value = float("nan") if value is None else float(value)
    return float("-inf") if math.isnan(value) else value


def _state(model, optimizer, scheduler, scaler, epoch, cfg, class_names, tracker) -> dict:
    from finescope import __version__

    return {
        "model": unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),  # {} unless fp16 autocast on CUDA
        "epoch": epoch,
        "rng": rng_state(),
        "config": resolved_dict(cfg),
        "class_names": list(class_names),
        "tracker": dict(tracker),
        "finescope_version": __version__,
    }


def _check_classes(state: dict, class_names: list[str], where: str) -> None:
    if list(state["class_names"]) != list(class_names):
        raise FinescopeError(
            f"checkpoint '{where}' was trained for classes {state['class_names']} but the data has {class_names}; "
            "use a checkpoint of this class list or data with its classes"
        )


def evaluate_split(model, sample_set, indices, cfg, device, desc="eval", loader=None) -> tuple[Predictions, dict]:
    """Predict ``indices`` (through ``loader`` when given, an evaluation loader over them) and compute their
    metrics (image- and, with groups, patient-level).

    Under DDP every rank predicts its shard and the predictions of all ranks are gathered, so each image is
    counted exactly once and every rank returns the same metrics.
    """
    own = loader is None  # made here: its workers stop here
    loader = loader if loader is not None else make_loader(sample_set, indices, cfg, train=False)
    preds = predict_loader(
        model, loader, device, amp=cfg.train.amp, cpu_amp=cfg.train.cpu_amp,
        channels_last=cfg.train.channels_last, predict_with=cfg.model.predict_with, aux_weight=cfg.train.aux_weight,
        desc=desc,
    )
    if own:
        with stops_raised():
            del loader
    preds = merge_predictions(dist.all_gather(preds))
    if len(preds.indices) == 0 and len(indices):
        which = "" if desc == "all" else f" of the {desc} split"
        raise FinescopeError(f"none of the {len(indices)} images{which} could be evaluated (data.on_error=skip "
                             "skipped them all: unreadable, or smaller than the model's crops, named in the warnings "
                             "above); fix or remove those files")
    preds.indices = np.asarray(indices)[preds.indices]  # dataset positions -> sample_set indices
    chosen = [sample_set.samples[i] for i in preds.indices]  # BreakHis: patient 22549AB, not its case 22549;
    patients = patient_index([s.group for s in chosen], [s.patient for s in chosen])  # a patient within its group
    metrics = compute_metrics(preds.labels, preds.probs, patients, sample_set.class_names)
    by_mag = per_magnification_metrics(preds.labels, preds.probs, patients,
                                       [s.meta.get("magnification") for s in chosen], sample_set.class_names)
    if by_mag:  # images of two or more magnifications (BreakHis 40X and 100X), as cv's summary gives them
        metrics["per_magnification"] = by_mag
    metrics["loss"] = preds.loss
    # images of the split that the loader skipped (data.on_error: skip), counted in the split, not in the metrics
    missing = sorted(set(np.asarray(indices).tolist()) - set(preds.indices.tolist()))
    metrics["n_skipped"], metrics["skipped"] = len(missing), [sample_set.samples[i].path for i in missing]
    return preds, metrics


def _log_epoch(run_dir: Path, row: dict) -> None:
    """Append ``row`` to ``history.jsonl``. A NaN or infinite value (the training loss of an fp16 epoch in which
    the GradScaler skipped steps) is written as null and named in ``non_finite_values`` ({key: ``inf``})."""
    row, where = finite_json(row)
    if where:
        row["non_finite_values"] = where
    with (run_dir / "history.jsonl").open("a") as f:
        f.write(json_text(row) + "\n")


# keys a resumed run may change: where the data and the cache are, how fast it runs, where, and how long it
# trains (more epochs stretch the learning-rate schedule from the resumed step on); not what an epoch computes.
# data.on_error too: a run that read every image so far computed the same under raise and skip, and an
# unreadable test image is found only after the last epoch, whose error says to set it to skip
RESUME_FREE = ("name", "data.root", "data.num_workers", "data.cache", "data.cache_dir", "data.on_error",
               "train.device", "train.eval_batch_size", "train.compile", "train.selection_graph",
               "train.cudnn_depthwise", "train.channels_last", "train.epochs", "train.patience")


# what may differ between the configs of a torchrun run's processes: where each machine finds the data and keeps its
# cache, and how many workers read it there (a machine's own paths and cores)
PER_MACHINE = ("data.root", "data.num_workers", "data.cache", "data.cache_dir")


def _check_same_config(cfg: Config) -> None:
    """Under torchrun, refuse a process whose resolved config (its own ``--config`` file and ``--set``) differs
    from rank 0's in a key outside :data:`PER_MACHINE`: a machine with another copy of the config file would
    train other settings. One collective; every rank raises the same error, naming the first such rank, its
    host and the first key that differs."""
    if not dist.is_distributed():
        return
    seen = dist.all_gather((to_dict(cfg), socket.gethostname()))
    for r, (other, host) in enumerate(seen[1:], start=1):
        diff = first_difference(seen[0][0], other, ignore=PER_MACHINE, names=("rank 0:", f"rank {r}:"))
        if diff:
            free = f"{', '.join(PER_MACHINE[:-1])} and {PER_MACHINE[-1]}"
            raise FinescopeError(f"rank {r} ({host}) was given another config than rank 0 ({seen[0][1]}): {diff}; "
                                 f"give every process the same --config file and --set options (only {free} may "
                                 "differ between machines)")


# what to do about a run's own splits.json that its data no longer fits (evaluate, explain --split, --resume)
OWN_SPLIT_FIX = "point data.root at the data this run was trained on"


def _check_resume_config(run_dir: Path, cfg: Config) -> dict:
    """Refuse to resume ``run_dir`` with another config than its own (the one in ``checkpoints/last.pt``, which
    is written whole, unlike ``config.yaml``, its copy for people), naming the first differing key; the keys
    of ``RESUME_FREE`` may change. Nothing in the run is written before this check. Returns ``last.pt``'s
    state, which the resume goes on from."""
    last, best = run_dir / "checkpoints" / "last.pt", run_dir / "checkpoints" / "best.pt"
    if not last.is_file() and best.is_file():  # deleted: best.pt holds all a resume needs, from its epoch on
        raise FinescopeError(f"--resume: no checkpoint at '{last}', but the run has '{best}': copy it to last.pt to "
                             "resume from the run's best epoch, or choose another --out")
    if not last.is_file():
        raise FinescopeError(f"--resume: no checkpoint at '{last}'; name the run's folder with --out, or start "
                             "without --resume")
    try:
        state = load_checkpoint(last)
    except FinescopeError:  # its advice, another checkpoint of the run, is for evaluate and predict
        instead = f", or copy '{best}' over it to resume from the run's best epoch" if best.is_file() else ""
        raise FinescopeError(f"--resume: '{last}' cannot be read (a copy cut short?); copy it back from where it "
                             f"came{instead}, or start a new run with another --out") from None
    try:  # as trained: today's form of its values (amp: true is bf16), keys added since at their old behaviour
        # model.weights and data.splits of a run stored before they were absolute: from the working folder
        old = to_dict(_files_absolute(load_config(base=stored_config(state["config"]))))
    except FinescopeError as e:
        raise FinescopeError(f"--resume: the config stored in '{last}' does not load here ({e}); was it written "
                             "by another finescope version?") from None
    diff = first_difference(old, to_dict(cfg), ignore=RESUME_FREE)
    if diff:
        raise FinescopeError(f"--resume: '{run_dir}' was trained with another config: {diff}; resume with the "
                             f"run's own settings (its config.yaml), or start a new run with another --out")
    trained = int(state["epoch"]) + 1
    if cfg.train.epochs < trained:  # its config.yaml would say fewer epochs than its weights have had
        raise FinescopeError(f"--resume: '{run_dir}' has trained {trained} epochs, more than train.epochs="
                             f"{cfg.train.epochs}; resume with train.epochs of at least {trained} (its config.yaml "
                             f"has {old['train']['epochs']}), or start a new run with another --out")
    _check_best_kept(run_dir, state)
    return state


def _check_best_kept(run_dir: Path, state: dict) -> None:
    """Refuse a resume whose ``best.pt`` is missing or unreadable while ``last.pt``'s tracker names an earlier
    epoch as the best: the test after the training reads it, and no other file holds that epoch (a best.pt of
    last.pt's own epoch is written again from it). Found here, not after the remaining epochs."""
    tracker = state.get("tracker")
    epoch = tracker.get("best_epoch") if isinstance(tracker, dict) else None
    if not isinstance(epoch, int) or epoch < 0 or epoch == state.get("epoch"):
        return
    best = run_dir / "checkpoints" / "best.pt"
    try:
        what = None if best.is_file() and load_checkpoint(best) else "is missing"
    except FinescopeError:
        what = "cannot be read (a copy cut short?)"
    if what:
        raise FinescopeError(f"--resume: '{best}' holds the run's best epoch ({epoch + 1}), which its test reads, "
                             f"but {what}; copy it back from where it came, or start a new run with another --out")


def _resume_state(run_dir: Path, state: dict, class_names, model, optimizer, scheduler, scaler, patience: int,
                  validated: bool = True) -> tuple[int, dict]:
    """Load ``state`` (``last.pt``, read by :func:`_check_resume_config`) into the run's objects."""
    _check_classes(state, class_names, state["path"])
    try:  # a last.pt of another finescope version, whose model or optimizer state this one does not build
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        _moments_like_parameters(optimizer)
        scheduler.load_state_dict(state["scheduler"])
        # the rates of this run's schedule from the next step on: the optimizer's state holds the stored run's,
        # another where train.epochs changed (the end of the shorter schedule: 0 for a finished run)
        for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True):
            group["lr"] = base * factor(scheduler.last_epoch)
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        tracker, epoch = dict(state["tracker"]), int(state["epoch"])
    except (KeyError, RuntimeError, ValueError, TypeError) as e:
        what = f"no '{e.args[0]}' entry" if isinstance(e, KeyError) else " ".join(str(e).split())[:160]
        version = state.get("finescope_version", "unknown")
        raise FinescopeError(f"--resume: '{state['path']}' (written by finescope {version}) does not fit "
                             f"the model and optimizer this finescope builds from its config ({what}); "
                             "resume it with the version that wrote it, or start a new run with another --out"
                             ) from None
    if dist.is_main():
        _truncate_history(run_dir, epoch)
        if tracker["best_epoch"] == epoch:
            _restore_best(run_dir, state)
    tracker["stopped"] = _early_stop(tracker, patience, validated)  # train.patience may change: a stop is undone
    return epoch + 1, tracker


def _restore_best(run_dir: Path, state: dict) -> None:
    """Write ``best.pt`` from ``state`` (``last.pt``, its best epoch) unless it holds that epoch already: the
    run was killed between the two checkpoints of that epoch."""
    best = run_dir / "checkpoints" / "best.pt"
    try:
        kept = load_checkpoint(best)["epoch"] if best.is_file() else None
    except FinescopeError:  # damaged: written again
        kept = None
    if kept != state["epoch"]:
        save_checkpoint({k: v for k, v in state.items() if k != "path"}, best)


def _moments_like_parameters(optimizer: torch.optim.Optimizer) -> None:
    """Give the optimizer's state tensors their parameter's memory layout. A run resumed with another
    ``train.channels_last`` loads moments stored in the other layout, and the fused AdamW reads parameters,
    gradients and moments as flat memory: element by element they would not match."""
    for p, state in optimizer.state.items():
        for key, value in state.items():
            if torch.is_tensor(value) and value.shape == p.shape and value.stride() != p.stride():
                state[key] = torch.empty_like(p, dtype=value.dtype).copy_(value)


def _truncate_history(run_dir: Path, last_epoch: int) -> None:
    """Drop history lines of epochs after the checkpoint (a run killed mid-epoch may have logged them)."""
    path = run_dir / "history.jsonl"
    if path.is_file():
        rows = [r for r in read_history(path) if r["epoch"] <= last_epoch]
        write_text(path, "".join(json_text(r) + "\n" for r in rows))


class RunLocked(FinescopeError):
    """``run_dir`` is being trained by another process (``holder``: ``pid N on HOST``). Its line says to go on with
    ``--resume`` once that process has ended; a cv or the demo, which resume their runs themselves, say it with
    their own rerun (:meth:`then`)."""

    def __init__(self, run_dir: Path, holder: str, again: str = "--resume") -> None:
        self.run_dir, self.holder = run_dir, holder
        super().__init__(f"'{run_dir}' is being trained by another process ({holder}); wait for it to end or stop "
                         f"it, then {again}, or choose another --out")

    def then(self, again: str) -> RunLocked:
        """The same refusal, saying ``again`` (e.g. ``rerun the same command``) instead of ``--resume``."""
        return RunLocked(self.run_dir, self.holder, again)


def _hold_lock(run_dir: Path):
    """Create ``run_dir`` and hold an exclusive lock on its ``.lock`` file: the open file, whose closing (or the
    process's end, however it ends) releases it; None where locks are unavailable (no ``fcntl``, or a file
    system without them, which gets a warning)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # Windows
        return None
    fh = open(run_dir / ".lock", "a+")  # noqa: SIM115 (held open for the run)
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        fh.seek(0)
        holder = fh.read().strip() or "unknown"
        fh.close()
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise RunLocked(run_dir, holder) from None
        warnings.warn(f"cannot lock '{run_dir}' ({e.strerror}): nothing stops a second process from training it "
                      "at the same time", FinescopeWarning, stacklevel=3)
        return None
    fh.seek(0)
    fh.truncate()
    fh.write(f"pid {os.getpid()} on {socket.gethostname()}")
    fh.flush()
    with contextlib.suppress(OSError):  # on the server of a network filesystem, for the others' _check_one_folder
        os.fsync(fh.fileno())
    return fh


def _check_one_folder(run_dir: Path) -> None:
    """Under torchrun, refuse an ``--out`` that is not the folder rank 0 made for every process (a relative one
    read from working folders that differ, or one not on a filesystem every machine shares): the others would
    find no ``best.pt`` for the test after the whole training, nor ``last.pt`` on ``--resume``. Each process
    compares the ``.lock`` it sees with rank 0's."""
    if not dist.is_distributed():
        return

    def lock_text() -> str | None:
        try:
            return (run_dir / ".lock").read_text().strip()
        except OSError:
            return None

    text = dist.from_main(lock_text() if dist.is_main() else None)  # None: rank 0 could not read it, no check
    seen = dist.all_gather((text is None or lock_text() == text, socket.gethostname()))
    blind = next((r for r, (ok, _) in enumerate(seen) if not ok), None)
    if blind is not None:
        raise FinescopeError(f"--out '{run_dir}' is not one folder for every process: rank {blind} ({seen[blind][1]}) "
                             f"does not see the one rank 0 ({seen[0][1]}) made (a relative --out read from another "
                             "working folder, or a folder that not every machine shares); give an --out on a "
                             "filesystem every machine sees, as an absolute path")


class _RunLock:
    """Rank 0's lock on a run folder while it is trained (:func:`_hold_lock`), so that a second ``train`` or
    ``--resume`` of the folder is refused instead of writing the same files; every rank raises the same error."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.made = [d for d in (run_dir, *run_dir.absolute().parents) if not d.exists()]  # deepest first
        self.new_lock = not (run_dir / ".lock").exists()
        self.fh = dist.rank0_first(lambda: _hold_lock(run_dir), others=False)
        try:
            _check_one_folder(run_dir)
        except FinescopeError:
            self.release()
            raise

    def release(self) -> None:
        """Release the lock. A run that stopped before writing its config leaves nothing behind: the lock file
        it made and the folders it made, when empty, are removed."""
        if self.fh is not None:
            self.fh.close()
        if not dist.is_main() or (self.run_dir / "config.yaml").exists():
            return
        if self.new_lock:
            (self.run_dir / ".lock").unlink(missing_ok=True)
        for d in self.made:
            if d.is_dir() and not any(d.iterdir()):
                d.rmdir()


def train(cfg: Config, run_dir: str | Path, resume: bool = False, progress: bool = True) -> dict:
    """Train ``cfg`` into ``run_dir``; return the test metrics (also written to ``metrics.json``).

    With ``resume`` the run continues from ``checkpoints/last.pt`` and reaches the same result as an
    uninterrupted run: every epoch reseeds its shuffling, augmentation and dropout from (seed, epoch). While it
    trains, the folder is locked (``RUN/.lock``) against a second process.
    """
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise FinescopeError(f"--out '{run_dir}' is a file; give a folder for the run (a new one, or a run's to "
                             "--resume)")
    # stored absolute: evaluate, predict, explain, report and --resume of the run read it from any folder
    if cfg.data.root:
        cfg = replace(cfg, data=replace(cfg.data, root=_absolute(cfg.data.root)))
    # settings the processes cannot run are refused before any file is written
    _check_same_config(cfg)
    cfg = _files_absolute(cfg)  # after the check: each machine's working folder may differ
    dist.per_rank_batch(cfg.train.batch_size, resume)
    dist.check_sync_bn(cfg.train.sync_bn, resolve_device(cfg.train.device), resume)
    check_compile(cfg.train.compile)
    # each machine's own data.root: a refusal on one rank is every rank's (none left waiting in a collective)
    dist.rank0_first(lambda: (check_outside_data(cfg.data, run_dir), _check_not_a_cv_folder(run_dir),
                              _check_not_users_config(run_dir)))
    lock = _RunLock(run_dir)
    try:
        # best.pt alone: a finished run whose last.pt was deleted (the optimizer's state), not a folder to train over
        if not resume and any((run_dir / "checkpoints" / name).is_file() for name in ("last.pt", "best.pt")):
            raise FinescopeError(f"'{run_dir}' already holds a run; pass --resume to continue it or choose another "
                                 "--out")
        resumed = _check_resume_config(run_dir, cfg) if resume else None
        return _train(cfg, run_dir, resumed, progress)
    finally:
        lock.release()


_WARNED_SCRATCH: set[tuple[str, str]] = set()  # (backbone, data root) warned about in this process (cv: once)


def scratch_warning(cfg: Config) -> str | None:
    """The warning for a new run whose backbone starts from random weights (neither ``model.weights`` nor
    ``model.pretrained``), which users of a torchvision or timm backbone rarely mean; None for ``tiny``, the
    small CNN of the tests and the demo, which has no pretrained weights, when either is given, or when this
    process warned about the backbone on the data already (each fold of a cv)."""
    m = cfg.model
    key = (m.backbone, cfg.data.root)
    if m.weights or m.pretrained or m.backbone == "tiny" or key in _WARNED_SCRATCH:
        return None
    _WARNED_SCRATCH.add(key)
    return (f"model.backbone {m.backbone} starts from random weights (model.weights is empty and model.pretrained "
            "false): it trains from scratch; to start from ImageNet weights set model.pretrained=true (downloads "
            "the library's weights) or model.weights=PATH (a local state dict of that backbone, or a finescope "
            "run of it)")


def _check_not_a_cv_folder(run_dir: Path) -> None:
    """Refuse an ``--out`` that is a cv folder: the run's ``splits.json`` and report would replace the cv's."""
    if (run_dir / "cv.json").is_file():
        raise FinescopeError(f"--out '{run_dir}' is a cv folder (it holds cv.json), whose splits.json and report a "
                             "run would replace; its runs are in runs/<variant>/<fold>; choose another --out")


def _check_not_users_config(run_dir: Path) -> None:
    """Refuse an ``--out`` whose ``config.yaml`` no run wrote (a run's own holds ``_provenance``): the user's
    experiment file (``train --config config.yaml --out .``), which the run's resolved config would replace."""
    path = run_dir / "config.yaml"
    if not path.is_file() or (run_dir / "checkpoints").is_dir():  # a run's folder: --resume checks last.pt's config
        return
    try:
        loaded = read_yaml_mapping(path)
        ours = not loaded or "_provenance" in loaded
    except FinescopeError:  # a damaged one: not an experiment file anyone could use
        ours = True
    if not ours:
        raise FinescopeError(f"--out '{run_dir}' holds a config.yaml that no finescope run wrote (an experiment "
                             "file?), which the run would replace with its resolved config; give the run a folder of "
                             "its own, e.g. --out runs/NAME")


def one_class_error(cfg: Config, class_names: list[str]) -> FinescopeError:
    """Data of one class: a classifier needs two; a ``folder`` root one level above the class folders (its one
    "class" holds several folders) is told where to point instead."""
    fix = "add images of another class"
    inner = Path(os.path.expanduser(cfg.data.root), *class_names[:1])
    if cfg.data.source == "folder" and class_names and sum(d.is_dir() for d in inner.iterdir()) > 1:
        fix = f"if the folders in '{inner}' are the classes, set data.root={inner}"
    return FinescopeError(f"data.root '{cfg.data.root}' ({cfg.data.source} source) holds one class "
                          f"({', '.join(class_names) or 'none'}) and a classifier needs at least 2; {fix}")


def _train(cfg: Config, run_dir: Path, resumed: dict | None, progress: bool) -> dict:
    resume = resumed is not None
    device = resolve_device(cfg.train.device)
    seed_everything(cfg.seed)
    sample_set = _load_samples_rank0_first(cfg)
    # the class order the run stored, or its data.splits file (a cv fold's, another run's) recorded: a run made
    # when labels 1, 2, 10 were ordered as text (1, 10, 2) keeps its indices
    stored = resumed["class_names"] if resume else stored_class_names(cfg.data.splits) if cfg.data.splits else None
    if stored:
        sample_set = in_class_order(sample_set, stored)
    if len(sample_set.class_names) < 2:
        raise one_class_error(cfg, sample_set.class_names)
    drawn_again = resume and not (run_dir / "splits.json").is_file()
    with dist.main_speaks():
        splits = resolve_splits(cfg, sample_set, run_dir, resume)
    if drawn_again and resumed.get("split_digest") not in {None, *split_digests(splits, sample_set)}:
        raise FinescopeError(f"'{run_dir}': its splits.json is missing and the split drawn again from its config and "
                             "data is not the one checkpoints/last.pt trained on (the data, or how finescope groups "
                             "it, changed since): restore splits.json, or point data.root at the data this run was "
                             "trained on")
    if dist.is_main() and (message := dark_images_warning(cfg, sample_set, splits["train"])):
        warnings.warn(message, FinescopeWarning, stacklevel=2)
    if dist.is_main() and not resume and (message := fine_tune_leak(cfg, splits, sample_set)):
        warnings.warn(message, FinescopeWarning, stacklevel=2)
    model = build_model(checkpoint_model_config(cfg) if resume else cfg, len(sample_set.class_names), device)
    if not resume and dist.is_main() and (message := scratch_warning(cfg)):  # a resume reads last.pt's weights
        warnings.warn(message, FinescopeWarning, stacklevel=3)
    if model.use_attention and model.image_feature == "avg" and model.select_from == "attention" and dist.is_main():
        warnings.warn("model.image_feature is avg: no loss reaches the attention (the global head reads the mean of "
                      "the cells, and the crops are chosen without gradient), so it keeps its initial weights and "
                      f"{'picks the crops at random' if model.num_crops else 'means nothing'}; use "
                      "model.image_feature=attention, or model.select_from=evidence to pick the crops by the global "
                      "head's evidence", FinescopeWarning, stacklevel=2)
    if dist.is_main():  # the run starts: what a killed process left half-written goes (the lock says none writes)
        for tmp in (run_dir / "checkpoints").glob(".*.tmp"):
            tmp.unlink(missing_ok=True)
        remove_temporaries(run_dir)
        if not resume:  # a new run's history starts empty (a run stopped before its first checkpoint left one)
            (run_dir / "history.jsonl").unlink(missing_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        extra = {"seed": cfg.seed}
        if resume and (earlier := rewritten_digests(run_dir / "splits.json", resumed.get("split_digest"), splits,
                                                    sample_set)):
            extra["earlier_digests"] = earlier  # best.pt of before the rewrite: not "trained on another split"
        save_splits(run_dir / "splits.json", splits, sample_set, extra=extra)
    optimizer = build_optimizer(model, cfg, device)
    # built once: workers and a memory cache last the whole run. What an epoch reads follows the run's own
    # train.compile (it drops the last incomplete batch and, with data.one_orientation=auto, turns the images):
    # a resume may start or stop compiling, for speed, and still reach the uninterrupted run's weights
    data_cfg = cfg if not resume else replace(cfg, train=replace(cfg.train, compile=load_config(
        base=stored_config(resumed["config"])).train.compile))
    loaders = _make_loaders(sample_set, splits, data_cfg)
    steps = len(loaders["train"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(steps * cfg.train.epochs, math.ceil(steps * cfg.train.warmup_epochs))
    )
    scaler = make_grad_scaler(device, cfg.train.amp)
    start, tracker = 0, {"best_score": float("-inf"), "best_epoch": -1, "bad_epochs": 0, "stopped": False}
    if resume:
        start, tracker = _resume_state(run_dir, resumed, sample_set.class_names, model, optimizer, scheduler,
                                       scaler, cfg.train.patience, validated=len(splits.get("val", [])) > 0)
        done = start >= cfg.train.epochs or tracker["stopped"]
        if not done and dist.is_main():  # a finished run trained on (more epochs, more patience) is unfinished
            # again: its metrics.json, which marks a finished run, goes until its test is run again, and with it
            # the test predictions of a best.pt that training may replace (report would show them as this run's)
            for name in ("metrics.json", "predictions_test.csv"):
                (run_dir / name).unlink(missing_ok=True)
        if progress and dist.is_main():
            rest = (": testing again" if len(splits.get("test", []))
                    else " and it has no test split: nothing is left to do")
            print(f"resuming {run_dir} after epoch {start} of {cfg.train.epochs}, with {dist.world_size()} "
                  f"process{'es' if dist.world_size() > 1 else ''}" + (f"; its training is done{rest}" if done else ""),
                  flush=True)
    fit_model = _fit_model(model, cfg, device, start)
    for epoch in range(start, cfg.train.epochs):
        if tracker["stopped"]:
            break
        if dist.is_distributed() and model.use_crops and epoch == cfg.train.crop_warmup_epochs > start:
            del fit_model  # the crops join: DDP is built again, without the search for unused parameters
            fit_model = _fit_model(model, cfg, device, epoch)
        tracker = _run_epoch(fit_model, model, optimizer, scheduler, sample_set, splits, cfg, device, epoch,
                             tracker, run_dir, progress, loaders, scaler=scaler)
    try:
        with stops_raised():
            del loaders  # stop the persistent workers before the test
        dist.barrier()  # rank 0 has written best.pt before any rank reads it
        metrics = finish(run_dir, cfg, sample_set, splits, device)
        if dist.is_main():
            _warn_earlier_evaluations(run_dir)
    except (KeyboardInterrupt, Terminated) as e:  # Ctrl-C, SIGTERM: the line says what the run holds
        said = written_after_training(run_dir, tested=len(splits.get("test", [])) > 0)
        raise (Interrupted if isinstance(e, KeyboardInterrupt) else Terminated)(said) from None
    return metrics


def _fit_model(model: torch.nn.Module, cfg: Config, device: torch.device, epoch: int) -> torch.nn.Module:
    """``model`` as it trains in ``epoch`` and the epochs after it: in DDP under torchrun, compiled with
    ``train.compile``. A warm-up epoch leaves the fusion head (and a separate crop backbone) without gradients, so
    DDP looks for unused parameters then; after the warm-up every parameter gets one, and the search would cost
    a traversal of the autograd graph every step and make torch warn on every rank that it found none: the
    trainer calls this again when the crops join."""
    fit_model = dist.wrap_model(model, device, sync_bn=cfg.train.sync_bn,
                                partial_steps=model.use_crops and epoch < cfg.train.crop_warmup_epochs)
    return compile_for_training(fit_model, cfg.train.compile) if cfg.train.compile != "off" else fit_model


def written_after_training(run_dir: Path, tested: bool) -> str:
    """What ``run_dir`` holds and lacks when its run was stopped after training ended (in its test, while its
    files were written, or as its workers stopped), and what to do."""
    kept = f"its checkpoints are written ('{run_dir / 'checkpoints' / 'best.pt'}', last.pt)"
    metrics, report = run_dir / "metrics.json", run_dir / "report.md"
    if not tested:
        return f"after training ended: {kept}; it has no test split, nothing else is left to do"
    if not metrics.is_file():
        return (f"after training ended: {kept}, its test is not (metrics.json, predictions_test.csv): the same "
                "command with --resume tests it")
    if report.is_file() and report.stat().st_mtime_ns < metrics.stat().st_mtime_ns:  # made again after metrics
        return (f"after training ended: the run is written ('{metrics}'), its report.md made before is not written "
                f"again: finescope report {shlex.quote(str(run_dir))} makes it")
    return f"after training ended: the run is written whole ('{metrics}'), nothing is left to do"


def _warn_earlier_evaluations(run_dir: Path) -> None:
    """Warn about what ``evaluate`` and ``explain`` wrote in ``run_dir`` of a checkpoint written again since
    (:func:`~finescope.checkpoint.earlier_evaluations`): they describe a model the run no longer has."""
    earlier = earlier_evaluations(run_dir)
    if earlier:
        warnings.warn(f"{', '.join(earlier)} in '{run_dir}' (and their predictions and reports) describe the "
                      f"earlier best.pt or checkpoint, written again since; make them again with "
                      f"{'; '.join(dict.fromkeys(earlier.values()))}", FinescopeWarning, stacklevel=2)


def _make_loaders(sample_set: SampleSet, splits: dict, cfg: Config) -> dict[str, DataLoader]:
    """The run's training and validation loaders. Each rank makes its own; what they find alike (a cache
    folder that cannot be written) rank 0 says once."""
    with dist.main_speaks():
        return {side: make_loader(sample_set, splits[side], cfg, train=side == "train")
                for side in ("train", "val") if len(splits.get(side, []))}


CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # torch.compile modes that replay CUDA graphs


def compile_for_training(model: torch.nn.Module, mode: str) -> torch.nn.Module:
    """``torch.compile`` in one of ``train.compile``'s modes (``default`` is inductor's own).

    Static shapes: each new batch shape (or set of image sizes, which the forward pass reads on the host) gets
    its own graph, as CUDA graphs need anyway. With dynamic shapes, inductor's choice on a second shape, the
    compile of a batch of mixed orientations failed (torch 2.14). So compiling pays where shapes repeat, as
    with BreakHis (one image size); after torch's recompile limit new shapes run eagerly.

    The modes that replay CUDA graphs run in one process only: under DDP a graph would have to hold the
    gradient all-reduce, which this project has not measured; ``default`` works under torchrun.
    """
    check_compile(mode)
    return torch.compile(model, mode=None if mode == "default" else mode, dynamic=False)


def check_compile(mode: str) -> None:
    """Refuse a ``train.compile`` mode that replays CUDA graphs under torchrun."""
    if mode in CUDA_GRAPH_MODES and dist.is_distributed():
        raise FinescopeError(f"config key 'train.compile' is '{mode}', which replays CUDA graphs and runs in one "
                             "process only; under torchrun use train.compile=default")


def _load_samples_rank0_first(cfg: Config) -> SampleSet:
    """Rank 0 scans (and, for the synthetic source, generates) the data before the other ranks read it; its
    error (a wrong path) is every rank's, and another rank's (its machine lacks the data) stops every rank too."""
    return dist.rank0_first(lambda: load_samples(cfg.data))


def loss_class_weights(cfg: Config, sample_set: SampleSet, train) -> torch.Tensor | None:
    """The weight of each class in the training loss (C,): under ``train.class_weights=balanced`` n / (C * n_c) of
    the ``train`` side's n images of its C classes (scikit-learn's ``compute_class_weight('balanced')``), so that
    each class weighs as much as if all were equal in number; a class with no training image weighs 1 (it is in
    no training batch). None under ``none``."""
    if cfg.train.class_weights == "none":
        return None
    from sklearn.utils.class_weight import compute_class_weight

    labels = np.asarray(sample_set.labels)[np.asarray(train, dtype=np.int64)]
    present = np.unique(labels)
    weights = np.ones(len(sample_set.class_names))
    weights[present] = compute_class_weight("balanced", classes=present, y=labels)
    return torch.tensor(weights, dtype=torch.float32)


def _run_epoch(fit_model, model, optimizer, scheduler, sample_set, splits, cfg, device, epoch, tracker, run_dir,
               progress, loaders: dict, scaler: torch.amp.GradScaler | None = None) -> dict:
    scaler = scaler if scaler is not None else make_grad_scaler(device, cfg.train.amp)
    # dropout, its own masks on every rank; shuffling and augmentation are seeded by the loader
    seed_everything(cfg.seed * 1000 + epoch + 1_000_003 * dist.rank())
    t = cfg.train
    model.crops_active = not model.use_crops or epoch >= t.crop_warmup_epochs  # stage-wise: global path first
    loaders["train"].sampler.set_epoch(epoch)
    lr = optimizer.param_groups[0]["lr"]  # the rate of the epoch's first step
    stats = train_one_epoch(
        fit_model, loaders["train"], optimizer, scheduler,
        device, aux_weight=t.aux_weight, label_smoothing=t.label_smoothing,
        class_weight=loss_class_weights(cfg, sample_set, splits["train"]), grad_clip=t.grad_clip, amp=t.amp,
        cpu_amp=t.cpu_amp, channels_last=t.channels_last, progress=progress and dist.is_main(),
        desc=f"epoch {epoch + 1}/{t.epochs}", scaler=scaler, mark_steps=t.compile in CUDA_GRAPH_MODES,
    )
    # summed over the ranks: all stop here alike, none waits in a collective; before any file of the epoch
    if stats.pop("diverged"):
        raise diverged_error(cfg, device, epoch, tracker, run_dir, stats["loss"], model)
    dist.broadcast_buffers(model)  # every rank validates (and rank 0 saves) rank 0's BatchNorm statistics
    _check_every_class_read(stats.pop("images_per_class"), sample_set, splits["train"], cfg,
                            loaders["train"].sampler.dropped)
    row = {"epoch": epoch, "lr": lr, "lr_last": stats.pop("lr_last"), **{f"train_{k}": v for k, v in stats.items()}}
    row["train_images_per_second"] = stats["images"] / max(stats["seconds"], 1e-9)
    if len(splits.get("val", [])):
        _, val = evaluate_split(model, sample_set, splits["val"], cfg, device, desc="val", loader=loaders["val"])
        row.update({f"val_{k}": v for k, v in val.items() if isinstance(v, (int, float)) or v is None})
        score = _score(val, t.monitor)
    else:  # no validation groups: keep the last epoch
        score = float(epoch)
    tracker = dict(tracker)
    if not model.crops_active:  # a warm-up epoch's fusion head is untrained: not a candidate for best.pt
        pass
    elif tracker["best_epoch"] < 0 or score > tracker["best_score"]:  # the first candidate is always kept
        tracker.update(best_score=score, best_epoch=epoch, bad_epochs=0)
    else:
        tracker["bad_epochs"] += 1
    tracker["stopped"] = _early_stop(tracker, t.patience, validated=len(splits.get("val", [])) > 0)
    if dist.is_main():
        _log_epoch(run_dir, row)  # first: a resume drops the lines after last.pt's epoch, never misses one
        state = _state(model, optimizer, scheduler, scaler, epoch, cfg, sample_set.class_names, tracker)
        state["split_digest"] = split_digest(splits, sample_set)  # a resume that draws the split again checks it
        # last.pt first: a kill before best.pt leaves the tracker naming this epoch, and the resume writes its
        # best.pt from last.pt (best.pt first would outlive a resume whose rerun of the epoch scores lower)
        save_checkpoint(state, run_dir / "checkpoints" / "last.pt")
        if tracker["best_epoch"] == epoch:
            save_checkpoint(state, run_dir / "checkpoints" / "best.pt")
        _print_epoch(row, progress)
    return tracker


def diverged_error(cfg: Config, device: torch.device, epoch: int, tracker: dict, run_dir: Path,
                   loss: float, model: torch.nn.Module | None = None) -> FinescopeError:
    """The error of a run whose weights or BatchNorm statistics became NaN, infinite or huge (beyond the bound of
    :func:`~finescope.engine.weight_bound`) in ``epoch``, naming the first such tensor of ``model``. It stops
    before the epoch's checkpoints, so ``last.pt`` (written after every earlier epoch) and ``best.pt`` keep the
    last good state; the error names them and what to change (``train.lr`` cannot change on ``--resume``: a new
    run)."""
    t, ckpt = cfg.train, run_dir / "checkpoints"
    if epoch == 0:
        kept, out = "no checkpoint was written", "again"
    else:
        best = f" and best.pt (epoch {tracker['best_epoch'] + 1})" if tracker["best_epoch"] >= 0 else ""
        kept, out = f"'{ckpt / 'last.pt'}' (epoch {epoch}){best} keep the last good state", "in a new --out"
    fixes = [f"a lower train.lr (now {t.lr:g})"]
    if t.grad_clip <= 0:
        fixes.append("train.grad_clip=1")
    if (device.type == "cuda" and t.amp != "off") or (device.type == "cpu" and t.cpu_amp != "off"):
        fixes.append(f"train.{'amp' if device.type == 'cuda' else 'cpu_amp'}=off")
    bound = weight_bound(device, t.amp)
    first = first_diverged(unwrap(model), bound) if model is not None else None
    where = "" if model is None else "those of another process; " if first is None else \
        f"first '{first[0]}', max |value| {first[1]:.3g}; "
    return FinescopeError(f"training diverged in epoch {epoch + 1} of {t.epochs}: the model's weights or BatchNorm "
                          f"statistics hold NaN, infinite or huge values (beyond {bound:g}) ({where}mean training "
                          f"loss {loss:.4g}); {kept}; train {out} with {' or '.join(fixes)}")


def _early_stop(tracker: dict, patience: int, validated: bool) -> bool:
    """Whether training stops: ``patience`` candidate epochs without improvement since the best one. Never
    before a candidate for best.pt (crop warm-up epochs are none: ``train.patience=0`` would end the run
    without a best.pt), and never without a validation side (early stopping is off there, as documented)."""
    return validated and tracker["best_epoch"] >= 0 and tracker["bad_epochs"] >= patience


def _check_every_class_read(read: list[int], sample_set: SampleSet, train, cfg: Config, dropped=()) -> None:
    """Under ``data.on_error=skip``, refuse to go on training when every training image of a class was
    unreadable: the model would learn without that class and still be scored on it. ``dropped``: the positions
    in ``train`` of the images the epoch left out (its last incomplete global batch under ``train.compile``,
    :attr:`~finescope.distributed.ShardSampler.dropped`); a class with one of them is not checked in this epoch
    (that image may be readable)."""
    if cfg.data.on_error != "skip":
        return
    read = read or [0] * len(sample_set.class_names)  # not one batch: no class was read (the engine knows none)
    labels = [sample_set.samples[i].label for i in train]
    listed = np.bincount(labels, minlength=len(read))
    unread = {labels[i] for i in dropped}
    lost = [name for c, (name, n, r) in enumerate(zip(sample_set.class_names, listed, read, strict=False))
            if n and not r and c not in unread]
    if lost:
        raise FinescopeError(f"none of the training images of class {', '.join(repr(c) for c in lost)} could be "
                             "read (data.on_error=skip skipped them all, named in the warnings above); fix or remove "
                             "those files")


def _print_epoch(row: dict, progress: bool) -> None:
    if not progress:
        return
    parts = [f"epoch {row['epoch'] + 1}", f"loss {row['train_loss']:.4f}", f"acc {row['train_accuracy']:.3f}"]
    for key in ("val_loss", "val_image_accuracy", "val_balanced_accuracy", "val_patient_recognition_rate"):
        if row.get(key) is not None:
            parts.append(f"{key} {row[key]:.3f}")
    parts.append(f"{row['train_images_per_second']:.1f} img/s")
    print("  ".join(parts), flush=True)


def finish(run_dir: Path, cfg: Config, sample_set: SampleSet, splits: dict, device: torch.device) -> dict:
    """Evaluate best.pt on the test split (every rank its shard); rank 0 writes metrics.json and
    predictions_test.csv and returns the metrics, other ranks return {}. A test report that ``evaluate`` or
    ``report`` wrote earlier (``report.md``, and evaluate's ``metrics_test.json``; a finished run trained on, say) is
    written again from them."""
    if len(splits.get("test", [])) == 0:
        return {}
    state = load_checkpoint(run_dir / "checkpoints" / "best.pt")
    model = build_model(checkpoint_model_config(cfg), len(sample_set.class_names), device)
    model.load_state_dict(state["model"])
    model.fold_batchnorm()
    preds, metrics = evaluate_split(model, sample_set, splits["test"], cfg, device, desc="test")
    if not dist.is_main():
        return {}
    metrics.update(split="test", checkpoint=str(run_dir / "checkpoints" / "best.pt"), best_epoch=state["epoch"],
                   split_leak=own_split_leak(splits, sample_set))  # a resumed run split under another grouping
    write_predictions(run_dir / "predictions_test.csv", preds, sample_set)
    if (run_dir / "metrics_test.json").is_file():  # evaluate's of the earlier best.pt: the pair of these predictions
        tested = {k: v for k, v in metrics.items() if k != "best_epoch"}
        tested.update(data_root=_absolute(cfg.data.root), split_leak=tested.pop("split_leak"))
        write_text(run_dir / "metrics_test.json", json_text(tested, indent=2))
    write_text(run_dir / "metrics.json", json_text(metrics, indent=2))  # last: it marks a finished run (cv)
    if (run_dir / "report.md").is_file():  # else it would describe the earlier best.pt beside this one's metrics
        from finescope.report import write_report  # matplotlib is imported only here

        write_report(run_dir)
    return metrics


# -- using a trained model -----------------------------------------------------------------------------------
def load_trained(source: str | Path, overrides: list[str] | None = None, device: str = "auto"):
    """Load a checkpoint (or a run directory's best.pt) for inference.

    Returns:
        (model in eval mode, its BatchNorms folded (:meth:`FineScopeNet.fold_batchnorm`: it refuses ``train()``),
        config with overrides applied, class names, checkpoint state).
    """
    state = load_checkpoint(source)
    if not isinstance(state.get("config"), dict) or "class_names" not in state or "model" not in state:
        raise FinescopeError(f"checkpoint '{state['path']}' is not a finescope model (no config, class names or "
                             "weights); pass a run directory or a .pt written by finescope train")
    base = stored_config(state["config"])
    # inference never compiles: a run trained with train.compile takes --set train.cudnn_depthwise=false, which
    # training refuses beside it
    base = {**base, "train": {**base.get("train", {}), "compile": "off"}}
    try:
        load_config(base=base)
    except FinescopeError as e:
        raise FinescopeError(f"checkpoint '{state['path']}': its stored config does not load here ({e}); was it "
                             "written by another finescope version?") from None
    cfg = load_config(base=base, overrides=overrides)
    cfg = checkpoint_model_config(cfg)  # the checkpoint holds the weights
    _warn_other_bit_depth(cfg, base, state["path"])
    if device == "auto":  # the run's own device where this machine has it (a run trained on cuda:1, read here)
        device = cfg.train.device if has_device(cfg.train.device) else "auto"
    torch_device = resolve_device(device)
    model = build_model(cfg, len(state["class_names"]), torch_device)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        changed = first_difference(base.get("model"), to_dict(cfg)["model"], "model.", ("model.weights",
                                                                                         "model.pretrained"))
        hint = (f"{changed}: a trained model keeps its architecture, drop that override" if changed else
                " ".join(str(e).split("\n", 1)[-1].split())[:160])
        raise FinescopeError(f"checkpoint '{state['path']}' does not fit the model config: {hint}") from None
    model.fold_batchnorm()  # inference only: BatchNorm folded into the convolutions, in eval mode
    model.class_names = list(state["class_names"])  # so that a model handed on (explain(model, ...)) keeps them
    return model, cfg, list(state["class_names"]), state


def _warn_other_bit_depth(cfg: Config, trained: dict, where: str) -> None:
    """Warn in one line when ``cfg`` reads 16-bit images with another ``data.bit_depth`` than the run ``trained``
    (its stored config) with: right for files from a camera that stores other bits, wrong otherwise."""
    was = int(trained.get("data", {}).get("bit_depth", 0))
    if cfg.data.bit_depth != was:
        warnings.warn(f"data.bit_depth {cfg.data.bit_depth} reads 16-bit images with another scaling than checkpoint "
                      f"'{where}' was trained with data.bit_depth {was}: right only for files from a camera that "
                      "stores other bits; drop the override to read them as in training (recorded as "
                      "model_overrides)", FinescopeWarning, stacklevel=3)


def model_overrides(cfg: Config, state: dict) -> dict:
    """``{'model.<key>': value}`` of the model settings that ``cfg`` (the checkpoint's config with ``--set``
    overrides) runs the checkpoint's weights with instead of its trained ones, such as ``model.threshold`` (which
    the weights do not fix): another model than the one trained; and ``data.bit_depth`` where it differs (the
    model reads its 16-bit input scaled otherwise than in training). Empty for the model as trained."""
    trained = to_dict(load_config(base=stored_config(state["config"])))
    trained_model, model_now = trained["model"], to_dict(cfg)["model"]
    changed = {f"model.{k}": v for k, v in model_now.items()  # not the model as trained
               if k not in ("weights", "pretrained") and v != trained_model.get(k)}
    if cfg.data.bit_depth != trained["data"]["bit_depth"]:
        changed["data.bit_depth"] = cfg.data.bit_depth
    return changed


def data_overrides(cfg: Config, state: dict) -> dict:
    """``{'data.<key>': value}`` of the data settings that ``cfg`` (the checkpoint's config with ``--set``
    overrides) reads with instead of the run's own (``data.source``, ``data.root`` as an absolute path,
    ``data.magnifications``, ...): what evaluate and explain record, so that the command that makes their files
    again reads the same images the same way. Empty for the run's own data as trained."""
    trained = to_dict(load_config(base=stored_config(state["config"])))["data"]
    now = to_dict(cfg)["data"]
    for paths in (trained, now):  # as the run stores them, absolute
        paths.update({key: paths[key] and _absolute(paths[key]) for key in ("root", "splits")})
    return {f"data.{k}": v for k, v in now.items() if v != trained.get(k)}


def overrides_text(overrides: dict) -> str:
    """``model.threshold=0.95 model.num_crops=2``: :func:`model_overrides` as ``--set`` takes them."""
    return " ".join(f"{k}={v}" for k, v in overrides.items())


def _files_absolute(cfg: Config) -> Config:
    """``cfg`` with ``model.weights`` and ``data.splits`` (files read from the working folder) absolute, as
    ``data.root`` is stored, so that ``train --config RUN/config.yaml`` starts from them in any folder."""
    return replace(cfg, model=replace(cfg.model, weights=cfg.model.weights and _absolute(cfg.model.weights)),
                   data=replace(cfg.data, splits=cfg.data.splits and _absolute(cfg.data.splits)))


def _absolute(root: str) -> str:
    """``data.root`` as an absolute path (``~`` expanded), as a run stores it."""
    return os.path.abspath(os.path.expanduser(root))


def _same_root(data, trained) -> bool:
    """Whether ``data`` reads the images the model was trained on: its source and root (as absolute paths)."""
    return data.source == trained.source and _absolute(data.root) == _absolute(trained.root)


def trained_data_of(state: dict):
    """The data section of the config the checkpoint ``state`` was trained with."""
    return load_config(base=stored_config(state["config"])).data


def own_splits(cfg: Config, state: dict, sample_set: SampleSet) -> tuple[dict | None, str | None]:
    """The run's split of ``sample_set`` and None, as evaluate and explain read it; for other data (a
    ``splits.json`` that does not fit it, read with data settings other than the run's, or none) None and why; on
    the run's own data a ``splits.json`` that does not fit it is refused (it changed since: said, not guessed)."""
    run_dir = run_dir_of(state)
    if not (run_dir / "splits.json").is_file():
        return None, f"no splits.json in '{run_dir}'"
    try:
        return load_splits(run_dir / "splits.json", sample_set, fix=OWN_SPLIT_FIX, own=True), None
    except FinescopeError as e:
        if cfg.data == trained_data_of(state):
            raise
        return None, f"the data is not the run's ({str(e).split(';')[0]})"


def lone_on_own_data(root: str, run_dir: Path, n: int, command: str = "evaluate") -> str:
    """What reading ``n`` images of ``root`` is when it is the data a checkpoint without its run's ``splits.json``
    (none in ``run_dir``) was trained on (``command``: evaluate, explain): they include the images it trained and
    validated on, not told apart."""
    again = "explain the run folder's --split test" if command == "explain" else f"{command} the run folder"
    return (f"data.root '{root}' is the one this model was trained on, and without its run's splits.json (none in "
            f"'{run_dir}') its test images cannot be told apart: these {n} images include the images it trained and "
            f"validated on, unless that folder now holds other data; {again}, or other data with --set data.root=DIR")


def run_dir_of(state: dict) -> Path:
    """The run directory a checkpoint state was loaded from (``RUN/checkpoints/best.pt`` -> ``RUN``)."""
    path = Path(state["path"])
    return path.parent.parent if path.parent.name == "checkpoints" else path.parent


def other_split(state: dict, splits: dict[str, np.ndarray], sample_set: SampleSet, run_dir: Path,
                command: str = "evaluate") -> str | None:
    """What is wrong with reading checkpoint ``state`` on ``run_dir``'s ``splits`` (``command``: evaluate,
    explain) when it was trained on another split (its ``split_digest``: a checkpoint copied into another run's
    folder, or a ``splits.json`` replaced), or None: its test side may hold images it trained on. The file as
    listed is its split too (images outside a manifest's folder moved since, for a checkpoint that recorded their
    names of then). Checkpoints from before the digest, and splits that only lost images skipped as unreadable
    since, cannot be told apart and give None."""
    trained = state.get("split_digest")
    if trained is None or sample_set.skipped or trained in split_digests(splits, sample_set) | listed_digests(
            run_dir / "splits.json"):
        return None
    return _other_split_text(state, run_dir, command)


def other_listed_split(state: dict, run_dir: Path, command: str = "explain") -> str | None:
    """:func:`other_split` where the run's data cannot be read: by the digest of ``run_dir``'s ``splits.json`` as
    it lists its images; None also without a readable one."""
    trained, listed = state.get("split_digest"), listed_digests(run_dir / "splits.json")
    if trained is None or not listed or trained in listed:
        return None
    return _other_split_text(state, run_dir, command)


def _other_split_text(state: dict, run_dir: Path, command: str) -> str:
    return (f"checkpoint '{state['path']}' was trained on another split than {run_dir / 'splits.json'} (copied from "
            f"another run, or that file replaced): its sides are not this model's, and the images {command} reads "
            f"from them may include ones it trained on; {command} it in the folder of the run that trained it")


def _trained_on_warning(state: dict, sample_set: SampleSet, run_dir: Path, own_data: bool) -> str | None:
    """What of ``sample_set`` (evaluated whole) the checkpoint ``state`` trained or validated on, by ``run_dir``'s
    ``splits.json`` (:func:`~finescope.data.splits.trained_on`), or, where that file is not the split it was
    trained on (its ``split_digest``, compared with the file's own list, as other data cannot be), that this is
    not known. On its ``own_data`` a file that only lost images skipped as unreadable since is its split, as for
    :func:`other_split`."""
    path = run_dir / "splits.json"
    trained = state.get("split_digest")
    if trained is None or trained in listed_digests(path) or (own_data and _is_own_split(state, sample_set, path)):
        return trained_on(path, sample_set)
    return (f"checkpoint '{state['path']}' was trained on another split than {path} (copied from another run, or "
            f"that file replaced): which of these {len(sample_set)} images it trained or validated on is not known "
            "from it, and may be any; evaluate it in the folder of the run that trained it")


def _is_own_split(state: dict, sample_set: SampleSet, path: Path) -> bool:
    """Whether the splits file ``path`` is, on the run's own data ``sample_set``, the split checkpoint ``state``
    trained on by :func:`other_split`; False where it does not match that data."""
    try:
        with warnings.catch_warnings():  # what is wrong with the file is said where the split is evaluated
            warnings.simplefilter("ignore")
            splits = load_splits(path, sample_set, own=True)
    except FinescopeError:
        return False
    return other_split(state, splits, sample_set, path.parent) is None


def evaluate(source: str | Path, split: str = "test", overrides: list[str] | None = None,
             out: str | Path | None = None, device: str = "auto") -> dict:
    """Metrics of a trained model on a split of its run, or on all images of other data.

    With data that the run's ``splits.json`` describes (its own, also moved or read with other loader
    settings), ``split`` picks train/val/test from it; with other data (e.g. ``--set data.root=UNSEEN``), without
    a ``splits.json`` next to the checkpoint, or with ``split='all'`` every image is evaluated, and a warning
    says why when another split was asked for.
    """
    if out and Path(out).suffix.lower() in (".csv", ".tsv", ".md", ".html"):  # before the model runs
        raise FinescopeError(f"--out '{out}' names the metrics JSON evaluate writes (its predictions go beside it as "
                             f"{Path(out).stem}_predictions.csv, its report as {Path(out).stem}_report.md); give a "
                             f".json path, e.g. --out {Path(out).with_suffix('.json')}")
    if out and _no_file(out):  # its predictions and report go beside it: /dev/null_predictions.csv, ...
        raise FinescopeError(f"--out '{out}' is no file (a device, a pipe or a folder), and evaluate writes its "
                             f"predictions and report beside it: give --out a file, e.g. --out metrics.json, or "
                             "leave it out (the run's metrics_<split>.json)")
    model, cfg, class_names, state = load_trained(source, overrides, device)
    trained_data = trained_data_of(state)
    sample_set = load_samples(cfg.data, require_all_classes=False, class_names=class_names)
    run_dir = run_dir_of(state)
    splits, why = (None, None) if split == "all" else own_splits(cfg, state, sample_set)
    seen = None
    if splits is None:
        if split != "all":
            warnings.warn(f"evaluating all {len(sample_set)} images, not the '{split}' split: {why}",
                          FinescopeWarning, stacklevel=2)
        indices, split = np.arange(len(sample_set)), "all"
        if (run_dir / "splits.json").is_file():
            seen = _trained_on_warning(state, sample_set, run_dir, _same_root(cfg.data, trained_data))
        elif _same_root(cfg.data, trained_data):  # a checkpoint out of its run, on the data it was trained on
            seen = lone_on_own_data(cfg.data.root, run_dir, len(indices))
        if seen:
            warnings.warn(seen, FinescopeWarning, stacklevel=2)
    else:
        if split not in splits:
            raise FinescopeError(f"--split '{split}' is not in {run_dir / 'splits.json'}; use train, val, test or all")
        indices = splits[split]
        seen = other_split(state, splits, sample_set, run_dir)
        if seen:
            warnings.warn(seen, FinescopeWarning, stacklevel=2)
    if len(indices) == 0:
        raise empty_split_error(split, splits, run_dir)
    preds, metrics = evaluate_split(model, sample_set, indices, cfg, next(model.parameters()).device, desc=split)
    metrics.update(split=split, checkpoint=state["path"], data_root=_absolute(cfg.data.root),
                   split_leak=seen if splits is None else "; ".join(filter(None, [own_split_leak(splits, sample_set),
                                                                                 seen])) or None,
                   model_overrides=model_overrides(cfg, state), data_overrides=data_overrides(cfg, state))
    ckpt = Path(state["path"])  # train's metrics.json and predictions_test.csv are best.pt's: another keeps its name
    other = f"_{ckpt.stem}" if ckpt.parent.name == "checkpoints" and ckpt.name != "best.pt" else ""
    # other data, or the model with other settings: files of their own, never over the run's (report.md) or another's
    other += evaluated_suffix(metrics["model_overrides"], metrics["data_overrides"], split)
    out = Path(out) if out else run_dir / f"metrics_{split}{other}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    stem = out.stem.replace("metrics", "predictions", 1) if "metrics" in out.stem else out.stem + "_predictions"
    stem = f"predictions_{split}" if stem == "predictions" else stem  # predictions.csv marks a cv folder
    write_predictions(out.with_name(stem + ".csv"), preds, sample_set, metrics["model_overrides"])
    write_text(out, json_text(metrics, indent=2))
    return {**metrics, "output": str(out), "predictions": str(out.with_name(stem + ".csv")), "run_dir": str(run_dir)}


def box_string(boxes, mass) -> str:
    """``x1 y1 x2 y2 mass`` per box, boxes separated by ';' (empty for variants without boxes): each coordinate
    the shortest text that reads back the same float32 (whole pixels without decimals), so that a box of less
    than a pixel (``model.min_box_fraction=0.001``) keeps its size instead of rounding to none; the mass too, so
    that a box holding 0.0004 of the attention does not read as one holding none. predict's and evaluate's CSVs and
    explain's results.csv all write boxes with it."""
    if boxes is None:
        return ""

    def shortest(v) -> str:
        return np.format_float_positional(np.float32(v), trim="-")

    return ";".join(" ".join(shortest(v) for v in (*b[:4], m)) for b, m in zip(boxes, mass))


def write_predictions(path: str | Path, preds: Predictions, sample_set: SampleSet,
                      overrides: dict | None = None) -> None:
    """One CSV row per image: path, group, patient, magnification (empty where the data gives none), true and
    predicted class, every class probability, boxes and, last, ``model_overrides``: the model settings changed with
    ``--set`` (:func:`overrides_text` of ``overrides``, the same in every row; empty for the model as trained)."""
    names = sample_set.class_names
    changed = overrides_text(overrides or {})  # another model than the one trained: said in each row
    with atomic_open(path, newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "group", "patient", "magnification", "true", "predicted", *[f"prob_{n}" for n in names],
                    "boxes", "model_overrides"])
        for row, i in enumerate(preds.indices):
            s = sample_set.samples[i]
            true = names[s.label] if 0 <= s.label < len(names) else ""
            boxes = box_string(preds.boxes[row], preds.box_mass[row]) if preds.boxes is not None else ""
            probs = [str(np.float32(p)) for p in preds.probs[row]]  # shortest text that reads back the same float32
            w.writerow([s.path, s.group, s.patient, s.meta.get("magnification", ""), true,
                        names[int(preds.probs[row].argmax())], *probs, boxes, changed])


def patients_path(out: str | Path) -> Path:
    """Where ``predict --per-patient`` writes its patients: ``OUT_patients.csv`` beside ``OUT.csv``."""
    return Path(out).with_name(Path(out).stem + "_patients.csv")


def write_patient_predictions(path: str | Path, preds: Predictions, sample_set: SampleSet,
                              overrides: dict | None = None) -> None:
    """One CSV row per patient of ``preds`` (``predict --per-patient``), in the order of their first images:
    the patient (the one its images' files say, :func:`~finescope.data.sources.file_sample`, else their group,
    else, for an image right in a class folder, the image itself, as training groups it, else the folder they lie
    in), its number of images, its true class where its images have one and the same,
    ``predicted`` (the argmax of their mean class probability), ``majority`` (the majority vote of their
    predictions, ties broken by the mean probability: the two ways the patient-level metrics score a patient),
    every mean class probability and, last, ``model_overrides`` as in :func:`write_predictions`."""
    from finescope.metrics import pooled_predictions

    names, samples = sample_set.class_names, [sample_set.samples[i] for i in preds.indices]
    # an image right in a class folder is a group of its own, as in training; one in no class folder, of its folder
    keys = [s.meta.get("patient") or s.group or (s.path if s.label >= 0 else os.path.dirname(s.path))
            for s in samples]
    patients, first, idx = np.unique(keys, return_index=True, return_inverse=True)
    idx = idx.ravel()
    total, majority = pooled_predictions(preds.probs, preds.probs.argmax(1), idx, len(patients))
    counts = np.bincount(idx, minlength=len(patients))
    labels = np.array([s.label for s in samples])  # -1: unknown
    low, high = np.full(len(patients), len(names)), np.full(len(patients), -1)
    np.minimum.at(low, idx, labels)
    np.maximum.at(high, idx, labels)
    changed = overrides_text(overrides or {})
    with atomic_open(path, newline="") as f:
        w = csv.writer(f)
        w.writerow(["patient", "n_images", "true", "predicted", "majority", *[f"prob_{n}" for n in names],
                    "model_overrides"])
        for k in np.argsort(first, kind="stable"):
            true = names[low[k]] if low[k] == high[k] >= 0 else ""  # one known class
            w.writerow([patients[k], int(counts[k]), true, names[int(total[k].argmax())], names[int(majority[k])],
                        *[str(np.float32(v)) for v in total[k] / counts[k]], changed])


def _no_file(out: str | Path) -> bool:
    """Whether ``out`` is no file that another can be written beside: a device, a pipe or a folder, or a name in
    /dev itself or /proc (``/dev/stdout`` is a regular file when the output is redirected into one; /dev/shm is a
    folder of files)."""
    folder = os.path.realpath(os.path.dirname(os.path.abspath(out)))
    special = folder == "/dev" or folder.split(os.sep)[1:2] == ["proc"]
    return special or (os.path.exists(out) and not os.path.isfile(out))


def predict(checkpoint: str | Path, paths: list[str], out: str | Path | None = None,
            overrides: list[str] | None = None, device: str = "auto", per_patient: bool = False) -> Path:
    """Predict image files and folders (recursively); write one CSV row per image and return its path. The true
    class, the group, the patient and the magnification are filled where the file says them (:func:`~finescope.data.sources.file_sample`),
    else left empty; the last column, ``model_overrides``, names the model settings changed with ``--set``
    (:func:`model_overrides`, empty for the model as trained). With ``per_patient`` also one row per patient,
    :func:`write_patient_predictions`, into :func:`patients_path`."""
    from finescope.data.sources import file_sample, images_in

    if per_patient and out is not None and _no_file(out):
        raise FinescopeError(f"--per-patient writes its patients beside --out, into '{patients_path(out)}', and "
                             f"'{out}' is no file (a device, a pipe or a folder): give --out a file for the rows "
                             "of the images, e.g. --out predictions.csv (the patients: predictions_patients.csv)")
    model, cfg, class_names, state = load_trained(checkpoint, overrides, device)
    # '..' resolved, so that a class folder above the working one is seen; each image once
    absolute = [os.path.abspath(f) for f, _ in images_in(paths)]
    samples = [file_sample(path, cfg.data, class_names) for path in absolute]
    sample_set = SampleSet(samples, class_names)
    # each image is read once: no cache (the run's disk cache would keep a decoded copy of every file predicted,
    # its memory cache all of them at once)
    data = replace(cfg.data, on_error="skip", cache="none")
    loader = make_loader(sample_set, np.arange(len(samples)), replace(cfg, data=data), train=False)
    preds = predict_loader(model, loader, next(model.parameters()).device, amp=cfg.train.amp,
                           cpu_amp=cfg.train.cpu_amp, channels_last=cfg.train.channels_last,
                           predict_with=cfg.model.predict_with)
    if len(preds.indices) == 0:
        raise FinescopeError(f"none of the {len(samples)} images could be predicted (unreadable, or smaller than "
                             "the model's crops: see the warnings above); nothing was written")
    out = Path(out or "predictions.csv")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_predictions(out, preds, sample_set, model_overrides(cfg, state))
    if per_patient:
        write_patient_predictions(patients_path(out), preds, sample_set, model_overrides(cfg, state))
    skipped = len(samples) - len(preds.indices)
    if skipped:
        warnings.warn(f"skipped {skipped} of {len(samples)} files, unreadable or too small (listed in the warnings "
                      "above)", FinescopeWarning, stacklevel=2)
    return out
