"""The small-structure demo task: four AAL regions on the Colin27 T1, from Debian's ``mricron-data``.

Debian's ``mricron-data`` package (bookworm: 1.2.20211006+dfsg-4; ``apt-get install
mricron-data``) puts in ``/usr/share/mricron/templates/``:

- ``ch2.nii.gz``: the MNI single-subject T1 (Colin27), 181x217x181, 1 mm, uint8 0..254;
- ``aal.nii.gz``: the AAL atlas on the same grid and affine (uint8, region ids 1..116);
- ``aal.nii.txt``: one line per region, ``id name AAL-code`` (e.g. ``41 Amygdala_L 4201``).

Classes (left and right merged; the ids are checked against ``aal.nii.txt`` on every build):

    1 amygdala               AAL 41 Amygdala_L, 42 Amygdala_R
    2 pallidum               AAL 75 Pallidum_L, 76 Pallidum_R
    3 insula                 AAL 29 Insula_L, 30 Insula_R
    4 parahippocampal gyrus  AAL 39 ParaHippocampal_L, 40 ParaHippocampal_R

Along the axial axis (axis 2, z index 0..180, world z = index - 71 mm) the classes occupy
z 42-61 (amygdala), 65-79 (pallidum), 51-95 (insula) and 35-69 (parahippocampal gyrus):
amygdala and pallidum never share a slice. Each small structure is cut three ways, one part
per split, with two-slice gaps between slabs of different splits, so few-shot and held-out
slices never touch (voxels per split; docs/demo_tasks.md lists every slice):

    split       slabs [start, stop)   amygdala  pallidum  insula  parahippocampal
    training    [52, 56)  [76, 80)        1078       598    5341             2068
    validation  [44, 50)  [71, 74)         757      1199    2837             4912
    test        [58, 69)                   867      1171    7544             3774

Unused: z < 44, the gaps 50-51, 56-57, 69-70, 74-75, and z >= 80.

- Training (the few-shot candidates, 8 slices) holds the amygdala's largest cross-sections
  (220-312 voxels a slice) and the pallidum's upper end (215-84): every class appears, and
  the bundles' default of 5 evenly spaced slices takes z 52, 54, 76, 77, 79.
- Test is one slab across the amygdala-pallidum transition (amygdala 244-172 voxels a slice,
  pallidum 17-452), so the one test volume holds all four classes and no per-volume Dice of
  the test is a "both empty" 1.0.
- Validation interleaves with the test: along z the held-out slabs run validation, test,
  validation, each next to a training slab, so validation is no closer to the few-shot slices
  than the test is. It holds the amygdala's lower end (106-144 voxels a slice, smaller than
  the test's) and the pallidum's core (430-376, larger): not easier or harder across the
  board. Its lower slab holds amygdala and parahippocampal gyrus
  only, its upper slab pallidum and insula only: there, a class a slab lacks scores a
  per-volume Dice of 1.0 when nothing is predicted (0.0 for any false positive).

Nothing is downloaded: only the package's files are read. Licence: see ``LICENCE`` below and
``docs/demo_tasks.md``.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from medsaga_components.data.decathlon import DatasetError

VERSION = 1
MRICRON_TEMPLATE_DIR = Path("/usr/share/mricron/templates")
MRICRON_FILES = {"t1": "ch2.nii.gz", "atlas": "aal.nii.gz", "names": "aal.nii.txt"}
DEBIAN_PACKAGE = "mricron-data"
DEBIAN_VERSION = "1.2.20211006+dfsg-4"  # Debian bookworm; the release these slabs were measured on
COLIN27_SHAPE = (181, 217, 181)
SLAB_AXIS = 2
FILE_PREFIX = "colin27_aal"

# class index -> (class name, {AAL id: AAL name as written in aal.nii.txt})
AAL_CLASSES = {
    1: ("amygdala", {41: "Amygdala_L", 42: "Amygdala_R"}),
    2: ("pallidum", {75: "Pallidum_L", 76: "Pallidum_R"}),
    3: ("insula", {29: "Insula_L", 30: "Insula_R"}),
    4: ("parahippocampal gyrus", {39: "ParaHippocampal_L", 40: "ParaHippocampal_R"}),
}
LABELS = {"0": "background", **{str(index): name for index, (name, _) in AAL_CLASSES.items()}}

# [start, stop) along the axial axis; see the module docstring for why.
SLABS = {
    "training": [(52, 56), (76, 80)],
    "validation": [(44, 50), (71, 74)],
    "test": [(58, 69)],
}

LICENCE = (
    "Files from Debian's mricron-data 1.2.20211006+dfsg-4. Its copyright file "
    "(/usr/share/doc/mricron-data/copyright) covers every file of the package with "
    "'Files: *', 'Copyright: Copyright 2006-2010, Chris Rorden', 'License: BSD-3-clause' "
    "(full text there and in medsaga's docs/demo_tasks.md); it has no separate entry for the templates "
    "ch2.nii.gz, aal.nii.gz or aal.nii.txt, and the package ships no terms of the AAL atlas's own. "
    "AAL's own readme (not in the package; 'Anatomical Automatic Labeling (AAL) For SPM8', v1, 14/06/2010, "
    "GIN Caen) says AAL 'is available to the scientific community as a copyright freeware under the terms "
    "of the GNU General Public Licence' and asks users to cite Tzourio-Mazoyer et al., NeuroImage 2002; "
    "15: 273-289."
)
REFERENCE = (
    "AAL: Tzourio-Mazoyer N et al., Automated anatomical labelling of activations in SPM using a macroscopic "
    "anatomical parcellation of the MNI MRI single subject brain, NeuroImage 2002; 15: 273-289. T1: the MNI "
    "single-subject brain (Colin27; Collins DL et al., IEEE Trans Med Imaging 1998; 17: 463-468). Files from "
    "MRIcron (Chris Rorden) as packaged by Debian (mricron-data)."
)


def missing_package_message(folder: Path, missing: list[str]) -> str:
    """What to do when the package's files are not in ``folder``."""
    return (f"the small-structure demo needs Debian's {DEBIAN_PACKAGE} package (bookworm: {DEBIAN_VERSION}), "
            f"which installs {', '.join(MRICRON_FILES.values())} into {folder}; missing: {missing}. "
            f"Install it as root with: apt-get update && apt-get install -y {DEBIAN_PACKAGE} "
            "(scripts/setup_env.sh does this when run as root). medsaga reads these files only from that "
            "package and downloads them from nowhere else.")


