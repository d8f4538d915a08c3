"""finescope: fine-grained classification of microscopy images.

Implements the network of Fan et al., "Microscopic fine-grained instance classification through deep
attention" (MICCAI 2020): a CNN reads the whole image, gated attention (Ilse et al. 2018, Eq. 9) picks key
regions, those regions are cut again from the full-resolution image and read by the same CNN, and global and
local features are fused for the label.
"""

__version__ = "0.1.0"

from finescope import explain  # noqa: E402  (a callable module: explain(model, image) -> Explanation)
from finescope.config import Config, load_config  # noqa: E402
from finescope.errors import FinescopeError  # noqa: E402
from finescope.models import ModelOutput, create_model, list_models  # noqa: E402

__all__ = ["Config", "FinescopeError", "ModelOutput", "__version__", "create_model", "explain", "list_models",
           "load_config"]
