"""Exemplar-guided synthesis (Cheap Lunch): new training pairs from each labelled exemplar slice.

Each synthetic pair starts from one exemplar ``{"image", "label"}`` (``[1, S, S]``) and goes
through

1. geometric transforms applied jointly to image and mask (MONAI: flips, rotation, scaling,
   translation, elastic deformation; the mask with nearest neighbour so classes stay whole);
2. intensity transforms of the image alone (MONAI: gamma, contrast, Gaussian noise, bias field);
3. with probability ``paste_prob``, pasting: the transformed foreground (every labelled
   pixel, plus a thin rim of its own surroundings) is blended onto another background,
   an unlabelled slice of the same dataset, with a soft edge (``paste_foreground``).

The synthetic set is fixed, as in the paper's offline synthesis: pair ``j`` of exemplar ``i``
always comes from the same random draws (its transforms are seeded with ``seed`` and its
index), so ``pairs_per_exemplar`` x k pairs are the same at every epoch and in every run with
the same seed; both numbers are written to the few-shot manifest (``synthesis``).

Backgrounds: the slices of the exemplars' own volumes that are not exemplars and not held
out for validation or test, read without their labels (in a few-shot setting they are the
unlabelled rest of the scans). Where such a slice shows the target structure outside the
pasted region, the pair teaches "background" there: the paste covers the foreground with a
margin, and only a fraction of pairs are pasted.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from monai.transforms import (
    Compose,
    GaussianSmooth,
    Rand2DElasticd,
    RandAdjustContrastd,
    RandAffined,
    RandBiasFieldd,
    RandFlipd,
    RandGaussianNoised,
    RandScaleIntensityFixedMeand,
)
from torch.utils.data import ConcatDataset, DataLoader, Dataset, DistributedSampler

from medsaga_components.config_values import as_bool
from medsaga_components.data.dataset import SliceDataset
from medsaga_components.data.manifest import SliceRef, write_manifest

KEYS = ("image", "label")


def geometric_transforms(max_rotation_degrees: float = 15.0, scale: float = 0.15, translate_fraction: float = 0.05,
                         elastic_prob: float = 0.5, image_size: int = 256) -> Compose:
    """Joint image/mask geometry: flips, rotation, scaling, translation, elastic deformation.
    Outside the moved image is zero (background class 0 in the mask)."""
    shift = translate_fraction * image_size
    # elastic control points every 1/8 of the image; their offsets (pixels, normal with a
    # standard deviation drawn up to 1.5 % of the side: about 4 px at 256) bend the anatomy mildly
    spacing = max(4, image_size // 8)
    return Compose([
        RandFlipd(keys=KEYS, prob=0.5, spatial_axis=0),
        RandFlipd(keys=KEYS, prob=0.5, spatial_axis=1),
        RandAffined(keys=KEYS, prob=0.9, rotate_range=math.radians(max_rotation_degrees), scale_range=(scale, scale),
                    translate_range=(shift, shift), mode=("bilinear", "nearest"), padding_mode="zeros"),
        Rand2DElasticd(keys=KEYS, spacing=(spacing, spacing), magnitude_range=(0.0, 0.015 * image_size),
                       prob=elastic_prob, mode=("bilinear", "nearest"), padding_mode="zeros"),
    ])


def intensity_transforms(gamma: tuple[float, float] = (0.7, 1.5), contrast: float = 0.25, noise_std: float = 0.03,
                         bias_field: float = 0.3) -> Compose:
    """Image-only intensity changes: gamma, contrast about the mean, noise, a smooth bias field."""
    return Compose([
        RandAdjustContrastd(keys="image", prob=0.5, gamma=gamma),
        RandScaleIntensityFixedMeand(keys="image", prob=0.5, factors=contrast, preserve_range=True),
        RandBiasFieldd(keys="image", prob=0.5, coeff_range=(0.0, bias_field)),
        RandGaussianNoised(keys="image", prob=0.5, std=noise_std),
    ])


def paste_foreground(image: torch.Tensor, label: torch.Tensor, background: torch.Tensor, margin: int = 3,
                     edge_sigma: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The labelled part of ``image`` blended onto ``background``; all ``[1, H, W]``.

    The blend weight is 1 on every labelled pixel and falls smoothly to 0 over a rim of the
    exemplar's own surroundings (the mask dilated by ``margin`` pixels, then Gaussian-smoothed
    with ``edge_sigma``): the seam lies outside the structure, whose own edge stays intact.
    Nothing moves: the result has the image's frame, and the label is the exemplar's.
    """
    if image.shape != background.shape or image.shape != label.shape:
        raise ValueError(f"image {tuple(image.shape)}, label {tuple(label.shape)} and background "
                         f"{tuple(background.shape)} must have one shape [1, H, W]")
    foreground = (label > 0).float()
    if margin > 0:
        foreground_rim = F.max_pool2d(foreground[None], 2 * margin + 1, stride=1, padding=margin)[0]
    else:
        foreground_rim = foreground
    alpha = GaussianSmooth(sigma=edge_sigma)(foreground_rim) if edge_sigma > 0 else foreground_rim
    alpha = torch.maximum(_plain(alpha).clamp(0.0, 1.0), foreground)
    return alpha * image + (1.0 - alpha) * background, label


