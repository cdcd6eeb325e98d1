"""Exemplar-guided synthesis (data/synthesis.py): image and mask stay aligned through every
transform, pasting writes only where the foreground goes, the synthetic set is fixed by its
seed, and the few-shot manifest records it. Real MNI152 demo slices where a dataset is needed."""

import json

import pytest
import torch

from medsaga_components.data import SliceDataset
from medsaga_components.data.synthesis import (
    ExemplarSynthesisDataset,
    StepsPerEpochSampler,
    TrainingSlices,
    geometric_transforms,
    intensity_transforms,
    paste_foreground,
    synthesis_train_loader,
    with_exemplar_synthesis,
)
from medsaga_components.engine import FewShotExperiment

SIZE = 256  # the bundles' size: the elastic deformation's magnitude scales with it

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def square_and_disk() -> tuple[torch.Tensor, torch.Tensor]:
    """``[1, S, S]`` image (0.9 inside the shapes, 0.1 elsewhere) and label (1 square, 2 disk)."""
    yy, xx = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    label = torch.zeros(SIZE, SIZE, dtype=torch.long)
    label[50:115, 65:130] = 1
    label[((yy - 170) ** 2 + (xx - 155) ** 2) <= 36 ** 2] = 2
    image = torch.where(label > 0, 0.9, 0.1)
    return image[None].float(), label[None]


def misaligned_fraction(image: torch.Tensor, label: torch.Tensor) -> float:
    """Share of the shapes' pixels (image above mid-grey) outside the mask, and of the mask
    outside the shapes, ignoring a one-pixel rim where interpolation blurs the edge."""
    bright = image[0] > 0.5
    mask = label[0] > 0
    rim = torch.nn.functional.max_pool2d(mask[None, None].float(), 3, 1, 1)[0, 0].bool() & \
        ~(-torch.nn.functional.max_pool2d(-mask[None, None].float(), 3, 1, 1)[0, 0]).bool()
    wrong = (bright ^ mask) & ~rim
    return wrong.sum().item() / max(1, mask.sum().item())


@pytest.mark.parametrize("step", range(4))  # flip, flip, affine, elastic: each on its own, always applied
def test_each_geometric_transform_moves_image_and_mask_together(step):
    transform = geometric_transforms(image_size=SIZE).transforms[step]
    transform.prob = 1.0
    image, label = square_and_disk()
    would_notice = False
    for seed in range(5):
        transform.set_random_state(seed=seed)
        out = transform({"image": image.clone(), "label": label.clone().float()})
        moved_image, moved_label = torch.as_tensor(out["image"]), torch.as_tensor(out["label"]).round().long()
        # the image moved enough that a mask left behind would fail the same check
        would_notice |= misaligned_fraction(moved_image, label) > 0.03
        assert moved_image.shape == image.shape and moved_label.shape == label.shape
        assert set(moved_label.unique().tolist()) <= {0, 1, 2}  # classes stay whole (nearest neighbour)
        assert misaligned_fraction(moved_image, moved_label) < 0.03, f"seed {seed}"
    assert would_notice, "the transform barely moves anything: this test could not see a misalignment"


def test_the_whole_pipeline_keeps_the_shapes_inside_their_masks():
    image, label = square_and_disk()
    geometric = geometric_transforms(image_size=SIZE)
    for seed in range(8):
        geometric.set_random_state(seed=seed)
        out = geometric({"image": image.clone(), "label": label.clone().float()})
        moved_image = torch.as_tensor(out["image"])
        moved_label = torch.as_tensor(out["label"]).round().long()
        assert misaligned_fraction(moved_image, moved_label) < 0.03, f"seed {seed}"
        # the disk (class 2) is still the brighter shape's class where it is, not the square's
        assert (moved_label == 2).sum() > 0.5 * (label == 2).sum()


def test_intensity_transforms_change_the_image_only_and_stay_in_range():
    image, _ = square_and_disk()
    intensity = intensity_transforms()
    changed = 0
    for seed in range(6):
        intensity.set_random_state(seed=seed)
        out = torch.as_tensor(intensity({"image": image.clone()})["image"]).clamp(0, 1)
        assert out.shape == image.shape and torch.isfinite(out).all()
        changed += not torch.allclose(out, image)
    assert changed >= 4


def test_pasting_writes_only_the_foreground_and_its_rim():
    image, label = square_and_disk()
    background = torch.full_like(image, 0.4)
    pasted, pasted_label = paste_foreground(image, label, background, margin=3, edge_sigma=2.0)
    assert pasted.shape == image.shape and torch.equal(pasted_label, label)
    inside = label > 0
    torch.testing.assert_close(pasted[inside], image[inside])  # the structure is copied exactly
    near = torch.nn.functional.max_pool2d(inside.float()[None], 2 * 3 + 1 + 2 * 8, 1, 3 + 8)[0].bool()
    torch.testing.assert_close(pasted[~near], background[~near])  # far from it nothing changes
    seam = near & ~inside
    assert ((pasted[seam] >= 0.1 - 1e-6) & (pasted[seam] <= 0.4 + 1e-6)).all()  # a blend, not new values
    assert (pasted[seam] < 0.4 - 1e-3).any() and (pasted[seam] > 0.1 + 1e-3).any()  # soft, not a hard cut


def test_pasting_refuses_mismatched_shapes():
    image, label = square_and_disk()
    with pytest.raises(ValueError, match="one shape"):
        paste_foreground(image, label, torch.zeros(1, SIZE, SIZE + 1))


