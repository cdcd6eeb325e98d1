"""Method registry: exactly the intended parameters train; merged exports equal the adapted networks."""

import pytest
import torch

from medsaga_components import SamSegmenter
from medsaga_components.adapters import count_parameters
from medsaga_components.adapters.export import plain_state_dict
from medsaga_components.prompts.from_labels import PROMPT_FROM_LABEL_KINDS, prompts_from_labels
from medsaga_components.methods import METHODS, build_loss, build_network, build_optimizer, get_method


def _trainable(network):
    return sorted(n for n, p in network.named_parameters() if p.requires_grad)


def test_samed_trains_lora_prompt_encoder_and_decoder_only():
    net = build_network("samed", "vit_tiny", num_classes=2, checkpoint=None, image_size=64)
    names = _trainable(net)
    encoder = [n for n in names if n.startswith("backbone.image_encoder")]
    assert encoder == [f"backbone.image_encoder.blocks.{b}.attn.qkv.lora.{part}.{m}"
                       for b in (0, 1) for part in ("q", "v") for m in ("A", "B")]
    rest = {n.split(".")[1] for n in names if not n.startswith("backbone.image_encoder")}
    assert rest == {"prompt_encoder", "mask_decoder"}
    assert all(p.requires_grad for p in net.backbone.mask_decoder.parameters())


# S-SAM's paper setting: the mask decoder frozen (its code's decoder_training 'none').
SSAM_PAPER = {"trained_in_full": ("prompt",)}


def test_ssam_paper_setting_trains_singular_values_norms_pos_embed_and_class_prompts_only():
    net = build_network(get_method("ssam", **SSAM_PAPER), "vit_tiny", num_classes=2, checkpoint=None, image_size=64,
                        class_names=["grey matter", "white matter"])
    names = _trainable(net)
    svd = [n for n in names if n.endswith((".scale", ".shift"))]
    # 2 blocks x (qkv, proj, lin1, lin2) + the two neck convolutions, each with a and b.
    assert len(svd) == 2 * (2 * 4 + 2)
    assert "backbone.image_encoder.pos_embed" in names
    assert {"prompt.class_embeddings", "prompt.projection.weight", "prompt.projection.bias",
            "prompt.class_logit_bias"} <= set(names)
    others = [n for n in names if n not in svd and n != "backbone.image_encoder.pos_embed"
              and not n.startswith("prompt.")]
    norm_types = ("LayerNorm", "LayerNorm2d", "BatchNorm2d")
    owners = {type(net.get_submodule(n.rsplit(".", 1)[0])).__name__ for n in others}
    assert others and owners <= set(norm_types), owners
    assert not any("transformer.layers.0.mlp" in n or n.endswith("qkv.weight") for n in names)


def test_cheap_lunch_default_trains_the_decoder_and_its_paper_setting_puts_lora_there():
    from medsaga_components.methods import CHEAP_LUNCH_PAPER_LORA, CHEAP_LUNCH_PAPER_TRAINED_IN_FULL

    def trainable_decoder(method):
        net = build_network(method, "lite_medsam_tiny", num_classes=2, checkpoint=None, image_size=64)
        return [n for n in _trainable(net) if n.startswith("backbone.mask_decoder.transformer.")]

    default = trainable_decoder("cheap_lunch")
    assert any(n.endswith("self_attn.q_proj.weight") for n in default) and not any(".lora." in n for n in default)
    paper = trainable_decoder(get_method("cheap_lunch", lora=CHEAP_LUNCH_PAPER_LORA,
                                         trained_in_full=CHEAP_LUNCH_PAPER_TRAINED_IN_FULL))
    assert paper and all(".lora." in n for n in paper)
    assert {n.split(".lora.")[0].rsplit(".", 1)[1] for n in paper} == {"q_proj", "v_proj"}


def test_ssam_default_also_trains_the_mask_decoder():
    net = build_network("ssam", "vit_tiny", num_classes=2, checkpoint=None, image_size=64)
    assert all(p.requires_grad for p in net.backbone.mask_decoder.parameters())
    frozen_encoder = {n for n, p in net.backbone.image_encoder.named_parameters() if not p.requires_grad}
    assert "blocks.0.attn.qkv.bias" in frozen_encoder and "blocks.0.attn.qkv.U" not in frozen_encoder  # U is a buffer