class ExemplarSynthesisDataset(Dataset):
    """``pairs_per_exemplar`` synthetic pairs per exemplar of ``exemplars``, as samples of the
    same form (``image`` float [1, S, S] in [0, 1], ``label`` int64 [1, S, S], and the
    exemplar's ``volume``/``slice_index``/... keys, so the trainer and collate treat them alike).

    Args:
        exemplars: the labelled few-shot slices (a ``SliceDataset`` without augmentation).
        backgrounds: unlabelled slices of the same dataset to paste onto, or None (no pasting).
        pairs_per_exemplar: P; the dataset has ``P * len(exemplars)`` samples.
        seed: pair ``n`` draws from transforms seeded with ``seed * 1_000_003 + n``.
        paste_prob: the share of pairs pasted onto a background.
        max_rotation_degrees, scale, elastic_prob: geometric ranges (``geometric_transforms``).
    """

    def __init__(self, exemplars: SliceDataset, backgrounds: SliceDataset | None = None, pairs_per_exemplar: int = 8,
                 seed: int = 0, paste_prob: float = 0.5, max_rotation_degrees: float = 15.0, scale: float = 0.15,
                 elastic_prob: float = 0.5) -> None:
        if int(pairs_per_exemplar) < 1:
            raise ValueError(f"pairs_per_exemplar must be >= 1, got {pairs_per_exemplar!r}")
        if not 0.0 <= float(paste_prob) <= 1.0:
            raise ValueError(f"paste_prob must be in [0, 1], got {paste_prob!r}")
        if exemplars.transform is not None:
            raise ValueError("ExemplarSynthesisDataset needs the exemplars as they are (a SliceDataset without transform)")
        self.exemplars = exemplars
        self.backgrounds = backgrounds if backgrounds is not None and len(backgrounds) else None
        self.pairs_per_exemplar = int(pairs_per_exemplar)
        self.seed = int(seed)
        self.paste_prob = float(paste_prob) if self.backgrounds is not None else 0.0
        self.geometric = geometric_transforms(max_rotation_degrees, scale, image_size=exemplars.image_size,
                                              elastic_prob=elastic_prob)
        self.intensity = intensity_transforms()

    def __len__(self) -> int:
        return len(self.exemplars) * self.pairs_per_exemplar

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(f"synthetic pair {index} out of range 0..{len(self) - 1}")
        pair_seed = self.seed * 1_000_003 + index
        draw = torch.Generator().manual_seed(pair_seed)
        sample = dict(self.exemplars[index // self.pairs_per_exemplar])
        # MONAI's random transforms draw from their own numpy states: seed them per pair
        self.geometric.set_random_state(seed=pair_seed % (2 ** 32))
        self.intensity.set_random_state(seed=(pair_seed + 1) % (2 ** 32))
        moved = self.geometric({"image": sample["image"], "label": sample["label"].float()})
        image = _plain(moved["image"]).float()
        label = _plain(moved["label"]).round().long()
        image = _plain(self.intensity({"image": image})["image"]).float().clamp(0.0, 1.0)
        if self.paste_prob and torch.rand((), generator=draw).item() < self.paste_prob:
            choice = int(torch.randint(len(self.backgrounds), (), generator=draw))
            background = self.backgrounds[choice]["image"].float()
            image, label = paste_foreground(image, label, background)
        sample["image"] = _plain(image).float().clamp(0.0, 1.0)  # plain tensors: collate with the exemplars
        sample["label"] = _plain(label).long()
        return sample


class TrainingSlices(ConcatDataset):
    """Exemplars and synthetic pairs as one dataset, answering ``num_classes`` and
    ``class_names`` like the ``SliceDataset`` of the exemplars (the first part)."""

    @property
    def num_classes(self) -> int:
        return self.datasets[0].num_classes

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.datasets[0].class_names


def _plain(x) -> torch.Tensor:
    return x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x)


def background_slices(exemplars: SliceDataset, held_out: Sequence = ()) -> SliceDataset | None:
    """Unlabelled slices to paste onto: every slice of the exemplars' volumes that is neither an
    exemplar nor inside a held-out range (``SliceRange`` of validation/test), read without labels."""
    chosen = {(ref.volume, ref.axis, ref.slice_index) for ref in exemplars.slices}
    refs = []
    for volume in dict.fromkeys(ref.volume for ref in exemplars.slices):
        axis = next(ref.axis for ref in exemplars.slices if ref.volume == volume)
        label = next(ref.label for ref in exemplars.slices if ref.volume == volume)
        image, _ = exemplars.load_volume(volume, label)
        for index in range(image.shape[axis]):
            ref = SliceRef(volume, None, axis, index)
            if (volume, axis, index) in chosen or any(r.contains(ref) for r in held_out):
                continue
            refs.append(ref)
    if not refs:
        return None
    return SliceDataset(exemplars.dataset, refs, exemplars.image_size)


class StepsPerEpochSampler(DistributedSampler):
    """``samples_per_replica`` shuffled indices per epoch (and per process under torchrun),
    whatever the dataset's length: an epoch stays ``steps_per_epoch`` batches when synthetic
    pairs make the training set larger than k. New order every epoch (``set_epoch``, which
    MONAI's trainer calls on a ``DistributedSampler``); every index once before any twice.

    ``real_share``: for a ``TrainingSlices`` (exemplars first, then synthetic pairs), the share
    of each epoch's samples drawn from the exemplars (rounded; each part cycled on its own, every
    index once before any twice). None draws from the whole set alike, where k real slices
    among 8k synthetic ones are a ninth of what the model sees.
    """

    def __init__(self, dataset: Dataset, samples_per_replica: int, distributed: bool = False, seed: int = 0,
                 real_share: float | None = None) -> None:
        if distributed:
            super().__init__(dataset, shuffle=True, seed=seed)
        else:
            super().__init__(dataset, num_replicas=1, rank=0, shuffle=True, seed=seed)
        self.samples_per_replica = int(samples_per_replica)
        if real_share is not None:
            if not 0.0 <= float(real_share) <= 1.0:
                raise ValueError(f"synthesis_real_share must be in [0, 1] or null, got {real_share!r}")
            if not isinstance(dataset, ConcatDataset) or len(dataset.datasets) != 2:
                raise ValueError("real_share needs the training set as exemplars + synthetic pairs (TrainingSlices)")
        self.real_share = None if real_share is None else float(real_share)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        total = self.samples_per_replica * self.num_replicas
        if self.real_share is None:
            order = _cycled_permutation(len(self.dataset), total, generator)
        else:
            real = len(self.dataset.datasets[0])
            n_real = round(total * self.real_share)
            drawn = torch.cat([_cycled_permutation(real, n_real, generator),
                               real + _cycled_permutation(len(self.dataset) - real, total - n_real, generator)])
            order = drawn[torch.randperm(total, generator=generator)]
        return iter(order[self.rank::self.num_replicas].tolist())

    def __len__(self) -> int:
        return self.samples_per_replica


def _cycled_permutation(n: int, total: int, generator: torch.Generator) -> torch.Tensor:
    """``total`` indices of ``range(n)``: shuffled rounds, every index once before any twice."""
    if total == 0:
        return torch.zeros(0, dtype=torch.long)
    rounds = -(-total // n)
    return torch.cat([torch.randperm(n, generator=generator) for _ in range(rounds)])[:total]


def synthesis_train_loader(experiment, batch_size: int, steps_per_epoch: int, distributed: bool = False,
                           seed: int = 0, real_share: float | None = None) -> DataLoader:
    """``steps_per_epoch`` batches of ``batch_size`` per epoch from ``experiment.train_dataset``
    (exemplars and synthetic pairs), as ``FewShotExperiment.train_loader`` gives for k slices;
    ``real_share`` of the samples from the exemplars when synthesis is on (``StepsPerEpochSampler``)."""
    if not isinstance(experiment.train_dataset, TrainingSlices):
        real_share = None  # synthesis off: the exemplars are the whole set
    sampler = StepsPerEpochSampler(experiment.train_dataset, int(batch_size) * int(steps_per_epoch), distributed, seed,
                                   real_share)
    return DataLoader(experiment.train_dataset, batch_size=int(batch_size), sampler=sampler, drop_last=True)


def with_exemplar_synthesis(experiment, enabled: bool = True, pairs_per_exemplar: int = 8, seed: int = 0,
                            paste_prob: float = 0.5):
    """``experiment`` (a ``FewShotExperiment``) whose training set is the augmented exemplars
    plus their synthetic pairs (when ``enabled``), with the synthesis settings written into
    its few-shot manifest (``"synthesis"``; ``{"enabled": false}`` when off). Returns it."""
    enabled = as_bool(enabled, "synthesis")
    settings = {"enabled": enabled}
    if enabled:
        plain = SliceDataset(experiment.train_dataset.dataset, experiment.train_dataset.slices,
                             experiment.train_dataset.image_size)
        plain._cache = experiment.train_dataset._cache  # the same volumes, read once
        backgrounds = background_slices(plain, (*experiment.manifest.validation, *experiment.manifest.test))
        synthetic = ExemplarSynthesisDataset(plain, backgrounds, pairs_per_exemplar, seed, paste_prob)
        settings.update(pairs_per_exemplar=synthetic.pairs_per_exemplar, seed=synthetic.seed,
                        paste_prob=synthetic.paste_prob, synthetic_pairs=len(synthetic),
                        background_slices=0 if backgrounds is None else len(backgrounds))
        experiment.train_dataset = TrainingSlices([experiment.train_dataset, synthetic])
    experiment.manifest = dataclasses.replace(experiment.manifest, synthesis=settings)
    write_manifest(Path(experiment.manifest_path), experiment.manifest)
    return experiment
