"""The memory-efficient training mode trains exactly like the plain mode, with less held at once."""

import copy
import io

import pytest
import torch
from torch.optim.lr_scheduler import LambdaLR

from medsaga_components.optimizers.galore import GaloreConfig, allow_galore_state_in_checkpoints
from medsaga_components.backbones.tiny_vit import MBConv
from medsaga_components.benchmark import saved_activation_bytes
from medsaga_components.training.memory import (
    MBCONV_CHANNEL_GROUPS,
    MemoryConfig,
    disable_memory_efficient_training,
    enable_memory_efficient_training,
    encoder_segments,
    mbconv_forward_in_channel_groups,
)
from medsaga_components.methods import build_loss, build_network, build_optimizer, get_method
from medsaga_components.optimizers import LayerwiseOptimizer

SIZE = 32  # the tiny backbones accept it (multiple of 16 for vit_tiny, of 4 for lite_medsam_tiny)
GALORE = GaloreConfig(rank=4, update_proj_gap=2)  # the projection is refreshed within the 3 test steps


def _method(name, **overrides):
    """The registered method with the test's GaLore settings (for medsaga)."""
    if name == "medsaga":
        overrides.update(rank=GALORE.rank, update_proj_gap=GALORE.update_proj_gap)
    return get_method(name, **overrides)


ONLY = {name: MemoryConfig(**{k: k == name for k in MemoryConfig().as_dict()})
        for name in ("activation_checkpointing", "layerwise_steps", "chunked_attention")}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(2, 1, SIZE, SIZE, generator=g), torch.randint(0, 3, (2, 1, SIZE, SIZE), generator=g)


def _setup(method, backbone, config):
    torch.manual_seed(0)
    network = build_network(method, backbone, num_classes=2, checkpoint=None, image_size=SIZE)
    network.train()
    optimizer = build_optimizer(_method(method, lr=1e-3), network)
    return network, enable_memory_efficient_training(network, optimizer, config)


def _step(network, optimizer, loss_function, images, labels):
    optimizer.zero_grad(set_to_none=True)
    loss = loss_function(network(images), labels)
    loss.backward()
    optimizer.step()
    return loss.item()


def _train(method, backbone, config, steps=3):
    network, optimizer = _setup(method, backbone, config)
    loss_function = build_loss(method)
    images, labels = _batch()
    losses = [_step(network, optimizer, loss_function, images, labels) for _ in range(steps)]
    return losses, network, optimizer


