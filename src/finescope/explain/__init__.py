"""Explanations: attention and CAM maps on the full-resolution image, galleries and measured faithfulness.

This module is also callable, so that both spellings work::

    from finescope import explain
    e = explain(model, image)                      # == finescope.explain.explain_image(model, image)
    finescope.explain.save_overlay_grid(items, p)  # the module's functions stay reachable

Parts: :mod:`~finescope.explain.maps` (map arithmetic), :mod:`~finescope.explain.methods` (attention and
pytorch-grad-cam), :mod:`~finescope.explain.core` (one image -> :class:`Explanation`),
:mod:`~finescope.explain.faithfulness` (deletion/insertion, hit rate, pointing game),
:mod:`~finescope.explain.overlay` (figures), :mod:`~finescope.explain.gallery` (index.html) and
:mod:`~finescope.explain.runner` (``finescope explain``).
"""

from __future__ import annotations

import sys
import types

from finescope.explain.core import as_image, explain_image
from finescope.explain.maps import attention_to_image, normalise_map
from finescope.explain.methods import CAM_METHODS, CamAdapter, Explanation, supported_methods
from finescope.explain.overlay import draw_overlay, save_explanation_figure, save_overlay_grid


def run_explain(*args, **kwargs):
    """``finescope explain``: see :func:`finescope.explain.runner.run_explain`."""
    from finescope.explain.runner import run_explain as _run

    return _run(*args, **kwargs)


class _CallableModule(types.ModuleType):
    """Lets ``finescope.explain(model, image)`` call :func:`explain_image` while staying a module."""

    def __call__(self, model, image, *args, **kwargs) -> Explanation:
        return explain_image(model, image, *args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

__all__ = [
    "CAM_METHODS",
    "CamAdapter",
    "Explanation",
    "as_image",
    "attention_to_image",
    "draw_overlay",
    "explain_image",
    "normalise_map",
    "run_explain",
    "save_explanation_figure",
    "save_overlay_grid",
    "supported_methods",
]
