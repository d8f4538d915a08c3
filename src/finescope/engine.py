"""Training and inference loops: plain functions, no globals, no file I/O.

The wiring (what to build from a config, where to write) lives in :mod:`finescope.trainer`.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from finescope import distributed as dist
from finescope.errors import FinescopeError
from finescope.models.network import ModelOutput
from finescope.progress import Progress


def compute_loss(out: ModelOutput, labels: torch.Tensor, aux_weight: float = 1.0, label_smoothing: float = 0.0,
                 class_weight: torch.Tensor | None = None):
    """CE(y_f, y) + lambda * CE(y_g, y) (method.md step 8); a single CE for variants without a global head.
    ``class_weight`` (C,) weighs each image's term by its class, each CE then divided by the batch's sum of
    weights (``F.cross_entropy``'s weighted mean)."""
    def ce(logits: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), labels, weight=class_weight, label_smoothing=label_smoothing)

    loss = ce(out.logits)
    if out.global_logits is not None and aux_weight > 0:
        loss = loss + aux_weight * ce(out.global_logits)
    return loss


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _amp_name(amp: str | bool) -> str:
    return {True: "bf16", False: "off"}.get(amp, amp) if isinstance(amp, bool) else amp


def autocast(device: torch.device, amp: str | bool, cpu_amp: str = "off"):
    """Autocast on CUDA in ``amp`` (``bf16``, ``fp16``; ``off`` or False = fp32; True = bf16), on the CPU in
    ``cpu_amp`` (``bf16`` or ``off``, the default: fp32).

    The two are separate settings (``train.amp``, ``train.cpu_amp``) because their costs differ: bf16 makes the
    convolutions of a CPU with AVX512-BF16 or AMX about twice as fast but an older CPU slower, and fp16, which
    the mobilenet_v2 configs use on CUDA, runs 5-20x slower than fp32 on a CPU.
    """
    amp = _amp_name(amp)
    if device.type == "cuda" and amp in AMP_DTYPES:
        return torch.autocast("cuda", dtype=AMP_DTYPES[amp])
    if device.type == "cpu" and cpu_amp == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def make_grad_scaler(device: torch.device, amp: str | bool) -> torch.amp.GradScaler:
    """Loss scaling for fp16 autocast on CUDA (fp16 gradients underflow without it); disabled otherwise.

    With the fused AdamW of CUDA runs the scaler's inf check happens inside the optimizer kernel: no host sync.
    """
    return torch.amp.GradScaler(device.type, enabled=device.type == "cuda" and _amp_name(amp) == "fp16")


def warmup_cosine(total_steps: int, warmup_steps: int):
    """A LambdaLR factor: linear warm-up to 1, then cosine decay to 0."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel and/or torch.compile wrapper."""
    model = model.module if hasattr(model, "module") else model
    return getattr(model, "_orig_mod", model)


def input_channels_last(model: nn.Module, device: torch.device, channels_last: bool) -> bool:
    """Whether ``model``'s input batches go channels-last: with ``channels_last``, on CUDA, and only when its
    backbone reads the images as they are (``global-hires``). Every other variant only resizes them or cuts
    crops from them; on CUDA both kernels (antialiased resize, roi_align) first copy a channels-last input to
    the contiguous layout, a pass over the full-resolution batch each, and a channels-last model converts the
    small view and crops at its first convolution. On the CPU the resizes and roi_align are faster on
    contiguous images too."""
    return channels_last and device.type == "cuda" and bool(getattr(unwrap(model), "hires", True))


WEIGHT_BOUND = 1e8  # |value| beyond which a weight or BatchNorm statistic has diverged (see diverged_tensors)
FP16_WEIGHT_BOUND = 6e4  # under fp16 autocast, for the weights: fp16's largest value is 65504


def weight_bound(device: torch.device, amp: str | bool) -> float:
    """The bound :func:`diverged_tensors` holds the parameters to when training on ``device`` in ``amp``."""
    return FP16_WEIGHT_BOUND if device.type == "cuda" and _amp_name(amp) == "fp16" else WEIGHT_BOUND


def _checked_tensors(model: nn.Module, param_bound: float) -> list[tuple[str, torch.Tensor, float]]:
    """(name, tensor, bound) of every non-empty floating-point parameter and buffer of ``model``."""
    named = [(n, t, param_bound) for n, t in model.named_parameters()]
    named += [(n, t, WEIGHT_BOUND) for n, t in model.named_buffers()]
    return [(n, t.detach(), b) for n, t, b in named if t.is_floating_point() and t.numel()]