def _assert_same_training(reference, other):
    (ref_losses, ref_net, _), (losses, net, _) = reference, other
    assert ref_losses[0] != ref_losses[-1], "the reference did not train"
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5, atol=1e-6)
    ref_state, state = ref_net.state_dict(), net.state_dict()
    assert state.keys() == ref_state.keys()
    for key, value in ref_state.items():  # weights, and batch-norm running statistics and counters
        torch.testing.assert_close(state[key], value, rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("backbone", ["vit_tiny", "lite_medsam_tiny"])
@pytest.mark.parametrize("method", ["medsaga", "full"])
def test_every_switch_trains_exactly_like_the_plain_mode(backbone, method):
    """Checkpointing alone, per-layer steps alone, chunked attention alone (vit_tiny's
    attention) and all switches: same losses, same parameters, same batch-norm statistics (the
    recomputation must not update them twice)."""
    plain = _train(method, backbone, MemoryConfig.off())
    for config in (ONLY["activation_checkpointing"], ONLY["layerwise_steps"], ONLY["chunked_attention"], MemoryConfig()):
        _assert_same_training(plain, _train(method, backbone, config))


def test_checkpointed_forward_keeps_only_segment_inputs():
    network, _ = _setup("full", "lite_medsam_tiny", MemoryConfig.off())
    images, _ = _batch()
    plain = sum(saved_activation_bytes(network, images).values())
    enable_memory_efficient_training(network, build_optimizer("full", network), ONLY["activation_checkpointing"])
    checkpointed = sum(saved_activation_bytes(network, images).values())  # segments' internals are not saved
    assert checkpointed < 0.5 * plain, (checkpointed, plain)


def test_frozen_leading_segments_run_without_autograd():
    """Under MedSAGa, TinyViT's patch embedding and conv stage have nothing to train: they store
    nothing for backward, and with ``frozen_without_grad`` they run under no_grad."""
    network, _ = _setup("medsaga", "lite_medsam_tiny", MemoryConfig.off())
    images, _ = _batch()
    saved = saved_activation_bytes(network, images)
    frozen = [k for k in saved if ".patch_embed" in k or ".layers.0." in k]
    assert frozen and all(saved[k] == 0 for k in frozen), saved
    assert saved["backbone.image_encoder.layers.1.blocks.0"] > 0

    grad_mode = []
    gelu = network.backbone.image_encoder.layers[0].blocks[0].act1
    gelu.register_forward_hook(lambda m, args, out: grad_mode.append(torch.is_grad_enabled()))
    network(images)
    enable_memory_efficient_training(network, build_optimizer(_method("medsaga"), network),
                                     MemoryConfig(activation_checkpointing=False, layerwise_steps=False))
    network(images)
    # plain: once, with autograd; frozen: once per channel group, without
    assert grad_mode == [True] + [False] * MBCONV_CHANNEL_GROUPS


def test_mbconv_in_channel_groups_matches_the_block():
    block = MBConv(16, expand_ratio=4.0).train()
    for bn in (block.conv1.bn, block.conv2.bn, block.conv3.bn):
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.normal_()
    grouped = copy.deepcopy(block)
    x = torch.randn(3, 16, 20, 20)
    with torch.no_grad():
        for _ in range(2):
            torch.testing.assert_close(mbconv_forward_in_channel_groups(grouped, x), block(x), rtol=1e-5, atol=1e-5)
    for key, value in block.state_dict().items():  # running statistics moved identically, counted once
        torch.testing.assert_close(grouped.state_dict()[key], value, rtol=1e-5, atol=1e-6, msg=key)
    assert block.conv1.bn.num_batches_tracked.item() == 2 and block.conv1.bn.running_mean.abs().sum() > 0


def test_a_trainable_parameter_outside_the_optimizer_is_refused():
    """It would get a full-size gradient that nothing reads: the method and its optimiser disagree."""
    network, _ = _setup("full", "vit_tiny", MemoryConfig.off())
    decoder_only = torch.optim.AdamW(network.backbone.mask_decoder.parameters())
    with pytest.raises(ValueError, match="not in the optimiser"):
        enable_memory_efficient_training(network, decoder_only, MemoryConfig(layerwise_steps=False))


def test_patches_keep_state_dict_keys_and_come_off_again():
    network, _ = _setup("medsaga", "lite_medsam_tiny", MemoryConfig.off())
    keys = list(network.state_dict())
    segments = encoder_segments(network.backbone.image_encoder)
    optimizer = build_optimizer(_method("medsaga"), network)
    enable_memory_efficient_training(network, optimizer, MemoryConfig())
    optimizer = enable_memory_efficient_training(network, optimizer, MemoryConfig())  # twice: no double patch
    assert list(network.state_dict()) == keys
    patch = segments[1].__dict__["forward"]
    assert patch.previous is None and patch.checkpointed
    disable_memory_efficient_training(network, optimizer)
    assert all("forward" not in s.__dict__ for s in [*segments, network])
    assert list(network.state_dict()) == keys


def test_no_two_full_size_gradients_coexist(monkeypatch):
    live_counts = []
    original = LayerwiseOptimizer._step_parameter

    def spy(self, p):
        live_counts.append(sum(q.grad is not None for q in self._per_parameter))
        original(self, p)

    _, plain, _ = _train("medsaga", "vit_tiny", MemoryConfig.off(), steps=1)
    with_gradients = sum(p.grad is not None for p in plain.parameters())  # the IoU head gets none
    monkeypatch.setattr(LayerwiseOptimizer, "_step_parameter", spy)
    _, network, _ = _train("medsaga", "vit_tiny", MemoryConfig(), steps=1)
    assert len(live_counts) == with_gradients and set(live_counts) == {1}
    assert all(p.grad is None for p in network.parameters())


def test_layerwise_galore_state_is_rank_r():
    _, network, optimizer = _train("medsaga", "vit_tiny", MemoryConfig(), steps=2)  # step 1 sends no gradient to the encoder
    assert isinstance(optimizer, LayerwiseOptimizer)
    qkv = network.backbone.image_encoder.blocks[0].attn.qkv.weight  # [96, 32]
    state = optimizer.state[qkv]
    assert tuple(state["exp_avg"].shape) == (96, GALORE.rank)
    assert tuple(state["projector"].ortho_matrix.shape) == (GALORE.rank, 32)
    decoder_weight = network.backbone.mask_decoder.output_upscaling[0].weight
    assert optimizer.state[decoder_weight]["exp_avg"].shape == decoder_weight.shape  # plain AdamW moments


def test_lambda_lr_sets_the_rate_the_hooked_steps_use():
    network, optimizer = _setup("medsaga", "vit_tiny", MemoryConfig())
    scheduler = LambdaLR(optimizer, lambda step: 0.0 if step == 0 else 1.0)
    loss_function = build_loss("medsaga")
    images, labels = _batch()
    before = [p.detach().clone() for p in network.parameters()]
    _step(network, optimizer, loss_function, images, labels)
    assert all(torch.equal(p, b) for p, b in zip(network.parameters(), before)), "lr 0 must leave weights alone"
    assert optimizer.state, "the hooked steps ran (and kept their moments)"
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)
    _step(network, optimizer, loss_function, images, labels)
    moved = [(p, b) for p, b in zip(network.parameters(), before)
             if optimizer.state.get(p) and optimizer.state[p]["exp_avg"].any()]  # not the zero-gradient biases
    assert moved and all(not torch.equal(p, b) for p, b in moved)


