"""Figures: translucent maps with ranked boxes and colour bars, crops, per-image panels and overlay grids.

The heat map is drawn with an opacity that grows with its value, so that weakly attended tissue stays
visible instead of being tinted by the cold end of the colour map.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import torch

from finescope.explain.maps import attention_to_image, normalise_map
from finescope.explain.methods import explains_class
from finescope.files import write_bytes

BOX_COLOURS = ("#ffffff", "#00e5ff", "#ffea00", "#ff6d00", "#d500f9", "#2979ff", "#ff1744", "#c6ff00")
TRUTH_COLOUR = "#00ff00"
MAX_FIGURE_INCHES = 60.0  # an image panel figure at most this wide (6,000 px at explain's 100 dpi)
NORMALISE_LABEL = {"max": "per-image max = 1", "percentile": "per-image {p:g}th percentile = 1, clipped"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def mass_text(mass) -> str:
    """A box's attention mass as figures and the gallery show it: 2 significant digits, so that a box holding 0.0004
    of the attention does not read as one holding none (0.00)."""
    return f"{float(mass):.2g}"


def draw_overlay(ax, image: np.ndarray, heat: np.ndarray | None, boxes=None, mass=None, title: str = "",
                 circles=None, alpha: float = 0.6, cmap: str = "turbo"):
    """Draw one image with a translucent heat map, ranked boxes and optional ground-truth circles.

    Args:
        ax: a matplotlib axis.
        image: (H, W, 3) uint8.
        heat: (H, W) map in [0, 1] or None; its opacity is ``alpha * heat``.
        boxes: (K, 4) x1, y1, x2, y2 in pixels, in rank order; labelled ``rank (mass)``.
        mass: (K,) attention mass of each box.
        circles: [[cx, cy, r], ...] ground-truth positions to circle.
        alpha: opacity where the map is 1.
        cmap: matplotlib colour map.

    Returns:
        The image artist of the heat map (for a colour bar), or None.
    """
    from matplotlib.patches import Circle, Rectangle

    ax.imshow(image)
    artist = None
    if heat is not None:
        artist = ax.imshow(heat, cmap=cmap, alpha=np.clip(heat, 0, 1) * alpha, vmin=0, vmax=1)
    for k, b in enumerate(boxes if boxes is not None else []):
        # boxes span [j, j + 1) for pixel j (roi_align's frame); imshow draws pixel j from j - 0.5 to j + 0.5
        x1, y1, x2, y2 = (float(v) - 0.5 for v in b)
        colour = BOX_COLOURS[k % len(BOX_COLOURS)]
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=colour, linewidth=1.6))
        label = f"{k + 1}" + (f" ({mass_text(mass[k])})" if mass is not None else "")
        ax.text(x1 + 2, y1 + 2, label, color="black", fontsize=7, va="top",
                bbox={"facecolor": colour, "alpha": 0.85, "pad": 1, "edgecolor": "none"})
    for cx, cy, r in circles or []:
        ax.add_patch(Circle((cx, cy), r * 1.6, fill=False, edgecolor=TRUTH_COLOUR, linewidth=1.4, linestyle="--"))
    ax.set_title(title, fontsize=8, parse_math=False)  # a file or class name as written, as the figure's title
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
    plt = _pyplot()
    rows = max(1, int(np.ceil(len(items) / columns)))
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 3.4 * rows), squeeze=False)
    artist = None
    for ax, item in zip(axes.flat, items, strict=False):  # more axes than items
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
    path = save_figure(fig, path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def verdict(expl) -> str:
    """``pred malignant 0.93 | true benign (wrong)`` for a figure title or a gallery caption."""
    names = expl.class_names
    text = f"pred {names[expl.predicted]} {expl.confidence:.2f}"
    if expl.label is not None:
        text += f" | true {names[expl.label]} ({'correct' if expl.correct else 'WRONG'})"
    return text


def map_title(expl, method: str) -> str:
    """A map panel's title: the method and, for a map of one class (the gradient CAMs), that class and whether it
    is the predicted or the true one (``gradcam: malignant (true class)``): with ``target='true'`` a mistake's
    CAM shows the evidence for the true class, not the reason for the prediction."""
    if not explains_class(method):
        return method
    roles = [role for role, c in (("predicted", expl.predicted), ("true", expl.label)) if c == expl.target]
    return f"{method}: {expl.class_names[expl.target]}" + (f" ({', '.join(roles)} class)" if roles else "")


def _crop_panel(fig, cell, expl) -> None:
    """The K crops in rank order, framed in their box colour, in a 2-column sub-grid of ``cell``."""
    K = expl.crops.shape[0]
    sub = cell.subgridspec(int(np.ceil(K / 2)), 2, wspace=0.05, hspace=0.25)
    for k in range(K):
        ax = fig.add_subplot(sub[k // 2, k % 2])
        ax.imshow(expl.crops[k].permute(1, 2, 0).numpy())
        mass = f" ({mass_text(expl.box_mass[k])})" if expl.box_mass is not None else ""
        ax.set_title(f"crop {k + 1}{mass}", fontsize=7)
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_edgecolor(BOX_COLOURS[k % len(BOX_COLOURS)])
            spine.set_linewidth(2.5)


def save_explanation_figure(expl, path: str | Path, normalise: str = "max", percentile: float = 99.0,
                            circles=None, title: str = "", dpi: int = 100) -> Path:
    """One image's panel: the image, one overlay per method (boxes, ranks, masses, colour bar; titled with the
    class a CAM explains, :func:`map_title`), the crops.

    Args:
        expl: an :class:`~finescope.explain.methods.Explanation`.
        path: the PNG to write.
        normalise: ``max`` or ``percentile`` (see :func:`normalise_map`).
        percentile: used by ``percentile``.
        circles: ground-truth [[cx, cy, r], ...] drawn as dashed circles.
        title: first line of the title (e.g. the file name); the prediction follows.
    """
    plt = _pyplot()
    image = expl.image.permute(1, 2, 0).numpy()  # (H, W, 3)
    H, W = image.shape[:2]
    methods = list(expl.maps)
    has_crops = expl.crops is not None and len(expl.crops) > 0
    ratios = [W / H] * (1 + len(methods)) + ([1.0] if has_crops else [])
    width, height = 3.0 * sum(ratios) + 0.6 * len(methods), 3.4
    if width > MAX_FIGURE_INCHES:  # a thin strip: panels as wide as the image's aspect would make no picture
        width, height = MAX_FIGURE_INCHES, max(1.6, height * MAX_FIGURE_INCHES / width)
    fig = plt.figure(figsize=(width, height))
    grid = fig.add_gridspec(1, len(ratios), width_ratios=ratios, wspace=0.3)
    draw_overlay(fig.add_subplot(grid[0]), image, None, title="image", circles=circles)
    for i, m in enumerate(methods):
        ax = fig.add_subplot(grid[1 + i])
        heat = expl.normalised(m, normalise, percentile)
        artist = draw_overlay(ax, image, heat, expl.boxes, expl.box_mass, title=map_title(expl, m), circles=circles)
        fig.colorbar(artist, ax=ax, fraction=0.046, pad=0.02).ax.tick_params(labelsize=6)
    if has_crops:
        _crop_panel(fig, grid[-1], expl)
    scale = f"maps: {NORMALISE_LABEL[normalise].format(p=percentile)}"
    # a file or class name as written: '$' in one ('cost $5 and $6.png') is no mathtext to typeset, or fail on
    fig.suptitle("\n".join([*([title] if title else []), f"{verdict(expl)}   ({scale})"]), fontsize=9, y=1.02,
                 parse_math=False)
    path = save_figure(fig, path, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return path


def save_image(array: np.ndarray | torch.Tensor, path: str | Path) -> Path:
    """Write a (3, L, L) float [0, 1] / uint8 tensor or an (L, L, 3) uint8 array as a PNG."""
    from PIL import Image

    if isinstance(array, torch.Tensor):
        t = array.detach().cpu()
        t = t if t.dtype == torch.uint8 else (t.float().clamp(0, 1) * 255).round().to(torch.uint8)
        array = t.permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buf, format="PNG")
    return _write_whole(path, buf.getvalue())


def save_figure(fig, path: str | Path, **savefig_kwargs) -> Path:
    """``fig.savefig(path, ...)`` in the format of ``path``'s suffix, written whole or not at all: a full disk
    leaves the previous file (or none), never a truncated image (:func:`finescope.files.write_bytes`). A title
    whose characters the font lacks (a file or class name in Chinese, an emoji) is drawn as far as the font goes,
    without matplotlib's two-line warning per missing character."""
    path = Path(path)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Glyph .* missing from font", category=UserWarning)
        fig.savefig(buf, format=path.suffix.lstrip(".").lower() or "png", **savefig_kwargs)
    return _write_whole(path, buf.getvalue())


def _write_whole(path: str | Path, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes(path, data)
    return path


__all__ = ["draw_overlay", "map_title", "mass_text", "save_explanation_figure", "save_figure", "save_image", "save_overlay_grid",
           "verdict"]