def mricron_template_dir(folder: str | Path | None = None) -> Path:
    """The folder holding ch2.nii.gz, aal.nii.gz and aal.nii.txt (default ``MRICRON_TEMPLATE_DIR``).

    Raises FileNotFoundError saying how to install the package if a file is missing.
    """
    folder = Path(MRICRON_TEMPLATE_DIR if folder is None else folder)
    missing = [name for name in MRICRON_FILES.values() if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(missing_package_message(folder, missing))
    return folder


def read_aal_names(path: str | Path) -> dict[int, str]:
    """``aal.nii.txt`` (lines ``id name code``) -> {region id: region name}."""
    names = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[0].isdigit():
            names[int(fields[0])] = fields[1]
    return names


def check_aal_ids(names: dict[int, str], source: str | Path = "aal.nii.txt") -> None:
    """Raise DatasetError unless every id in ``AAL_CLASSES`` carries the expected name in ``names``."""
    wrong = [f"id {region_id}: expected {expected!r}, found {names.get(region_id)!r}"
             for _, regions in AAL_CLASSES.values() for region_id, expected in regions.items()
             if names.get(region_id) != expected]
    if wrong:
        raise DatasetError(f"{source}: AAL region ids differ from those the small-structure demo expects: "
                           + "; ".join(wrong))


def merge_aal_regions(atlas: np.ndarray) -> np.ndarray:
    """AAL region ids [X, Y, Z] (any integer dtype) -> uint8 class indices 0..4, left and right merged."""
    labels = np.zeros(atlas.shape, dtype=np.uint8)
    for index, (_, regions) in AAL_CLASSES.items():
        labels[np.isin(atlas, list(regions))] = index
    return labels


def load_colin27_small_structures(folder: str | Path | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The package's files -> (T1 uint8 [181, 217, 181], class labels uint8 [181, 217, 181], affine [4, 4]).

    Raises FileNotFoundError (how to install the package) or DatasetError (unexpected ids,
    grid or affine).
    """
    folder = mricron_template_dir(folder)
    check_aal_ids(read_aal_names(folder / MRICRON_FILES["names"]), folder / MRICRON_FILES["names"])
    t1_image = nib.load(str(folder / MRICRON_FILES["t1"]))
    atlas_image = nib.load(str(folder / MRICRON_FILES["atlas"]))
    for image, key in ((t1_image, "t1"), (atlas_image, "atlas")):
        if image.shape != COLIN27_SHAPE:
            raise DatasetError(f"{folder / MRICRON_FILES[key]}: shape {image.shape}, expected {COLIN27_SHAPE}")
    if not np.allclose(t1_image.affine, atlas_image.affine, atol=1e-4):
        raise DatasetError(f"{folder}: {MRICRON_FILES['t1']} and {MRICRON_FILES['atlas']} have different affines")
    t1 = np.asarray(t1_image.dataobj)
    labels = merge_aal_regions(np.asarray(atlas_image.dataobj))
    return t1, labels, np.asarray(t1_image.affine, dtype=np.float64)


def class_voxels_per_split(labels: np.ndarray, slabs: dict[str, list[tuple[int, int]]] = SLABS,
                           axis: int = SLAB_AXIS) -> dict[str, dict[str, int]]:
    """Class labels [X, Y, Z] -> {split: {class name: voxels in that split's slabs}}."""
    counts = {}
    for split, ranges in slabs.items():
        parts = [np.take(labels, np.arange(start, stop), axis=axis) for start, stop in ranges]
        counts[split] = {name: int(sum(int((part == index).sum()) for part in parts))
                         for index, (name, _) in AAL_CLASSES.items()}
    return counts


def dataset_description() -> dict:
    """The dataset.json fields other than the splits and the ``medsaga_demo`` marker."""
    return {
        "name": "Colin27-AAL-small-structures-demo",
        "description": "Axial slabs of the Colin27 T1 (MNI single subject) with four small AAL regions, left and "
                       "right merged: amygdala, pallidum, insula, parahippocampal gyrus. For trying medsaga on "
                       "small structures offline.",
        "reference": REFERENCE,
        "licence": LICENCE,
        "tensorImageSize": "3D",
        "modality": {"0": "MRI"},
        "labels": LABELS,
    }


def demo_marker(labels: np.ndarray) -> dict:
    """What ``medsaga_demo`` in dataset.json records about this task besides its name and version
    (``labels``: the class labels [181, 217, 181], for the voxel counts per split)."""
    return {
        "axis": SLAB_AXIS,
        "slabs": {split: [list(s) for s in ranges] for split, ranges in SLABS.items()},
        "source": {"debian_package": f"{DEBIAN_PACKAGE} {DEBIAN_VERSION}", "folder": str(MRICRON_TEMPLATE_DIR),
                   **MRICRON_FILES},
        "aal_ids": {name: sorted(regions) for name, regions in AAL_CLASSES.values()},
        "class_voxels": class_voxels_per_split(labels),
    }
