"""Cutting the crops: torchvision's ``roi_align``, on the CPU as two ``embedding_bag`` passes per box.

torchvision's CPU kernel of ``roi_align`` runs on one thread, box after box, and for an RGB source most of its
time goes to the sampling positions and weights of each box, which only three channels then share: a box with a
grid of gy x gx samples per bin costs about gy * gx times one with a single sample. Its average of bilinear
samples is separable, though: a sample at (y, x) weighs its four neighbours by the product of a weight along y
and one along x, and a sample counts only when both y and x are inside [-1, size], so a bin's mean is the mean
over its sample rows of the source's rows (two source rows per sample row), then over its sample columns. On the
CPU, :func:`crop_align` cuts a box so (:func:`_separable_crops`): its rows with one ``embedding_bag`` over the
rows and columns of the source the box reads (a contiguous copy of them, or for a box that reads more than
half of the width, its image's whole rows in place), then, transposed, its columns with another. Both passes
are vectorised and spread over torch's threads, and the crops are roi_align's to float rounding, with the
kernel's sample positions and weights in its float32 arithmetic (:func:`_taps`). A box whose bins are exactly
one source pixel high and wide (one sample each, read inside the source) is the source shifted by the box's
fractional offset: four slices blended with the kernel's own weights (:func:`_unit_crops`), cheaper still. Such
boxes are common: :meth:`~finescope.models.network.FineScopeNet.crop_scale` resizes the crop source so that the
smallest box spans exactly ``local_size`` pixels, and :func:`snap_boxes` makes "exactly" hold in float32.

Before the separable crops (06c5fc8 to the commit before them) the rows of boxes with several sample rows per bin
were resized first and then cut by ``roi_align`` with one sample row per bin, its columns on one thread, and the
other boxes by ``roi_align`` alone; the separable crops took 0.2-0.5x their time (``benchmarks/RESULTS.md``).
From 22d08a5 to 985437b every box was also cut in horizontal strips on a Python thread pool, which gave each pool
thread an OpenMP team of its own and slowed every later parallel operation of the process
(``benchmarks/openmp_cost.py``): nothing here runs torch on a thread of its own. Until 0b38b09 the row pass
read the source in place, restricted to the box's columns: ``embedding_bag`` over such a column slice of a wider
table is several times slower than over a contiguous one, more than the copy costs. Until b024fce a call with
both shifts and other boxes also copied each kind's crops into its output by a boolean index (now every crop is
written where it belongs), and boxes reading more than ``NARROW`` of the width were copied out too (now they
read their image's whole rows).

On CUDA, for a source that needs a gradient and while ``torch.compile`` traces, it is one ``roi_align`` call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from finescope.models.resize import row_table

CPU_WAYS = True  # the separable crops on the CPU (benchmarks switch them off to time one roi_align call)
NARROW = 0.5  # a separable box reading at most this fraction of the source's width is copied out (_separable_crops)


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
                x_taps: tuple[torch.Tensor, ...], out: torch.Tensor, slots: list[int]) -> None:
    """The crops of unit boxes (``y_taps``, ``x_taps``: :func:`_unit_taps`'s first three results on each axis,
    for these boxes) into ``out[slots]``: each the source shifted by the box's fractional offset, ``lerp`` of
    four slices with the kernel's weights."""
    (ys, wy, dys), (xs, wx, dxs) = y_taps, x_taps
    for r, (slot, b, y, dy, x, dx) in enumerate(zip(slots, rois[:, 0].long().tolist(), ys.tolist(), dys.tolist(),
                                                    xs.tolist(), dxs.tolist(), strict=True)):
        upper, lower = source[b, :, y:y + size], source[b, :, y + dy:y + dy + size]  # rows first + i, + i + dy
        top = torch.lerp(upper[..., x:x + size], upper[..., x + dx:x + dx + size], wx[r])
        bottom = torch.lerp(lower[..., x:x + size], lower[..., x + dx:x + dx + size], wx[r])
        torch.lerp(top, bottom, wy[r][:, None], out=out[slot])


