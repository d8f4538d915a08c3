"""Named model variants (method.md's ablation table) in a small registry.

    >>> from finescope.models import create_model, list_models
    >>> list_models()
    ['attention', 'fusion', 'fusion-nogate', 'global', 'global-hires']
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from finescope.config import ModelConfig
from finescope.errors import FinescopeError
from finescope.models.backbones import create_backbone
from finescope.models.network import FineScopeNet

# name -> (one-line description, FineScopeNet switches)
_VARIANTS: dict[str, tuple[str, dict]] = {}


def register_variant(name: str, description: str, **switches: bool) -> None:
    """Register a variant: ``switches`` are FineScopeNet's use_attention / use_crops / hires / gated."""
    if name in _VARIANTS:
        raise ValueError(f"variant '{name}' is already registered")
    _VARIANTS[name] = (description, switches)


register_variant("global", "backbone + global average pool + linear head on the global view (plain fine-tuned CNN)",
                 use_attention=False, use_crops=False)
register_variant("global-hires", "the plain CNN fed the full-resolution image (cost reference)",
                 use_attention=False, use_crops=False, hires=True)
register_variant("attention", "backbone + gated attention over feature-map cells, no crops (steps 1-4)",
                 use_attention=True, use_crops=False)
register_variant("fusion", "the full method: gated attention, K high-resolution crops, fused head (steps 1-8)",
                 use_attention=True, use_crops=True)
register_variant("fusion-nogate", "fusion with the plain tanh attention of Ilse Eq. 8",
                 use_attention=True, use_crops=True, gated=False)


def list_models() -> list[str]:
    """Names of the registered variants, sorted."""
    return sorted(_VARIANTS)


def describe_models() -> dict[str, str]:
    """Variant name -> one-line description."""
    return {name: _VARIANTS[name][0] for name in list_models()}


def variant_switches(name: str) -> dict:
    """The FineScopeNet switches of a variant; unknown names raise FinescopeError listing the valid ones."""
    if name not in _VARIANTS:
        raise FinescopeError(f"unknown model.variant '{name}'; choose one of: {', '.join(list_models())}")
    return dict(_VARIANTS[name][1])


def _check_sides(cfg: ModelConfig, switches: dict, backbone: nn.Module) -> None:
    """Refuse a global view or crop smaller than one feature cell of a backbone that floors its grid (patchifying
    stems such as ConvNeXt's): it would have no cell, and the backbone's first forward pass would fail."""
    stride = getattr(backbone, "stride", None)
    if stride is None or getattr(backbone, "ceil", True):
        return
    sides = {"model.global_size": cfg.global_size} if not switches.get("hires") else {}
    if switches.get("use_crops"):
        sides["model.local_size"] = cfg.local_size
    for key, side in sides.items():
        if side < stride:
            raise FinescopeError(f"config key '{key}' is {side} px, smaller than one feature cell of backbone "
                                 f"'{cfg.backbone}' ({stride} px); set it to at least {stride}")


def create_model(cfg: ModelConfig, num_classes: int, backbone_factory: Callable | None = None) -> FineScopeNet:
    """Build the variant ``cfg.variant`` with backbone ``cfg.backbone`` for ``num_classes`` classes."""
    switches = variant_switches(cfg.variant)
    if num_classes < 2:
        raise FinescopeError(f"need at least 2 classes to train a classifier, found {num_classes}")
    backbone = (backbone_factory or create_backbone)(cfg.backbone, cfg.weights, cfg.pretrained)
    _check_sides(cfg, switches, backbone)
    return FineScopeNet(
        backbone,
        num_classes,
        global_size=cfg.global_size,
        view_multiple=cfg.view_multiple,
        local_size=cfg.local_size,
        num_crops=cfg.num_crops,
        threshold=cfg.threshold,
        selection_norm=cfg.selection_norm,
        peak_iou=cfg.peak_iou,
        min_box_fraction=cfg.min_box_fraction,
        selection_upsample=cfg.selection_upsample,
        selection_components=cfg.selection_components,
        selection_peaks=cfg.selection_peaks,
        proj_dim=cfg.proj_dim,
        attn_dim=cfg.attn_dim,
        image_feature=cfg.image_feature,
        dropout=cfg.dropout,
        select_from=cfg.select_from,
        separate_crop_backbone=cfg.crop_backbone == "separate",
        **switches,
    )
