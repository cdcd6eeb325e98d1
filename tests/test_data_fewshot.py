"""Few-shot selection, hold-out splits, the manifest, and SliceDataset in a MONAI trainer."""

from __future__ import annotations

import json

import fire
import nibabel as nib
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from data_synthetic import affine_with_spacing, save, write_dataset
from medsaga_components.data.holdout import split_slice_ranges
from medsaga_components.data import (
    FewShotError,
    SliceDataset,
    augmentation_transforms,
    fewshot_command,
    load_decathlon,
    read_manifest,
    select_few_shot_slices,
    write_manifest,
)
from medsaga_components.data.fewshot import check_disjoint

LABELLED_PER_VOLUME = 16  # data_synthetic puts foreground in slices 4..19 only


@pytest.fixture(scope="module")
def dataset_json(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("fewshot"), n_training=4)


def _labels(dataset_json, ref):
    dataset = load_decathlon(dataset_json)
    return np.take(np.asarray(nib.load(str(dataset.resolve(ref.label))).dataobj), ref.slice_index, axis=ref.axis)


def test_same_seed_same_manifest_and_different_seeds_differ(dataset_json, tmp_path):
    paths = [fewshot_command(str(dataset_json), 5, seed=s, out=str(tmp_path / f"m{i}.json"), holdout="declared")
             for i, s in enumerate([0, 0, 1])]
    texts = [open(p).read() for p in paths]
    assert texts[0] == texts[1]
    assert json.loads(texts[0])["slices"] != json.loads(texts[2])["slices"]


def test_manifest_has_the_documented_fields_and_round_trips(dataset_json, tmp_path):
    path = fewshot_command(str(dataset_json), 6, strategy="total", seed=3, out=str(tmp_path / "m.json"))
    raw = json.loads(open(path).read())
    for key in ("dataset_json", "axis", "strategy", "seed", "k", "slices"):
        assert key in raw
    assert raw["k"] == 6 and raw["seed"] == 3 and raw["axis"] == 2
    assert set(raw["slices"][0]) == {"volume", "label", "axis", "slice_index"}
    assert raw["slices"][0]["volume"].startswith("imagesTr/")
    manifest = read_manifest(path)
    assert len(manifest.slices) == 6
    write_manifest(tmp_path / "copy.json", manifest)
    assert json.loads((tmp_path / "copy.json").read_text()) == raw


def test_selected_slices_contain_foreground(dataset_json):
    refs = select_few_shot_slices(dataset_json, 12, seed=5)
    assert len(refs) == len(set(refs)) == 12
    assert all(_labels(dataset_json, ref).any() for ref in refs)
    assert all(4 <= ref.slice_index < 20 for ref in refs)


def test_strategies_per_volume_and_fraction(dataset_json):
    refs = select_few_shot_slices(dataset_json, 2, strategy="per_volume", seed=0)
    per_volume = {}
    for ref in refs:
        per_volume[ref.volume] = per_volume.get(ref.volume, 0) + 1
    assert per_volume == {f"imagesTr/case{i}.nii.gz": 2 for i in range(4)}
    available = 4 * LABELLED_PER_VOLUME
    assert len(select_few_shot_slices(dataset_json, 0.1, strategy="fraction")) == round(0.1 * available)
    assert len(select_few_shot_slices(dataset_json, 0.005, strategy="fraction")) == 1  # at least one


def test_too_many_shots_is_a_clear_error(dataset_json):
    with pytest.raises(FewShotError, match=rf"requested 65 few-shot slices, but only {4 * LABELLED_PER_VOLUME}"):
        select_few_shot_slices(dataset_json, 65)
    with pytest.raises(FewShotError, match="case0.nii.gz has only 16"):
        select_few_shot_slices(dataset_json, 17, strategy="per_volume")
    with pytest.raises(FewShotError, match="strategy 'sometimes' unknown"):
        select_few_shot_slices(dataset_json, 1, strategy="sometimes")
    with pytest.raises(FewShotError, match="whole number"):
        select_few_shot_slices(dataset_json, 2.5)


def test_stratified_selection_covers_a_rare_class(tmp_path):
    # Class 2 lives in exactly one slice (z=11) of one volume out of 30 labelled slices.
    dataset = _rare_class_dataset(tmp_path)
    for seed in range(10):
        refs = select_few_shot_slices(dataset, 2, seed=seed)
        assert any(r.volume == "i1.nii.gz" and r.slice_index == 11 for r in refs), seed


