"""The shipped LiteMedSAM weights are really loaded and really segment a real MRI."""

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

from medsaga_components.backbones import build_backbone
from medsaga_components.io.checkpoints import sha256_of
from medsaga_components.backbones.lite_medsam import LITE_MEDSAM_SHA256, shipped_lite_medsam_checkpoint


def _whole_brain_slice(mni_files, z=70):
    """Axial slice z of the MNI152 T1 (percentile-scaled) and its grey + white matter mask.

    The slice's second array axis (posterior -> anterior) is reversed. LiteMedSAM is
    sensitive to orientation on this slice: whole-brain Dice 0.81 with anterior on the left,
    0.72 in the array's own orientation (measured while writing this test).
    """
    t1 = nib.load(mni_files["t1"]).get_fdata()
    lo, hi = np.percentile(t1, [1, 99])
    image = np.clip((t1[:, :, z] - lo) / (hi - lo), 0, 1)[:, ::-1]
    tissue = (nib.load(mni_files["gm"]).get_fdata()[:, :, z] >= 128) | (nib.load(mni_files["wm"]).get_fdata()[:, :, z] >= 128)
    return image, tissue[:, ::-1]


def _to_network_frame(array, size=256):
    """Scale the longest side to ``size`` and zero-pad bottom/right: ``[H, W] -> [1, 1, size, size]``."""
    h, w = array.shape
    scale = size / max(h, w)
    resized = F.interpolate(torch.tensor(array.copy(), dtype=torch.float32)[None, None],
                            size=(round(h * scale), round(w * scale)), mode="bilinear", align_corners=False)
    return F.pad(resized, (0, size - resized.shape[-1], 0, size - resized.shape[-2]))


def _box_prompted_dice(backbone, image, mask):
    x, y = _to_network_frame(image), _to_network_frame(mask.astype(np.float32)) > 0.5
    ys, xs = torch.nonzero(y[0, 0], as_tuple=True)
    box = torch.tensor([[xs.min(), ys.min(), xs.max(), ys.max()]], dtype=torch.float32)
    pred = backbone.eval().predict_with_boxes(x, box) > 0
    return (2 * (pred & y).sum() / (pred.sum() + y.sum())).item()


def test_shipped_checkpoint_is_the_published_file():
    assert sha256_of(shipped_lite_medsam_checkpoint()) == LITE_MEDSAM_SHA256


def test_pretrained_lite_medsam_segments_the_brain_and_random_weights_do_not(mni_files):
    image, mask = _whole_brain_slice(mni_files)
    pretrained = _box_prompted_dice(build_backbone("lite_medsam"), image, mask)
    torch.manual_seed(0)
    random = _box_prompted_dice(build_backbone("lite_medsam", checkpoint=None), image, mask)
    print(f"whole-brain Dice, slice 70: pretrained {pretrained:.3f}, random weights {random:.3f}")
    assert pretrained >= 0.8
    assert random < 0.6
