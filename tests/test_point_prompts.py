"""Point prompts (cheap_lunch): prompts from label maps, the prepare_batch MONAI's engines call,
class tokens, absent classes, clicks outside the image, and inference with and without clicks."""

import pytest
import torch
from monai.engines import SupervisedTrainer

from medsaga_components import SamSegmenter
from medsaga_components.prompts.from_labels import PromptsFromLabels, boxes_from_labels, points_from_labels
from medsaga_components.inference.prompted import segment_slice_with_points
from medsaga_components.inference.two_pass import PointFirstPass, TwoPassPointSegmenter, two_pass_logits
from medsaga_components.methods import build_loss, build_network, build_optimizer
from medsaga_components.network import ABSENT_CLASS_LOGIT

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SIZE = 64


def two_structures(batch: int = 2) -> torch.Tensor:
    """``[B, 1, S, S]``: class 1 a ring around class 2 (a point in the ring's bounding box centre
    would be class 2: the middle of a structure is not its box centre); image 1 lacks class 1."""
    yy, xx = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    r = ((yy - 30) ** 2 + (xx - 34) ** 2).float().sqrt()
    label = torch.zeros(batch, 1, SIZE, SIZE, dtype=torch.long)
    label[0, 0][(r <= 20) & (r > 12)] = 1
    for b in range(batch):
        label[b, 0][r <= 8] = 2
    return label


def test_points_lie_inside_their_class_and_absent_classes_are_padding():
    labels = two_structures()
    points, point_labels = points_from_labels(labels, 2, points_per_class=3)
    assert points.shape == (2, 2, 3, 2) and point_labels.shape == (2, 2, 3)
    assert point_labels[1, 0].tolist() == [-1, -1, -1] and point_labels[0].eq(1).all()
    random_points, _ = points_from_labels(labels, 2, points_per_class=5, generator=torch.Generator().manual_seed(0))
    for chosen in (points, random_points):
        for b, c in [(0, 0), (0, 1), (1, 1)]:
            for x, y in chosen[b, c].long().tolist():
                assert labels[b, 0, y, x] == c + 1, (b, c, x, y)  # (x, y) = (column, row)
    # the deterministic first click is the deepest pixel of the ring, not its box centre (class 2)
    x, y = points[0, 0, 0].long().tolist()
    assert labels[0, 0, y, x] == 1 and abs(((y - 30) ** 2 + (x - 34) ** 2) ** 0.5 - 16) <= 1.5


