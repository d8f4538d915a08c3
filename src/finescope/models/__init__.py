"""Backbones, attention pooling, instance selection, the network and its variant registry."""

from finescope.models.attention import AttentionPool
from finescope.models.backbones import Backbone, create_backbone, list_backbones
from finescope.models.network import FineScopeNet, ModelOutput
from finescope.models.registry import create_model, describe_models, list_models, register_variant
from finescope.models.selection import select_boxes

__all__ = [
    "AttentionPool",
    "Backbone",
    "FineScopeNet",
    "ModelOutput",
    "create_backbone",
    "create_model",
    "describe_models",
    "list_backbones",
    "list_models",
    "register_variant",
    "select_boxes",
]
