"""Faithfulness of explanation maps: deletion and insertion curves, hit rate and the pointing game.

Deletion / insertion (Petsiuk et al., "RISE", BMVC 2018): the image is cut into about square blocks
(:func:`~finescope.explain.maps.region_grid`), the blocks are ranked by the map's mean over each block, and in
``steps`` equal steps the most-attended blocks are first *removed* (replaced by a baseline image) or, starting
from the baseline, *revealed*. The probability of the explained class is recorded after each step; the area
under that curve over the removed/revealed fraction in [0, 1] is the score. A faithful map gives a low deletion
AUC and a high insertion AUC compared with a random block order, and compared with :func:`detail_map`, a map
made from the image alone: the blur baseline removes exactly the cells and texture a microscopy classifier
reads, so ranking blocks by how much detail they hold already beats the random order by far.

Hit rate and pointing game need ground truth (the synthetic set's atypical nuclei, ``cells.json``):

- a true nucleus is *hit* when its centre lies inside at least one of the K selected boxes; because a box
  covering the whole image would hit everything, :func:`box_coverage` reports the area the boxes cover
  (which is also the hit rate that boxes placed at random would expect);
- *pointing game* (Zhang et al., ECCV 2016): a map scores when its maximum lies within ``tolerance`` pixels of
  a true nucleus (inside its radius plus the tolerance; 15 px in the original paper). A flat map (zero
  everywhere, say) has no maximum: it neither scores nor misses, and explain counts it apart (``flat_maps``).

Boxes and map maxima are in the frame of the model's boxes (``roi_align(aligned=True)``), where pixel j spans
[j, j + 1) and its centre is j + 0.5; the synthetic set's ``cells.json`` gives a nucleus centre in pixel indices
(the generator stamps pixel j by its distance from j to the centre), so both metrics move it by half a pixel.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from finescope.errors import FinescopeError
from finescope.explain.maps import map_peak, region_grid, region_scores

BASELINES = ("blur", "mean")
PIXEL_CENTRE = 0.5  # a cells.json centre in pixel indices -> the boxes' frame, where pixel j's centre is j + 0.5


def baseline_image(image: torch.Tensor, kind: str = "blur", factor: int = 16) -> torch.Tensor:
    """What removed regions are replaced with.

    Args:
        image: (3, H, W) float in [0, 1].
        kind: ``blur`` (the image shrunk ``factor`` times with antialiasing and enlarged again: colours stay,
            texture and cells vanish) or ``mean`` (the image's mean colour).
        factor: the blur's shrink factor.

    Returns:
        (3, H, W) float.
    """
    if kind == "mean":
        return image.mean(dim=(1, 2), keepdim=True).expand_as(image).clone()
    if kind != "blur":
        raise FinescopeError(f"faithfulness baseline '{kind}' is unknown; choose one of: {', '.join(BASELINES)}")
    H, W = image.shape[-2:]
    small = F.interpolate(image[None], size=(max(1, H // factor), max(1, W // factor)), mode="bilinear",
                          antialias=True, align_corners=False)
    return F.interpolate(small, size=(H, W), mode="bilinear", align_corners=False)[0]


def detail_map(image: torch.Tensor, baseline: torch.Tensor, window: int = 1) -> torch.Tensor:
    """The model-free control map ``detail``: (H, W) ``|image - baseline|`` averaged over the channels and over a
    ``window`` x ``window`` neighbourhood, i.e. where replacing a region by the baseline changes it most (with
    the blur baseline: edges, texture, nuclei).

    It knows nothing of the model, yet ranks first the blocks whose removal changes the image most, which a
    classifier reading cells notices: a map that is not better than ``detail`` in deletion and insertion shows
    no more about the model than the image's own detail does. The window (explain uses the size of a deletion
    block) makes its maximum that of a region, not of one noisy pixel, so that its pointing game is a fair one.
    """
    change = (image - baseline).abs().mean(dim=0)
    if window <= 1:
        return change
    H, W = change.shape
    pooled = F.avg_pool2d(change[None, None], window, stride=1, padding=window // 2, count_include_pad=False)
    return pooled[0, 0, :H, :W]


def rank_blocks(scores: torch.Tensor, tie_order: torch.Tensor | None = None) -> torch.Tensor:
    """(R,) block scores -> (R,) rank of every block (0 = most attended).

    Blocks of equal score (the zero blocks of a Grad-CAM map, about 30% of a demo image's blocks; every block
    of a flat map) go in ``tie_order``, an (R,) permutation of the blocks (:func:`map_curves` passes its first
    random order), so that a tie counts as no information; without it they keep block order, top-left first,
    which favours whatever evidence sits there. A NaN score (a map holding NaN has no maximum either:
    :func:`~finescope.explain.maps.map_peak`) ranks below every number, NaN blocks among themselves as ties.
    """
    scores = torch.where(scores.isnan(), float("-inf"), scores)  # sort would put NaN first, as most attended
    if tie_order is None:
        order = torch.sort(scores, descending=True, stable=True).indices
    else:
        order = tie_order[torch.sort(scores[tie_order], descending=True, stable=True).indices]
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order))
    return rank


@torch.no_grad()
def class_probability(model, images: torch.Tensor, target: int, predict_with: str = "fused",
                      batch_size: int = 16) -> torch.Tensor:
    """Probability of class ``target`` for a stack of images (N, 3, H, W) -> (N,), in batches."""
    device = next(model.parameters()).device
    out = [model(images[i:i + batch_size].to(device)).probabilities(predict_with)[:, target].float().cpu()
           for i in range(0, len(images), batch_size)]
    return torch.cat(out)


CURVE_BATCH_BYTES = 512 * 2**20  # the perturbed copies of an image one forward pass of a curve reads, at most


def perturbation_curve(model, image: torch.Tensor, rank_map: torch.Tensor, n_regions: int, target: int,
                       baseline: torch.Tensor, mode: str = "deletion", steps: int = 10,
                       ends: tuple[float, float] | None = None, predict_with: str = "fused") -> np.ndarray:
    """Probability of class ``target`` as the top-ranked blocks are removed (or revealed).

    Args:
        model: a finescope model in eval mode (its device is used).
        image: (3, H, W) float in [0, 1].
        rank_map: (H, W) long rank of the block each pixel belongs to (0 = first to go).
        n_regions: R, the number of blocks.
        target: class index.
        baseline: (3, H, W) what removed pixels become (``deletion``) or where ``insertion`` starts.
        mode: ``deletion`` or ``insertion``.
        steps: T; step t switches the first round(t * R / T) blocks.
        ends: the probabilities at t = 0 and t = T when already known (they are the same for every order:
            the image and the baseline), saving two forward passes.

    Returns:
        (T + 1,) probabilities, from t = 0 (nothing switched) to t = T (everything).
    """
    if mode not in ("deletion", "insertion"):
        raise ValueError(f"mode must be 'deletion' or 'insertion', got {mode!r}")
    counts = torch.round(torch.arange(steps + 1) * n_regions / steps).long()  # (T+1,)
    if ends is not None:
        counts = counts[1:-1]
    first, second = (baseline, image) if mode == "deletion" else (image, baseline)
    per_batch = max(1, CURVE_BATCH_BYTES // max(1, image.numel() * image.element_size()))
    probs = []
    for chunk in counts.split(per_batch):  # all of a large image's perturbed copies at once would take GBs
        switched = (rank_map[None] < chunk[:, None, None])[:, None]  # (n, 1, H, W)
        batch = torch.where(switched, first[None], second[None])  # (n, 3, H, W)
        probs.append(class_probability(model, batch, target, predict_with).numpy())
    probs = np.concatenate(probs)
    return np.concatenate([[ends[0]], probs, [ends[1]]]) if ends is not None else probs


def _ends(model, image, baseline, target, predict_with) -> dict[str, tuple[float, float]]:
    p_image, p_base = class_probability(model, torch.stack([image, baseline]), target, predict_with).tolist()
    return {"deletion": (p_image, p_base), "insertion": (p_base, p_image)}


def curve_auc(curve: np.ndarray) -> float:
    """Area under a curve sampled at T + 1 equally spaced fractions of [0, 1] (trapezoid rule)."""
    y = np.asarray(curve, dtype=np.float64)
    return float(((y[1:] + y[:-1]) / 2).mean()) if len(y) > 1 else float(y[0])


def map_curves(model, image: torch.Tensor, heats: dict[str, torch.Tensor], target: int, baseline: torch.Tensor,
               grid: int = 16, steps: int = 10, repeats: int = 1, seed: int = 0,
               predict_with: str = "fused") -> dict[str, dict[str, np.ndarray]]:
    """Deletion and insertion curves of several maps and of ``repeats`` random orders (seeded, averaged).

    A map's blocks go in the order of their mean score, blocks of equal score in the first random order (the
    same for every map: a flat map scores what that order does; :func:`rank_blocks`).

    Args:
        image: (3, H, W) float in [0, 1].
        heats: method -> (H, W) map.
        baseline: (3, H, W), see :func:`baseline_image`.
        repeats: random orders; 0 = no random baseline.

    Returns:
        {method or ``random``: {``deletion``/``insertion``: (T + 1,) probabilities}}.
    """
    blocks, R = region_grid(tuple(image.shape[-2:]), grid)
    ends = _ends(model, image, baseline, target, predict_with)
    gen = torch.Generator().manual_seed(seed)
    random_ranks = [torch.randperm(R, generator=gen) for _ in range(max(repeats, 1))]  # (R,) rank of each block
    randoms = [rank[blocks] for rank in random_ranks[:repeats]]  # (H, W) each
    ties = torch.argsort(random_ranks[0])  # the blocks in the first random order, for the ties of every map
    ranks = {m: rank_blocks(region_scores(h, blocks, R), ties)[blocks] for m, h in heats.items()}  # (H, W) each
    curves = {}
    for name, rank_maps in [*((m, [r]) for m, r in ranks.items()), *([("random", randoms)] if randoms else [])]:
        curves[name] = {mode: np.mean([perturbation_curve(model, image, r, R, target, baseline, mode, steps,
                                                          ends[mode], predict_with) for r in rank_maps], axis=0)
                        for mode in ("deletion", "insertion")}
    return curves


def hit_count(boxes: torch.Tensor, cells) -> tuple[int, int]:
    """(hits, total): true nuclei [[cx, cy, r], ...] (``cells.json``, pixel indices) whose centre lies inside at
    least one (K, 4) box."""
    if not cells:
        return 0, 0
    c = torch.tensor([[x, y] for x, y, _ in cells], dtype=torch.float32) + PIXEL_CENTRE  # (n, 2)
    b = boxes.float()[None]  # (1, K, 4)
    inside = (c[:, None, 0] >= b[..., 0]) & (c[:, None, 0] <= b[..., 2]) & (c[:, None, 1] >= b[..., 1]) & (
        c[:, None, 1] <= b[..., 3])  # (n, K)
    return int(inside.any(dim=1).sum()), len(cells)


def box_coverage(boxes: torch.Tensor, size: tuple[int, int]) -> dict[str, float]:
    """How much of the (H, W) image the (K, 4) boxes cover.

    Returns:
        ``union``: fraction of pixels inside any box (the hit rate expected of randomly placed nuclei);
        ``largest``: the largest single box's area fraction.
    """
    H, W = size
    covered = torch.zeros(H, W, dtype=torch.bool)
    largest = 0.0
    for x1, y1, x2, y2 in boxes.round().long().tolist():
        covered[max(y1, 0):max(y2, 0), max(x1, 0):max(x2, 0)] = True
        largest = max(largest, (x2 - x1) * (y2 - y1) / (H * W))
    return {"union": float(covered.float().mean()), "largest": float(largest)}


def pointing_hit(heat: torch.Tensor, cells, tolerance: float = 15.0) -> bool | None:
    """Pointing game: does the (H, W) map's maximum lie within ``r + tolerance`` of a true nucleus ([[cx, cy, r],
    ...] as ``cells.json``, pixel indices)? None if no nucleus, or if the map is flat and so has no maximum
    (:func:`~finescope.explain.maps.map_peak`)."""
    peak = map_peak(heat)
    if not cells or peak is None:
        return None
    y, x = peak[0] + 0.5, peak[1] + 0.5
    return any(np.hypot(x - cx - PIXEL_CENTRE, y - cy - PIXEL_CENTRE) <= r + tolerance for cx, cy, r in cells)


__all__ = ["BASELINES", "baseline_image", "box_coverage", "class_probability", "curve_auc", "hit_count", "map_curves",
           "perturbation_curve", "pointing_hit", "rank_blocks"]
