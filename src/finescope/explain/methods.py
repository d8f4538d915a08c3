"""Explanation methods: the model's own attention and CAM methods from pytorch-grad-cam.

``attention`` is the gated attention map of the model (Ilse et al. 2018, Eq. 9) upsampled onto the image;
it exists for the variants with attention (``attention``, ``fusion``, ``fusion-nogate``). The CAM methods come
from the field's own library, pytorch-grad-cam (Gildenblat et al.), not from a copy: :class:`CamAdapter`
makes every finescope variant CAM-able by returning plain logits and exposing the feature map of the
*global view* as a layer (``tap``) that the library hooks. For ``fusion`` the CAM therefore explains the
global path's share of the fused logits; the crops reach the logits through the input pixels, not through
that feature map.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from finescope.errors import FinescopeError
from finescope.explain.maps import attention_to_image, normalise_map
from finescope.models.network import FineScopeNet

# CAM name -> pytorch_grad_cam class name. ScoreCAM and AblationCAM are left out: they run one forward pass per
# feature channel (1,280 for mobilenet_v2) for every image.
CAM_METHODS = {
    "gradcam": "GradCAM",
    "gradcam++": "GradCAMPlusPlus",
    "hirescam": "HiResCAM",
    "xgradcam": "XGradCAM",
    "layercam": "LayerCAM",
    "eigencam": "EigenCAM",
}
DEFAULT_CAMS = ("gradcam", "gradcam++")
# maps that take no class: the model's attention, and EigenCAM (the first principal component of the features)
CLASS_FREE = ("attention", "eigencam")


def explains_class(method: str) -> bool:
    """Whether ``method``'s map is that of one class (``Explanation.target``): the gradient CAMs, not
    ``attention`` or ``eigencam``, whose maps are the same for every class."""
    return method not in CLASS_FREE


def supported_methods(model: FineScopeNet) -> list[str]:
    """The methods a model can be explained with: ``attention`` when it has attention, then every CAM."""
    return (["attention"] if model.use_attention else []) + list(CAM_METHODS)


def resolve_methods(model: FineScopeNet, methods: str | list[str] | tuple[str, ...], variant: str = "") -> list[str]:
    """Check requested method names against the model; ``auto`` = attention (if any) + Grad-CAM + Grad-CAM++.

    Raises:
        FinescopeError: an unknown method, or ``attention`` for a variant without attention; the message lists
            what the model supports.
    """
    names = [methods] if isinstance(methods, str) else list(methods)
    given = {n.strip().lower(): n.strip() for part in names for n in part.split(",") if n.strip()}  # -> as typed
    names = list(given)
    auto = (["attention"] if model.use_attention else []) + list(DEFAULT_CAMS)
    names = [m for n in names or ["auto"] for m in (auto if n == "auto" else [n])]  # auto may join others
    ok = supported_methods(model)
    which = f"variant '{variant}'" if variant else "this model"
    for n in names:
        if n == "attention" and not model.use_attention:
            raise FinescopeError(f"{which} has no attention map; methods it supports: {', '.join(ok)} "
                                 "(e.g. --method gradcam)")
        if n not in ok:
            where = (" (it is a file: --method takes every name after it, so give the images before --method)"
                     if Path(given[n]).exists() else "")
            raise FinescopeError(f"unknown explanation method '{given[n]}'{where}; methods {which} supports: "
                                 f"{', '.join(ok)}")
    return list(dict.fromkeys(names))


@dataclass
class Explanation:
    """What :func:`finescope.explain` returns for one image.

    Attributes:
        image: (3, H, W) uint8, the full-resolution image.
        maps: method name -> (H, W) float map on the image (non-negative; attention sums to ~1, CAMs in [0, 1]).
        method: the first (main) method; ``map`` is ``maps[method]``.
        probabilities: (C,) class probabilities.
        class_names: the model's classes.
        target: the class index the CAMs explain, as ``target=`` of :func:`finescope.explain` asked: ``true``
            (the default) the true class when known, else the predicted one; ``predicted`` the predicted class;
            an index that class.
        label: the true class index, or None when unknown.
        boxes: (K, 4) x1, y1, x2, y2 pixels of the selected regions in rank order, or None (no crops).
        box_mass: (K,) attention mass of each box, or None.
        crops: (K, 3, L, L) float in [0, 1]: the boxes cut from the full-resolution image as the model reads them.
        attention: (h, w) attention on the feature grid, or None.
        cell_px: (2,) pixels per attention cell, or None.
        path: the image file, when read from one.
    """

    image: torch.Tensor
    maps: dict[str, torch.Tensor]
    method: str
    probabilities: torch.Tensor
    class_names: list[str]
    target: int
    label: int | None = None
    boxes: torch.Tensor | None = None
    box_mass: torch.Tensor | None = None
    crops: torch.Tensor | None = None
    attention: torch.Tensor | None = None
    cell_px: torch.Tensor | None = None
    path: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def map(self) -> torch.Tensor:
        """(H, W) map of the main method."""
        return self.maps[self.method]

    @property
    def predicted(self) -> int:
        return int(self.probabilities.argmax())

    @property
    def confidence(self) -> float:
        """Probability of the predicted class."""
        return float(self.probabilities.max())

    @property
    def correct(self) -> bool | None:
        return None if self.label is None else self.predicted == self.label

    def normalised(self, method: str | None = None, how: str = "max", percentile: float = 99.0) -> np.ndarray:
        """(H, W) map of ``method`` (default: the main one) scaled to [0, 1] for display."""
        return normalise_map(self.maps[method or self.method], how, percentile)


class _FirstCallTap(nn.Module):
    """Wraps the backbone so that its first output in a forward pass (the global view) goes through ``tap``."""

    def __init__(self, backbone: nn.Module, tap: nn.Module) -> None:
        super().__init__()
        self.inner, self.tap, self.calls = backbone, tap, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.inner(x)  # (B, C, h, w)
        self.calls += 1
        if self.calls > 1:
            return y  # later calls read the crops
        if torch.is_grad_enabled() and not y.requires_grad:  # weights that take no gradient (requires_grad_(False),
            y = y.detach().requires_grad_()  # a frozen backbone): the CAMs need the gradient at the map alone
        return self.tap(y)


class CamAdapter(nn.Module):
    """A finescope model as pytorch-grad-cam expects it: ``forward(images) -> logits`` and a target layer.

    Args:
        model: a :class:`FineScopeNet` of any variant.

    Attributes:
        tap: an identity layer on the global view's feature map (B, C, h, w); pass ``[adapter.tap]`` as
            ``target_layers``.
    """

    def __init__(self, model: FineScopeNet) -> None:
        super().__init__()
        self.model = model
        self.tap = nn.Identity()

    @contextlib.contextmanager
    def _tapped(self) -> Iterator[None]:
        backbone = self.model.backbone
        self.model.backbone = _FirstCallTap(backbone, self.tap)
        try:
            yield
        finally:
            self.model.backbone = backbone

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) in [0, 1] -> logits (B, C) (fused for ``fusion``)."""
        with self._tapped():
            return self.model(images).logits


