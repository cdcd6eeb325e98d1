"""Every registered method learns: on a small synthetic task (a bright disk on a noisy
background), each method, built through the registry with the tiny random backbone, segments
held-out images far above chance after a short run; the same run with nothing trainable does
not. A method whose parameters are frozen by mistake, or whose optimiser misses them, fails.

The backbone is random (no pretrained weights at 64 px), so its features are weak and every
method runs at 15x its few-shot rates; that scaling is the same for all methods.
"""

import pytest
import torch

from medsaga_components.prompts.from_labels import PROMPT_FROM_LABEL_KINDS, PromptsFromLabels
from medsaga_components.methods import METHODS, build_loss, build_network, build_optimizer, build_scheduler, get_method

SIZE = 64
STEPS = 100
RATE_SCALE = 15.0


def disk_task(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[count, 1, S, S]`` images in [0, 1] and ``[count, 1, S, S]`` labels (1 inside the disk)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    images, labels = [], []
    for _ in range(count):
        cy, cx = torch.randint(16, SIZE - 16, (2,), generator=g).tolist()
        radius = torch.randint(8, 13, (1,), generator=g).item()
        disk = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius ** 2
        images.append((0.2 + 0.6 * disk.float() + 0.05 * torch.randn(SIZE, SIZE, generator=g)).clamp(0, 1)[None])
        labels.append(disk.long()[None])
    return torch.stack(images), torch.stack(labels)


def dice(prediction: torch.Tensor, label: torch.Tensor) -> float:
    p, t = prediction.bool(), label.bool()
    return (2 * (p & t).sum() / (p.sum() + t.sum()).clamp(min=1)).item()


def train_and_score(method) -> float:
    torch.manual_seed(0)
    network = build_network(method, "lite_medsam_tiny", num_classes=1, checkpoint=None, image_size=SIZE)
    optimizer = build_optimizer(method, network)
    scheduler = build_scheduler(method, optimizer, STEPS)
    loss_function = build_loss(method)
    # Point/box methods get their prompts from the labels: random in training, the middle
    # of (or the box around) the disk at test, as the bundles do.
    prompted = get_method(method).prompt in PROMPT_FROM_LABEL_KINDS
    train_prompts = PromptsFromLabels(get_method(method).prompt, 1, jitter=0.1, seed=0) if prompted else None
    test_prompts = PromptsFromLabels(get_method(method).prompt, 1) if prompted else None
    images, labels = disk_task(16, seed=1)
    order = torch.Generator().manual_seed(2)
    network.train()
    for _ in range(STEPS):
        batch = torch.randint(0, len(images), (4,), generator=order)
        optimizer.zero_grad()
        extra = {"prompts": train_prompts.prompts(labels[batch])} if prompted else {}
        loss_function(network(images[batch], **extra), labels[batch]).backward()
        optimizer.step()
        scheduler.step()
    test_images, test_labels = disk_task(8, seed=3)
    network.eval()
    with torch.no_grad():
        extra = {"prompts": test_prompts.prompts(test_labels)} if prompted else {}
        prediction = network(test_images, **extra).argmax(dim=1, keepdim=True)
    return dice(prediction, test_labels)


def scaled_rates(name: str, scale: float):
    spec = get_method(name)
    rates = {"lr": spec.lr * scale, "adapter_lr": (spec.adapter_lr or spec.lr) * scale,
             "head_lr": (spec.head_lr or spec.lr) * scale}
    if spec.galore is not None:
        rates["galore_lr"] = (spec.galore.lr or spec.lr) * scale
    return spec.with_overrides(**rates)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_learns_the_disk(name):
    score = train_and_score(scaled_rates(name, RATE_SCALE))
    print(f"{name}: held-out Dice {score:.3f} after {STEPS} steps")
    assert score > 0.5, f"{name} did not learn the synthetic task: Dice {score:.3f}"


def test_a_method_that_trains_nothing_fails_the_same_check():
    # every rate 0: the same optimiser groups, parameters that never move
    score = train_and_score(scaled_rates("samed", 0.0))
    print(f"samed with every rate 0: held-out Dice {score:.3f}")
    assert score < 0.3
