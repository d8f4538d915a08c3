"""finescope: fine-grained classification of microscopy images.

Implements the network of Fan et al., "Microscopic fine-grained instance classification through deep
attention" (MICCAI 2020): a CNN reads the whole image, gated attention (Ilse et al. 2018, Eq. 9) picks key
regions, those regions are cut again from the full-resolution image and read by the same CNN, and global and
local features are fused for the label.
"""

__version__ = "0.1.0"

import importlib  # noqa: E402

from finescope.config import Config, load_config  # noqa: E402
from finescope.errors import FinescopeError  # noqa: E402

# imported on first use, so that the command line starts (and Ctrl-C in its first seconds is caught) before torch
_LAZY = {"explain": None, "ModelOutput": "finescope.models", "create_model": "finescope.models",
         "list_models": "finescope.models"}


def __getattr__(name: str):
    """``explain`` (a callable module: explain(model, image) -> Explanation) and the model API, imported when first
    asked for (PEP 562)."""
    if name not in _LAZY:
        raise AttributeError(f"module 'finescope' has no attribute '{name}'")
    module = importlib.import_module(_LAZY[name] or f"finescope.{name}")
    value = module if _LAZY[name] is None else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = ["Config", "FinescopeError", "ModelOutput", "__version__", "create_model", "explain", "list_models",
           "load_config"]
