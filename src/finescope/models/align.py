"""Cutting the crops: torchvision's ``roi_align``, spread over the CPU's threads.

torchvision's CPU kernel of ``roi_align`` runs on one thread, box after box, and for an RGB source most of its
time goes to the sampling positions and weights of each box, which only three channels then share. On the CPU,
:func:`crop_align` cuts every box in horizontal strips, one strip per intra-op thread (``torch.get_num_threads``),
each a ``roi_align`` of that strip of every box. A strip keeps the box's bins and its sampling grid, so it reads
the same samples as the whole box would, up to float rounding of their positions. On CUDA, and where there is one
thread, it is one ``roi_align`` call.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import torch
from torchvision.ops import roi_align

_POOL: tuple[int, int, ThreadPoolExecutor] | None = None  # (pid, workers, pool); threads do not survive a fork


def _pool(workers: int) -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None or _POOL[0] != os.getpid() or _POOL[1] < workers:
        _POOL = (os.getpid(), workers, ThreadPoolExecutor(workers, thread_name_prefix="finescope-crops"))
    return _POOL[2]


def _align(source: torch.Tensor, rois: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return roi_align(source, rois, output_size=size, spatial_scale=1.0, sampling_ratio=-1, aligned=True)


def crop_align(source: torch.Tensor, rois: torch.Tensor, size: int) -> torch.Tensor:
    """``roi_align`` (aligned, adaptive sampling) of ``rois`` on ``source`` -> (n, C, size, size).

    Args:
        source: (B, C, H, W) the image the boxes are cut from.
        rois: (n, 5) batch index, x1, y1, x2, y2 in ``source`` pixels, the dtype of ``source``.
        size: the side of each crop.

    On the CPU with several threads, output rows ``[r0, r1)`` of every box come from one thread: a box from
    ``y1 + r0 * bin`` to ``y1 + r1 * bin`` (``bin = (y2 - y1) / size``) with ``r1 - r0`` output rows has the same
    bins and sampling grid as the whole box. The crops match one ``roi_align`` call to float rounding (a grid
    can differ where a strip's height rounds across a whole number of output rows: the box is then sampled
    once more per bin). Boxes whose source needs a gradient are cut in one call.
    """
    threads = min(torch.get_num_threads(), size)
    if source.device.type != "cpu" or threads < 2 or rois.shape[0] == 0 or source.requires_grad:
        return _align(source, rois, (size, size))
    y1, y2 = rois[:, 2], rois[:, 4]
    step = (y2 - y1) / size
    bounds = [int(r[0]) for r in torch.arange(size).tensor_split(threads)] + [size]
    strips = []
    for r0, r1 in zip(bounds[:-1], bounds[1:], strict=True):
        part = rois.clone()
        part[:, 2] = y1 + r0 * step
        part[:, 4] = y2 if r1 == size else y1 + r1 * step
        strips.append((part, (r1 - r0, size)))
    pool = _pool(threads - 1)
    futures = [pool.submit(_align, source, part, hw) for part, hw in strips[1:]]
    first = _align(source, *strips[0])  # this thread cuts the first strip
    return torch.cat([first] + [f.result() for f in futures], dim=2)
