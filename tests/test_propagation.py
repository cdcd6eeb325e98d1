"""Slice-by-slice propagation of box prompts (medsaga_components.inference.propagation).

A synthetic sphere in a 32x40x40 volume and predictors with known behaviour stand in for SAM:
an oracle (the true cross-section inside the prompt box), a leaky one (the prompt box filled,
optionally grown past it) and a noisy one (tiny fragments where the structure has ended).
"""

from __future__ import annotations

import re

import numpy as np
import pytest

from medsaga_components.inference.propagation import (StopRule, box_of, match_structures, propagate_from_box,
                                                       propagate_labelled, propagate_structure, resegment_structure,
                                                       union_box)

D, H, W = 32, 40, 40
SHAPE = (H, W)
MARGIN = 0.1


def ball(centre=(16, 20, 20), radius=8) -> np.ndarray:
    z, y, x = np.ogrid[:D, :H, :W]
    return (z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2 <= radius ** 2


SPHERE = ball()  # slices 8..24 hold it (its poles are single pixels)


def slanted_tube() -> np.ndarray:
    """A disc of radius 5 whose centre moves one column per slice: every slice's box differs."""
    z, y, x = np.ogrid[:D, :H, :W]
    return (y - 20) ** 2 + (x - (z + 4)) ** 2 <= 25


def filled(box, grow: int = 0) -> np.ndarray:
    """Pixels inside ``box`` widened by ``grow`` pixels (independent of the module's own helpers)."""
    x0, y0, x1, y1 = box
    rows, cols = np.arange(H)[:, None], np.arange(W)[None, :]
    return (rows >= y0 - grow) & (rows <= y1 + grow) & (cols >= x0 - grow) & (cols <= x1 + grow)


class Recorder:
    """A predict(k, box) that records every call."""

    def __init__(self, respond):
        self.respond = respond
        self.calls: list[tuple[int, tuple]] = []

    def __call__(self, k, box):
        self.calls.append((k, box))
        return self.respond(k, box)

    @property
    def slices(self) -> list[int]:
        return [k for k, _ in self.calls]

    def box_on(self, k):
        boxes = [box for j, box in self.calls if j == k]
        assert len(boxes) == 1, f"slice {k} predicted {len(boxes)} times"
        return boxes[0]


def oracle(truth=SPHERE) -> Recorder:
    return Recorder(lambda k, box: truth[k] & filled(box))


def leaky(grow: int = 0) -> Recorder:
    return Recorder(lambda k, box: filled(box, grow))


def dice(a, b) -> float:
    return 2 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


def test_box_recovers_sphere_and_stops_at_poles():
    predict = oracle()
    box, k0, k1 = (10.6, 11.2, 29.4, 28.7), 5, 27  # the sphere's box (12..28) jittered a little larger
    result = propagate_from_box(predict, D, SHAPE, box, k0, k1)
    assert dice(result, SPHERE) > 0.95
    assert not result[:8].any() and not result[25:].any()
    assert all(k0 <= k <= k1 for k in predict.slices)
    # StopRule(min_pixels=1) stops at the first empty slice past each pole: 7 and 25, never further.
    assert min(predict.slices) == 7 and max(predict.slices) == 25


def test_leaky_predictor_never_leaves_the_3d_box():
    predict = leaky(grow=3)  # fills past its prompt: only zeroing outside the limits keeps it in
    box, k0, k1 = (12.0, 10.0, 27.0, 30.0), 10, 20
    result = propagate_from_box(predict, D, SHAPE, box, k0, k1)
    inside = filled(box)
    assert result[k0:k1 + 1].any()
    assert not result[:, ~inside].any()
    assert not result[:k0].any() and not result[k1 + 1:].any()
    for k, (x0, y0, x1, y1) in predict.calls:
        assert k0 <= k <= k1 and box[0] <= x0 <= x1 <= box[2] and box[1] <= y0 <= y1 <= box[3]


def test_leaky_predictor_needs_a_stop_rule():
    seeds = {16: SPHERE[16]}
    unbounded = propagate_structure(leaky(), D, SHAPE, seeds)
    assert unbounded[0].any() and unbounded[D - 1].any()  # the default rule never sees the structure end
    # The first leaked slice (the whole margin-widened box) overlaps the disc below IoU 0.6.
    stopped = propagate_structure(leaky(), D, SHAPE, seeds, stop=StopRule(min_overlap=0.6))
    assert np.array_equal(stopped[16], SPHERE[16]) and stopped.sum() == SPHERE[16].sum()


def test_stop_rule_fields():
    previous = filled((10, 10, 19, 19))  # 100 pixels
    assert StopRule().stops(previous, np.zeros(SHAPE, bool))
    assert not StopRule().stops(previous, filled((10, 10, 10, 10)))
    assert StopRule(min_area_ratio=0.5).stops(previous, filled((10, 10, 19, 13)))  # 40 < 0.5 * 100 pixels
    assert not StopRule(min_area_ratio=0.5).stops(previous, filled((10, 10, 19, 14)))  # 50 pixels
    assert StopRule(min_overlap=0.5).stops(previous, filled((15, 10, 24, 19)))  # IoU 50 / 150
    assert not StopRule(min_overlap=0.3).stops(previous, filled((15, 10, 24, 19)))


def test_min_area_ratio_stops_tiny_fragments():
    def fragments(k, box):  # the truth, or where there is none a one-pixel fragment at the box's centre
        mask = SPHERE[k] & filled(box)
        if not mask.any():
            mask[int((box[1] + box[3]) / 2), int((box[0] + box[2]) / 2)] = True
        return mask

    seeds = {16: SPHERE[16]}
    endless = propagate_structure(Recorder(fragments), D, SHAPE, seeds)
    assert endless[0].any() and endless[D - 1].any()
    stopped = propagate_structure(Recorder(fragments), D, SHAPE, seeds, stop=StopRule(min_area_ratio=0.25))
    assert not stopped[:8].any() and not stopped[25:].any()
    assert dice(stopped, SPHERE) > 0.95


def test_seeds_come_back_exactly():
    square = filled((5, 5, 34, 34))  # nothing like the sphere's disc
    seeds = {16: square, 12: SPHERE[12]}
    predict = oracle()
    result = propagate_structure(predict, D, SHAPE, seeds)
    assert np.array_equal(result[16], square) and np.array_equal(result[12], SPHERE[12])
    assert 16 not in predict.slices and 12 not in predict.slices
    assert np.array_equal(result[17:], SPHERE[17:])


@pytest.mark.parametrize("a, b, middle", [(10, 20, 15), (10, 13, 11), (10, 12, 11)])
def test_between_seeds_both_fronts_meet_in_the_middle(a, b, middle):
    truth = slanted_tube()
    predict = oracle(truth)
    result = propagate_structure(predict, D, SHAPE, {a: truth[a], b: truth[b]}, k_range=(a, b))
    assert sorted(predict.slices) == list(range(a + 1, b))  # each slice between the seeds once, nothing else
    expected_volume = np.zeros_like(truth)
    expected_volume[a:b + 1] = truth[a:b + 1]
    assert np.array_equal(result, expected_volume)
    for k in range(a + 1, middle):  # the lower front: each slice from the one below
        assert predict.box_on(k) == box_of(result[k - 1], MARGIN)
    for k in range(middle + 1, b):  # the upper front: each slice from the one above
        assert predict.box_on(k) == box_of(result[k + 1], MARGIN)
    expected = union_box(box_of(result[middle - 1], MARGIN), box_of(result[middle + 1], MARGIN))
    assert predict.box_on(middle) == expected
    assert expected not in (box_of(result[middle - 1], MARGIN), box_of(result[middle + 1], MARGIN))


def test_between_seeds_an_empty_prediction_keeps_the_last_box():
    truth = slanted_tube()
    predict = Recorder(lambda k, box: np.zeros(SHAPE, bool) if k == 12 else truth[k] & filled(box))
    result = propagate_structure(predict, D, SHAPE, {10: truth[10], 20: truth[20]}, k_range=(10, 20))
    assert not result[12].any()
    assert predict.box_on(13) == predict.box_on(12) == box_of(result[11], MARGIN)
    assert result[13].any() and result[14].any()  # no stop rule between seeds


def test_known_empty_slices_are_never_predicted_or_crossed():
    predict = oracle()
    result = propagate_structure(predict, D, SHAPE, {16: SPHERE[16]}, empty_slices={12, 21})
    assert sorted(predict.slices) == [13, 14, 15, 17, 18, 19, 20]
    assert not result[:13].any() and not result[21:].any()
    assert np.array_equal(result[13:21], SPHERE[13:21])


def test_known_empty_slice_between_seeds_splits_the_gap():
    predict = oracle()
    result = propagate_structure(predict, D, SHAPE, {10: SPHERE[10], 22: SPHERE[22]}, empty_slices={16},
                                 k_range=(10, 22))
    assert 16 not in predict.slices and not result[16].any()
    assert np.array_equal(result[10:16], SPHERE[10:16]) and np.array_equal(result[17:23], SPHERE[17:23])


def test_midway_ends_a_box_filling_model_where_copying_the_nearest_labelled_slice_would():
    """A leaky model never stops by itself. With ``end_in_gap="midway"``, a structure seeded on 10
    whose class is labelled absent on 20 fills 11..15 (15 is as far from both; a tie goes to the
    lower slice) and one seeded on 26 with the class absent on 19 fills 23..25; beyond the
    outermost seed the stop rule still decides. The default fills up to the empty slice."""
    seed = filled((12.0, 12.0, 20.0, 20.0))
    predict = leaky()
    result = propagate_structure(predict, D, SHAPE, {10: seed}, empty_slices={20}, k_range=(8, 31),
                                 end_in_gap="midway")
    assert sorted(predict.slices) == [8, 9, 11, 12, 13, 14, 15]
    assert result[8:16].any(axis=(1, 2)).all() and not result[16:].any()
    predict = leaky()
    propagate_structure(predict, D, SHAPE, {26: seed}, empty_slices={19}, k_range=(0, 27), end_in_gap="midway")
    assert sorted(predict.slices) == [23, 24, 25, 27]
    predict = leaky()
    propagate_structure(predict, D, SHAPE, {10: seed}, empty_slices={20}, k_range=(10, 31))
    assert sorted(predict.slices) == list(range(11, 20))
    with pytest.raises(ValueError, match=re.escape("end_in_gap is 'nearest'; expected one of")):
        propagate_structure(predict, D, SHAPE, {10: seed}, end_in_gap="nearest")


def two_blobs(shift: int = 0) -> tuple[np.ndarray, np.ndarray]:
    left, right = np.zeros(SHAPE, bool), np.zeros(SHAPE, bool)
    left[10:18, 4 + shift:12 + shift] = True
    right[20:30, 25 + shift:33 + shift] = True
    return left, right


def test_match_structures_two_blobs_on_three_slices():
    blobs = {k: two_blobs(shift) for k, shift in ((5, 0), (10, 2), (15, 4))}
    labelled = {k: left | right for k, (left, right) in blobs.items()}
    labelled[20] = np.zeros(SHAPE, bool)  # labelled, and the class is absent
    structures, labelled_slices = match_structures(labelled)
    assert labelled_slices == {5, 10, 15, 20}
    assert len(structures) == 2
    for side, structure in enumerate(structures):
        assert sorted(structure) == [5, 10, 15]
        for k, mask in structure.items():
            assert np.array_equal(mask, blobs[k][side])


def test_match_structures_falls_back_to_boxes_and_starts_new_structures():
    ring, inside, far = np.zeros(SHAPE, bool), np.zeros(SHAPE, bool), np.zeros(SHAPE, bool)
    ring[5:15, 5:15] = True
    ring[7:13, 7:13] = False
    inside[9:11, 9:11] = True  # no pixel in common with the ring, but inside its box
    far[30:35, 30:35] = True
    structures, _ = match_structures({3: ring, 4: inside | far, 6: far})
    assert [sorted(s) for s in structures] == [[3, 4], [4, 6]]
    assert np.array_equal(structures[0][4], inside) and np.array_equal(structures[1][4], far)


def test_propagate_labelled_keeps_labels_and_stops_at_an_empty_label():
    predict = oracle()
    labelled = {12: SPHERE[12], 18: SPHERE[18], 22: np.zeros(SHAPE, bool)}
    result = propagate_labelled(predict, D, SHAPE, labelled)
    assert not {12, 18}.intersection(predict.slices) and max(predict.slices) < 22
    assert np.array_equal(result[:22], SPHERE[:22]) and not result[22:].any()


SEED = {16: SPHERE[16]}


@pytest.mark.parametrize("call, message", [
    (lambda p: propagate_structure(p, D, SHAPE, {40: SPHERE[16]}),
     "seed slice 40 is outside the volume's slices 0..31"),
    (lambda p: propagate_structure(p, D, SHAPE, SEED, k_range=(0, 10)), "seed slice 16 is outside k_range 0..10"),
    (lambda p: propagate_structure(p, D, SHAPE, {16: SPHERE[16, :30]}),
     "seed on slice 16 has shape (30, 40); expected (40, 40)"),
    (lambda p: propagate_structure(p, D, SHAPE, {}), "no seeds"),
    (lambda p: propagate_structure(p, D, SHAPE, {16: np.zeros(SHAPE)}), "seed on slice 16 is empty"),
    (lambda p: propagate_structure(p, D, SHAPE, SEED, empty_slices={16}), "seed slice 16 is also in empty_slices"),
    (lambda p: propagate_structure(p, D, SHAPE, SEED, limits=(20, 5, 10, 30)),
     "limits box (20, 5, 10, 30) is reversed"),
    (lambda p: propagate_structure(p, D, SHAPE, SEED, limits=(0, 0, 40, 39)),
     "limits box (0, 0, 40, 39) lies outside the 40x40 slice"),
    (lambda p: propagate_from_box(p, D, SHAPE, (5, 5, 45, 30), 3, 9),
     "box (5, 5, 45, 30) on slices 3..9 of the volume of 32x40x40 (D x H x W) lies outside"),
    (lambda p: propagate_from_box(p, D, SHAPE, (5, 5, 25, 30), 20, 35),
     "box (5, 5, 25, 30) on slices 20..35 of the volume of 32x40x40 (D x H x W) lies outside"),
    (lambda p: propagate_from_box(p, D, SHAPE, (25, 5, 5, 30), 3, 9),
     "box (25, 5, 5, 30) on slices 3..9 of the volume of 32x40x40 (D x H x W) is reversed"),
    (lambda p: propagate_from_box(p, D, SHAPE, (5, 5, 25, 30), 9, 3),
     "box (5, 5, 25, 30) on slices 9..3 of the volume of 32x40x40 (D x H x W) is reversed"),
    (lambda p: match_structures({3: SPHERE[16], 4: SPHERE[16, :30]}), "labelled slice 4 has shape (30, 40)"),
])
def test_bad_input_is_refused_by_name(call, message):
    predict = oracle()
    with pytest.raises(ValueError, match=re.escape(message)):
        call(predict)
    assert not predict.calls


def test_predict_of_the_wrong_shape_is_named():
    with pytest.raises(ValueError, match=re.escape("predict returned shape (2, 2) on slice 15; expected (40, 40)")):
        propagate_structure(lambda k, box: np.zeros((2, 2), bool), D, SHAPE, SEED)


def test_box_of_margin_and_limits():
    mask = filled((10, 20, 19, 21))  # 10 columns x 2 rows
    assert box_of(np.zeros(SHAPE, bool)) is None
    assert box_of(mask) == (10, 20, 19, 21)
    assert box_of(mask, 0.1) == (9, 19, 20, 22)  # 10% of 10 columns; at least a pixel for 2 rows
    assert box_of(mask, 0.5) == (5, 19, 24, 22)
    assert box_of(mask, 0.5, limits=(8, 0, 30, 21.5)) == (8, 19, 24, 21.5)
    assert box_of(filled((0, 0, 3, 3)), 1.0) == (0, 0, 7, 7)  # clamped to the slice
    assert box_of(mask, 0.1, limits=(30, 30, 35, 35)) is None  # wholly outside the limits


def test_all_empty_box_gives_an_empty_volume_and_tries_every_slice_nearest_first():
    predict = Recorder(lambda k, box: np.zeros(SHAPE, bool))
    result = propagate_from_box(predict, D, SHAPE, (5, 5, 30, 30), 10, 14)
    assert not result.any()
    assert predict.slices == [12, 11, 13, 10, 14]


def test_box_seeds_from_the_nearest_non_empty_slice():
    box = (10.0, 10.0, 30.0, 30.0)
    # The first try (the whole box on the middle slice 16) misses; the next slice (15) seeds.
    predict = Recorder(lambda k, prompt: SPHERE[k] & filled(prompt) if (k, prompt) != (16, box) else
                       np.zeros(SHAPE, bool))
    result = propagate_from_box(predict, D, SHAPE, box, 5, 27)
    assert predict.calls[:2] == [(16, box), (15, box)]
    assert np.array_equal(result, SPHERE)


def test_interpolated_boxes_prompt_each_gap_slice_independently_of_its_neighbours():
    """Between seeds on 4 and 12 of the slanted tube, ``between="interpolate"`` prompts slice k by
    the seeds' boxes interpolated at k (no front carries an error on), and the leaky predictor
    (which fills its box) shows the boxes themselves."""
    tube = slanted_tube()
    predict = leaky()
    seeds = {4: tube[4], 12: tube[12]}
    result = propagate_structure(predict, D, SHAPE, seeds, margin=0.0, between="interpolate",
                                 stop=StopRule(min_pixels=10**6))  # nothing beyond the seeds
    first, last = box_of(tube[4]), box_of(tube[12])
    for k in range(5, 12):
        t = (k - 4) / 8
        expected = tuple((1 - t) * u + t * v for u, v in zip(first, last))
        np.testing.assert_allclose(predict.box_on(k), expected)
        assert result[k].any()
    assert np.array_equal(result[4], tube[4]) and np.array_equal(result[12], tube[12])
    with pytest.raises(ValueError, match="between is 'middle'; expected one of"):
        propagate_structure(predict, D, SHAPE, seeds, between="middle")


def test_a_loose_boxs_seed_is_tightened_around_what_it_holds():
    """With ``refine_seed=1`` the middle slice is asked again with the box of its first answer: the
    oracle's answer inside a loose box is the cross-section, so the second ask is the tight box."""
    predict = oracle()
    loose = (2.0, 2.0, 37.0, 37.0)
    propagate_from_box(predict, D, SHAPE, loose, 6, 26, margin=0.0, refine_seed=1)
    middle_asks = [box for k, box in predict.calls if k == 16]
    assert middle_asks[0] == loose and middle_asks[1] == box_of(SPHERE[16])


def test_a_guide_ends_the_structure_where_a_box_filling_model_would_not():
    # A model that fills whatever box it gets never sees the sphere end: alone it fills the 3-D box
    # from end to end. Guided (the oracle propagates), it is asked once per slice the guide reached,
    # with the box of the guide's mask there, so nothing it fills carries to the next slice.
    box, k0, k1 = (10.6, 11.2, 29.4, 28.7), 5, 27
    alone = propagate_from_box(leaky(), D, SHAPE, box, k0, k1)
    assert alone[k0].any() and alone[k1].any()
    filler = leaky()
    guided = propagate_from_box(oracle(), D, SHAPE, box, k0, k1, resegment=filler)
    assert not guided[:8].any() and not guided[25:].any()
    assert sorted(filler.slices) == list(range(8, 25))
    for k in range(8, 25):
        assert filler.box_on(k) == box_of(SPHERE[k], MARGIN, box)
        assert np.array_equal(guided[k], filled(box_of(SPHERE[k], MARGIN, box)))
    assert dice(guided, SPHERE) > 0.7 and dice(alone, SPHERE) < 0.5


def test_a_resegmenting_model_never_touches_the_users_slices():
    labelled = {12: SPHERE[12], 20: SPHERE[20]}
    filler = leaky()
    result = propagate_labelled(oracle(), D, SHAPE, labelled, resegment=filler)
    assert np.array_equal(result[12], SPHERE[12]) and np.array_equal(result[20], SPHERE[20])
    assert sorted(filler.slices) == [k for k in range(8, 25) if k not in labelled]


def test_resegment_structure_checks_its_guide_and_limits():
    with pytest.raises(ValueError, match=r"bool \[D, H, W\] guide"):
        resegment_structure(leaky(), SPHERE[16])
    with pytest.raises(ValueError, match="limits box"):
        resegment_structure(leaky(), SPHERE, limits=(30.0, 0.0, 10.0, 5.0))
    # A slice whose guide mask lies wholly outside the limits is left empty, not asked.
    filler = leaky()
    result = resegment_structure(filler, SPHERE, limits=(0.0, 0.0, 39.0, 13.0))  # rows 0..13 only
    assert filler.slices and not result[8].any() and 8 not in filler.slices  # slice 8: one pixel at row 20
