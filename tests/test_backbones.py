"""Backbone registry: shapes at several sizes, position-table interpolation, checkpoint errors."""

import pytest
import torch

from medsaga_components.backbones import BACKBONES, CheckpointError, build_backbone
from medsaga_components.backbones.sam_vit import VIT_SPECS, build_sam_vit, resize_position_tables


def test_registry_names():
    assert {"lite_medsam", "vit_b", "vit_l", "vit_h", "vit_tiny", "lite_medsam_tiny"} <= set(BACKBONES)
    with pytest.raises(ValueError, match="unknown backbone 'vit_x'"):
        build_backbone("vit_x")


@pytest.mark.parametrize(
    "name,size,expected",
    [
        ("vit_tiny", 32, (2, 32, 2, 2)),
        ("vit_tiny", 64, (2, 32, 4, 4)),
        ("vit_tiny", 160, (2, 32, 10, 10)),
        ("lite_medsam_tiny", 64, (2, 32, 16, 16)),
        ("lite_medsam_tiny", 96, (2, 32, 24, 24)),
        ("lite_medsam", 128, (2, 256, 32, 32)),
    ],
)
def test_encoder_output_shapes(name, size, expected):
    backbone = build_backbone(name, image_size=size, checkpoint=None)
    with torch.no_grad():
        assert tuple(backbone.embed_images(torch.rand(2, 3, size, size)).shape) == expected
        # The prompt encoder's grid must match the encoder's output for the decoder to work.
        assert tuple(backbone.prompt_encoder.get_dense_pe().shape[-2:]) == expected[-2:]


def test_vit_b_builds_at_512_with_interpolated_tables():
    backbone = build_backbone("vit_b", image_size=512, checkpoint=None)
    enc = backbone.image_encoder
    assert tuple(enc.pos_embed.shape) == (1, 32, 32, 768)
    assert tuple(enc.blocks[2].attn.rel_pos_h.shape) == (63, 64)  # global block: 2 * 32 - 1
    assert tuple(enc.blocks[0].attn.rel_pos_h.shape) == (27, 64)  # windowed block: 2 * 14 - 1


def test_position_tables_are_interpolated_when_loading_at_another_size(tmp_path):
    source = build_sam_vit("vit_tiny", image_size=64)
    state = source.state_dict()
    # A pos_embed that is a linear ramp along the width must stay a ramp after resizing.
    ramp = torch.linspace(0, 1, 4).view(1, 1, 4, 1).expand(1, 4, 4, 32).clone()
    state["image_encoder.pos_embed"] = ramp
    path = tmp_path / "tiny.pth"
    torch.save(state, path)

    target = build_sam_vit("vit_tiny", image_size=128, checkpoint=path)
    pos = target.image_encoder.pos_embed.detach()
    assert tuple(pos.shape) == (1, 8, 8, 32)
    row = pos[0, 3, :, 0]
    assert torch.all(row[1:] >= row[:-1] - 1e-6), "interpolated ramp must stay monotonic"
    assert row[0] < 0.1 and row[-1] > 0.9
    global_block = target.image_encoder.blocks[1].attn
    assert tuple(global_block.rel_pos_h.shape) == (15, 16)  # 2 * 8 - 1 rows, head_dim 16
    # Same size: loaded exactly.
    same = build_sam_vit("vit_tiny", image_size=64, checkpoint=path)
    assert torch.equal(same.image_encoder.pos_embed, ramp)


def test_resize_leaves_matching_entries_untouched():
    state = {"a.pos_embed": torch.ones(1, 4, 4, 8), "b.weight": torch.ones(3)}
    out = resize_position_tables(state, {"a.pos_embed": torch.zeros(1, 4, 4, 8), "b.weight": torch.zeros(3)})
    assert out["a.pos_embed"] is state["a.pos_embed"] and out["b.weight"] is state["b.weight"]


def test_missing_checkpoint_names_the_path(tmp_path):
    path = tmp_path / "nowhere.pth"
    with pytest.raises(CheckpointError, match=f"not found: {path}"):
        build_backbone("lite_medsam", checkpoint=path)


def test_wrong_hash_names_path_and_expected_hash(tmp_path):
    path = tmp_path / "sam_vit_b_01ec64.pth"
    torch.save({"x": torch.zeros(1)}, path)
    with pytest.raises(CheckpointError) as err:
        build_backbone("vit_b", image_size=64, checkpoint=path)
    message = str(err.value)
    assert str(path) in message and VIT_SPECS["vit_b"].sha256 in message


def test_wrong_architecture_names_path_and_mismatch(tmp_path):
    path = tmp_path / "tiny.pth"
    torch.save(build_backbone("lite_medsam_tiny", checkpoint=None).state_dict(), path)
    with pytest.raises(CheckpointError) as err:
        build_backbone("lite_medsam", checkpoint=path)
    message = str(err.value)
    assert str(path) in message and "does not fit the lite_medsam" in message and "wrong shapes" in message


def test_not_a_state_dict(tmp_path):
    path = tmp_path / "garbage.pth"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="could not be read"):
        build_backbone("lite_medsam_tiny", checkpoint=path)


def test_official_vit_weights_are_not_invented():
    with pytest.raises(CheckpointError, match="sam_vit_h_4b8939.pth"):
        build_backbone("vit_h")
