"""Instance selection: an attention map on the feature grid -> K boxes on the full-resolution image.

method.md step 5. The map is upsampled (bilinear) to a fine grid of ``upsample`` points per feature cell and
each image's size, normalised by its maximum and thresholded at tau; 8-connected components give boxes; each
box is grown to a minimum side and clipped to the image; the K boxes with the largest attention mass are kept.
With fewer than K components the remaining boxes are centred on the highest remaining attention peaks,
skipping any whose IoU with a box already taken exceeds ``iou_threshold``. Thresholding on a grid a few times
finer than the feature map gives the same components as thresholding at every pixel (the upsampled map is
smooth), at a cost that does not grow with the image, and everything stays on the tensor's device.

Runs under ``torch.no_grad``: selection is not differentiable.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _fill_padding(attn: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Replace padded cells by their nearest valid cell so that upsampling does not fade the edges.

    attn: (B, h, w); valid: (B, 2) number of valid rows and columns of each image.
    """
    B, h, w = attn.shape
    rows = torch.arange(h, device=attn.device).expand(B, h)
    cols = torch.arange(w, device=attn.device).expand(B, w)
    rows = torch.minimum(rows, (valid[:, 0:1] - 1))  # (B, h)
    cols = torch.minimum(cols, (valid[:, 1:2] - 1))  # (B, w)
    b = torch.arange(B, device=attn.device)[:, None, None]
    return attn[b, rows[:, :, None], cols[:, None, :]]  # (B, h, w)


def _connected_components(binary: torch.Tensor, first_check: int | None = None) -> torch.Tensor:
    """Label 8-connected components of a (B, H, W) bool grid; each component gets its largest cell index + 1.

    Labels spread by one cell per 3x3 max-pool. Convergence is tested (a host-device sync on CUDA) only after
    ``first_check`` steps (default max(H, W): enough for any convex component, whose 8-connected geodesic
    diameter is at most max(H, W)) and then every 4 steps, so a step usually syncs once, and the result is
    exact for any shape.
    """
    B, H, W = binary.shape
    first_check = max(H, W) if first_check is None else first_check
    mask = binary.float()
    labels = torch.arange(1, H * W + 1, device=binary.device, dtype=torch.float32).view(1, H, W) * mask
    for step in range(H * W):
        new = F.max_pool2d(labels.unsqueeze(1), 3, 1, 1).squeeze(1) * mask
        if step >= first_check and step % 4 == 3 and torch.equal(new, labels):
            break
        labels = new
    return labels.long()  # (B, H, W), 0 = background


