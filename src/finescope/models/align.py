"""Cutting the crops: torchvision's ``roi_align``, with its rows resized first and spread over the CPU's threads.

torchvision's CPU kernel of ``roi_align`` runs on one thread, box after box, and for an RGB source most of its
time goes to the sampling positions and weights of each box, which only three channels then share: a box with a
grid of gy x gx samples per bin costs about gy * gx times one with a single sample. On the CPU,
:func:`crop_align` does two things with the same result:

- **Rows first.** A bin's average of gy x gx bilinear samples is separable: the mean over its gy sample rows of
  the source's rows (two source rows per sample, as the kernel weighs them), then the mean over gx columns. The
  boxes for which that saves at least two samples per bin have their rows resized first into one image of
  ``size`` rows per box (one ``embedding_bag`` over the source's rows, vectorised along the row), which
  ``roi_align`` then cuts with one sample row per bin: gx samples per bin instead of gy * gx.
- **Strips.** Every box is cut in horizontal strips, one strip per intra-op thread (``torch.get_num_threads``),
  each a ``roi_align`` of that strip of every box. A strip keeps the box's bins and its sampling grid (checked in
  the kernel's float arithmetic), so it reads the same samples as the whole box would, up to float rounding of
  their positions.

Each strip thread runs its parallel regions on one OpenMP thread (:func:`_pool`): with GNU OpenMP, a thread
that enters one gets a team of its own, and with more OpenMP threads than cores libgomp's workers sleep at their
barriers instead of spinning, so that every later parallel operation of the process waits for wake-ups
(``benchmarks/openmp_cost.py``).

On CUDA, for a source that needs a gradient and while ``torch.compile`` traces, it is one ``roi_align`` call.
"""

from __future__ import annotations

import ctypes
import functools
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from finescope.models.resize import row_table

ROWS_FIRST = True  # resize the rows of boxes with several sample rows per bin first (benchmarks switch it off)
# (pid, workers, pool or None where its threads cannot be kept to one OpenMP thread); threads do not survive a fork
_POOL: tuple[int, int, ThreadPoolExecutor | None] | None = None


@functools.cache
def _openmp_runtime() -> ctypes.CDLL | None:
    """The OpenMP runtime loaded in this process (libgomp, libomp or libiomp5, as ``/proc/self/maps`` lists it),
    or None where there is none to be found that way."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    for line in maps.splitlines():
        path = line.split(maxsplit=5)[-1]
        if Path(path).name.startswith(("libgomp", "libomp", "libiomp5")):
            try:
                return ctypes.CDLL(path)  # the loaded library itself: dlopen of a loaded path returns it
            except OSError:
                continue
    return None


def _one_openmp_thread(runtime: ctypes.CDLL) -> None:
    """Pool thread initializer: this thread's parallel regions run on it alone, with no OpenMP team."""
    torch.get_num_threads()  # ATen sets a thread's team size at its first parallel call: let it, then override
    runtime.omp_set_num_threads(1)


def _pool(workers: int) -> ThreadPoolExecutor | None:
    """The strip threads, each kept to one OpenMP thread; None where that cannot be done (then no strips)."""
    global _POOL
    if _POOL is None or _POOL[0] != os.getpid() or _POOL[1] < workers:
        if _POOL is not None and _POOL[0] == os.getpid() and _POOL[2] is not None:
            _POOL[2].shutdown(wait=False)  # torch.set_num_threads raised the thread count
        pool = None
        if (runtime := _openmp_runtime()) is not None:
            pool = ThreadPoolExecutor(workers, thread_name_prefix="finescope-crops", initializer=_one_openmp_thread,
                                      initargs=(runtime,))
            if pool.submit(torch.get_num_threads).result() != 1:  # not the runtime torch runs on
                pool.shutdown()
                pool = None
        _POOL = (os.getpid(), workers, pool)
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