def diverged_tensors(model: nn.Module, param_bound: float = WEIGHT_BOUND) -> torch.Tensor:
    """How many of ``model``'s floating-point parameters and buffers (BatchNorm's running statistics) hold a NaN,
    an infinite value, or one beyond the bound: a 0-dim tensor on their device, not read on the host (no sync).

    The bound of the buffers is :data:`WEIGHT_BOUND` (1e8), and that of the parameters ``param_bound``: the same
    1e8 in fp32 and bf16, :data:`FP16_WEIGHT_BOUND` (6e4) under fp16 autocast (:func:`weight_bound`). A finite
    weight beyond them is a diverged one all the same: 1e30 after an exploding step gave losses of 1e29 and was
    saved to the checkpoints, and under fp16 autocast a weight beyond 65504 is cast to inf, so every later step
    is NaN and the GradScaler skips them all. Trained models stay far below: the ImageNet MobileNetV2 of
    torchvision holds no weight beyond 2.7 and no BatchNorm running variance beyond 6.1 (fp16 keeps BatchNorm
    and its statistics in fp32, so the buffers keep the wide bound under fp16 too).

    One ``aminmax`` per tensor, which is NaN when a value is: about the time of a float32 sum, and a fifth of that
    of ``torch.isfinite`` on a CPU (MobileNetV2, 3.5M values: 1.9, 1.2 and 8.6 ms, 2 threads).
    """
    named = _checked_tensors(model, param_bound)
    if not named:
        return torch.zeros((), dtype=torch.long)
    bad = torch.zeros((), dtype=torch.long, device=named[0][1].device)
    for bound in {b for *_, b in named}:  # comparisons with a number: no bound is copied to the device
        ranges = torch.stack([torch.stack(torch.aminmax(t)).float() for _, t, b in named if b == bound])  # (T, 2)
        bad = bad + (~(ranges.abs() <= bound)).any(1).sum()  # NaN compares False: counted
    return bad


def first_diverged(model: nn.Module, param_bound: float = WEIGHT_BOUND) -> tuple[str, float] | None:
    """Name and largest ``|value|`` (NaN if any) of the first tensor that :func:`diverged_tensors` counts, read on
    the host for the error message; ``None`` when this process's model has none (another rank's has)."""
    for name, t, bound in _checked_tensors(model, param_bound):
        low, high = (float(v) for v in torch.aminmax(t))
        top = max(abs(low), abs(high)) if low == low and high == high else math.nan
        if not top <= bound:
            return name, top
    return None


def model_input(batch, device: torch.device, channels_last: bool):
    """The images, sizes and labels of ``batch`` on ``device``, the images channels-last when ``channels_last``
    (:func:`input_channels_last` decides)."""
    images = batch.model_input(device, channels_last=channels_last)
    return images, batch.sizes, batch.labels.to(device, non_blocking=True)


