"""Augmentation presets on full-resolution (3, H, W) uint8 tensors.

Microscopy has no canonical orientation, so flips and 90-degree rotations are label-preserving; colour jitter
stays mild because stain colour carries information. Resizing is the model's job (global view and crops), so
no preset changes the image size except by swapping H and W.

Example:
    >>> t = build_transform("microscopy", train=True)
    >>> t(torch.zeros(3, 460, 700, dtype=torch.uint8)).shape   # (3, 460, 700) or (3, 700, 460)
"""

from __future__ import annotations

import functools
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

    def sample(self) -> torch.Tensor:
        """Draw the factors and return the colour map as 10 float32 numbers: the 3x3 matrix ``M`` (row-major)
        and ``k``, the contrast offset per unit of mean grey (``t = k * grey(mean rgb)``)."""
        b = self._factor(self.brightness)
        c = self._factor(self.contrast)
        s = self._factor(self.saturation)
        h = self._factor(self.hue, 0.0)
        saturate = s * torch.eye(3, dtype=torch.float64) + (1 - s) * _GREY.expand(3, 3)
        cos, sin = math.cos(2 * math.pi * h), math.sin(2 * math.pi * h)
        rotate = torch.tensor([[1, 0, 0], [0, cos, -sin], [0, sin, cos]], dtype=torch.float64)
        hue = torch.linalg.solve(_YIQ, rotate @ _YIQ)  # YIQ^-1 R YIQ
        matrix = (c * b) * (hue @ saturate)  # grey is a fixed point of both: the contrast offset passes unchanged
        return torch.cat([matrix.flatten(), torch.tensor([(1 - c) * b], dtype=torch.float64)]).to(torch.float32)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        params = self.sample()
        matrix, k = params[:9].view(3, 3), float(params[9])
        x = img.reshape(3, -1).to(torch.float32)
        offset = k * float(_GREY.to(torch.float32) @ x.mean(dim=1)) if k != 0 else 0.0
        out = torch.addmm(torch.full((3, 1), offset), matrix, x)
        return out.clamp_(0, 255).round_().to(torch.uint8).view_as(img)


def apply_colour(images: torch.Tensor, params: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """Apply per-image colour maps from :meth:`ColourJitter.sample` to a padded float batch, on its device.

    Args:
        images: (B, 3, H, W) float in [0, 1], each image at the top-left, zero-padded.
        params: (B, 10) the maps, on any device.
        sizes: (B, 2) the valid (h, w) of each image, on the host.

    Returns:
        (B, 3, H, W) float in [0, 1], contiguous; the padding stays 0. The same map as the worker-side
        ``ColourJitter`` up to its rounding to uint8 levels (within 1/255).
    """
    B, _, H, W = images.shape
    device = images.device
    params = params.to(device, torch.float32, non_blocking=True)
    matrix, k = params[:, :9].view(B, 3, 3), params[:, 9]
    dev_sizes = sizes.to(device, non_blocking=True)
    mean = images.sum(dim=(2, 3)) / dev_sizes.prod(dim=1).clamp(min=1)[:, None]  # padding adds nothing
    offset = k * (mean @ _grey_on(device))  # (B,)
    out = torch.einsum("bij,bjhw->bihw", matrix, images).add_(offset[:, None, None, None]).clamp_(0, 1)
    if bool((sizes != torch.tensor([H, W], device=sizes.device)).any()):  # sizes on the host: no device sync
        rows = torch.arange(H, device=device)[None, :] < dev_sizes[:, :1]  # (B, H)
        cols = torch.arange(W, device=device)[None, :] < dev_sizes[:, 1:]  # (B, W)
        out.mul_(rows[:, None, :, None] & cols[:, None, None, :])
    return out


@functools.lru_cache(maxsize=8)
def _grey_on(device: torch.device) -> torch.Tensor:
    """The grey weights as float32 on ``device``, copied there once rather than with every batch."""
    return _GREY.to(device, torch.float32)


class Identity(torch.nn.Module):
    """No change (evaluation and the ``none`` preset); a module so that DataLoader workers can pickle it."""

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return img


def _geometric() -> list[torch.nn.Module]:
    return [v2.RandomHorizontalFlip(p=0.5), v2.RandomVerticalFlip(p=0.5), RandomRot90()]


def _preset_jitter(name: str) -> ColourJitter | None:
    if name == "microscopy":
        return ColourJitter(brightness=0.1, contrast=0.1, saturation=0.1, hue=0.02)
    if name == "strong":
        return ColourJitter(brightness=0.25, contrast=0.25, saturation=0.25, hue=0.05)
    return None


_DEVICE_COLOUR = ("microscopy",)  # presets whose jitter is their last step (see colour_jitter)


def _check_preset(name: str) -> None:
    """Refuse an unknown ``data.augment`` preset with the one-line error naming the key and the choices."""
    if name not in PRESETS:
        raise FinescopeError(f"config key 'data.augment' is '{name}'; choose one of: {', '.join(PRESETS)}")


def colour_jitter(name: str, train: bool) -> ColourJitter | None:
    """The colour jitter of preset ``name`` that can run on the training device (``data.colour_on``): the
    preset's last step, so drawing its factors after the others and applying it to the batch gives the same
    image up to uint8 rounding. That is ``microscopy``; ``strong`` blurs after its jitter, so its jitter stays
    in the workers. None for the other presets and for evaluation."""
    _check_preset(name)
    return _preset_jitter(name) if train and name in _DEVICE_COLOUR else None


def rotates_90(name: str) -> bool:
    """Whether the training preset ``name`` rotates images by 90 degrees (and so swaps H and W of non-square
    images): every preset but ``none``."""
    _check_preset(name)
    return name != "none"


def build_transform(name: str, train: bool, colour: bool = True) -> Callable[[torch.Tensor], torch.Tensor]:
    """The augmentation preset ``name`` (``data.augment``) for training, or the identity for evaluation.

    Args:
        name: ``none`` (identity), ``geometric`` (flips and 90-degree rotations only, for data without stain
            variation), ``microscopy`` (flips, 90-degree rotations, colour jitter 0.1/0.1/0.1/0.02)
            or ``strong`` (the same with jitter 0.25/0.25/0.25/0.05 and Gaussian blur with probability 0.2).
        train: False gives the identity whatever the preset.
        colour: False leaves out the jitter that :func:`colour_jitter` returns (``data.colour_on: device``:
            the dataset draws its factors and the batch applies them on the training device,
            :func:`apply_colour`); a preset without one is unchanged.

    Returns:
        A callable (3, H, W) uint8 -> (3, H', W') uint8 with (H', W') = (H, W) or (W, H).

    Raises:
        FinescopeError: an unknown preset name.
    """
    _check_preset(name)
    if not train or name == "none":
        return Identity()
    jitter = _preset_jitter(name) if colour or name not in _DEVICE_COLOUR else None
    steps = _geometric() + ([jitter] if jitter is not None else [])
    if name == "strong":
        steps.append(v2.RandomApply([v2.GaussianBlur(kernel_size=5, sigma=(0.1, 1.5))], p=0.2))
    return v2.Compose(steps)


__all__ = ["PRESETS", "ColourJitter", "apply_colour", "build_transform", "colour_jitter", "rotates_90"]
