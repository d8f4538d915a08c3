"""Cutting the crops: torchvision's ``roi_align``, spread over the CPU's threads.

torchvision's CPU kernel of ``roi_align`` runs on one thread, box after box, and for an RGB source most of its
time goes to the sampling positions and weights of each box, which only three channels then share. On the CPU,
:func:`crop_align` cuts every box in horizontal strips, one strip per intra-op thread (``torch.get_num_threads``),
each a ``roi_align`` of that strip of every box. A strip keeps the box's bins and its sampling grid (checked in
the kernel's float arithmetic), so it reads the same samples as the whole box would, up to float rounding of their
positions. On CUDA, and where there is one thread, it is one ``roi_align`` call.
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
        if _POOL is not None and _POOL[0] == os.getpid():
            _POOL[2].shutdown(wait=False)  # torch.set_num_threads raised the thread count
        _POOL = (os.getpid(), workers, ThreadPoolExecutor(workers, thread_name_prefix="finescope-crops"))
    return _POOL[2]


def _align(source: torch.Tensor, rois: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return roi_align(source, rois, output_size=size, spatial_scale=1.0, sampling_ratio=-1, aligned=True)


def _grid(y1: torch.Tensor, y2: torch.Tensor, rows: int) -> torch.Tensor:
    """The rows of samples per bin that roi_align (aligned, adaptive) takes for boxes from ``y1`` to ``y2`` cut
    into ``rows`` output rows, in the kernel's float32 arithmetic."""
    return torch.ceil(((y2 - 0.5) - (y1 - 0.5)) / rows)


def _strips(rois: torch.Tensor, size: int, parts: int) -> list[tuple[torch.Tensor, tuple[int, int]]] | None:
    """``rois`` cut into ``parts`` horizontal strips, each with its output size, every strip with its box's bins
    and sampling grid; None when a strip's grid cannot be made its box's."""
    y1, y2 = rois[:, 2], rois[:, 4]
    step = (y2 - y1) / size
    want = _grid(y1, y2, size)
    bounds = [size * i // parts for i in range(parts + 1)]
    strips = []
    for r0, r1 in zip(bounds[:-1], bounds[1:], strict=True):
        top = y1 if r0 == 0 else y1 + r0 * step
        bottom = y2 if r1 == size else y1 + r1 * step
        # float rounding can tip a strip's height over a whole number of rows per bin (a box of exactly one
        # source pixel per output row is common: crop_scale makes the smallest box so); move its inner edge
        # by one float step at a time until the grid is the box's
        for _ in range(8):
            diff = _grid(top, bottom, r1 - r0) - want
            if not diff.any():
                break
            if r0 == 0:
                bottom = torch.where(diff > 0, bottom.nextafter(top), torch.where(diff < 0, bottom.nextafter(y2),
                                                                                  bottom))
            else:
                top = torch.where(diff > 0, top.nextafter(bottom), torch.where(diff < 0, top.nextafter(y1), top))
        else:
            return None
        part = rois.clone()
        part[:, 2], part[:, 4] = top, bottom
        strips.append((part, (r1 - r0, size)))
    return strips


def crop_align(source: torch.Tensor, rois: torch.Tensor, size: int) -> torch.Tensor:
    """``roi_align`` (aligned, adaptive sampling) of ``rois`` on ``source`` -> (n, C, size, size).

    Args:
        source: (B, C, H, W) the image the boxes are cut from.
        rois: (n, 5) batch index, x1, y1, x2, y2 in ``source`` pixels, the dtype of ``source``.
        size: the side of each crop.

    On the CPU with several threads, output rows ``[r0, r1)`` of every box come from one thread: a box from
    ``y1 + r0 * bin`` to ``y1 + r1 * bin`` (``bin = (y2 - y1) / size``) with ``r1 - r0`` output rows has the same
    bins and, checked in the kernel's arithmetic, the same sampling grid as the whole box. The crops match one
    ``roi_align`` call to the float rounding of the sampling positions. Boxes whose source needs a gradient, and
    boxes in a graph ``torch.compile`` traces, are cut in one call.
    """
    if torch.compiler.is_compiling() or source.device.type != "cpu" or source.requires_grad:
        return _align(source, rois, (size, size))
    threads = min(torch.get_num_threads(), size)
    if threads < 2 or rois.shape[0] == 0:
        return _align(source, rois, (size, size))
    strips = _strips(rois, size, threads)
    if strips is None:
        return _align(source, rois, (size, size))
    pool = _pool(threads - 1)
    futures = [pool.submit(_align, source, part, hw) for part, hw in strips[1:]]
    first = _align(source, *strips[0])  # this thread cuts the first strip
    return torch.cat([first] + [f.result() for f in futures], dim=2)
