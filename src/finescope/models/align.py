"""Cutting the crops: torchvision's ``roi_align``, on the CPU with faster ways for large and smallest boxes.

torchvision's CPU kernel of ``roi_align`` runs on one thread, box after box, and for an RGB source most of its
time goes to the sampling positions and weights of each box, which only three channels then share: a box with a
grid of gy x gx samples per bin costs about gy * gx times one with a single sample. A bin's average of gy x gx
bilinear samples is separable, though: the mean over its gy sample rows of the source's rows (two source rows per
sample, as the kernel weighs them), then the mean over gx columns. On the CPU, :func:`crop_align` resizes the
rows first for the boxes where that saves at least two samples per bin: into one image of ``size`` rows per box
(one ``embedding_bag`` over the source's rows, vectorised along the row and spread over torch's threads), which
``roi_align`` then cuts with one sample row per bin, gx samples per bin instead of gy * gx. And a box whose
bins are exactly one source pixel high and wide (one sample each, read inside the source) is the source shifted
by the box's fractional offset: four slices blended with the kernel's own weights, 3-4x faster than the kernel
(``benchmarks/results/cpu_crop_cost_at_6acd71a.md``). Such boxes are common:
:meth:`~finescope.models.network.FineScopeNet.crop_scale` resizes the crop source so that the smallest box spans
exactly ``local_size`` pixels, and :func:`snap_boxes` makes "exactly" hold in float32. The crops are the same to
float rounding.

From 22d08a5 to 985437b every box was also cut in horizontal strips, one per CPU thread, on a Python thread
pool. The crops alone were 1.2-2x faster, but with GNU OpenMP a pool thread that enters a parallel region gets
an OpenMP team of its own, and with more OpenMP threads than cores libgomp's workers sleep at their barriers
instead of spinning: every later parallel operation of the process waited for wake-ups, a mobilenet_v2 pass
1.5-2.1x longer (``benchmarks/openmp_cost.py``). With the pool kept to one OpenMP thread (00c3d9b) the strips
still cut the crops alone up to 1.8x faster than one call, but inside mobilenet_v2 inference steps they took
0.8-1.2x as long as without strips (``benchmarks/results/cpu_crop_cost_at_00c3d9b.md`` against
``cpu_crop_cost_at_8566993.md``), so they were dropped: nothing here runs torch on a thread of its own.

On CUDA, for a source that needs a gradient and while ``torch.compile`` traces, it is one ``roi_align`` call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from finescope.models.resize import row_table

CPU_WAYS = True  # rows first and shifts on the CPU (benchmarks switch them off to time one roi_align call)


def _align(source: torch.Tensor, rois: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return roi_align(source, rois, output_size=size, spatial_scale=1.0, sampling_ratio=-1, aligned=True)


def _grid(y1: torch.Tensor, y2: torch.Tensor, rows: int) -> torch.Tensor:
    """The rows of samples per bin that roi_align (aligned, adaptive) takes for boxes from ``y1`` to ``y2`` cut
    into ``rows`` output rows, in the kernel's float32 arithmetic."""
    return torch.ceil(((y2 - 0.5) - (y1 - 0.5)) / rows)


def snap_boxes(rois: torch.Tensor, size: int, tol: float = 0.5) -> torch.Tensor:
    """``rois`` (n, 5) with every side within ``tol`` pixels of ``size`` made exactly ``size``: its start rounded
    to 1/64 pixel, its end the start plus ``size``, both exact in float32 (coordinates below 2^17).

    A box grown to the smallest side spans ``size`` pixels of its crop source only up to the rounding of the
    source's size (a fraction of a pixel: 1388 x 0.646 = 896.9 is rounded to 897) and of the scaled coordinates,
    and ``roi_align``'s adaptive grid, ``ceil(side / size)`` samples per bin, turns a side of ``size`` plus one
    float step into two samples per bin: a crop half a pixel blurrier, at twice the cost, for a third to all of
    such boxes depending on the image size. Snapped, their bins are one pixel and one sample each on every device
    (on the CPU cut as shifts, :func:`_unit_crops`). A box changes by less than ``tol`` pixels of the source, and
    boxes further from ``size`` are left as they are."""
    lo, hi = rois[:, 1:3], rois[:, 3:5]
    near = ((hi - lo) - size).abs() <= tol
    start = torch.round(lo * 64) / 64
    return torch.cat([rois[:, :1], torch.where(near, start, lo), torch.where(near, start + size, hi)], dim=1)