@pytest.mark.parametrize("method,prompt", [("samed", "none"), ("ssam", "class_tokens")])
def test_merged_export_equals_the_adapted_network(method, prompt):
    net = build_network(method, "vit_tiny", num_classes=2, checkpoint=None, image_size=64).eval()
    with torch.no_grad():  # move every adapter away from its identity start, as training would
        for name, p in net.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    plain = SamSegmenter("vit_tiny", num_classes=2, checkpoint=None, image_size=64, prompt=prompt).eval()
    plain.load_state_dict(plain_state_dict(net), strict=True)
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        adapted, merged = net(x), plain(x)
    assert adapted.abs().max() > 0
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_takes_a_training_step(method):
    net = build_network(method, "lite_medsam_tiny", num_classes=2, checkpoint=None, image_size=64)
    optimizer = build_optimizer(method, net)
    before = {n: p.detach().clone() for n, p in net.named_parameters() if p.requires_grad}
    labels = torch.randint(0, 3, (2, 1, 64, 64))
    kind = get_method(method).prompt
    prompts = prompts_from_labels(labels, 2, kind) if kind in PROMPT_FROM_LABEL_KINDS else None
    loss = build_loss(method)(net(torch.rand(2, 1, 64, 64), prompts), labels)
    loss.backward()
    optimizer.step()
    changed = [n for n, p in net.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert changed and torch.isfinite(loss)


@pytest.mark.parametrize("method", ["ssam", "cheap_lunch"])
def test_zero_readout_starts_every_class_at_logit_zero_and_learns_from_the_first_step(method):
    torch.manual_seed(0)
    labels = torch.randint(0, 3, (2, 1, 64, 64))
    image = torch.rand(2, 1, 64, 64)
    kind = get_method(method).prompt
    prompts = prompts_from_labels(labels, 2, kind) if kind in PROMPT_FROM_LABEL_KINDS else None
    kept = build_network(get_method(method, readout="pretrained"), "lite_medsam_tiny", 2, checkpoint=None,
                         image_size=64).eval()
    assert kept(image, prompts)[:, 1:].abs().amax() > 0
    spec = get_method(method)
    assert spec.readout == "zero"  # the default of both per-class-token methods
    net = build_network(spec, "lite_medsam_tiny", 2, checkpoint=None, image_size=64).eval()
    assert torch.count_nonzero(net(image, prompts)[:, 1:]) == 0
    net.train()
    optimizer = build_optimizer(spec, net)
    build_loss(spec)(net(image, prompts), labels).backward()
    optimizer.step()
    after = net.eval()(image, prompts)[:, 1:]
    assert (after.amax(dim=(-2, -1)) - after.amin(dim=(-2, -1))).amin() > 0  # each class varies over the image
    with pytest.raises(ValueError, match="unknown readout 'random'"):
        get_method(method, readout="random")


def test_ssam_trainable_fraction_at_256_px_is_below_one_percent():
    """S-SAM's "0.4 % of SAM" (paper setting) holds at 256 px: the position embedding grows with the image."""
    net = build_network(get_method("ssam", **SSAM_PAPER), "vit_b", num_classes=2, checkpoint=None, image_size=256,
                        decompose=False)
    # Against plain SAM: in the adapted network the frozen weights live in SVD buffers.
    sam = SamSegmenter("vit_b", num_classes=2, checkpoint=None, image_size=256, prompt="class_tokens")
    fraction = count_parameters(net) / count_parameters(sam, trainable_only=False)
    print(f"S-SAM, ViT-B at 256 px: {count_parameters(net):,} trainable = {100 * fraction:.2f} %")
    assert 0.002 < fraction < 0.01


@pytest.mark.parametrize("method", ["medsaga", "samed", "ssam"])
def test_head_lr_gives_the_class_read_out_its_own_group(method):
    net = build_network(method, "lite_medsam_tiny", 2, checkpoint=None, image_size=64)
    heads = {id(p) for p in net.class_head_parameters()}
    assert heads
    optimizer = build_optimizer(get_method(method, lr=1e-4, head_lr=3e-3), net)
    grouped = [p for g in optimizer.param_groups for p in g["params"]]
    assert len(grouped) == len({id(p) for p in grouped}) == sum(p.requires_grad for p in net.parameters())
    head_groups = [g for g in optimizer.param_groups if any(id(p) in heads for p in g["params"])]
    assert len(head_groups) == 1 and head_groups[0]["lr"] == 3e-3
    assert {id(p) for p in head_groups[0]["params"]} == heads
    assert all(g["lr"] != 3e-3 for g in optimizer.param_groups if g is not head_groups[0])
    if method == "medsaga":  # the GaLore rank groups keep the encoder weights, at their own rate
        assert all(not any(id(p) in heads for p in g["params"]) for g in optimizer.param_groups if "rank" in g)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_optimizer_groups_hold_exactly_the_trainable_parameters_once(method):
    net = build_network(method, "lite_medsam_tiny", 2, checkpoint=None, image_size=64)
    groups = get_method(method).optimizer_groups(net)
    grouped = [id(p) for g in groups for p in g["params"]]
    assert len(grouped) == len(set(grouped))
    assert set(grouped) == {id(p) for p in net.parameters() if p.requires_grad}
    assert all(g["params"] for g in groups)


def test_overrides_change_one_setting_and_refuse_what_the_method_lacks():
    samed = get_method("samed", rank=8, lr=None)
    assert samed.lora[0][0].rank == 8 and samed.lr == METHODS["samed"].lr
    assert get_method("medsaga", rank=16, galore_scale=0.5).galore.rank == 16
    with pytest.raises(ValueError, match="does not use GaLore"):
        get_method("samed", galore_scale=0.5)
    with pytest.raises(ValueError, match="no rank"):
        get_method("ssam", rank=4)
    with pytest.raises(ValueError, match="unknown method"):
        get_method("lora")
    with pytest.raises(ValueError, match="unknown settings"):
        get_method("medsaga", learning_rate=1.0)
