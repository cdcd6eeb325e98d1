"""What a bundle needs from ``dataset_dir``, prepared once: validation, few-shot manifest, datasets."""

from __future__ import annotations

from pathlib import Path

import torch
from monai.transforms import Compose
from torch.utils.data import ConcatDataset, DataLoader, DistributedSampler

from medsaga_components.data import SliceDataset, augmentation_transforms, ensure_demo_dataset, fewshot_command, read_manifest
from medsaga_components.data.datalist import write_datalist_dataset
from medsaga_components.data.fewshot import STRATEGIES as FEWSHOT_STRATEGIES
from medsaga_components.data.structure_crops import StructureCropd
from medsaga_components.data.zoom_crops import zoomed_crop_transforms
from medsaga_components.bundle_config import check_bundle_command_line
from medsaga_components.inference.zoom import STRUCTURES, zoom_setting


class FewShotExperiment:
    """A dataset folder turned into few-shot training, validation and test slice datasets.

    ``dataset_dir`` holds a Decathlon ``dataset.json``; a default demo location (a missing
    ``data/mni152_demo`` or ``aal_small_structures``) receives the embedded demo. The dataset is validated before anything trains (a missing
    file, mismatched geometry or an undeclared label value stops here, naming the file),
    and the few-shot selection is written to ``output_dir/fewshot_manifest.json`` so that a
    run can be repeated and audited.

    Args:
        dataset_dir: folder with ``dataset.json`` (or where the demo is written).
        output_dir: where the manifest goes.
        shots: k (see ``strategy``); image_size: S; axis: slicing axis; seed: selection seed.
        spacing: ``random`` (seeded, stratified) or ``even`` (evenly spaced slices), see
            ``medsaga_components.data.fewshot``.
        augment: random flips (and rotations up to ``rotation_degrees``) of the few-shot slices.
        rotation_degrees: 0 for flips only, e.g. when every scan shares one orientation.
        zoom: > 1 trains on windows of the slices scaled by ``zoom``, centred on the classes
            (``data.zoom_crops``); ``"structures"`` on whole slices and squares around the
            labelled structures (``data.structure_crops``). Inference must then read the same
            way (``inference.zoom``).
        train_data, validation_data: MONAI datalists (``[{"image", "label"}, ...]``, the bundle
            keys ``train#dataset#data`` / ``validate#dataset#data`` that MONAI Label's bundle
            trainer sets). Given ``train_data``, ``dataset_dir``'s dataset.json only declares
            the classes and modality; the lists are written as ``output_dir/datalist/dataset.json``
            and split like any dataset.json: with ``validation_data`` those volumes validate and
            nothing is tested; without, validation and test slices are held out of the
            training volumes (``data.holdout``).
    """

    def __init__(self, dataset_dir: str | Path, output_dir: str | Path, shots: float = 5, strategy: str = "total",
                 seed: int = 0, axis: int = 2, image_size: int = 256, augment: bool = True,
                 rotation_degrees: float = 15.0, spacing: str = "random", train_data: list | None = None,
                 validation_data: list | None = None, zoom: float | str = 1.0) -> None:
        check_bundle_command_line()  # a misspelled --key stops here, before the dataset or manifest is touched
        if strategy not in FEWSHOT_STRATEGIES:
            raise ValueError(f"strategy must be one of {FEWSHOT_STRATEGIES}, got {strategy!r}")
        if float(shots) <= 0:
            raise ValueError(f"shots must be positive, got {shots!r}")
        if int(image_size) % 16:
            raise ValueError(f"image_size must be a multiple of 16, got {image_size!r}")
        self.dataset_json = ensure_demo_dataset(dataset_dir)
        self.train_data, self.validation_data = train_data, validation_data
        if train_data is not None:
            self.dataset_json = write_datalist_dataset(train_data, validation_data, self.dataset_json,
                                                       Path(output_dir) / "datalist")
        elif validation_data:
            raise ValueError("validate#dataset#data is set but train#dataset#data is not: give the training "
                             "datalist too (the validation volumes alone cannot train)")
        self.manifest_path = fewshot_command(self.dataset_json, shots, strategy=strategy, seed=seed,
                                             out=str(Path(output_dir) / "fewshot_manifest.json"), axis=axis,
                                             spacing=spacing)
        self.manifest = read_manifest(self.manifest_path)
        self.image_size = int(image_size)
        augmentation = augmentation_transforms(rotate_prob=0.5 if rotation_degrees else 0.0,
                                               max_rotation_degrees=rotation_degrees)
        self.train_dataset = SliceDataset.from_manifest(self.manifest, "fewshot", self.image_size,
                                                        transform=augmentation if augment else None)
        zoom = zoom_setting(zoom)
        if zoom != 1:  # after the flips, so that every window of every mirrored view can be drawn
            crops = StructureCropd() if zoom == STRUCTURES else zoomed_crop_transforms(
                self.image_size, zoom, self.train_dataset.num_classes - 1)
            self.train_dataset.transform = Compose([self.train_dataset.transform, crops]) if augment else crops
        self.val_dataset = SliceDataset.from_manifest(self.manifest, "validation", self.image_size, labelled_only=True)
        # A dataset may declare validation volumes and no test: training then skips the test evaluation.
        self.test_dataset = SliceDataset.from_manifest(self.manifest, "test", self.image_size, allow_empty=True)

    @property
    def num_classes(self) -> int:
        """Foreground classes N (the network emits N + 1 channels, background first)."""
        return self.train_dataset.num_classes - 1

    @property
    def class_names(self) -> tuple[str, ...]:
        """Foreground class names, by class index 1..N."""
        return self.train_dataset.class_names[1:]

    def train_loader(self, batch_size: int, steps_per_epoch: int, num_workers: int = 0,
                     distributed: bool = False) -> DataLoader:
        """``steps_per_epoch`` shuffled batches per epoch, cycling through the k slices (each
        pass draws new augmentations); a batch never exceeds k distinct slices.

        ``distributed``: each process of a ``torchrun`` job takes its share of the batches
        (MONAI's trainer sets the sampler's epoch), so the global batch is world_size x batch.
        """
        k = len(self.train_dataset)
        batch = min(batch_size, k)
        world = torch.distributed.get_world_size() if distributed else 1
        repeats = max(1, -(-batch * steps_per_epoch * world // k))
        data = ConcatDataset([self.train_dataset] * repeats)
        sampler = DistributedSampler(data, shuffle=True, drop_last=True) if distributed else None
        return DataLoader(data, batch_size=batch, shuffle=sampler is None, sampler=sampler, drop_last=True,
                          num_workers=num_workers)


def experiment_dataset(experiment: FewShotExperiment, split: str, data: list | None = None) -> SliceDataset:
    """The bundle configs' ``train#dataset`` / ``validate#dataset``: ``experiment``'s
    ``fewshot`` (training), ``validation`` or ``test`` slice dataset.

    ``data`` gives MONAI's datalist keys ``train#dataset#data`` / ``validate#dataset#data``
    their standard place; the experiment reads them when it is built (they decide the
    classes, the slices and the manifest), so ``data`` must be what it was given.
    """
    datasets = {"fewshot": experiment.train_dataset, "validation": experiment.val_dataset,
                "test": experiment.test_dataset}
    if split not in datasets:
        raise ValueError(f"split must be one of {sorted(datasets)}, got {split!r}")
    given = {"fewshot": experiment.train_data, "validation": experiment.validation_data}.get(split)
    if data is not None and data != given:
        raise ValueError(f"the {split} datalist differs from the one the experiment was built with: pass "
                         f"train#dataset#data / validate#dataset#data to the experiment (train_data / validation_data)")
    return datasets[split]
