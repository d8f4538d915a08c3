"""Explanation maps on the full-resolution image: upsampling, normalisation, regions and peak boxes.

Every map here is an (H, W) float tensor over the image's own pixels, non-negative, on its own scale (an
attention map sums to about 1, a CAM lies in [0, 1]). Functions are pure: no model, no file.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from finescope.errors import FinescopeError

NORMALISATIONS = ("max", "percentile")


def attention_to_image(attn: torch.Tensor, cell_px: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Upsample one attention map smoothly (bicubic) onto its full-resolution image.

    Args:
        attn: (h, w) attention of one image (zero on padded cells).
        cell_px: (2,) height and width of one cell in pixels.
        size: (H, W) of the image.

    Returns:
        (H, W) float map (same total mass up to interpolation, not renormalised), non-negative.
    """
    H, W = size
    ch, cw = float(cell_px[0]), float(cell_px[1])
    hv = min(attn.shape[0], max(1, int(np.ceil(H / ch - 1e-6))))
    wv = min(attn.shape[1], max(1, int(np.ceil(W / cw - 1e-6))))
    valid = attn[:hv, :wv].detach().float().cpu()[None, None]
    big = F.interpolate(valid, size=(max(H, round(hv * ch)), max(W, round(wv * cw))), mode="bicubic", align_corners=False)
    return big[0, 0, :H, :W].clamp(min=0)


def normalise_map(m: np.ndarray | torch.Tensor, how: str = "max", percentile: float = 99.0) -> np.ndarray:
    """Scale one map to [0, 1] for display.

    Args:
        m: (H, W) map.
        how: ``max`` (the image's maximum -> 1) or ``percentile`` (its ``percentile``-th percentile -> 1, values
            above are clipped, so that one hot spot does not leave the rest of the map cold; a map whose
            percentile is its minimum, positive on fewer pixels than that, is scaled by its maximum).
        percentile: used by ``percentile``.

    Returns:
        (H, W) float32 array in [0, 1].
    """
    if how not in NORMALISATIONS:
        raise FinescopeError(f"normalisation '{how}' is unknown; choose one of: {', '.join(NORMALISATIONS)}")
    if not 0 < percentile <= 100:
        raise FinescopeError(f"percentile must be in (0, 100], got {percentile}")
    m = np.asarray(m.detach().cpu() if isinstance(m, torch.Tensor) else m, dtype=np.float32)
    lo = float(m.min())
    hi = float(np.percentile(m, percentile)) if how == "percentile" else float(m.max())
    if hi <= lo:  # a map positive on under 100 - percentile % of its pixels: its percentile is its minimum
        hi = float(m.max())
    return np.clip((m - lo) / max(hi - lo, 1e-12), 0, 1).astype(np.float32)


def region_grid(size: tuple[int, int], grid: int) -> tuple[torch.Tensor, int]:
    """Cut an image into about square blocks: ``grid`` blocks along the short side.

    Args:
        size: (H, W).
        grid: number of blocks along the short side (>= 1); at most one per pixel of it (a shorter side gets
            blocks of one pixel, never empty ones).

    Returns:
        (H, W) long block index of every pixel (row-major) and the number of blocks R.
    """
    H, W = size
    side = min(H, W) / min(grid, H, W)
    nh, nw = max(1, round(H / side)), max(1, round(W / side))
    rows = (torch.arange(H) * nh // H)[:, None]  # (H, 1)
    cols = (torch.arange(W) * nw // W)[None, :]  # (1, W)
    return rows * nw + cols, nh * nw


def region_scores(heat: torch.Tensor, blocks: torch.Tensor, n_regions: int) -> torch.Tensor:
    """Mean of ``heat`` (H, W) over each block of ``blocks`` (H, W) -> (R,)."""
    flat = blocks.flatten()
    total = torch.zeros(n_regions).scatter_add_(0, flat, heat.detach().float().cpu().flatten())
    count = torch.zeros(n_regions).scatter_add_(0, flat, torch.ones(flat.shape[0]))
    return total / count.clamp(min=1)


def map_peak(heat: torch.Tensor) -> tuple[int, int] | None:
    """Row and column of the map's maximum (the first in row-major order when several pixels share it).

    A flat map (every value equal, such as a Grad-CAM that is zero everywhere) has no maximum to point at, nor
    has a map holding NaN: None, where ``argmax`` would name the top-left pixel.

    Args:
        heat: (H, W) map.

    Returns:
        (y, x) pixel indices, or None for a flat map.
    """
    if heat.numel() == 0 or not bool(heat.max() > heat.min()):  # False for NaN too
        return None
    flat = int(heat.flatten().argmax())
    return flat // heat.shape[1], flat % heat.shape[1]


def peak_box(heat: torch.Tensor, side: float) -> torch.Tensor | None:
    """A square box of ``side`` pixels centred on the map's maximum, shifted inside the image.

    Args:
        heat: (H, W) map.
        side: box side in pixels (clipped to the image).

    Returns:
        (4,) float x1, y1, x2, y2; None for a flat map, which has no maximum (:func:`map_peak`).
    """
    H, W = heat.shape
    peak = map_peak(heat)
    if peak is None:
        return None
    cy, cx = peak[0] + 0.5, peak[1] + 0.5
    out = []
    for c, limit in ((cx, W), (cy, H)):
        s = min(side, limit)
        lo = min(max(c - s / 2, 0.0), limit - s)
        out.append((lo, lo + s))
    (x1, x2), (y1, y2) = out
    return torch.tensor([x1, y1, x2, y2], dtype=torch.float32)


__all__ = ["NORMALISATIONS", "attention_to_image", "map_peak", "normalise_map", "peak_box", "region_grid",
           "region_scores"]
