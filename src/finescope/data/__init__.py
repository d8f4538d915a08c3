"""The data layer: sources find samples, splits partition them by group, the dataset loads them.

Sources (:func:`load_samples`) turn a folder, a CSV manifest or BreakHis into plain :class:`Sample` records; the
split functions are pure functions over labels and groups that never put a group on two sides; the
:class:`ImageDataset` only reads images, and :func:`collate_padded` batches images of different sizes.
"""

from finescope.data.dataset import Batch, ImageDataset, collate_padded, read_image
from finescope.data.records import Sample, SampleSet
from finescope.data.sources import SUPPORTED_EXTENSIONS, load_samples
from finescope.data.splits import (
    carve_validation,
    check_no_leak,
    empty_split_error,
    kfold_groups,
    load_splits,
    save_splits,
    split_groups,
    summarize_splits,
    trial_splits,
)
from finescope.data.summary import describe_samples, format_description
from finescope.data.transforms import apply_colour, build_transform, colour_jitter, rotates_90

__all__ = [
    "SUPPORTED_EXTENSIONS",
    "Batch",
    "ImageDataset",
    "Sample",
    "SampleSet",
    "apply_colour",
    "build_transform",
    "carve_validation",
    "check_no_leak",
    "colour_jitter",
    "collate_padded",
    "describe_samples",
    "empty_split_error",
    "format_description",
    "kfold_groups",
    "load_samples",
    "load_splits",
    "read_image",
    "rotates_90",
    "save_splits",
    "split_groups",
    "summarize_splits",
    "trial_splits",
]