def train_one_epoch(
    model: nn.Module,
    loader,
    optimizer: torch.optim.Optimizer,
    scheduler,
    device: torch.device,
    *,
    aux_weight: float = 1.0,
    label_smoothing: float = 0.0,
    class_weight: torch.Tensor | None = None,
    grad_clip: float = 0.0,
    amp: str | bool = "bf16",
    cpu_amp: str = "off",
    channels_last: bool = True,
    progress: bool = True,
    desc: str = "train",
    scaler: torch.amp.GradScaler | None = None,
    mark_steps: bool = False,
) -> dict[str, float]:
    """One pass over ``loader``; returns mean loss, accuracy, images, seconds, ``lr_last`` (the learning rate of
    its last step, the first group's), ``images_per_class`` (the
    images read of each class, over every rank) and ``diverged``: how many of the model's parameters and
    buffers hold NaN, infinite or huge values after the epoch (:func:`diverged_tensors`, its bound from ``amp``:
    :func:`weight_bound`), summed over the ranks, so
    that every rank sees any rank's divergence (DDP keeps the parameters equal, not the BatchNorm statistics).
    The check adds no sync: it travels in the epoch's one all-reduce of the statistics. Under fp16 the
    GradScaler skips a step with infinite gradients, which leaves the weights finite; a weight beyond fp16's
    range makes every step's gradients infinite, and the bound of :func:`weight_bound` reports it.

    A loader whose sampler has ``step_scales`` (:class:`~finescope.distributed.ShardSampler`) weights each
    step's loss by its factor: in the last, incomplete global batch of a DDP epoch the ranks' batches differ in
    size, and a rank with nothing left reads a stand-in whose loss counts 0 (and which the statistics skip).
    Under DDP a batch whose images were all unreadable (``data.on_error=skip``) is replaced by this rank's
    previous batch (before any, its next readable one), weighted 0 in the same way: skipping it would leave the
    other ranks waiting in the gradient all-reduce. In a single process it is skipped. A stand-in step leaves the
    BatchNorm running statistics as they were.

    ``class_weight`` (C,), from ``train.class_weights``, weighs the loss's classes (:func:`compute_loss`).

    ``scaler`` (from :func:`make_grad_scaler`, kept across epochs and checkpointed) scales the loss under fp16
    autocast; when None one is made for this epoch. ``mark_steps`` tells torch.compile's CUDA graphs where each
    step begins (``train.compile: reduce-overhead``): the outputs of a step are used up within it.
    """
    scaler = scaler if scaler is not None else make_grad_scaler(device, amp)
    class_weight = None if class_weight is None else class_weight.to(device)
    model.train()
    total_loss = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen, start, per_class, lr_last = 0, time.perf_counter(), None, optimizer.param_groups[0]["lr"]
    scales = getattr(getattr(loader, "sampler", None), "step_scales", None) or []
    input_cl = input_channels_last(model, device, channels_last)
    with Progress(loader, desc=desc, leave=False, disable=None if progress else True) as batches:
        for step, (batch, stand_in) in enumerate(_stand_in_empty(batches, dist.is_distributed())):
            scale = 0.0 if stand_in else scales[step] if step < len(scales) else 1.0
            kept = _batchnorm_statistics(model) if scale == 0.0 else []  # a stand-in's pass must not move them
            images, sizes, labels = model_input(batch, device, input_cl)
            if mark_steps:
                torch.compiler.cudagraph_mark_step_begin()
            with autocast(device, amp, cpu_amp):
                try:
                    out = model(images, sizes)
                except ValueError as e:  # torch's BatchNorm: one value per channel, nothing to normalise
                    if "more than 1 value per channel" not in str(e):
                        raise
                    raise FinescopeError("a training batch of one image reaches a 1x1 feature map in the backbone, "
                                         "which BatchNorm cannot normalise in training: raise model.global_size and "
                                         "model.local_size above the backbone's stride (32 for torchvision's, 16 "
                                         "for tiny; global-hires reads the images at their own size), or set "
                                         "train.batch_size so that no batch holds a single image"
                                         + (f" (under torchrun each of the {dist.world_size()} processes reads its "
                                            "share of a batch, and of the last, incomplete one, which may be one "
                                            "image whatever the batch size: raise the sizes)"
                                            if dist.is_distributed() else "")) from None
            loss = compute_loss(out, labels, aux_weight, label_smoothing, class_weight)
            if per_class is None:  # every rank runs every step (stand-ins too): the same size on every rank
                per_class = torch.zeros(out.logits.shape[1], device=device, dtype=torch.long)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss if scale == 1.0 else loss * scale).backward()
            if grad_clip > 0:
                scaler.unscale_(optimizer)  # clip the true gradients
                nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            lr_last = optimizer.param_groups[0]["lr"]
            scaler.step(optimizer)
            scaler.update()
            if scheduler is not None:
                scheduler.step()
            if scale == 0.0:  # a stand-in (the sampler's, or for unreadable images): not an image of this epoch
                for buffer, value in kept:
                    buffer.data.copy_(value)
                continue
            total_loss += loss.detach() * len(labels)  # stays on the device: no sync per step
            correct += (out.logits.argmax(1) == labels).sum()
            seen += len(labels)
            per_class += labels.bincount(minlength=per_class.numel())
    seconds = time.perf_counter() - start
    if per_class is None:  # no batch: the classes are not known here, every count is 0
        per_class = torch.zeros(0, device=device, dtype=torch.long)
    bad = diverged_tensors(unwrap(model), weight_bound(device, amp)).to(device)  # NaN, inf or huge: the caller stops
    totals = dist.all_reduce_sum(torch.cat([torch.stack([total_loss.float(), correct.float(),
                                                         torch.tensor(seen, device=device, dtype=torch.float32),
                                                         bad.float()]),
                                            per_class.float()]))
    total, hits, seen, bad, *counts = (float(v) for v in totals.cpu())  # over every rank: one collective per epoch
    return {
        "loss": total / max(seen, 1),
        "accuracy": hits / max(seen, 1),
        "images": int(seen),
        "seconds": seconds,
        "images_per_class": [int(c) for c in counts],
        "diverged": int(bad),
        "lr_last": lr_last,
    }


