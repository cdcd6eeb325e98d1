"""bf16 autocast of the image encoder: detected, switched, float32 outside, same answer as fp32.

The forced-on cases run on any CPU (autocast emulates bf16 where the CPU lacks it), so these
tests do not depend on the CI machine's instruction set; the detection test reads /proc/cpuinfo.
"""

import copy
from pathlib import Path

import pytest
import torch

from medsaga_components.backbones import build_backbone
from medsaga_components.methods import build_loss, build_network, build_optimizer
from medsaga_components.precision import cpu_bf16_instructions, native_bf16, resolve_bf16, use_bf16, uses_bf16
from medsaga_components.training.memory import MemoryConfig, enable_memory_efficient_training
from test_pretrained_lite_medsam import _to_network_frame, _whole_brain_slice


@pytest.mark.skipif(not Path("/proc/cpuinfo").is_file(), reason="reads the CPU flags Linux reports")
def test_native_bf16_on_cpu_follows_the_cpu_flags():
    flags = set(Path("/proc/cpuinfo").read_text().split())
    assert native_bf16("cpu") == bool({"avx512_bf16", "amx_bf16"} & flags)
    assert ("avx512_bf16" in cpu_bf16_instructions()) == ("avx512_bf16" in flags)


def test_the_bundle_key_resolves_auto_true_and_false():
    assert resolve_bf16("auto", "cpu") == resolve_bf16(None, "cpu") == native_bf16("cpu")
    assert resolve_bf16("true", "cpu") and resolve_bf16(True, "cpu")
    assert not resolve_bf16("False", "cpu") and not resolve_bf16(False, "cpu")
    with pytest.raises(ValueError, match="bf16"):
        resolve_bf16("fast", "cpu")


def _tiny_medsaga():
    return build_network("medsaga", "vit_tiny", num_classes=2, checkpoint=None, image_size=32)


def test_encoder_runs_in_bf16_and_everything_around_it_in_float32():
    network = use_bf16(_tiny_medsaga(), True)
    assert uses_bf16(network)
    block_dtypes = []
    network.backbone.image_encoder.blocks[0].attn.qkv.register_forward_hook(lambda m, a, out: block_dtypes.append(out.dtype))
    images, labels = torch.rand(2, 1, 32, 32), torch.randint(0, 3, (2, 1, 32, 32))
    optimizer = build_optimizer("medsaga", network)
    logits = network(images)
    assert block_dtypes == [torch.bfloat16]
    assert logits.dtype == torch.float32 and network.backbone.embed_images(images).dtype == torch.float32
    build_loss("medsaga")(logits, labels).backward()
    optimizer.step()
    with_grads = [p for p in network.parameters() if p.grad is not None]
    assert with_grads and all(p.grad.dtype == torch.float32 for p in with_grads)
    assert all(p.dtype == torch.float32 for p in network.parameters())


def test_switching_off_restores_float32_and_the_state_dict_keys_never_change():
    network = _tiny_medsaga()
    keys = list(network.state_dict())
    use_bf16(network, True)
    assert list(network.state_dict()) == keys
    copied = copy.deepcopy(network)  # what the plain-model export and the test evaluation do
    assert uses_bf16(copied) and copied.backbone.image_encoder.forward.module is copied.backbone.image_encoder
    use_bf16(network, False)
    assert not uses_bf16(network)
    block_dtypes = []
    network.backbone.image_encoder.blocks[0].attn.qkv.register_forward_hook(lambda m, a, out: block_dtypes.append(out.dtype))
    network(torch.rand(1, 1, 32, 32))
    assert block_dtypes == [torch.float32]


def test_checkpointed_segments_recompute_in_bf16_with_the_plain_steps_loss_and_gradients():
    """Activation checkpointing must recompute under the forward's autocast state: otherwise the
    recomputed tensors differ in dtype and backward fails or the gradients change."""
    images, labels = torch.rand(2, 1, 32, 32), torch.randint(0, 3, (2, 1, 32, 32))
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        network = use_bf16(_tiny_medsaga(), True)
        enable_memory_efficient_training(network, build_optimizer("medsaga", network),
                                         MemoryConfig(activation_checkpointing=checkpointing, layerwise_steps=False))
        loss = build_loss("medsaga")(network(images), labels)
        loss.backward()
        results.append((loss.item(), [p.grad.clone() for p in network.parameters() if p.grad is not None]))
    (plain_loss, plain_grads), (ckpt_loss, ckpt_grads) = results
    assert plain_loss == pytest.approx(ckpt_loss, rel=1e-6)
    assert len(plain_grads) == len(ckpt_grads) > 0
    for a, b in zip(plain_grads, ckpt_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_pretrained_lite_medsam_answers_a_box_nearly_the_same_in_bf16(mni_files):
    """Same box, same real MRI slice: the bf16 mask mostly agrees with the float32 one. Zero-shot
    box answers are the path most sensitive to bf16 (measured on slices 50/70/90: agreement
    0.96-0.98, whole-brain Dice -0.022/-0.014/+0.009); a broken autocast would give another mask."""
    image, mask = _whole_brain_slice(mni_files)
    x, y = _to_network_frame(image), _to_network_frame(mask.astype("float32")) > 0.5
    ys, xs = torch.nonzero(y[0, 0], as_tuple=True)
    box = torch.tensor([[xs.min(), ys.min(), xs.max(), ys.max()]], dtype=torch.float32)
    backbone = build_backbone("lite_medsam").eval()
    fp32 = backbone.predict_with_boxes(x, box) > 0
    use_bf16(torch.nn.ModuleDict({"backbone": backbone}), True)
    bf16 = backbone.predict_with_boxes(x, box) > 0

    def dice(a, b):
        return (2 * (a & b).sum() / (a.sum() + b.sum())).item()

    print(f"fp32 against bf16 mask Dice {dice(fp32, bf16):.4f}; against the ground truth "
          f"fp32 {dice(fp32, y):.4f}, bf16 {dice(bf16, y):.4f}")
    assert dice(fp32, bf16) >= 0.95
    assert abs(dice(fp32, y) - dice(bf16, y)) <= 0.03