@pytest.fixture(scope="module")
def exemplars(demo_dir, tmp_path_factory):
    experiment = FewShotExperiment(demo_dir, tmp_path_factory.mktemp("eval"), shots=3, spacing="even", image_size=64,
                                   rotation_degrees=0)
    return experiment


def test_synthetic_pairs_are_fixed_by_the_seed_and_stay_in_the_image(exemplars):
    plain = SliceDataset(exemplars.train_dataset.dataset, exemplars.train_dataset.slices, 64)
    backgrounds = SliceDataset(plain.dataset, [r.__class__(r.volume, None, r.axis, (r.slice_index + 3) % 20)
                                               for r in plain.slices], 64)
    first = ExemplarSynthesisDataset(plain, backgrounds, pairs_per_exemplar=4, seed=0, paste_prob=0.5)
    again = ExemplarSynthesisDataset(plain, backgrounds, pairs_per_exemplar=4, seed=0, paste_prob=0.5)
    other = ExemplarSynthesisDataset(plain, backgrounds, pairs_per_exemplar=4, seed=1, paste_prob=0.5)
    assert len(first) == 4 * len(plain)
    differ = 0
    for i in range(len(first)):
        a, b, c = first[i], again[i], other[i]
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
        differ += not torch.equal(a["image"], c["image"])
        assert a["image"].shape == (1, 64, 64) and a["label"].shape == (1, 64, 64)
        assert a["image"].min() >= 0 and a["image"].max() <= 1 and a["label"].dtype == torch.long
        assert set(a["label"].unique().tolist()) <= {0, 1, 2}
        assert a["volume"] == plain.slices[i // 4].volume  # pair i comes from exemplar i // P
    assert differ >= len(first) - 1
    with pytest.raises(IndexError):
        first[len(first)]


def test_the_manifest_records_synthesis_and_the_switch_turns_it_off(demo_dir, tmp_path):
    on = with_exemplar_synthesis(FewShotExperiment(demo_dir, tmp_path / "on", shots=3, spacing="even", image_size=64),
                                 enabled=True, pairs_per_exemplar=6, seed=7, paste_prob=0.25)
    recorded = json.loads((tmp_path / "on" / "fewshot_manifest.json").read_text())["synthesis"]
    assert recorded["enabled"] is True and recorded["pairs_per_exemplar"] == 6 and recorded["seed"] == 7
    assert recorded["synthetic_pairs"] == 18 and len(on.train_dataset) == 3 + 18
    assert recorded["background_slices"] > 0 and on.num_classes == 2
    # backgrounds are never exemplars nor held-out slices
    synthetic = on.train_dataset.datasets[1]
    exemplar_keys = {(r.volume, r.slice_index) for r in on.manifest.slices}
    assert all((r.volume, r.slice_index) not in exemplar_keys and r.label is None for r in synthetic.backgrounds.slices)
    off = with_exemplar_synthesis(FewShotExperiment(demo_dir, tmp_path / "off", shots=3, spacing="even", image_size=64),
                                  enabled="false")  # as `--synthesis false` arrives
    assert json.loads((tmp_path / "off" / "fewshot_manifest.json").read_text())["synthesis"] == {"enabled": False}
    assert len(off.train_dataset) == 3
    with pytest.raises(ValueError, match="synthesis must be true or false"):
        with_exemplar_synthesis(off, enabled="maybe")


def test_an_epoch_is_steps_per_epoch_batches_whatever_the_set_size():
    data = list(range(21))
    sampler = StepsPerEpochSampler(data, samples_per_replica=10, seed=3)
    first = list(sampler)
    assert len(first) == len(sampler) == 10 and len(set(first)) == 10  # no repeat before every index is used
    sampler.set_epoch(1)
    assert list(sampler) != first
    long = StepsPerEpochSampler(data, samples_per_replica=30, seed=3)
    drawn = list(long)
    assert sorted(drawn[:21]) == data  # every index once before any twice


def test_real_share_draws_that_share_of_an_epoch_from_the_exemplars():
    data = TrainingSlices([list(range(5)), list(range(40))])  # 5 exemplars, 8 synthetic pairs each
    for share, expected_real in ((0.5, 5), (0.0, 0), (1.0, 10), (0.3, 3)):
        sampler = StepsPerEpochSampler(data, samples_per_replica=10, seed=1, real_share=share)
        for epoch in range(3):
            sampler.set_epoch(epoch)
            drawn = list(sampler)
            real = [i for i in drawn if i < 5]
            assert len(drawn) == 10 and len(real) == expected_real, (share, drawn)
            counts = [real.count(i) for i in range(5)]
            assert max(counts) - min(counts) <= 1  # every exemplar once before any twice
            assert all(0 <= i < 45 for i in drawn)
    uniform = StepsPerEpochSampler(data, samples_per_replica=450, seed=1)  # None: the set alike, a ninth real
    assert sum(i < 5 for i in uniform) == 50
    with pytest.raises(ValueError, match="synthesis_real_share must be in"):
        StepsPerEpochSampler(data, samples_per_replica=10, real_share=1.5)
    with pytest.raises(ValueError, match="exemplars \\+ synthetic pairs"):
        StepsPerEpochSampler(list(range(5)), samples_per_replica=10, real_share=0.5)


def test_the_synthesis_loader_gives_steps_per_epoch_batches(exemplars):
    class Holder:  # the experiment's training set as with_exemplar_synthesis leaves it
        train_dataset = exemplars.train_dataset
    loader = synthesis_train_loader(Holder, batch_size=2, steps_per_epoch=3)
    batches = list(loader)
    assert len(batches) == 3 and all(b["image"].shape == (2, 1, 64, 64) for b in batches)

