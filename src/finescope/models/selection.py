"""Instance selection: an attention map on the feature grid -> K boxes on the full-resolution image.

method.md step 5. The map, upsampled (bilinear) to the image, normalised by its maximum and thresholded at
tau; connected components give boxes; each box is grown to a minimum side and clipped to the image; the K boxes
with the largest attention mass are kept. With fewer than K components the remaining boxes are centred on the
highest remaining attention peaks, skipping any whose IoU with a box already taken exceeds ``iou_threshold``.

method.md thresholds the map at every pixel. By default (``components="exact"``, ``model.selection_components``)
the components and their boxes are those of the bilinear map itself, found on the feature grid
(:func:`_exact_components`): the same as every pixel's, up to the pixels' own rounding, at a cost that does not
grow with the image. The masses that rank them and the fallback peaks are read on a grid of ``upsample`` points
per cell (``model.selection_upsample``, 4). ``components="grid"`` (the selection before ``selection_components``
existed) thresholds and labels that grid itself, 8-connected: an approximation, as a diagonal link between two
points of the coarse grid can join components that the pixels keep apart across a saddle near tau, and a box
edge moves by up to a grid step. ``benchmarks/selection_grid.py`` measures how far each way's boxes are from
those of a grid as fine as the pixels, on a trained model's maps (RESULTS.md, "The selection's grid").

On a CPU the cost is the number of small operations and how fast each one is. There the components are
labelled by ``scipy.ndimage.label`` in one call, and the boxes are held as coordinate planes (the x1 of every
box in one row, its y1 in the next, ...), so that each operation runs along the boxes rather than along their
four coordinates. On a 2-core Intel Xeon VM the selection for one 1536x2048 image took 0.68-0.74 instead of
0.89-0.95 ms, and for a batch of 16 BreakHis images 1.9-2.0 instead of 3.7-4.3 ms, with the same boxes
(``benchmarks/results/cpu_selection_8fcd74d_vs_4cd8e3b``).

On a GPU this runs on tiny tensors, so its cost is the number of kernels launched, not arithmetic: every step
below is batched over images, components, boxes and peaks, and the only host-device sync is the convergence
test of the component labelling (once per call for ordinary attention maps). In eager mode on CUDA the whole
selection is, by default, captured once per input shape as a CUDA graph and replayed: one launch instead of
about 165 (counted on CUDA for the grid's components; the exact ones take about 80 operations more, counted on
the CPU by ``benchmarks/selection_cost.py``). The graph runs the labelling's first ``GRAPH_ROUNDS`` rounds and
tests convergence on the device; when a map needs more rounds the call runs again without the graph, so the
boxes are always the exact ones.
:func:`select_boxes_deferred` leaves that flag unread, for a caller that can go on with the boxes and read it
later (the model reads it once its whole forward pass is queued, ``FineScopeNet.forward``).

Runs under ``torch.no_grad``: selection is not differentiable.
"""

from __future__ import annotations

import collections
import functools
import warnings

import numpy as np
import torch
import torch.nn.functional as F

from finescope.errors import FinescopeWarning

COMPILED_ROUNDS = 8  # labelling rounds under torch.compile (see _connected_components)
GRAPH_ROUNDS = COMPILED_ROUNDS  # labelling rounds inside a CUDA graph (see _GraphedSelect)
GRAPH_CACHE = 16  # CUDA graphs kept (one per input shape and arguments), least recently used dropped first


