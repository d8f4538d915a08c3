"""Explanations: attention maps on the full-resolution image, overlays with the selected boxes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def attention_to_image(attn: torch.Tensor, cell_px: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Upsample one attention map smoothly onto its full-resolution image.

    Args:
        attn: (h, w) attention of one image (zero on padded cells).
        cell_px: (2,) height and width of one cell in pixels.
        size: (H, W) of the image.

    Returns:
        (H, W) float map (same total mass up to interpolation, not renormalised).
    """
    H, W = size
    ch, cw = float(cell_px[0]), float(cell_px[1])
    hv = min(attn.shape[0], max(1, int(np.ceil(H / ch - 1e-6))))
    wv = min(attn.shape[1], max(1, int(np.ceil(W / cw - 1e-6))))
    valid = attn[:hv, :wv].float()[None, None]
    big = F.interpolate(valid, size=(max(H, round(hv * ch)), max(W, round(wv * cw))), mode="bicubic", align_corners=False)
    return big[0, 0, :H, :W].clamp(min=0)


def normalise_map(m: np.ndarray, how: str = "max", percentile: float = 99.0) -> np.ndarray:
    """Scale a map to [0, 1]: by its maximum (``max``) or by a high percentile (``percentile``), clipped."""
    lo = float(m.min())
    hi = float(np.percentile(m, percentile)) if how == "percentile" else float(m.max())
    return np.clip((m - lo) / max(hi - lo, 1e-12), 0, 1)


def draw_overlay(ax, image: np.ndarray, heat: np.ndarray | None, boxes=None, mass=None, title: str = "",
                 circles=None, alpha: float = 0.45, cmap: str = "jet"):
    """Draw one image with a translucent heat map, ranked boxes and optional ground-truth circles.

    Args:
        ax: a matplotlib axis.
        image: (H, W, 3) uint8.
        heat: (H, W) map in [0, 1] or None.
        boxes: (K, 4) x1, y1, x2, y2 in pixels, in rank order.
        mass: (K,) attention mass of each box.
        circles: [[cx, cy, r], ...] ground-truth positions to circle.

    Returns:
        The image artist of the heat map (for a colour bar), or None.
    """
    from matplotlib.patches import Circle, Rectangle

    ax.imshow(image)
    artist = None
    if heat is not None:
        artist = ax.imshow(heat, cmap=cmap, alpha=alpha, vmin=0, vmax=1)
    for k, b in enumerate(boxes if boxes is not None else []):
        x1, y1, x2, y2 = (float(v) for v in b)
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor="white", linewidth=1.6))
        label = f"{k + 1}" + (f" ({float(mass[k]):.2f})" if mass is not None else "")
        ax.text(x1 + 2, y1 + 2, label, color="black", fontsize=7, va="top",
                bbox={"facecolor": "white", "alpha": 0.8, "pad": 1, "edgecolor": "none"})
    for cx, cy, r in circles or []:
        ax.add_patch(Circle((cx, cy), r * 1.6, fill=False, edgecolor="lime", linewidth=1.4, linestyle="--"))
    ax.set_title(title, fontsize=8)
    ax.axis("off")
    return artist


def save_overlay_grid(items: list[dict], path: str | Path, columns: int = 4, normalise: str = "max") -> Path:
    """Save a grid of overlays.

    Args:
        items: dicts with ``image`` (H, W, 3) uint8, ``attention`` (h, w) tensor or None, ``cell_px``, ``boxes``,
            ``mass``, ``title`` and optional ``circles``.
        path: the PNG to write.
        columns: images per row.
        normalise: ``max`` or ``percentile`` scaling of each map.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = max(1, int(np.ceil(len(items) / columns)))
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 3.4 * rows), squeeze=False)
    artist = None
    for ax, item in zip(axes.flat, items):
        heat = None
        if item.get("attention") is not None:
            H, W = item["image"].shape[:2]
            heat = normalise_map(attention_to_image(item["attention"], item["cell_px"], (H, W)).numpy(), normalise)
        artist = draw_overlay(ax, item["image"], heat, item.get("boxes"), item.get("mass"), item.get("title", ""),
                              item.get("circles")) or artist
    for ax in list(axes.flat)[len(items):]:
        ax.axis("off")
    if artist is not None:
        fig.colorbar(artist, ax=axes.ravel().tolist(), shrink=0.6, label="attention (per-image scale)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