def _taps(lo: torch.Tensor, hi: torch.Tensor, size: int, limit: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Along one axis, the source indices and weights that ``roi_align`` (aligned, adaptive sampling) reads for
    boxes from ``lo`` to ``hi`` cut into ``size`` bins of an axis of ``limit`` pixels: (n, size, 2G) each, G the
    most samples per bin of any box, bin i of box r being ``sum_t weight[r, i, t] * source[index[r, i, t]]``.

    As the kernel (``roi_align_kernel.cpp``): g = ceil(side / size) samples per bin at ``lo - 0.5 + i * bin +
    (j + 0.5) * bin / g``, in its float32 arithmetic; a sample outside [-1, limit] counts 0 (the kernel drops a
    sample when either of its coordinates is outside, which is the product of the two axes' weights), is clamped
    at 0, and reads its two neighbours by distance (the last index alone, whose two weights then sum to 1); each
    weighs 1 / g (the kernel divides by gy * gx, the product again). Slots past a box's g weigh 0."""
    start = lo - 0.5
    side = (hi - 0.5) - start
    bin_, grid = (side / size)[:, None, None], _grid(lo, hi, size)[:, None, None]
    G = max(int(grid.max()), 1)
    i = torch.arange(size, dtype=lo.dtype)[:, None]
    j = torch.arange(G, dtype=lo.dtype)
    count = grid.clamp(min=1)  # a box of no samples (a side <= 0) reads nothing, as in the kernel
    pos = start[:, None, None] + i * bin_ + (j + 0.5) * bin_ / count  # (n, size, G)
    keep = ((pos >= -1) & (pos <= limit) & (j < grid)).to(lo.dtype) / count
    pos = pos.clamp(0, limit)  # what lies outside counts 0 anyway
    low = pos.long().clamp(max=limit - 1)
    frac = pos - low
    index = torch.stack([low, (low + 1).clamp(max=limit - 1)], dim=-1).flatten(2)
    weight = (torch.stack([1 - frac, frac], dim=-1) * keep[..., None]).flatten(2)
    return index, weight


def _separable_crops(source: torch.Tensor, rois: torch.Tensor, size: int, out: torch.Tensor,
                     slots: list[int]) -> None:
    """roi_align's crops of a float32 ``source`` into ``out[slots]`` as two ``embedding_bag`` passes per box: the
    box's rows (each output row a weighted sum of source rows), then, transposed, its columns.

    The row pass reads a contiguous table, as ``embedding_bag`` over a column slice of a wider table is several
    times slower: for a box that reads at most ``NARROW`` of the source's width, a copy of the rows and columns
    it reads; for a wider one, the whole rows of its image, in place (the copy would cost more than the columns
    it saves)."""
    _, C, H, W = source.shape
    y_index, y_weight = _taps(rois[:, 2], rois[:, 4], size, H)
    x_index, x_weight = _taps(rois[:, 1], rois[:, 3], size, W)
    (y0, y1), (x0, x1) = _span(y_index, y_weight, H), _span(x_index, x_weight, W)
    wide = ((x1 - x0) > NARROW * W) & ((x1 - x0) < W)  # a box reading whole rows has a contiguous block already
    channel = torch.arange(C)[None, :, None, None]

    def bags(index: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        """(n, C, size, T): the rows of a box's (C * extent, ...) table that its taps read, extent = hi - lo."""
        inside = torch.minimum((index - lo[:, None, None]).clamp(min=0), (hi - lo - 1)[:, None, None])
        return channel * (hi - lo)[:, None, None, None] + inside[:, None]

    row_bags, col_bags = bags(y_index, y0, y1), bags(x_index, x0, x1)
    if bool(wide.any()):  # the rows of every image in place, as one table (a copy where they are not so laid out)
        B = source.shape[0]
        table, starts = row_table(source)
        planes = starts.view(B, C)[rois[:, 0].long()]  # (n, C): the table row where each box's channel starts
        first = planes.amin(dim=1)  # box r reads table rows [first, last) only: its image's
        last = planes.amax(dim=1) + H
        row_bags = torch.where(wide[:, None, None, None], (planes - first[:, None])[:, :, None, None]
                               + y_index[:, None], row_bags)
        y0, y1 = torch.where(wide, first, y0), torch.where(wide, last, y1)
    y_weight, x_weight = (w.repeat(1, C, 1) for w in (y_weight, x_weight))  # (n, C * size, 2G)
    with torch.autocast("cpu", enabled=False):
        for r, (slot, b, t, e, a, z, full) in enumerate(zip(slots, rois[:, 0].long().tolist(), y0.tolist(),
                                                             y1.tolist(), x0.tolist(), x1.tolist(), wide.tolist(),
                                                             strict=True)):
            # a wide box: table rows [t, e), whole; else the box's rows and columns (copied unless contiguous)
            block = table[t:e] if full else source[b, :, t:e, a:z].reshape(C * (e - t), z - a)
            rows = F.embedding_bag(row_bags[r].view(C * size, -1), block, mode="sum",
                                   per_sample_weights=y_weight[r])  # (C * size, w or more): the crop's rows
            rows = rows.view(C, size, -1)[..., a:z] if full else rows.view(C, size, z - a)
            columns = rows.transpose(1, 2).reshape(C * (z - a), size)  # a row per column
            cut = F.embedding_bag(col_bags[r].view(C * size, -1), columns, mode="sum",
                                  per_sample_weights=x_weight[r])  # (C * size, size): row j is the crop's column j
            out[slot] = cut.view(C, size, size).transpose(1, 2)


def _span(index: torch.Tensor, weight: torch.Tensor, limit: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The indices [lo, hi) of an axis of ``limit`` pixels that (n, size, T) taps (:func:`_taps`) read with a
    non-zero weight, per box (n,): at least one index, inside the axis."""
    reads = weight != 0
    lo = torch.where(reads, index, limit).amin(dim=(1, 2)).clamp(max=limit - 1)
    return lo, torch.maximum(torch.where(reads, index, -1).amax(dim=(1, 2)) + 1, lo + 1)


def crop_align(source: torch.Tensor, rois: torch.Tensor, size: int) -> torch.Tensor:
    """``roi_align`` (aligned, adaptive sampling) of ``rois`` on ``source`` -> (n, C, size, size).

    Args:
        source: (B, C, H, W) the image the boxes are cut from.
        rois: (n, 5) batch index, x1, y1, x2, y2 in ``source`` pixels, the dtype of ``source``.
        size: the side of each crop.

    On the CPU, for a float32 source that needs no gradient: boxes whose bins are one source pixel are cut as
    shifts (:func:`_unit_crops`), the others as two ``embedding_bag`` passes (:func:`_separable_crops`); the
    crops are roi_align's to float rounding, in the boxes' order. Elsewhere, and in a graph ``torch.compile``
    traces, it is one call.
    """
    if (not CPU_WAYS or torch.compiler.is_compiling() or source.device.type != "cpu" or source.requires_grad
            or source.dtype != torch.float32 or rois.shape[0] == 0):
        return _align(source, rois, (size, size))
    H, W = source.shape[-2:]
    *y_taps, unit_y = _unit_taps(rois[:, 2], rois[:, 4], size, H)
    *x_taps, unit_x = _unit_taps(rois[:, 1], rois[:, 3], size, W)
    unit = (unit_y & unit_x).tolist()
    out = source.new_empty(rois.shape[0], source.shape[1], size, size)
    shifts, others = [i for i, u in enumerate(unit) if u], [i for i, u in enumerate(unit) if not u]
    if shifts:
        pick = torch.tensor(shifts) if others else slice(None)
        _unit_crops(source, rois[pick], size, [t[pick] for t in y_taps], [t[pick] for t in x_taps], out, shifts)
    if others:
        _separable_crops(source, rois[torch.tensor(others)] if shifts else rois, size, out, others)
    return out