def _grow_and_clip(boxes: torch.Tensor, min_side: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """Grow (B, S, 4) x1y1x2y2 boxes to ``min_side`` (B,) per side, shift inside the image, clip to it."""
    H = sizes[:, 0, None].float()
    W = sizes[:, 1, None].float()
    m = min_side[:, None]
    out = []
    for lo, hi, limit in ((boxes[..., 0], boxes[..., 2], W), (boxes[..., 1], boxes[..., 3], H)):
        side = torch.maximum(hi - lo, torch.minimum(m, limit))
        centre = (lo + hi) / 2
        lo = (centre - side / 2).clamp(min=0)
        lo = torch.minimum(lo, limit - side).clamp(min=0)
        out.append((lo, torch.minimum(lo + side, limit)))
    (x1, x2), (y1, y2) = out
    return torch.stack([x1, y1, x2, y2], dim=-1)


def _component_boxes(labels, fine, cell_px, upsample):
    """Boxes (B, S, 4) in pixels and attention mass (B, S) of each component, sorted by mass."""
    B, H, W = labels.shape
    P = H * W
    flat = labels.view(B, P)
    r = torch.arange(H, device=labels.device).repeat_interleave(W).expand(B, P).float()
    c = torch.arange(W, device=labels.device).repeat(H).expand(B, P).float()
    big = float(P + 1)
    stats = []
    for values, reduce, init in ((r, "amin", big), (r, "amax", -1.0), (c, "amin", big), (c, "amax", -1.0)):
        buf = torch.full((B, P + 1), init, device=labels.device)
        stats.append(buf.scatter_reduce(1, flat, values, reduce=reduce, include_self=True))
    mass = torch.zeros(B, P + 1, device=labels.device).scatter_add(1, flat, fine.view(B, P).float())
    mass[:, 0] = -1.0  # background slot
    rmin, rmax, cmin, cmax = stats
    ch = cell_px[:, 0, None] / upsample
    cw = cell_px[:, 1, None] / upsample
    boxes = torch.stack([cmin * cw, rmin * ch, (cmax + 1) * cw, (rmax + 1) * ch], dim=-1)  # (B, P+1, 4)
    order = mass.argsort(dim=1, descending=True)
    boxes = boxes.gather(1, order[..., None].expand(-1, -1, 4))
    mass = mass.gather(1, order)
    return boxes, mass


def _peak_boxes(fine_norm, valid_fine, cell_px, upsample, min_side, sizes):
    """Boxes centred on every fine-grid point, sorted by attention (B, P, 4), and their validity (B, P)."""
    B, H, W = fine_norm.shape
    P = H * W
    score = fine_norm.masked_fill(~valid_fine, -1.0).view(B, P)
    order = score.argsort(dim=1, descending=True)
    r = (order // W).float() + 0.5
    c = (order % W).float() + 0.5
    cy = r * cell_px[:, 0, None] / upsample
    cx = c * cell_px[:, 1, None] / upsample
    centre = torch.stack([cx, cy, cx, cy], dim=-1)  # zero-size boxes, grown below
    boxes = _grow_and_clip(centre, min_side, sizes)
    return boxes, score.gather(1, order) >= 0


def _batched_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of (B, P, 4) boxes against (B, K, 4) boxes: (B, P, K)."""
    lt = torch.maximum(a[:, :, None, :2], b[:, None, :, :2])
    rb = torch.minimum(a[:, :, None, 2:], b[:, None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=-1)
    area_a = (a[..., 2:] - a[..., :2]).clamp(min=0).prod(dim=-1)
    area_b = (b[..., 2:] - b[..., :2]).clamp(min=0).prod(dim=-1)
    return inter / (area_a[:, :, None] + area_b[:, None, :] - inter).clamp(min=1e-9)


def _first_true(ok: torch.Tensor) -> torch.Tensor:
    """Index of the first True per row of a (B, P) bool tensor (0 when there is none)."""
    P = ok.shape[1]
    rank = torch.where(ok, torch.arange(P, device=ok.device).expand_as(ok), torch.full_like(ok, P, dtype=torch.long))
    idx = rank.min(dim=1).values
    return torch.where(idx == P, torch.zeros_like(idx), idx)


def box_mass(attn: torch.Tensor, boxes: torch.Tensor, cell_px: torch.Tensor) -> torch.Tensor:
    """Attention mass inside each box: the sum of the weights of feature cells whose centre lies in it.

    Args:
        attn: (B, h, w) attention, zero on padding.
        boxes: (B, K, 4) x1, y1, x2, y2 in pixels.
        cell_px: (B, 2) height and width of one feature cell in original pixels.

    Returns:
        (B, K) mass in [0, 1].
    """
    B, h, w = attn.shape
    cy = (torch.arange(h, device=attn.device).float() + 0.5)[None, :] * cell_px[:, 0:1]  # (B, h)
    cx = (torch.arange(w, device=attn.device).float() + 0.5)[None, :] * cell_px[:, 1:2]  # (B, w)
    in_y = (cy[:, None, :] >= boxes[..., 1:2]) & (cy[:, None, :] < boxes[..., 3:4])  # (B, K, h)
    in_x = (cx[:, None, :] >= boxes[..., 0:1]) & (cx[:, None, :] < boxes[..., 2:3])  # (B, K, w)
    inside = in_y[..., :, None] & in_x[..., None, :]  # (B, K, h, w)
    return (inside.float() * attn[:, None].float()).sum(dim=(-1, -2))


def _normalise(fine: torch.Tensor, valid_fine: torch.Tensor, how: str) -> torch.Tensor:
    """Scale each (H', W') map to a peak of 1: by its maximum, or min-max over its valid points."""
    peak = fine.flatten(1).amax(dim=1)[:, None, None]
    if how == "max":
        return fine / peak.clamp(min=1e-12)
    if how != "minmax":
        raise ValueError(f"normalise must be 'max' or 'minmax', got {how!r}")
    low = fine.masked_fill(~valid_fine, float("inf")).flatten(1).amin(dim=1)[:, None, None]
    return ((fine - low) / (peak - low).clamp(min=1e-12)).clamp(min=0) * valid_fine


@torch.no_grad()
def select_boxes(
    attn: torch.Tensor,
    valid: torch.Tensor,
    sizes: torch.Tensor,
    cell_px: torch.Tensor,
    k: int,
    threshold: float = 0.5,
    min_box_fraction: float = 1 / 3,
    upsample: int = 4,
    iou_threshold: float = 0.5,
    normalise: str = "max",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick K boxes per image from an attention map (method.md step 5).

    Args:
        attn: (B, h, w) attention weights (zero on padded cells).
        valid: (B, 2) long, the number of valid feature rows and columns of each image.
        sizes: (B, 2) the full-resolution height and width of each image, in pixels.
        cell_px: (B, 2) height and width of one feature cell in full-resolution pixels.
        k: number of boxes K.
        threshold: tau, applied to the max-normalised map.
        min_box_fraction: the minimum box side as a fraction of the image's short side.
        upsample: fine-grid points per feature cell along each axis.
        iou_threshold: peaks whose box overlaps a taken box by more than this are skipped.
        normalise: ``max`` divides the map by its maximum (method.md); ``minmax`` maps [min, max] to [0, 1]
            first, so a flat background at half the peak (common on small grids) stays below tau.

    Returns:
        boxes: (B, K, 4) float x1, y1, x2, y2 in full-resolution pixels, ordered by rank.
        mass: (B, K) attention mass inside each box.
    """
    attn = attn.float()
    B, h, w = attn.shape
    sizes = sizes.to(attn.device)
    fine = F.interpolate(_fill_padding(attn, valid).unsqueeze(1), scale_factor=upsample, mode="bilinear")
    fine = fine.squeeze(1)  # (B, h*u, w*u)
    rows = torch.arange(h * upsample, device=attn.device)
    cols = torch.arange(w * upsample, device=attn.device)
    valid_fine = (rows[None, :, None] < valid[:, 0, None, None] * upsample) & (
        cols[None, None, :] < valid[:, 1, None, None] * upsample
    )  # (B, H', W')
    fine = fine * valid_fine
    fine_norm = _normalise(fine, valid_fine, normalise)
    labels = _connected_components((fine_norm >= threshold) & valid_fine)
    comp_boxes, comp_mass = _component_boxes(labels, fine, cell_px, upsample)
    min_side = min_box_fraction * sizes.float().min(dim=1).values  # (B,)
    comp_boxes = _grow_and_clip(comp_boxes[:, :k], min_side, sizes)
    comp_ok = comp_mass[:, :k] > 0
    peak_boxes, peak_ok = _peak_boxes(fine_norm, valid_fine, cell_px, upsample, min_side, sizes)
    taken: list[torch.Tensor] = []
    for i in range(k):
        ok = peak_ok
        if taken:
            iou = _batched_iou(peak_boxes, torch.stack(taken, dim=1))  # (B, P, i)
            ok = ok & (iou <= iou_threshold).all(dim=-1)
        idx = _first_true(ok)
        peak_box = peak_boxes.gather(1, idx[:, None, None].expand(-1, 1, 4)).squeeze(1)
        use_comp = comp_ok[:, i] if i < comp_ok.shape[1] else torch.zeros(B, dtype=torch.bool, device=attn.device)
        comp_box = comp_boxes[:, i] if i < comp_boxes.shape[1] else peak_box
        taken.append(torch.where(use_comp[:, None], comp_box, peak_box))
    boxes = torch.stack(taken, dim=1) if taken else attn.new_zeros(B, 0, 4)
    return boxes, box_mass(attn, boxes, cell_px)
