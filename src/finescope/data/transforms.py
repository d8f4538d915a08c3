"""Augmentation presets on full-resolution (3, H, W) uint8 tensors.

Microscopy has no canonical orientation, so flips and 90-degree rotations are label-preserving; colour jitter
stays mild because stain colour carries information. Resizing is the model's job (global view and crops), so
no preset changes the image size except by swapping H and W.

Example:
    >>> t = build_transform("microscopy", train=True)
    >>> t(torch.zeros(3, 460, 700, dtype=torch.uint8)).shape   # (3, 460, 700) or (3, 700, 460)
"""

from __future__ import annotations

import math
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


# RGB -> YIQ (NTSC); the hue of a colour is its angle in the I-Q (chroma) plane
_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], dtype=torch.float64)
_GREY = torch.tensor([0.2989, 0.587, 0.114], dtype=torch.float64)  # torchvision's rgb_to_grayscale weights


class ColourJitter(torch.nn.Module):
    """Brightness, contrast, saturation and hue jitter of a uint8 (3, H, W) image as ONE affine colour map.

    The factors are drawn as in torchvision's ``ColorJitter`` (brightness, contrast, saturation uniform in
    [1 - x, 1 + x]; hue uniform in [-x, x] of a full turn) and applied in that fixed order: brightness scales,
    contrast blends with the mean grey, saturation blends with each pixel's grey, and hue rotates the I-Q chroma
    plane of YIQ (the linear form of a hue shift; it keeps grey and luma). Brightness, saturation and hue are
    linear and contrast adds a constant, so the composition is ``M @ rgb + t``: one 3x3 product per pixel,
    ~5 ms for a 700x460 image on one core where torchvision's HSV hue step alone takes ~16 ms.
    """

    def __init__(self, brightness: float = 0.0, contrast: float = 0.0, saturation: float = 0.0, hue: float = 0.0):
        super().__init__()
        self.brightness, self.contrast, self.saturation, self.hue = brightness, contrast, saturation, hue

    @staticmethod
    def _factor(spread: float, centre: float = 1.0) -> float:
        return centre + spread * (2 * float(torch.rand(())) - 1) if spread > 0 else centre

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        b = self._factor(self.brightness)
        c = self._factor(self.contrast)
        s = self._factor(self.saturation)
        h = self._factor(self.hue, 0.0)
        saturate = s * torch.eye(3, dtype=torch.float64) + (1 - s) * _GREY.expand(3, 3)
        cos, sin = math.cos(2 * math.pi * h), math.sin(2 * math.pi * h)
        rotate = torch.tensor([[1, 0, 0], [0, cos, -sin], [0, sin, cos]], dtype=torch.float64)
        hue = torch.linalg.solve(_YIQ, rotate @ _YIQ)  # YIQ^-1 R YIQ
        matrix = (c * b) * (hue @ saturate)  # grey is a fixed point of both: the contrast offset passes unchanged
        x = img.reshape(3, -1).to(torch.float32)
        offset = (1 - c) * b * float(_GREY.to(torch.float32) @ x.mean(dim=1)) if c != 1 else 0.0
        out = torch.addmm(torch.full((3, 1), offset), matrix.to(torch.float32), x)
        return out.clamp_(0, 255).round_().to(torch.uint8).view_as(img)


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
    if name == "geometric":
        return v2.Compose(_geometric())
    if name == "microscopy":
        colour = [ColourJitter(brightness=0.1, contrast=0.1, saturation=0.1, hue=0.02)]
    else:
        colour = [
            ColourJitter(brightness=0.25, contrast=0.25, saturation=0.25, hue=0.05),
            v2.RandomApply([v2.GaussianBlur(kernel_size=5, sigma=(0.1, 1.5))], p=0.2),
        ]
    return v2.Compose(_geometric() + colour)


__all__ = ["PRESETS", "ColourJitter", "build_transform"]