def _batchnorm_statistics(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(buffer, copy) of the running statistics of ``model``'s BatchNorms in training mode, to put back after a
    stand-in step: its images are counted already (or are another rank's), and rank 0's statistics are the ones
    every rank validates and the checkpoint keeps."""
    return [(b, b.detach().clone()) for m in unwrap(model).modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for b in m.buffers(recurse=False)]


def _stand_in_empty(batches, distributed: bool):
    """``(batch, stand_in)`` for each batch of ``batches``. A batch whose images were all unreadable
    (``data.on_error=skip``) is skipped in a single process; under DDP the other ranks wait for this one's
    gradients in every step, so it becomes a stand-in (``stand_in`` True, its loss weighted 0): the previous
    batch, or, when no batch was readable yet, the next readable one. A rank without any readable batch is an
    error."""
    last, waiting = None, 0  # waiting: empty batches before the first readable one
    for batch in batches:
        if len(batch) and last is None:
            yield from ((batch, True) for _ in range(waiting))
        if len(batch):
            last = batch
            yield batch, False
        elif distributed and last is None:
            waiting += 1
        elif distributed:
            yield last, True
    if waiting and last is None:
        raise FinescopeError(f"every training image of rank {dist.rank()} in this epoch is unreadable, and the other "
                             "processes would wait for its gradients; fix or remove the files named in the warnings "
                             "above")


@dataclass
class Predictions:
    """Everything an inference pass produced, in dataset order of ``indices``.

    Attributes:
        indices: (N,) dataset indices.
        labels: (N,) true labels (-1 when unknown).
        probs: (N, C) class probabilities.
        loss: mean loss (NaN when labels are unknown).
        loss_count: number of images the loss is averaged over.
        boxes: (N, K, 4) selected boxes in pixels, or None.
        box_mass: (N, K) attention mass of each box, or None.
    """

    indices: np.ndarray
    labels: np.ndarray
    probs: np.ndarray
    loss: float = float("nan")
    loss_count: int = 0
    boxes: np.ndarray | None = None
    box_mass: np.ndarray | None = None
    extra: dict = field(default_factory=dict)


@torch.no_grad()
def predict_loader(
    model: nn.Module,
    loader,
    device: torch.device,
    *,
    amp: str | bool = "bf16",
    cpu_amp: str = "off",
    channels_last: bool = True,
    predict_with: str = "fused",
    aux_weight: float = 1.0,
    progress: bool = False,
    desc: str = "predict",
) -> Predictions:
    """Run the model over ``loader`` in eval mode and collect probabilities, boxes and the loss, in the order
    of the dataset indices (an evaluation loader reads images of one shape together, not in index order).

    Outputs stay on the device until the loop ends (one copy to the host at the end, no sync per batch).
    """
    model.eval()
    idx, labels, probs, boxes, mass = [], [], [], [], []
    input_cl = input_channels_last(model, device, channels_last)
    loss_sum, loss_n = torch.zeros((), device=device), 0
    with Progress(loader, desc=desc, leave=False, disable=None if progress else True) as batches:
        for batch in batches:
            if len(batch) == 0:
                continue
            known = bool((batch.labels >= 0).all())  # on the host: no device sync
            images, sizes, y = model_input(batch, device, input_cl)
            with autocast(device, amp, cpu_amp):
                out = model(images, sizes)
            if known:
                loss_sum += compute_loss(out, y, aux_weight).detach() * len(y)
                loss_n += len(y)
            idx.append(batch.indices)
            labels.append(batch.labels)
            probs.append(out.probabilities(predict_with))
            if out.boxes is not None:
                boxes.append(out.boxes.float())
                mass.append(out.box_mass.float())
    if not idx:
        return Predictions(np.zeros(0, int), np.zeros(0, int), np.zeros((0, 0)))

    indices = torch.cat(idx).numpy()
    order = np.argsort(indices, kind="stable")  # dataset order, whatever order the loader read them in

    def host(parts: list[torch.Tensor]) -> np.ndarray | None:
        return torch.cat(parts).cpu().numpy()[order] if parts else None

    return Predictions(
        indices=indices[order],
        labels=host(labels),
        probs=host(probs),
        loss=float(loss_sum) / loss_n if loss_n else float("nan"),
        loss_count=loss_n,
        boxes=host(boxes),
        box_mass=host(mass),
    )


def merge_predictions(parts: list[Predictions]) -> Predictions:
    """Join the predictions of several ranks: sorted by index, each index once, the loss weighted by counts.

    Args:
        parts: one :class:`Predictions` per rank (e.g. from :func:`finescope.distributed.all_gather`).

    Returns:
        One :class:`Predictions` over the union of the indices.
    """
    parts = [p for p in parts if len(p.indices)]
    if len(parts) <= 1:
        return parts[0] if parts else Predictions(np.zeros(0, int), np.zeros(0, int), np.zeros((0, 0)))
    indices = np.concatenate([p.indices for p in parts])
    _, first = np.unique(indices, return_index=True)  # sorted unique indices; first occurrence of each

    def cat(name: str) -> np.ndarray | None:
        values = [getattr(p, name) for p in parts]
        return None if any(v is None for v in values) else np.concatenate(values)[first]

    counted = [p for p in parts if p.loss_count]
    n = sum(p.loss_count for p in counted)
    return Predictions(
        indices=indices[first],
        labels=cat("labels"),
        probs=cat("probs"),
        loss=sum(p.loss * p.loss_count for p in counted) / n if n else float("nan"),
        loss_count=n,
        boxes=cat("boxes"),
        box_mass=cat("box_mass"),
    )