def test_boxes_enclose_each_class_and_jitter_stays_in_the_image():
    labels = two_structures()
    boxes, present = boxes_from_labels(labels, 2)
    assert present.tolist() == [[True, True], [False, True]]
    assert boxes[0, 0].tolist() == [14.0, 10.0, 54.0, 50.0] and boxes[0, 1].tolist() == [26.0, 22.0, 42.0, 38.0]
    assert boxes[1, 0].tolist() == [0.0, 0.0, SIZE - 1.0, SIZE - 1.0]  # absent: the whole image
    jittered, _ = boxes_from_labels(labels, 2, jitter=0.5, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(jittered, boxes)
    assert (jittered >= 0).all() and (jittered <= SIZE - 1).all()
    assert (jittered[..., 2] >= jittered[..., 0]).all() and (jittered[..., 3] >= jittered[..., 1]).all()


def test_prepare_batch_feeds_prompts_to_a_monai_trainer_step():
    network = build_network("cheap_lunch", "lite_medsam_tiny", num_classes=2, checkpoint=None, image_size=SIZE)
    labels = two_structures()
    prepare = PromptsFromLabels("class_points", 2, seed=0)
    image, label, args, kwargs = prepare({"image": torch.rand(2, 1, SIZE, SIZE), "label": labels})
    assert args == () and set(kwargs["prompts"]) == {"points", "point_labels", "present"}
    assert kwargs["prompts"]["present"].tolist() == [[True, True], [False, True]]
    before = {n: p.detach().clone() for n, p in network.named_parameters() if p.requires_grad}
    trainer = SupervisedTrainer(device="cpu", max_epochs=1, train_data_loader=[{"image": image, "label": label}],
                                network=network, optimizer=build_optimizer("cheap_lunch", network),
                                loss_function=build_loss("cheap_lunch"), prepare_batch=prepare)
    trainer.run()
    assert torch.isfinite(torch.as_tensor(trainer.state.output[0]["loss"]))  # decollated: one dict per image
    assert any(not torch.equal(p, before[n]) for n, p in network.named_parameters() if p.requires_grad)


def test_promptless_queries_keep_the_class_present():
    labels = two_structures(64)
    prompts = PromptsFromLabels("class_points", 2, seed=0, promptless_prob=0.3).prompts(labels)
    silent = (prompts["point_labels"] == -1).all(-1) & prompts["present"]
    share = silent.sum().item() / prompts["present"].sum().item()
    assert 0.15 < share < 0.45  # 0.3 within sampling error of ~96 queries
    with pytest.raises(ValueError, match="promptless_prob"):
        PromptsFromLabels("boxes", 2, seed=0, promptless_prob=0.3)


@pytest.fixture(scope="module")
def pretrained():
    """LiteMedSAM's real weights with the cheap_lunch prompt (class tokens untrained)."""
    torch.manual_seed(0)
    return SamSegmenter("lite_medsam", num_classes=2, image_size=256, prompt="class_points").eval()


def test_a_changed_click_or_class_token_changes_the_output(pretrained):
    image = torch.zeros(1, 1, 256, 256)
    image[..., 40:120, 40:120] = 0.8
    image[..., 150:220, 140:230] = 0.5
    labels = torch.ones(1, 2, 1, dtype=torch.long)
    at_first = {"points": torch.tensor([[[[80.0, 80.0]], [[180.0, 185.0]]]]), "point_labels": labels}
    moved = {"points": torch.tensor([[[[185.0, 180.0]], [[180.0, 185.0]]]]), "point_labels": labels}
    with torch.no_grad():
        a, b = pretrained(image, at_first), pretrained(image, moved)
        # class 1 moved from the bright square to the grey rectangle; class 2 did not move
        assert (a[0, 1] - b[0, 1]).abs().mean() > 0.5
        torch.testing.assert_close(a[0, 2], b[0, 2])
        tokens = pretrained.prompt.class_tokens.detach().clone()
        pretrained.prompt.class_tokens.data[0] += 1.0
        c = pretrained(image, at_first)
        pretrained.prompt.class_tokens.data.copy_(tokens)
    assert (a[0, 1] - c[0, 1]).abs().mean() > 0.05


def test_an_absent_class_is_never_predicted(pretrained):
    prompts = {"points": torch.tensor([[[[80.0, 80.0]], [[0.0, 0.0]]]]),
               "point_labels": torch.tensor([[[1], [-1]]]), "present": torch.tensor([[True, False]])}
    with torch.no_grad():
        logits = pretrained(torch.rand(1, 1, 256, 256), prompts)
    assert (logits[0, 2] == ABSENT_CLASS_LOGIT).all() and (logits.argmax(1) != 2).all()


def test_a_click_outside_the_image_is_an_error_naming_it(pretrained):
    prompts = {"points": torch.tensor([[[[80.0, 80.0]], [[256.0, 10.0]]]]), "point_labels": torch.ones(1, 2, 1).long()}
    with pytest.raises(ValueError, match=r"point \[256.0, 10.0\].*outside the 256 x 256 image"):
        pretrained(torch.rand(1, 1, 256, 256), prompts)
    with pytest.raises(ValueError, match=r"click \[-3.0, 5.0\].*class 'white matter'.*outside the 300 x 200 slice"):
        segment_slice_with_points(pretrained, torch.rand(200, 300), {"white matter": [(-3, 5)]},
                                  class_names=["grey matter", "white matter"])
    with pytest.raises(ValueError, match="at least one click"):
        segment_slice_with_points(pretrained, torch.rand(200, 300), {"white matter": []},
                                  class_names=["grey matter", "white matter"])


def test_clicks_on_a_slice_give_a_label_map_on_its_grid(pretrained):
    labels, logits = segment_slice_with_points(pretrained, torch.rand(200, 300), {1: [(150, 100)]})
    assert labels.shape == (200, 300) and logits.shape == (3, 200, 300)
    assert not (labels == 2).any()  # class 2 had no click


def test_without_clicks_the_second_pass_clicks_the_middle_of_the_first(pretrained):
    calls = []

    def forward(image, prompts):
        calls.append(prompts)
        return pretrained(image, prompts)

    image = torch.rand(1, 1, 128, 128)  # another size than the network's: clicks map to its frame
    with torch.no_grad():
        logits = two_pass_logits(forward, image, 2, 256, PointFirstPass())
        first = pretrained(image, None)
    assert logits.shape == (1, 3, 128, 128) and len(calls) == 2 and calls[0] is None
    expected, expected_labels = points_from_labels(first.argmax(1, keepdim=True), 2)
    assert torch.equal(calls[1]["point_labels"], expected_labels)
    found = calls[1]["present"]
    torch.testing.assert_close(calls[1]["points"][found], ((expected + 0.5) * 2 - 0.5)[found])


def test_the_two_pass_network_loads_a_plain_model_strictly(pretrained):
    two_pass = TwoPassPointSegmenter("lite_medsam", num_classes=2, checkpoint=None, image_size=256).eval()
    two_pass.load_state_dict(pretrained.state_dict(), strict=True)
    prompts = {"points": torch.tensor([[[[80.0, 80.0]], [[180.0, 185.0]]]]), "point_labels": torch.ones(1, 2, 1).long()}
    image = torch.rand(1, 1, 256, 256)
    with torch.no_grad():
        torch.testing.assert_close(two_pass(image, prompts), pretrained(image, prompts))
        assert two_pass(image).shape == (1, 3, 256, 256)  # no clicks: two passes
