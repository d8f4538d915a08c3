"""Augmentation presets on full-resolution (3, H, W) uint8 tensors.

Microscopy has no canonical orientation, so flips and 90-degree rotations are label-preserving; colour jitter
stays mild because stain colour carries information. Resizing is the model's job (global view and crops), so
no preset changes the image size except by swapping H and W.

Example:
    >>> t = build_transform("microscopy", train=True)
    >>> t(torch.zeros(3, 460, 700, dtype=torch.uint8)).shape   # (3, 460, 700) or (3, 700, 460)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torchvision.transforms import v2

from finescope.errors import FinescopeError

PRESETS = ("none", "geometric", "microscopy", "strong")


class RandomRot90(torch.nn.Module):
    """Rotate by 0, 90, 180 or 270 degrees with equal probability; (3, H, W) -> (3, H, W) or (3, W, H)."""

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        k = int(torch.randint(0, 4, ()).item())
        return torch.rot90(img, k, dims=(-2, -1)) if k else img


class Identity(torch.nn.Module):
    """No change (evaluation and the ``none`` preset); a module so that DataLoader workers can pickle it."""

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return img


def _geometric() -> list[torch.nn.Module]:
    return [v2.RandomHorizontalFlip(p=0.5), v2.RandomVerticalFlip(p=0.5), RandomRot90()]


def build_transform(name: str, train: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """The augmentation preset ``name`` (``data.augment``) for training, or the identity for evaluation.

    Args:
        name: ``none`` (identity), ``geometric`` (flips and 90-degree rotations only, for data without stain
            variation), ``microscopy`` (flips, 90-degree rotations, colour jitter 0.1/0.1/0.1/0.02)
            or ``strong`` (the same with jitter 0.25/0.25/0.25/0.05 and Gaussian blur with probability 0.2).
        train: False gives the identity whatever the preset.

    Returns:
        A callable (3, H, W) uint8 -> (3, H', W') uint8 with (H', W') = (H, W) or (W, H).

    Raises:
        FinescopeError: an unknown preset name.
    """
    if name not in PRESETS:
        raise FinescopeError(f"config key 'data.augment' is '{name}'; choose one of: {', '.join(PRESETS)}")
    if not train or name == "none":
        return Identity()
    if name == "geometric":  # no colour jitter: ColorJitter's hue step costs ~1 s per 700x460 image on a CPU
        return v2.Compose(_geometric())
    if name == "microscopy":
        colour = [v2.ColorJitter(brightness=0.1, contrast=0.1, saturation=0.1, hue=0.02)]
    else:
        colour = [
            v2.ColorJitter(brightness=0.25, contrast=0.25, saturation=0.25, hue=0.05),
            v2.RandomApply([v2.GaussianBlur(kernel_size=5, sigma=(0.1, 1.5))], p=0.2),
        ]
    return v2.Compose(_geometric() + colour)


__all__ = ["PRESETS", "build_transform"]