def _rare_class_dataset(tmp_path):
    """Two volumes, slices 3..17 labelled; class 2 only in slice 11 of the second volume."""
    affine = affine_with_spacing()
    entries = []
    for v in range(2):
        image = np.zeros((16, 16, 20), np.float32)
        labels = np.zeros((16, 16, 20), np.uint8)
        labels[4:8, 4:8, 3:18] = 1
        if v == 1:
            labels[10:12, 10:12, 11] = 2
        save(image, affine, tmp_path / f"i{v}.nii.gz")
        save(labels, affine, tmp_path / f"l{v}.nii.gz")
        entries.append({"image": f"i{v}.nii.gz", "label": f"l{v}.nii.gz"})
    (tmp_path / "dataset.json").write_text(json.dumps(
        {"modality": "CT", "labels": {"0": "bg", "1": "common", "2": "rare"}, "training": entries}))
    return tmp_path / "dataset.json"


def test_even_spacing_spans_the_candidates_from_first_to_last(dataset_json):
    # 4 volumes x slices 4..19: 64 candidates in volume order; positions 0, 21, 42, 63.
    refs = select_few_shot_slices(dataset_json, 4, spacing="even", seed=0)
    assert [(r.volume, r.slice_index) for r in refs] == [
        ("imagesTr/case0.nii.gz", 4), ("imagesTr/case1.nii.gz", 9),
        ("imagesTr/case2.nii.gz", 14), ("imagesTr/case3.nii.gz", 19)]
    assert select_few_shot_slices(dataset_json, 4, spacing="even", seed=7) == refs  # no randomness
    per_volume = select_few_shot_slices(dataset_json, 3, strategy="per_volume", spacing="even")
    assert [r.slice_index for r in per_volume] == [4, 12, 19] * 4
    assert [r.slice_index for r in select_few_shot_slices(dataset_json, 1, strategy="per_volume", spacing="even")] \
        == [11] * 4  # one slice: the middle candidate
    with pytest.raises(FewShotError, match="spacing 'sparse' unknown"):
        select_few_shot_slices(dataset_json, 2, spacing="sparse")


def test_even_spacing_warns_about_a_missed_class_and_is_recorded(tmp_path, caplog):
    dataset = _rare_class_dataset(tmp_path)
    with caplog.at_level("WARNING", logger="medsaga_components.data.fewshot"):
        refs = select_few_shot_slices(dataset, 2, spacing="even")
    assert [(r.volume, r.slice_index) for r in refs] == [("i0.nii.gz", 3), ("i1.nii.gz", 17)]
    assert "miss classes [2]" in caplog.text
    path = fewshot_command(str(dataset), 2, spacing="even", out=str(tmp_path / "m.json"), holdout="slices")
    assert json.loads(open(path).read())["spacing"] == "even"
    assert read_manifest(path).spacing == "even"
    raw = json.loads(open(path).read())
    del raw["spacing"]  # manifests written before spacing existed were all seeded draws
    (tmp_path / "old.json").write_text(json.dumps(raw))
    assert read_manifest(tmp_path / "old.json").spacing == "random"


def _holdout_slices(manifest):
    return {(r.volume, ref.slice_index) for part in (manifest.validation, manifest.test) for r in part
            for ref in r.refs()}