def _unit_taps(lo: torch.Tensor, hi: torch.Tensor, size: int, limit: int) -> tuple[torch.Tensor, torch.Tensor,
                                                                                 torch.Tensor, torch.Tensor]:
    """Along one axis, for boxes from ``lo`` to ``hi`` cut into ``size`` bins of one sample each: the first source
    index each box reads (n,), the weight of the next index for each bin (n, size), the step to that next index
    (n,: 0 when every sample lies on a whole pixel, as at the source's last row, which the kernel reads alone),
    and whether the box is a unit box on this axis (n,): bins of exactly one pixel (consecutive sample indices)
    and every sample and next index inside the source, so that the kernel reads indices ``first + i`` and
    ``first + i + step`` for bin i. The positions are the kernel's, in its float32 arithmetic."""
    start = lo - 0.5
    bin_ = ((hi - 0.5) - start) / size
    pos = start[:, None] + torch.arange(size, dtype=lo.dtype) * bin_[:, None] + 0.5 * bin_[:, None]
    low = pos.clamp(min=0).long()
    weight = pos.clamp(min=0) - low
    step = (weight > 0).any(dim=1).long()
    unit = ((_grid(lo, hi, size) == 1) & (pos >= -1).all(1) & (low[:, -1] + step <= limit - 1)
            & (low == low[:, :1] + torch.arange(size)).all(1))
    return low[:, 0], weight, step, unit


def _unit_crops(source: torch.Tensor, rois: torch.Tensor, size: int, y_taps: tuple[torch.Tensor, ...],
                x_taps: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The crops of unit boxes (``y_taps``, ``x_taps``: :func:`_unit_taps`'s first three results on each axis,
    for these boxes): each the source shifted by the box's fractional offset, ``lerp`` of four slices with the
    kernel's weights."""
    out = source.new_empty(rois.shape[0], source.shape[1], size, size)
    (ys, wy, dys), (xs, wx, dxs) = y_taps, x_taps
    for r, (b, y, dy, x, dx) in enumerate(zip(rois[:, 0].long().tolist(), ys.tolist(), dys.tolist(), xs.tolist(),
                                              dxs.tolist(), strict=True)):
        upper, lower = source[b, :, y:y + size], source[b, :, y + dy:y + dy + size]  # rows first + i, + i + dy
        top = torch.lerp(upper[..., x:x + size], upper[..., x + dx:x + dx + size], wx[r])
        bottom = torch.lerp(lower[..., x:x + size], lower[..., x + dx:x + dx + size], wx[r])
        torch.lerp(top, bottom, wy[r][:, None], out=out[r])
    return out


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

    On the CPU, for a float32 source that needs no gradient: boxes whose bins are one source pixel are cut as
    shifts (:func:`_unit_crops`), the rows of boxes with gy x gx samples per bin, (gy - 1) * gx >= 2, are resized
    first (:func:`_rows_first`), the others cut by ``roi_align``; the crops match one ``roi_align`` call to float
    rounding, in the boxes' order. Elsewhere, and in a graph ``torch.compile`` traces, it is one call.
    """
    if (not CPU_WAYS or torch.compiler.is_compiling() or source.device.type != "cpu" or source.requires_grad
            or source.dtype != torch.float32 or rois.shape[0] == 0):
        return _align(source, rois, (size, size))
    H, W = source.shape[-2:]
    *y_taps, unit_y = _unit_taps(rois[:, 2], rois[:, 4], size, H)
    *x_taps, unit_x = _unit_taps(rois[:, 1], rois[:, 3], size, W)
    unit = unit_y & unit_x
    # boxes whose rows first save at least two samples per bin: gy * gx samples become gx
    many = ~unit & ((_grid(rois[:, 2], rois[:, 4], size) - 1) * _grid(rois[:, 1], rois[:, 3], size) >= 2)
    ways = (
        (unit, lambda m: _unit_crops(source, rois[m], size, [t[m] for t in y_taps], [t[m] for t in x_taps])),
        (many, lambda m: _align(*_rows_first(source, rois[m], size), (size, size))),
        (~unit & ~many, lambda m: _align(source, rois[m], (size, size))),
    )
    for mask, cut in ways:
        if bool(mask.all()):
            return cut(mask)
    out = source.new_empty(rois.shape[0], source.shape[1], size, size)
    for mask, cut in ways:
        if bool(mask.any()):
            out[mask] = cut(mask)
    return out