def _grid(H: int, W: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Constants of an H x W grid: cell numbers 1..H*W (1, 1, H, W) float; each cell's corners as
    [-c, -r, c + 1, r + 1] (4, H*W) float (row r, column c), whose maxima over a component are its bounding box
    with x1 and y1 negated; and each cell's centre [c + 0.5, r + 0.5] (2, H*W). Cached, except while
    torch.compile traces (it folds them into the graph) or a CUDA graph is captured."""
    if torch.compiler.is_compiling() or (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        return _make_grid(H, W, device)  # a CUDA graph makes its own: it must not read memory it does not own
    return _cached_grid(H, W, device)


def _make_grid(H: int, W: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    index = torch.arange(1, H * W + 1, dtype=torch.float32, device=device).view(1, 1, H, W)
    r = torch.arange(H, dtype=torch.float32, device=device)[:, None].expand(H, W).reshape(-1)  # no sync to size it
    c = torch.arange(W, dtype=torch.float32, device=device).repeat(H)
    return index, torch.stack([-c, -r, c + 1, r + 1]), torch.stack([c, r]) + 0.5


_cached_grid = functools.lru_cache(maxsize=32)(_make_grid)


def _cells_inside(valid: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, h, w) bool: the cells of each image's own ``valid`` (B, 2) rows and columns, not its padding."""
    return (torch.arange(h, device=valid.device)[None, :, None] < valid[:, 0, None, None]) \
        & (torch.arange(w, device=valid.device)[None, None, :] < valid[:, 1, None, None])


def _fill_padding(attn: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Replace padded cells by their nearest valid cell so that upsampling does not fade the edges.

    attn: (B, h, w); valid: (B, 2) number of valid rows and columns of each image.
    """
    B, h, w = attn.shape
    rows = torch.minimum(torch.arange(h, device=attn.device), valid[:, 0:1] - 1)  # (B, h)
    cols = torch.minimum(torch.arange(w, device=attn.device), valid[:, 1:2] - 1)  # (B, w)
    b = torch.arange(B, device=attn.device)[:, None, None]
    return attn[b, rows[:, :, None], cols[:, None, :]]  # (B, h, w)


def _run_ids(mask: torch.Tensor, dim: int) -> torch.Tensor:
    """Number every run of True along ``dim`` (3 = rows, 2 = columns) of a (B, 1, H, W) mask: a distinct id
    >= 1 per run over the whole batch, 0 on False."""
    m = mask.transpose(2, 3) if dim == 2 else mask
    # a run's first cell; out of place: torch 2.14's Inductor on the CPU emits C++ that does not compile for the
    # in-place ``start[..., 1:] &= ~m[..., :-1]`` on a transposed mask computed in the graph
    start = m & ~F.pad(m[..., :-1], (1, 0))
    ids = start.reshape(-1).cumsum(0).view(m.shape) * m
    return (ids.transpose(2, 3) if dim == 2 else ids).contiguous()


def _connected_components(binary: torch.Tensor, first_check: int = 4, rounds: int | None = None,
                          report: bool = False, eight: bool = True) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Label 8-connected (``eight``, else 4-connected) components of a (B, H, W) bool grid; each component gets
    its largest cell number (1-based row-major index).

    One round spreads labels to the 8 neighbours (a 3x3 max-pool; not for 4-connectivity, which the runs
    cover), then along every horizontal run and every vertical run of the component at once (a max per run),
    so blob-like components are labelled in two or three rounds. Convergence (a round that changes nothing) is
    tested, a host-device sync on CUDA, after ``first_check`` rounds and then after every round, so the result
    is exact for any shape; the default 4 makes the usual case one sync, as confirming convergence after three
    rounds takes a fourth anyway.
    With ``rounds`` set, exactly that many rounds run and nothing is tested (no sync, one static graph for
    ``torch.compile``); a component that needs more rounds (a long winding one) then keeps more than one label.
    With ``report`` as well, it also returns a 0-dim bool tensor, computed on the device without a sync: True
    when the last round changed nothing, so the labels are the exact ones.
    """
    B, H, W = binary.shape
    mask = binary.unsqueeze(1)
    maskf = mask.float()
    labels = _grid(H, W, binary.device)[0] * maskf  # (B, 1, H, W)
    runs = [_run_ids(mask, 3).view(-1), _run_ids(mask, 2).view(-1)]
    n = B * H * W + 1
    converged = None
    for step in range(H * W if rounds is None else rounds):
        new = F.max_pool2d(labels, 3, 1, 1) * maskf if eight else labels
        for ids in runs:
            new = new.new_zeros(n).scatter_reduce_(0, ids, new.view(-1), "amax")[ids].view_as(labels)
        if rounds is None and step + 1 >= first_check and torch.equal(new, labels):
            break
        if report and step + 1 == rounds:
            converged = (new == labels).all()
        labels = new
    labels = labels.view(B, H, W).long()  # (B, H, W), 0 = background
    return (labels, converged) if report else labels


_EIGHT_IN_PLANE = np.zeros((3, 3, 3), dtype=bool)
_EIGHT_IN_PLANE[1] = True  # 8-connectivity within each image of a (B, H, W) stack, none across images
_FOUR_IN_PLANE = np.zeros((3, 3, 3), dtype=bool)
_FOUR_IN_PLANE[1, 1, :] = _FOUR_IN_PLANE[1, :, 1] = True  # 4-connectivity within each image


def _components_on_host(binary: torch.Tensor, eight: bool = True) -> torch.Tensor:
    """:func:`_connected_components` of a CPU tensor by ``scipy.ndimage.label``: one pass over the grid instead of
    rounds of small operations, with the same labels (each component its largest cell number)."""
    from scipy import ndimage

    B, H, W = binary.shape
    structure = _EIGHT_IN_PLANE if eight else _FOUR_IN_PLANE
    ids, n = ndimage.label(binary.numpy(), structure=structure)  # 1..n over the whole batch, 0 = background
    ids = torch.from_numpy(ids).view(-1).long()
    cell = _grid(H, W, binary.device)[0].view(1, H * W).expand(B, H * W).reshape(-1)
    largest = cell.new_zeros(n + 1).scatter_reduce_(0, ids, cell, "amax")
    largest[:1] = 0  # background cells stay 0
    return largest[ids].view(B, H, W).long()



def _label(binary: torch.Tensor, graph_rounds: int | None, eight: bool = True,
           ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """8-connected (``eight``, else 4-connected) components of a (B, H, W) bool grid, each labelled by its largest
    cell number, by the means that suit the caller: fixed rounds with their convergence flag (a CUDA graph),
    fixed rounds (torch.compile), ``scipy.ndimage.label`` (CPU) or rounds tested for convergence (another
    device)."""
    if graph_rounds is not None:
        return _connected_components(binary, rounds=graph_rounds, report=True, eight=eight)
    if torch.compiler.is_compiling():
        return _connected_components(binary, rounds=COMPILED_ROUNDS, eight=eight), None
    if binary.device.type == "cpu":
        return _components_on_host(binary, eight), None
    return _connected_components(binary, eight=eight), None


def _exact_constants(h: int, w: int, upsample: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Constants of :func:`_exact_components` for a map of h x w cells: on its doubled grid of (2h + 3) x (2w + 3)
    (ring-padded nodes, the edges between them, the squares), each point's [-x, -y, x, y] in cells (4, N), an
    edge's from the node it starts at; a (N,) mask that is 0 on the squares; and the position across its square
    (0..1) of each of the ``upsample`` fine-grid columns in a square (upsample,). Cached as :func:`_grid` is."""
    if torch.compiler.is_compiling() or (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        return _make_exact_constants(h, w, upsample, device)
    return _cached_exact_constants(h, w, upsample, device)


def _make_exact_constants(h: int, w: int, upsample: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    y = (torch.arange(2 * h + 3, device=device) // 2).float() - 0.5  # a node row's, or its edges' first node's
    x = (torch.arange(2 * w + 3, device=device) // 2).float() - 0.5
    y, x = y[:, None].expand(-1, 2 * w + 3), x.expand(2 * h + 3, -1)
    odd_y, odd_x = torch.arange(2 * h + 3, device=device) % 2, torch.arange(2 * w + 3, device=device) % 2
    not_square = 1 - (odd_y[:, None] * odd_x).reshape(-1)
    position = (torch.arange(upsample, device=device) + (0.5 if upsample % 2 == 0 else 0.0)) / upsample
    return torch.stack([-x, -y, x, y]).reshape(4, -1), not_square, position


_cached_exact_constants = functools.lru_cache(maxsize=32)(_make_exact_constants)


def _exact_components(nodes, fine, fine_in, threshold, cell_px, sizes, k, graph_rounds, inside=None):
    """Components and boxes of the map's bilinear interpolant itself, thresholded as if at every pixel
    (method.md), not on a grid of sample points: ``components="exact"`` of :func:`select_boxes`.

    The interpolant is bilinear between the centres of the feature cells (the nodes) and constant beyond the
    outer ones, so it is ring-padded by one node (a copy of its neighbour) and then bilinear everywhere. Within a
    square of four nodes the part at or above tau is connected through the square's corners at or above it, with
    one exception: two diagonal corners above and two below are joined only when the saddle of the bilinear patch,
    (ad - bc) / (a + d - b - c), is at or above tau (the asymptotic decider of marching squares). So the
    components are labelled, 4-connected, on a grid twice as fine as the nodes: the nodes above tau, the edges
    with an end above (the part of the edge at that end is above), and the squares with a corner above, unless
    the saddle keeps their corners apart. Two cells of that grid touch only through a node above that both
    reach, so they join only what the map joins; and every path the map's part above tau takes runs through
    them. Along a row or a column the labels spread in one step (a max per run), so a component takes about as
    many rounds as its outline has turns, fewer than a diagonal chain of 8-connected points would.

    The box of a component reaches its nodes and, on each edge from one of its nodes to a node below, the point
    where the edge crosses tau (linear along an edge; the extreme x or y of the part above tau in a square lies
    on its edges); it is clipped to the image.
    Components are ranked by their mass on the fine grid (``upsample`` points per cell), each fine point above
    tau counted in the component of its square (in a saddle square, of the edge on its side of the saddle): the
    fine points of a square are a block of ``upsample`` x ``upsample``, so the masses are summed per square, then
    per component. One too small to hold a fine point ranks after every one that holds one, by its nodes'
    attention.

    Args:
        nodes: (B, h, w) the map scaled to [0, 1] (``normalise``), padding filled by its nearest valid cell.
        fine: (B, H', W') the unscaled map on the fine grid, zero on padding: the mass.
        fine_in: (B, H', W') bool, the fine points at or above tau (and valid).
        cell_px: (B, 2) height and width of a feature cell in pixels; sizes: (B, 2) the image's height and width.
        graph_rounds: see :func:`_label`.
        inside: (B, h, w) bool, each image's own cells (:func:`_cells_inside`), None when all are: a rank by the
            nodes' attention counts an image's own nodes, not the copies of its edge that fill its padding.

    Returns:
        The boxes as planes (B, 4, k') x1, y1, x2, y2 in pixels of the k' = min(k, P + 1) best-ranked components,
        their rank keys (B, k'), above 0 for a component, 0 for a slot that is none, -1 for the background, and
        the labelling's convergence flag (or None).
    """
    B, h, w = nodes.shape
    u = fine.shape[1] // h
    corner, not_square, position = _exact_constants(h, w, u, nodes.device)
    v = F.pad(nodes.unsqueeze(1), (1, 1, 1, 1), mode="replicate")  # (B, 1, h + 2, w + 2)
    # on the doubled grid, each point's greatest node: a node's own, an edge's two, a square's four
    doubled = F.max_pool2d(F.interpolate(v, scale_factor=2.0, mode="nearest"), 2, 1).squeeze(1) >= threshold
    v = v.squeeze(1)
    up = doubled[:, ::2, ::2]
    a, b, c, d = v[:, :-1, :-1], v[:, :-1, 1:], v[:, 1:, :-1], v[:, 1:, 1:]  # each square's corners (B, h+1, w+1)
    ua, ub, uc, ud = up[:, :-1, :-1], up[:, :-1, 1:], up[:, 1:, :-1], up[:, 1:, 1:]
    diagonal = (ua == ud) & (ub == uc) & (ua != ub)  # two opposite corners above, two below
    e = (a - b - c + d).where(diagonal, 1.0)  # nonzero on such squares
    apart = diagonal & ((a * d - b * c) / e < threshold)  # their saddle below tau
    doubled[:, 1::2, 1::2] &= ~apart
    labels, converged = _label(doubled, graph_rounds, eight=False)  # (B, 2h + 3, 2w + 3), 0 below tau
    # every point that bounds a box: the nodes, and the points where edges with an end above cross tau (within
    # the edge: one with both ends above adds nothing to the box of its nodes); its label is the edge's
    step = [v[:, :, 1:] - v[:, :, :-1], v[:, 1:] - v[:, :-1]]
    cross = [((threshold - v[:, :, :-1]) / step[0].where(step[0] != 0, 1.0)).clamp(0, 1),
             ((threshold - v[:, :-1]) / step[1].where(step[1] != 0, 1.0)).clamp(0, 1)]
    shift = v.new_zeros(B, 2, 2 * h + 3, 2 * w + 3)
    shift[:, 0, ::2, 1::2] = cross[0]
    shift[:, 1, 1::2, ::2] = cross[1]
    planes = corner + torch.cat([-shift, shift], dim=1).view(B, 4, -1)  # -x, -y, x, y in cells
    P = labels.shape[1] * labels.shape[2]
    extremes = v.new_full((B, 4, P + 1), -1e9)
    extremes.scatter_reduce_(2, (labels.view(B, 1, P) * not_square).expand(B, 4, P), planes, "amax")
    # the mass of each square's block of fine points above tau (the blocks are offset by half a cell), split in a
    # saddle square at the saddle's x, (a - c) / e, between the components of its left and right edges
    before = (u + 1) // 2
    block = F.pad(fine * fine_in, (before, u - before, before, u - before)).view(B, h + 1, u, w + 1, u).sum(dim=2)
    left_of = position < ((a - c) / e).where(apart, 2.0)[..., None]  # (B, h + 1, w + 1, u)
    left = (block * left_of).sum(dim=3)
    halves = torch.stack([left, block.sum(dim=3) - left], dim=1)  # the right half 0 (or rounding) off saddles
    square = labels[:, 1::2, 1::2]
    owner = torch.stack([torch.where(apart, labels[:, 1::2, :-1:2], square),
                         torch.where(apart, labels[:, 1::2, 2::2], square)], dim=1)
    mass = fine.new_zeros(B, P + 1).scatter_add_(1, owner.view(B, -1), halves.view(B, -1).float())
    if inside is not None:
        nodes = nodes * inside
    small = fine.new_zeros(B, P + 1).scatter_add_(1, labels[:, 2:-2:2, 2:-2:2].reshape(B, -1),
                                                  nodes.reshape(B, -1).float())
    # those holding a fine point by their mass (itself: mass + 1 in float32 would keep only about 1e-7 of it), then
    # the others by their nodes' attention, each below the least of those masses
    least = mass[:, 1:].masked_fill(mass[:, 1:] <= 0, float("inf")).amin(dim=1, keepdim=True).clamp(max=1.0)
    rank = torch.where(mass > 0, mass, small / (small[:, 1:].sum(dim=1, keepdim=True) + 1.0) * least)
    rank[:, 0] = -1.0  # background slot
    rank, slot = rank.topk(min(k, P + 1), dim=1)
    cell = cell_px.flip(1).float()  # (B, 2) width, height
    box = extremes.gather(2, slot[:, None].expand(-1, 4, -1)) * torch.cat([-cell, cell], dim=1)[:, :, None]
    limit = sizes.flip(1).float()[:, :, None]  # (B, 2, 1) width, height
    lo = box[:, :2].clamp(min=0)
    hi = torch.minimum(box[:, 2:], limit)
    return torch.cat([torch.minimum(lo, limit), torch.maximum(hi, lo.new_zeros(()))], dim=1), rank, converged


def _grow_and_clip(lo: torch.Tensor, hi: torch.Tensor, min_side: torch.Tensor, limit: torch.Tensor,
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Grow boxes to ``min_side`` (B,) per side, shift them inside the image, clip them to it.

    Boxes are coordinate planes: ``lo`` (B, 2, S) their x1 and y1, ``hi`` their x2 and y2, ``limit`` (B, 2, 1)
    the image's width and height. Returns the new ``lo`` and ``hi``.
    """
    side = torch.maximum(hi - lo, torch.minimum(min_side[:, None, None], limit))
    lo = ((lo + hi) / 2 - side / 2).clamp(min=0)
    lo = torch.minimum(lo, limit - side).clamp(min=0)
    return lo, torch.minimum(lo + side, limit)


def _component_boxes(labels, fine, cell_xy, k):
    """Boxes as planes (B, 4, k') x1, y1, x2, y2 in pixels and attention mass (B, k') of the k' = min(k, P + 1)
    components with the largest mass (slots that are no component have mass 0, the background -1); ``cell_xy``
    (B, 2) is the width and height of a fine-grid cell in pixels."""
    B, H, W = labels.shape
    P = H * W
    flat = labels.view(B, 1, P)
    corners = _grid(H, W, labels.device)[1]  # (4, P): -c, -r, c + 1, r + 1
    extremes = labels.new_full((B, 4, P + 1), -float(P + 1), dtype=torch.float32)
    extremes.scatter_reduce_(2, flat.expand(B, 4, P), corners.expand(B, 4, P), "amax")
    mass = fine.new_zeros(B, P + 1).scatter_add_(1, flat[:, 0], fine.reshape(B, P).float())
    mass[:, 0] = -1.0  # background slot
    mass, slot = mass.topk(min(k, P + 1), dim=1)
    signed_cell = torch.cat([-cell_xy, cell_xy], dim=1)[:, :, None]  # (B, 4, 1): the negated x1, y1 back
    return extremes.gather(2, slot[:, None].expand(-1, 4, -1)) * signed_cell, mass


def _peak_centres(fine_norm, valid_fine, cell_xy):
    """The centre of every fine-grid point (B, 2, P) x, y in pixels, and its score (B, P): the normalised map,
    -1 on padding."""
    B, H, W = fine_norm.shape
    centre = _grid(H, W, fine_norm.device)[2] * cell_xy[:, :, None]
    score = fine_norm if valid_fine is None else fine_norm.masked_fill(~valid_fine, -1.0)
    return centre, score.reshape(B, H * W)


def _iou(a_lo: torch.Tensor, a_hi: torch.Tensor, b_lo: torch.Tensor, b_hi: torch.Tensor) -> torch.Tensor:
    """IoU of boxes as planes (B, 2, P) against boxes (B, 2, K): (B, K, P)."""
    lt = torch.maximum(a_lo[:, None], b_lo.transpose(1, 2)[..., None])  # (B, K, 2, P)
    rb = torch.minimum(a_hi[:, None], b_hi.transpose(1, 2)[..., None])
    inter = (rb - lt).clamp(min=0).prod(dim=2)
    area_a = (a_hi - a_lo).clamp(min=0).prod(dim=1)  # (B, P)
    area_b = (b_hi - b_lo).clamp(min=0).prod(dim=1)  # (B, K)
    return inter / (area_a[:, None, :] + area_b[:, :, None] - inter).clamp(min=1e-9)


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
    return torch.einsum("bkh,bkw,bhw->bk", in_y.float(), in_x.float(), attn.float())


def _normalise(fine: torch.Tensor, valid_fine: torch.Tensor | None, how: str, other: torch.Tensor | None = None,
               ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Scale each (H', W') map to a peak of 1: by its maximum, or min-max over its valid points. A flat map (a 1x1
    feature map), which min-max would make 0 everywhere or its rounding noise, is scaled by its maximum. With
    ``other`` (B, ...) also returns it scaled as its image's map is."""
    peak = fine.flatten(1).amax(dim=1)[:, None, None]
    if how == "max":
        def scaled(x):
            return x / peak.view(-1, *[1] * (x.dim() - 1)).clamp(min=1e-12)
    elif how == "minmax":
        low = fine if valid_fine is None else fine.masked_fill(~valid_fine, float("inf"))
        low = low.flatten(1).amin(dim=1)[:, None, None]
        flat = peak - low <= 1e-6 * peak.abs() + 1e-12  # equal to float rounding (the upsampling's included)
        # a flat map: every point at the peak, as 'max' says
        low, span = low.masked_fill(flat, 0.0), torch.where(flat, peak, peak - low).clamp(min=1e-12)

        def scaled(x):
            shape = (-1, *[1] * (x.dim() - 1))
            return ((x - low.view(shape)) / span.view(shape)).clamp(min=0)
    else:
        raise ValueError(f"normalise must be 'max' or 'minmax', got {how!r}")
    out = scaled(fine)
    out = out if valid_fine is None else out * valid_fine
    return out if other is None else (out, scaled(other))


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
    padded: bool = True,
    graph: bool = True,
    components: str = "exact",
    peaks: str = "nodes",
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
        upsample: fine-grid points per feature cell along each axis: the grid of the components' masses and of
            the fallback peaks, and with ``components="grid"`` the grid thresholded and labelled.
        iou_threshold: peaks whose box overlaps a taken box by more than this are skipped.
        normalise: ``max`` divides the map by its maximum (method.md); ``minmax`` maps [min, max] to [0, 1]
            first, so a flat background at half the peak (common on small grids) stays below tau.
        padded: False when the caller knows every image fills the whole grid (``valid`` is (h, w) for all),
            which skips the padding masks; True is always correct.
        graph: on CUDA, outside torch.compile, replay a CUDA graph of the selection (the same boxes).
        components: ``exact``: the components and boxes of the bilinear map itself, as if thresholded at every
            pixel (:func:`_exact_components`); ``grid``: those of the ``upsample`` grid, 8-connected.
        peaks: where the fallback peaks may be centred: ``nodes``, on the ``upsample`` grid's points and on the
            feature cells' centres, where the bilinear map has its maxima; ``grid``, on the grid's points only.

    Returns:
        boxes: (B, K, 4) float x1, y1, x2, y2 in full-resolution pixels, ordered by rank.
        mass: (B, K) attention mass inside each box.
    """
    boxes, mass, exact = select_boxes_deferred(attn, valid, sizes, cell_px, k, threshold, min_box_fraction,
                                               upsample, iou_threshold, normalise, padded, graph, components, peaks)
    if exact is not None and not bool(exact):  # the one host-device sync
        boxes, mass, _ = select_boxes_deferred(attn, valid, sizes, cell_px, k, threshold, min_box_fraction,
                                               upsample, iou_threshold, normalise, padded, False, components, peaks)
    return boxes, mass


@torch.no_grad()
def select_boxes_deferred(
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
    padded: bool = True,
    graph: bool = True,
    components: str = "exact",
    peaks: str = "nodes",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """:func:`select_boxes` (the same arguments) without reading whether its CUDA graph's boxes are exact.

    Returns:
        boxes, mass: as :func:`select_boxes`.
        exact: None when the boxes are the exact ones; else (from the CUDA graph) a 0-dim bool on the device,
            unread: False when the graph's labelling rounds did not converge, and the caller must then select
            again with ``graph=False`` before it uses the boxes for anything it keeps.
    """
    inputs = (attn, valid, sizes, cell_px)
    options = (k, threshold, min_box_fraction, upsample, iou_threshold, normalise, padded, components, peaks)
    with torch.autocast(attn.device.type, enabled=False):  # float32 throughout, also inside an autocast region
        if graph and _graph_applies(attn, k):
            replayed = _GraphedSelect.replay(inputs, options)
            if replayed is not None:
                return replayed
        return (*_select(*inputs, *options), None)


def _graph_applies(attn: torch.Tensor, k: int) -> bool:
    """Whether the selection of ``attn`` can be replayed as a CUDA graph: on CUDA, eager, not while capturing."""
    return attn.is_cuda and k > 0 and not torch.compiler.is_compiling() \
        and not torch.cuda.is_current_stream_capturing()


class _GraphedSelect:
    """``_select`` captured as one CUDA graph for one key (device, input shapes and dtypes, options).

    Inputs are copied into the graph's own tensors, the graph is replayed and the outputs are cloned (the next
    replay overwrites them). The labelling runs ``GRAPH_ROUNDS`` rounds; the third output says, on the device,
    whether they converged (:func:`select_boxes_deferred`).
    """

    graphs: collections.OrderedDict = collections.OrderedDict()  # key -> _GraphedSelect, or None: capture failed

    def __init__(self, inputs: tuple[torch.Tensor, ...], options: tuple) -> None:
        device = inputs[0].device
        self.inputs = tuple(x.to(device).clone() for x in inputs)
        side = torch.cuda.Stream(device)  # warm up on a side stream, as torch.cuda.graph's documentation asks
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            _select(*self.inputs, *options, graph_rounds=GRAPH_ROUNDS)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: DataLoader's pin-memory thread may call the CUDA API while this thread captures
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.outputs = _select(*self.inputs, *options, graph_rounds=GRAPH_ROUNDS)

    @classmethod
    def replay(cls, inputs: tuple[torch.Tensor, ...], options: tuple) -> tuple[torch.Tensor, ...] | None:
        """Boxes, masses and the convergence flag (on the device, not read) from the graph of this key (captured on
        first use), or None: no graph."""
        key = (inputs[0].device, *((x.shape, x.dtype) for x in inputs), *options)
        if key in cls.graphs:
            cls.graphs.move_to_end(key)
            graphed = cls.graphs[key]
        else:
            try:
                graphed = cls(inputs, options)
            except RuntimeError as err:  # a driver or build without graph capture: select without it
                warnings.warn(f"instance selection runs without a CUDA graph: capture failed ({err})",
                              FinescopeWarning, stacklevel=3)
                graphed = None
            cls.graphs[key] = graphed
            while len(cls.graphs) > GRAPH_CACHE:
                cls.graphs.popitem(last=False)
        if graphed is None:
            return None
        for static, x in zip(graphed.inputs, inputs, strict=True):
            static.copy_(x, non_blocking=True)
        graphed.graph.replay()
        boxes, mass, converged = graphed.outputs
        return boxes.clone(), mass.clone(), converged.clone()  # a flag read later must not be the next replay's


def _select(attn, valid, sizes, cell_px, k, threshold, min_box_fraction, upsample, iou_threshold, normalise, padded,
            components="exact", peaks="nodes", graph_rounds=None):
    """The selection of ``select_boxes``. With ``graph_rounds`` the labelling runs exactly that many rounds and a
    third output says, on the device, whether they converged (what a CUDA graph of it needs: no sync)."""
    attn = attn.float()
    B, h, w = attn.shape
    if k == 0:
        return attn.new_zeros(B, 0, 4), attn.new_zeros(B, 0)
    sizes = sizes.to(attn.device)
    cell_px = cell_px.float()
    valid_fine = inside = None
    if padded:
        attn_in = _fill_padding(attn, valid)
        inside = _cells_inside(valid, h, w)  # (B, h, w)
        valid_fine = _cells_inside(valid * upsample, h * upsample, w * upsample)  # (B, H', W')
    nodes = attn_in if padded else attn

    def upsampled(x):
        x = F.interpolate(x.unsqueeze(1), scale_factor=upsample, mode="bilinear").squeeze(1)
        return x if valid_fine is None else x * valid_fine  # (B, H', W')

    fine = upsampled(nodes)
    cell_xy = (cell_px / upsample).flip(1)  # (B, 2) width and height of a fine cell in pixels
    if components == "exact":  # padding holds copies of valid cells: scaling all nodes scales the valid ones
        nodes = _normalise(nodes, None, normalise)
        fine_norm, nodes_norm = upsampled(nodes), nodes
    elif peaks == "nodes":  # the cells' own values, scaled as the grid's
        fine_norm, nodes_norm = _normalise(fine, valid_fine, normalise, other=nodes)
    else:
        fine_norm = _normalise(fine, valid_fine, normalise)
    binary = fine_norm >= threshold
    binary = binary if valid_fine is None else binary & valid_fine
    if components == "exact":
        comp, comp_mass, converged = _exact_components(nodes, fine, binary, threshold, cell_px, sizes, k,
                                                       graph_rounds, inside)
    elif components == "grid":
        labels, converged = _label(binary, graph_rounds)
        comp, comp_mass = _component_boxes(labels, fine, cell_xy, k)  # (B, 4, k'), (B, k')
    else:
        raise ValueError(f"components must be 'exact' or 'grid', got {components!r}")
    kc = comp.shape[2]
    centre, score = _peak_centres(fine_norm, valid_fine, cell_xy)  # (B, 2, P), (B, P)
    if peaks == "nodes":  # the cells' centres too, after the grid's points (which win a tie)
        centre = torch.cat([centre, _grid(h, w, attn.device)[2] * cell_px.flip(1)[:, :, None]], dim=2)
        if padded:
            nodes_norm = nodes_norm.masked_fill(~inside, -1.0)
        score = torch.cat([score, nodes_norm.reshape(B, h * w)], dim=1)
    elif peaks != "grid":
        raise ValueError(f"peaks must be 'nodes' or 'grid', got {peaks!r}")
    # Boxes as coordinate planes, the components' then every peak's (a point box on each fine-grid point), so
    # that each operation below runs along the P peaks, not along 4 coordinates.
    min_side = min_box_fraction * sizes.float().min(dim=1).values  # (B,)
    lo, hi = _grow_and_clip(torch.cat([comp[:, :2], centre], dim=2), torch.cat([comp[:, 2:], centre], dim=2),
                            min_side, sizes.flip(1).float()[:, :, None])
    comp_ok = comp_mass > 0  # (B, k'): a prefix, the masses being sorted
    # Peaks, greedily: the best-scoring peak whose box overlaps no box already taken by more than the IoU
    # threshold (the best of all when none is left). Components come first, so every peak is checked against
    # the used components at once, then against each peak taken. All peak boxes of an image have the same
    # size (side x side, area A), so for two of them IoU <= t  <=>  intersection <= 2 t A / (1 + t).
    peak_lo, peak_hi = lo[..., kc:], hi[..., kc:]  # (B, 2, P)
    side = peak_hi[..., :1] - peak_lo[..., :1]  # (B, 2, 1)
    most = (2 * iou_threshold / (1 + iou_threshold)) * side.prod(dim=1)  # (B, 1)
    overlaps = (_iou(peak_lo, peak_hi, lo[..., :kc], hi[..., :kc]) > iou_threshold) & comp_ok[:, :, None]
    ok = (score >= 0) & ~overlaps.any(dim=1)  # (B, P)
    fallback = score - 3.0  # valid peaks score >= 0, padding -1: the best valid one wins when none is ok
    peak_box = torch.cat([peak_lo, peak_hi], dim=1)  # (B, 4, P)
    peaks = []
    for i in range(k):
        pick = torch.where(ok, score, fallback).argmax(dim=1)
        peaks.append(peak_box.gather(2, pick[:, None, None].expand(-1, 4, 1)))  # (B, 4, 1)
        if i + 1 < k:
            inter = (side - (peak_lo - peaks[-1][:, :2]).abs()).clamp(min=0).prod(dim=1)  # (B, P)
            ok = ok & (inter <= most)
    # Box i is component i while there is one, then the (i - number of components)-th peak.
    slot = torch.arange(k, device=attn.device).expand(B, k)
    used = F.pad(comp_ok, (0, k - kc))
    slot = torch.where(used, slot, slot + k - comp_ok.sum(dim=1, keepdim=True))
    candidates = torch.cat([F.pad(torch.cat([lo[..., :kc], hi[..., :kc]], dim=1), (0, k - kc)), *peaks], dim=2)
    boxes = candidates.transpose(1, 2).gather(1, slot[..., None].expand(-1, -1, 4))  # (B, K, 4)
    mass = box_mass(attn, boxes, cell_px)
    return (boxes, mass) if graph_rounds is None else (boxes, mass, converged)
