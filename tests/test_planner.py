"""``medsaga plan``: the counted terms match what a real forward saves, the fit recovers its
coefficients, the largest batch is the largest that fits, and the command answers per method."""

import json
import subprocess
import sys

import pytest
import torch

from medsaga_components.benchmark import saved_activation_bytes, synthetic_training_batch
from medsaga_components.methods import build_network
from medsaga_components.planner import (MODEL_PATH, MODES, MemoryModel, TrainingSetup, _encoder_activations,
                                        activation_bytes_per_image, features, parse_memory, plan_command)


def test_memory_sizes_read_as_users_write_them():
    assert parse_memory("8GB") == 8e9 and parse_memory("10 GiB") == 10 * 2 ** 30 and parse_memory("16g") == 16e9
    assert parse_memory(1024) == 1024.0 and parse_memory("512MiB") == 512 * 2 ** 20
    with pytest.raises(ValueError, match="memory must look like 8GB"):
        parse_memory("eight gigs")


@pytest.mark.parametrize("method", ["medsaga", "cheap_lunch", "mcp_medsam"])
def test_counted_activations_equal_a_real_forwards_saved_tensors(method):
    """The encoder on meta plus the rest on CPU from a stand-in embedding adds up to what one real
    CPU forward of the whole network saves (plain mode)."""
    torch.manual_seed(0)
    network = build_network(method, "vit_tiny", num_classes=2, checkpoint=None, image_size=32)
    images, _, prompts = synthetic_training_batch(method, 1, 32, 2, 0, torch.device("cpu"))
    real = sum(saved_activation_bytes(network.train(), images, prompts=prompts).values())
    counted = activation_bytes_per_image(TrainingSetup(method, "vit_tiny", 32, False), network)
    attention_backward = _encoder_activations(network, memory_efficient=False)[3]
    assert attention_backward > 0, "vit_tiny's attention is a SAM ViT's: its backward transient is counted"
    assert counted == real + attention_backward > 0


def test_the_memory_efficient_mode_needs_less_of_every_term():
    both = features("samed", "lite_medsam_tiny", 64)  # (vit_tiny: too few blocks for checkpointing to pay)
    plain, efficient = both["plain"], both["memory_efficient"]
    assert efficient["activations"] < plain["activations"]
    assert efficient["gradients"] < plain["gradients"]
    assert efficient["weights"] == plain["weights"] and efficient["optimizer_state"] == plain["optimizer_state"]
    assert plain["static"] == plain["weights"] + plain["gradients"] + plain["optimizer_state"]


def test_attention_in_row_chunks_is_counted_one_chunk_at_a_time():
    from medsaga_components.planner import chunked_attention_bytes  # makes segment_anything importable
    from segment_anything.modeling.image_encoder import Attention

    attention = Attention(64, num_heads=4, use_rel_pos=True, input_size=(16, 16))
    qkv = 3 * 2 * 16 * 16 * 64 * 4  # batch 2, float32: read by every chunk
    whole = chunked_attention_bytes(attention, (2, 16, 16, 64), chunks=1) - qkv
    eighth = chunked_attention_bytes(attention, (2, 16, 16, 64), chunks=8) - qkv
    assert whole >= 2 * 4 * 256 * 256 * 4, "at least the softmax of all 256 x 256 pairs (batch 2, 4 heads)"
    assert whole / 16 < eighth < whole / 4, "one chunk of 2 query rows out of 16"


def test_the_fit_recovers_its_coefficients_and_the_largest_batch_is_the_largest_that_fits():
    truth = {"plain": (1.3, 200e6), "memory_efficient": (2.1, 50e6)}
    rows = [{"mode": mode, "static": static, "activations": a, "batch": b,
             "measured": static + b * k * a + c}
            for mode, (k, c) in truth.items() for static, a, b in ((1e8, 3e8, 1), (2e8, 3e8, 4), (5e7, 9e8, 2))]
    model = MemoryModel.fit(rows)
    for mode, (k, c) in truth.items():
        assert model.k[mode] == pytest.approx(k) and model.c[mode] == pytest.approx(c, rel=1e-6)
    budget = 8e9
    for mode in MODES:
        batch = model.largest_batch(mode, 4e8, 5e8, budget)
        assert batch >= 1
        assert model.predict(mode, 4e8, 5e8, batch) <= budget < model.predict(mode, 4e8, 5e8, batch + 1)
    assert model.largest_batch("plain", 4e8, 1e10, budget) == 0
    with pytest.raises(ValueError, match="at least 2 measured"):
        MemoryModel.fit(rows[:1] + rows[3:])