def _rows_first(source: torch.Tensor, rois: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of every box resized as ``roi_align`` samples them, (1, C, n * size, W) float32 with box r's
    ``size`` rows at ``[r * size, (r + 1) * size)``, and the boxes on it (n, 5) with one sample row per bin.
    For a float32 ``source`` and boxes of at least one sample row per bin.

    The sample rows and weights are the kernel's (``roi_align_kernel.cpp``, aligned, adaptive sampling): row
    ``y = y1 - 0.5 + ph * bin + (iy + 0.5) * bin / gy``, none outside [-1, H], clamped at 0, read from two source
    rows by distance (the last row alone), each sample weighed 1 / gy. Every output row is one bag of 2 * G
    source rows, G the largest gy; a box with fewer sample rows has the rest weighed 0.
    """
    B, C, H, W = source.shape
    top = rois[:, 2] - 0.5
    height = (rois[:, 4] - 0.5) - top
    grid = torch.ceil(height / size)  # gy per box
    G = int(grid.max())
    bin_h, grid, top = (height / size)[:, None, None], grid[:, None, None], top[:, None, None]
    ph = torch.arange(size, dtype=source.dtype)[:, None]  # (size, 1)
    iy = torch.arange(G, dtype=source.dtype)
    y = top + ph * bin_h + (iy + 0.5) * bin_h / grid  # (n, size, G)
    keep = ((y >= -1) & (y <= H) & (iy < grid)).to(source.dtype) / grid  # outside [-1, H]: reads 0, counts
    y = y.clamp(min=0)
    low = y.long().clamp(max=H - 1)
    frac = y - low  # past the last row both reads are the last row, whose weights then sum to 1
    rows = torch.stack([low, (low + 1).clamp(max=H - 1)], dim=-1)  # (n, size, G, 2)
    weight = (torch.stack([1 - frac, frac], dim=-1) * keep[..., None]).reshape(1, -1, 2 * G)
    table, starts = row_table(source)
    plane = starts.view(B, C)[rois[:, 0].long()].t()  # (C, n): the table row where each box's channel starts
    bags = (plane[:, :, None, None, None] + rows).reshape(-1, 2 * G)  # (C * n * size, 2G), channel-major
    with torch.autocast("cpu", enabled=False):
        out = F.embedding_bag(bags, table, mode="sum",
                              per_sample_weights=weight.expand(C, -1, -1).reshape(-1, 2 * G))
    n = rois.shape[0]
    out = out.view(1, C, n * size, table.shape[1])[..., :W].contiguous()
    at = torch.arange(n, dtype=rois.dtype) * size  # where each box's rows start in ``out``
    return out, torch.stack([torch.zeros_like(at), rois[:, 1], at, rois[:, 3], at + size], dim=1)


def crop_align(source: torch.Tensor, rois: torch.Tensor, size: int) -> torch.Tensor:
    """``roi_align`` (aligned, adaptive sampling) of ``rois`` on ``source`` -> (n, C, size, size).

    Args:
        source: (B, C, H, W) the image the boxes are cut from.
        rois: (n, 5) batch index, x1, y1, x2, y2 in ``source`` pixels, the dtype of ``source``.
        size: the side of each crop.

    On the CPU the rows of boxes with gy x gx samples per bin, (gy - 1) * gx >= 2, are resized first
    (:func:`_rows_first`), and with several threads output rows ``[r0, r1)`` of every box come from one thread: a
    box from ``y1 + r0 * bin`` to ``y1 + r1 * bin`` (``bin = (y2 - y1) / size``) with ``r1 - r0`` output rows has
    the same bins and, checked in the kernel's arithmetic, the same sampling grid as the whole box. The crops
    match one ``roi_align`` call to float rounding. Boxes whose source needs a gradient, and boxes in a graph
    ``torch.compile`` traces, are cut in one call.
    """
    if torch.compiler.is_compiling() or source.device.type != "cpu" or source.requires_grad:
        return _align(source, rois, (size, size))
    if rois.shape[0] == 0:
        return _align(source, rois, (size, size))
    if ROWS_FIRST and source.dtype == torch.float32:
        # boxes whose rows first save at least two samples per bin: gy * gx samples become gx
        many = (_grid(rois[:, 2], rois[:, 4], size) - 1) * _grid(rois[:, 1], rois[:, 3], size) >= 2
        if bool(many.all()):
            source, rois = _rows_first(source, rois, size)
        elif bool(many.any()):  # those rows first, the others as they are
            out = source.new_empty(rois.shape[0], source.shape[1], size, size)
            out[many] = crop_align(source, rois[many], size)
            out[~many] = crop_align(source, rois[~many], size)
            return out
    threads = min(torch.get_num_threads(), size)
    pool = _pool(threads - 1) if threads >= 2 else None
    strips = _strips(rois, size, threads) if pool is not None else None
    if strips is None:
        return _align(source, rois, (size, size))
    futures = [pool.submit(_align, source, part, hw) for part, hw in strips[1:]]
    first = _align(source, *strips[0])  # this thread cuts the first strip
    return torch.cat([first] + [f.result() for f in futures], dim=2)
