"""Checks shared by the demo-task tests: every slab file is the template's own voxels, in place."""

from __future__ import annotations

import nibabel as nib
import numpy as np


def assert_slabs_are_template_crops(entries, slabs, image_volume, affine, label_volume=None) -> None:
    """Each entry's image (and label, when ``label_volume`` is given) equals the template's axial
    slab ``[start, stop)`` and keeps its world position: slab voxel (i, j, k) is template voxel
    (i, j, k + start)."""
    for entry, (start, stop) in zip(entries, slabs):
        image, label = nib.load(str(entry.image_path)), nib.load(str(entry.label_path))
        assert image.shape == (*image_volume.shape[:2], stop - start)
        assert np.allclose(image.affine, label.affine)
        assert np.allclose(image.affine[:3, :3], affine[:3, :3])
        to_template = np.linalg.inv(affine) @ image.affine
        assert np.allclose(to_template @ [10, 20, 2, 1], [10, 20, 2 + start, 1])
        assert np.array_equal(np.asarray(image.dataobj), image_volume[:, :, start:stop])
        if label_volume is not None:
            assert np.array_equal(np.asarray(label.dataobj), label_volume[:, :, start:stop])