def test_state_dict_round_trip_under_weights_only():
    """A layerwise checkpoint loads under ``torch.load(weights_only=True)`` (MONAI's CheckpointLoader)
    into a layerwise or a grouped optimiser, and training continues identically from it."""
    _, network, optimizer = _train("medsaga", "vit_tiny", MemoryConfig(), steps=2)
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    allow_galore_state_in_checkpoints()
    resumed = []
    for config in (MemoryConfig(), MemoryConfig.off()):
        net, opt = _setup("medsaga", "vit_tiny", config)
        net.load_state_dict(network.state_dict())
        buffer.seek(0)  # one load each: load_state_dict keeps the loaded tensors, it does not copy them
        opt.load_state_dict(torch.load(buffer, weights_only=True))
        resumed.append((net, opt))
    assert isinstance(resumed[0][1], LayerwiseOptimizer) and not isinstance(resumed[1][1], LayerwiseOptimizer)
    images, labels = _batch()
    loss_function = build_loss("medsaga")
    for net, opt in [(network, optimizer), *resumed]:
        _step(net, opt, loss_function, images, labels)
    for net, _ in resumed:
        for (name, p), q in zip(network.named_parameters(), net.parameters()):
            torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=name)


def test_supervised_trainer_with_layerwise_optimizer_and_lr_handler():
    from monai.engines import SupervisedTrainer
    from monai.handlers import LrScheduleHandler

    network, optimizer = _setup("medsaga", "vit_tiny", MemoryConfig())
    scheduler = LambdaLR(optimizer, lambda step: 0.5 ** step)
    images, labels = _batch()
    data = [{"image": images, "label": labels}] * 2  # already batched: one item per iteration
    trainer = SupervisedTrainer(device=torch.device("cpu"), max_epochs=1, train_data_loader=data,
                                network=network, optimizer=optimizer, loss_function=build_loss("medsaga"),
                                train_handlers=[LrScheduleHandler(scheduler, epoch_level=False, print_lr=False)])
    qkv = network.backbone.image_encoder.blocks[0].attn.qkv.weight
    before = qkv.detach().clone()
    trainer.run()
    assert trainer.state.iteration == 2
    assert not torch.equal(qkv, before)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * 0.25)


def test_memory_config_from_json_values():
    assert MemoryConfig.parse(None) == MemoryConfig() == MemoryConfig.parse(True)
    assert not any(MemoryConfig.parse(False).as_dict().values())
    assert MemoryConfig.parse({"layerwise_steps": False}) == MemoryConfig(layerwise_steps=False)
    with pytest.raises(ValueError, match="unknown memory config keys"):
        MemoryConfig.parse({"checkpointing": True})
    with pytest.raises(ValueError, match="true or false"):
        MemoryConfig.parse({"layerwise_steps": "yes"})
    with pytest.raises(ValueError, match="bundle key `bf16`"):  # bf16 left the memory switches
        MemoryConfig.parse({"bf16_autocast": True})
