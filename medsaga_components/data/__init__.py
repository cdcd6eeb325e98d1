"""Data: Decathlon datasets, slicing, few-shot selection, the 2-D slice dataset, the demo dataset.

Conventions shared with the rest of the package: a sample's image is float32 [1, S, S] in
[0, 1]; its label is an int64 [1, S, S] map of class indices, 0 = background and 1..N the
declared ``labels`` in ascending order of their values; S (``image_size``) defaults to 256.
"""

from medsaga_components.data.augment import augmentation_transforms
from medsaga_components.data.dataset import SliceDataset
from medsaga_components.data.decathlon import (
    DatasetEntry,
    DatasetError,
    DecathlonDataset,
    load_decathlon,
    validate_dataset,
)
from medsaga_components.data.demo import ensure_demo_dataset, write_demo_dataset
from medsaga_components.data.fewshot import FewShotError, fewshot_command, select_few_shot_slices
from medsaga_components.data.holdout import Holdout, plan_holdout
from medsaga_components.data.intensity import scale_intensity
from medsaga_components.data.labels import ClassMap
from medsaga_components.data.manifest import Manifest, ManifestError, SliceRange, SliceRef, read_manifest, write_manifest
from medsaga_components.data.slicing import crop_slab, slab_affine, slices_to_volume, take_slice, volume_to_slices
from medsaga_components.data.square_resize import (
    SquareGeometry,
    resize_pad_image,
    resize_pad_labels,
    undo_resize_pad_image,
    undo_resize_pad_labels,
)
from medsaga_components.data.volume_io import VolumeReadError, read_image, read_label

__all__ = [
    "ClassMap", "DatasetEntry", "DatasetError", "DecathlonDataset", "FewShotError", "Holdout", "Manifest",
    "ManifestError", "SliceDataset", "SliceRange", "SliceRef", "SquareGeometry", "VolumeReadError",
    "augmentation_transforms", "crop_slab", "ensure_demo_dataset", "fewshot_command", "load_decathlon",
    "plan_holdout", "read_image", "read_label", "read_manifest", "resize_pad_image", "resize_pad_labels",
    "scale_intensity", "select_few_shot_slices", "slab_affine", "slices_to_volume", "take_slice",
    "undo_resize_pad_image", "undo_resize_pad_labels", "validate_dataset", "volume_to_slices",
    "write_demo_dataset", "write_manifest",
]