def test_holdout_by_declared_splits_volume_and_slice_range(tmp_path):
    declared = write_dataset(tmp_path / "declared", n_training=2, n_validation=1, n_test=1)
    manifest = read_manifest(fewshot_command(str(declared), 8, out=str(tmp_path / "a.json")))
    assert manifest.holdout == "declared"
    assert [r.volume for r in manifest.test] == ["imagesTs/case0.nii.gz"]
    assert all(ref.volume.startswith("imagesTr/") for ref in manifest.slices)

    by_volume = write_dataset(tmp_path / "volumes", n_training=5)
    manifest = read_manifest(fewshot_command(str(by_volume), 16, out=str(tmp_path / "b.json")))
    assert manifest.holdout == "volume"
    held = {r.volume for r in manifest.validation + manifest.test}
    assert len(held) == 2 and not held & {ref.volume for ref in manifest.slices}

    single = write_dataset(tmp_path / "single", n_training=1)
    path = fewshot_command(str(single), 0.99, strategy="fraction", out=str(tmp_path / "c.json"))
    manifest = read_manifest(path)
    assert manifest.holdout == "slices"
    held = _holdout_slices(manifest)
    assert len(held) > 0 and manifest.k > 0
    assert not held & {(ref.volume, ref.slice_index) for ref in manifest.slices}
    check_disjoint(manifest)
    # The validation/test ranges hold their share of labelled slices (16 labelled: 10 | 2 | 4).
    assert manifest.available_labelled_slices == 10
    # A hand-edited manifest that leaks a test slice into the few-shot set is caught.
    raw = json.loads(open(path).read())
    raw["slices"].append({**raw["slices"][0], "slice_index": raw["test"][0]["slice_start"]})
    (tmp_path / "leak.json").write_text(json.dumps(raw))
    with pytest.raises(FewShotError, match="also in the test set"):
        check_disjoint(read_manifest(tmp_path / "leak.json"))


def test_fewshot_command_is_fire_friendly(dataset_json, tmp_path):
    out = tmp_path / "fire.json"
    result = fire.Fire(fewshot_command, command=["--dataset_json", str(dataset_json), "--shots", "3",
                                                  "--strategy", "total", "--seed", "2", "--out", str(out)])
    assert result == str(out) and read_manifest(out).k == 3


def test_slice_dataset_samples_collate_and_follow_conventions(dataset_json, tmp_path):
    manifest = fewshot_command(str(dataset_json), 4, out=str(tmp_path / "m.json"))
    dataset = SliceDataset.from_manifest(manifest, image_size=64, transform=augmentation_transforms())
    batch = next(iter(DataLoader(dataset, batch_size=4)))
    assert batch["image"].shape == (4, 1, 64, 64) and batch["image"].dtype == torch.float32
    assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0
    assert batch["label"].shape == (4, 1, 64, 64) and batch["label"].dtype == torch.int64
    assert set(batch["label"].unique().tolist()) <= {0, 1, 2} and batch["label"].any()
    assert batch["geometry"].tolist()[0] == [40, 32, 64, 51, 64]
    assert batch["volume_shape"].tolist()[0] == [40, 32, 24]
    assert isinstance(batch["image_path"][0], str) and batch["slice_index"].dtype == torch.int64
    test_part = SliceDataset.from_manifest(manifest, part="test", image_size=64)
    assert len(test_part) == 24  # every slice of the held-out volume, for restacking


def test_slice_dataset_trains_in_a_monai_supervised_trainer(dataset_json, tmp_path):
    from monai.engines import SupervisedTrainer
    from monai.losses import DiceCELoss

    manifest = fewshot_command(str(dataset_json), 4, out=str(tmp_path / "m.json"))
    loader = DataLoader(SliceDataset.from_manifest(manifest, image_size=32), batch_size=2, shuffle=True)
    network = torch.nn.Conv2d(1, 3, kernel_size=3, padding=1)
    trainer = SupervisedTrainer(
        device=torch.device("cpu"), max_epochs=1, train_data_loader=loader, network=network,
        optimizer=torch.optim.SGD(network.parameters(), lr=0.1),
        loss_function=DiceCELoss(to_onehot_y=True, softmax=True))
    trainer.run()
    assert trainer.state.iteration == 2
    assert np.isfinite(float(trainer.state.output[0]["loss"]))


def test_slice_holdout_interleaves_validation_and_test_across_the_extent():
    labelled = list(range(10, 90))  # 80 labelled slices of a 100-slice volume
    train, validation, test = split_slice_ranges(labelled, 100, 0.15, 0.25)
    assert len(train) == len(validation) == len(test) == 4
    cover = sorted(train + validation + test)
    assert cover[0][0] == 0 and cover[-1][1] == 100
    assert all(a[1] == b[0] for a, b in zip(cover, cover[1:]))  # no slice lost or shared
    # Validation and test both reach into the first and the last quarter of the extent.
    for part in (validation, test):
        assert part[0][0] < 30 and part[-1][0] > 70
    held = sum(stop - start for start, stop in validation)
    assert held == 4 * 3  # 20 labelled slices a block: 12 | 3 | 5
    with pytest.raises(ValueError, match="at least 3 labelled slices"):
        split_slice_ranges([4, 5], 10, 0.15, 0.25)