class CamExplainer:
    """Reusable CAM objects for one model: ``cam(method, image, target) -> (H, W)`` map in [0, 1].

    Use as a context manager (or call :meth:`close`) so that the library's hooks are removed afterwards.
    """

    def __init__(self, model: FineScopeNet) -> None:
        self.adapter = CamAdapter(model)
        self._cams: dict = {}

    def cam(self, method: str, image: torch.Tensor, target: int) -> torch.Tensor:
        """Map of ``method`` for class ``target`` on one image (3, H, W) float in [0, 1] -> (H, W)."""
        import pytorch_grad_cam
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        if method not in self._cams:
            cls = getattr(pytorch_grad_cam, CAM_METHODS[method])
            self._cams[method] = cls(model=self.adapter, target_layers=[self.adapter.tap])
        device = next(self.adapter.parameters()).device
        # the gradients these methods read, also when called under torch.no_grad() or torch.inference_mode() (whose
        # tensors autograd refuses to save: a copy made outside it)
        with torch.inference_mode(False), torch.enable_grad():
            x = image[None].to(device).clone()  # (1, 3, H, W)
            grey = self._cams[method](input_tensor=x, targets=[ClassifierOutputTarget(target)])
        return torch.from_numpy(np.ascontiguousarray(grey[0])).float()  # (H, W)

    def close(self) -> None:
        for cam in self._cams.values():
            cam.activations_and_grads.release()
        self._cams.clear()

    def __enter__(self) -> CamExplainer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def attention_map(model: FineScopeNet, image: torch.Tensor, out) -> torch.Tensor:
    """The model's attention of one forward pass ``out`` upsampled onto ``image`` (3, H, W) -> (H, W)."""
    if out.attention is None:
        raise FinescopeError("this model has no attention map; use a CAM method such as gradcam")
    return attention_to_image(out.attention[0], out.cell_px[0], tuple(image.shape[-2:]))


__all__ = ["CAM_METHODS", "CLASS_FREE", "CamAdapter", "CamExplainer", "Explanation", "explains_class", "resolve_methods",
           "supported_methods"]