def test_plan_answers_per_method_and_mode_with_bundle_overrides(tmp_path):
    rows = [{"mode": m, "static": 1e8, "activations": a, "batch": b, "measured": 1e8 + b * a + 1e8}
            for m in MODES for a, b in ((1e8, 1), (1e8, 3))]
    model_path = MemoryModel.fit(rows, measured_with="synthetic rows of this test").save(tmp_path / "model.json")
    text = plan_command(backbone="lite_medsam_tiny", image_size=64, memory="300MB", method="medsaga,samed",
                        model=str(model_path))
    table = [line for line in text.splitlines() if line.startswith("| medsaga |") or line.startswith("| samed |")]
    assert len(table) == 4  # two methods, two modes
    assert all("--memory_efficient" in line and "--batch_size" in line for line in table)
    plain, efficient = ([line for line in table if line.startswith("| medsaga |") and mode in line][0]
                        for mode in ("| plain |", "| memory-efficient |"))
    batch = lambda line: int(line.split("|")[3])  # noqa: E731
    assert 4096 > batch(efficient) > batch(plain) >= 1  # below the cap: the budget decided
    with pytest.raises(ValueError, match="unknown method"):
        plan_command(backbone="lite_medsam_tiny", image_size=64, method="lora", model=str(model_path))


def test_the_packaged_model_loads_and_the_command_line_reaches_it(tmp_path):
    model = MemoryModel.load(MODEL_PATH)
    assert all(model.k[m] > 0 for m in MODES)
    fitted_on = json.loads(MODEL_PATH.read_text())["fitted_on"]
    validation = [r for r in fitted_on if r["role"] == "validation"]
    # the target: at least six configurations it never saw within 15 %; none predicted more
    # than 15 % low (the side on which a planned run runs out of memory)
    assert sum(abs(r["error"]) <= 0.15 for r in validation) >= 6 and all(r["error"] >= -0.15 for r in validation)
    broken = tmp_path / "broken.json"
    broken.write_text("{}")
    with pytest.raises(ValueError, match="not a memory model"):
        MemoryModel.load(broken)
    done = subprocess.run([sys.executable, "-m", "medsaga_components.cli", "plan", "--backbone", "vit_tiny",
                           "--image_size", "64", "--memory", "1GB", "--method", "ssam"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| ssam | plain |" in done.stdout and "| ssam | memory-efficient |" in done.stdout


def test_a_refit_reuses_only_measurements_taken_with_the_same_settings(tmp_path):
    from medsaga_components.planner import _earlier_measurement

    path = tmp_path / "samed@vit_b_512_b2.json"
    measured = {"method": "samed", "backbone": "vit_b", "image_size": 512, "batch": 2, "steps": 2, "device": "cpu",
                "cpu_allocator": "live", "cpu_threads": 2, "peak_above_baseline_bytes": 123}
    path.write_text(json.dumps(measured))
    same = dict(method="samed", backbone="vit_b", image_size=512, batch=2, steps=2)
    assert _earlier_measurement(path, **same, cpu_threads=None)["peak_above_baseline_bytes"] == 123
    assert _earlier_measurement(path, **same, cpu_threads=2) is not None
    assert _earlier_measurement(path, **{**same, "steps": 3}, cpu_threads=None) is None
    assert _earlier_measurement(path, **{**same, "batch": 4}, cpu_threads=None) is None
    path.write_text(json.dumps({**measured, "cpu_allocator": "heap"}))
    assert _earlier_measurement(path, **same) is None
    path.write_text("{not json")
    assert _earlier_measurement(path, **same) is None
    assert _earlier_measurement(tmp_path / "missing.json", **same) is None
