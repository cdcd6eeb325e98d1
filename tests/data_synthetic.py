"""Small synthetic Decathlon datasets for the data/evaluation tests (answers known by construction)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
from monai.data.synthetic import create_test_image_3d

SPACING = (1.5, 1.0, 2.0)


def affine_with_spacing(spacing=SPACING, origin=(-10.0, 5.0, 3.0)) -> np.ndarray:
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = origin
    return affine


def save(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), str(path))


def synthetic_volume(seed: int, shape=(40, 32, 24)) -> tuple[np.ndarray, np.ndarray]:
    """(image float32, labels uint8 in {0, 1, 2}) [X, Y, Z]; labels only in slices 4..19 along z."""
    image, labels = create_test_image_3d(*shape, num_objs=6, rad_max=6, rad_min=3, noise_max=0.1,
                                         num_seg_classes=2, random_state=np.random.RandomState(seed))
    labels = labels.astype(np.uint8)
    labels[:, :, :4] = 0
    labels[:, :, 20:] = 0
    labels[1:3, 1:3, 4:20] = 1  # a thin rod, so that every slice 4..19 is labelled
    return (image * 1000).astype(np.float32), labels


def write_dataset(root: Path, n_training: int = 3, n_validation: int = 0, n_test: int = 0,
                  label_values=(0, 1, 2), modality="MRI") -> Path:
    """dataset.json + NIfTI volumes; label classes 1, 2 are stored as ``label_values[1]``, ``[2]``."""
    affine = affine_with_spacing()
    names = {0: "background", 1: "ring", 2: "blob", 3: "other", 4: "more"}
    description = {"name": "synthetic", "modality": {"0": modality},
                   "labels": {str(v): names.get(i, f"c{i}") for i, v in enumerate(label_values)}}
    seed = 0
    for split, count, folder in (("training", n_training, "Tr"), ("validation", n_validation, "Va"),
                                 ("test", n_test, "Ts")):
        entries = []
        for i in range(count):
            image, labels = synthetic_volume(seed)
            seed += 1
            stored = np.asarray(label_values, dtype=np.uint8)[labels]
            save(image, affine, root / f"images{folder}" / f"case{i}.nii.gz")
            save(stored, affine, root / f"labels{folder}" / f"case{i}.nii.gz")
            entries.append({"image": f"images{folder}/case{i}.nii.gz", "label": f"labels{folder}/case{i}.nii.gz"})
        if count:
            description[split] = entries
    path = root / "dataset.json"
    path.write_text(json.dumps(description, indent=2))
    return path
