"""Data layer: find image pairs on disk, check them, split them, cache them as arrays, augment them.

Flow: :func:`discover` -> :func:`validate` -> :func:`make_split` -> :func:`load_arrays` -> views.
"""

from mics.data.cache import load_arrays
from mics.data.errors import DataError
from mics.data.layouts import IMAGE_EXTENSIONS, PAIR_MODES, ImageSet, Sample, discover
from mics.data.splits import Split, labelled_subset, load_split, make_split, save_split
from mics.data.validate import Dropped, check_image, load_rgb, validate, write_dropped

__all__ = [
    "IMAGE_EXTENSIONS",
    "PAIR_MODES",
    "DataError",
    "Dropped",
    "ImageSet",
    "Sample",
    "Split",
    "check_image",
    "discover",
    "labelled_subset",
    "load_arrays",
    "load_rgb",
    "load_split",
    "make_split",
    "save_split",
    "validate",
    "write_dropped",
]
