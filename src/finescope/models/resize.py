"""Antialiased bilinear resizing, ``F.interpolate(mode="bilinear", antialias=True)``, faster on the CPU.

ATen's CPU kernel for the antialiased resize resizes the columns of every input row first, then the rows, each
output value a scalar loop over its taps. For a downscale most of its time goes to the first pass, over all the
input rows. Resizing the rows first is an ``embedding_bag``: each output row is the weighted sum of a few input rows,
and torch runs that vectorised along the row. :func:`resize_aa` does that with ATen's own weights (computed as
ATen computes them, to the bit), then leaves the columns to ATen, which then has fewer rows to go through. The
result is ATen's to float rounding (the two passes run in the other order). A 1536x2048 image to 672x896 took
5.3 instead of 8.2 ms on this project's 2-core CPU (``benchmarks/resize_cost.py``).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


@functools.lru_cache(maxsize=64)
def aa_taps(in_size: int, out_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The taps of ATen's antialiased bilinear resize of one axis from ``in_size`` to ``out_size`` samples
    (align_corners=False): the input index (out_size, T) int64 and weight (out_size, T) float32 of every tap, T
    the most taps of any output, unused taps with weight 0 (and a valid index). Cached per pair of sizes: the
    tensors are shared, not to be modified.

    The arithmetic is ATen's (``_compute_weights_aa`` in UpSampleKernel.cpp), in the same float and double steps:
    a triangle filter of half-width ``max(scale, 1)`` around ``scale * (i + 0.5)``, normalised per output.
    """
    f32, f64 = torch.float32, torch.float64
    scale = torch.tensor(in_size, dtype=f32) / torch.tensor(out_size, dtype=f32)
    down = bool(scale >= 1.0)
    support = scale if down else torch.tensor(1.0, dtype=f32)
    invscale = (1.0 / scale.double()).float() if down else torch.tensor(1.0, dtype=f32)
    center = (scale.double() * (torch.arange(out_size, dtype=f64) + 0.5)).float()  # (out,)
    first = ((center - support).double() + 0.5).trunc().long().clamp(min=0)
    count = ((center + support).double() + 0.5).trunc().long().clamp(max=in_size) - first
    k = torch.arange(int(count.max()))
    index = first[:, None] + k  # (out, T)
    arg = (((index.float() - center[:, None]).double() + 0.5) * invscale.double()).float()
    weight = (1.0 - arg.abs().double()).float().clamp(min=0)
    weight = torch.where(k < count[:, None], weight, torch.zeros((), dtype=f32))
    total = torch.zeros(out_size, dtype=f32)
    for t in range(weight.shape[1]):  # summed tap by tap, as ATen does
        total = total + weight[:, t]
    weight = weight / torch.where(total != 0, total, torch.ones((), dtype=f32))[:, None]
    return index.clamp(max=in_size - 1), weight


def row_table(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of a (B, C, H, W) tensor as one 2-D table (rows, R), R >= W the row stride, and the table row
    where each (b, c) plane starts (B*C,). The table reads ``x``'s storage in place (a slice of a padded batch
    too); where the rows are not laid out so (channels-last, a column stride other than 1) it reads a
    contiguous copy."""
    B, C, H, W = x.shape
    sb, sc, sh, sw = x.stride()
    if sw != 1 or sh < W or sc % sh or sb % sh:
        return row_table(x.contiguous())
    starts = (torch.arange(B)[:, None] * (sb // sh) + torch.arange(C) * (sc // sh)).flatten()  # (B*C,)
    rows = int(starts.max()) + H
    if x.storage_offset() + rows * sh > x.untyped_storage().nbytes() // x.element_size():
        return row_table(x.contiguous())
    return x.as_strided((rows, sh), (sh, 1)), starts


def resize_aa(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``F.interpolate(x, size, mode="bilinear", antialias=True)`` of a (B, C, H, W) float tensor -> (B, C, h, w).

    On the CPU, for a float32 tensor that needs no gradient and fewer rows out than in, the rows are resized
    first with one ``embedding_bag`` over the input's rows (no copy of a slice of a padded batch), then the
    columns by ATen. Elsewhere, and while ``torch.compile`` traces, it is ``F.interpolate``.
    """
    h, w = size
    H = x.shape[-2]
    if (x.device.type != "cpu" or x.dtype != torch.float32 or x.requires_grad or h >= H or x.numel() == 0
            or torch.compiler.is_compiling()):
        return F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
    rows, starts = row_table(x)
    B, C, _, W = x.shape
    index, weight = aa_taps(H, h)  # (h, T)
    bags = (starts[:, None, None] + index).view(-1, index.shape[1])  # (B*C*h, T) rows of the table
    with torch.autocast("cpu", enabled=False):
        out = F.embedding_bag(bags, rows, mode="sum", per_sample_weights=weight.repeat(B * C, 1))
    out = out.view(B, C, h, rows.shape[1])[..., :W]  # (B, C, h, W)
    if w == W:
        return out.contiguous()
    return F.interpolate(out, size=size, mode="bilinear", antialias=True, align_corners=False)
