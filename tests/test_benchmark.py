"""``medsaga benchmark`` end to end on a tiny backbone, plus its naming and byte counting."""

import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from medsaga_components.benchmark import (CPU_ALLOCATORS, method_list, _worker_environment, parse_method_variant,
                                          tensor_bytes_in)
from medsaga_components.compute_floor import count_step_flops, step_floor_seconds
from medsaga_components.training.memory import MemoryConfig

METHODS = ["samed", "medsaga_efficient+bf16"]  # two fresh processes keep the test short
POSITIVE_FIELDS = ["trainable_parameters", "total_parameters", "weight_bytes", "gradient_bytes_at_once",
                   "optimizer_state_bytes", "memory_baseline_bytes", "memory_ready_bytes", "peak_memory_bytes",
                   "peak_above_baseline_bytes", "activation_bytes_total", "activation_bytes_largest_segment",
                   "memory_floor_bytes", "median_step_time_s", "flops_per_step", "encoder_flops_per_step",
                   "floor_step_time_s", "step_time_over_floor", "inference_s_per_slice"]
OTHER_FIELDS = ["method", "base_method", "memory_config", "backbone", "image_size", "batch", "steps", "device",
                "memory_measure", "training_increment_bytes", "largest_segment", "activation_bytes_outside_segments",
                "step_times_s", "timing_includes_warmup", "losses", "cpu_allocator", "load_average_1min", "bf16",
                "gemm_flops_per_second"]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    exe = shutil.which("medsaga") or str(Path(sys.executable).parent / "medsaga")
    command = [exe, "benchmark", "--backbone", "vit_tiny", "--image_size", "32", "--batch", "2", "--steps", "3",
               "--methods", ",".join(METHODS), "--out", str(out), "--threads", "1"]
    run = subprocess.run(command, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    return out, json.loads((out / "benchmark.json").read_text()), (out / "benchmark.md").read_text()


def test_every_method_ran_in_its_own_process_with_every_field(report):
    out, data, _ = report
    assert list(data["methods"]) == METHODS
    assert data["settings"]["backbone"] == "vit_tiny" and data["settings"]["batch"] == 2
    assert "random" in data["data"]
    for name, result in data["methods"].items():
        assert (out / f"{name}.json").exists() and (out / f"{name}.log").exists()
        missing = [f for f in POSITIVE_FIELDS + OTHER_FIELDS if f not in result]
        assert not missing, (name, missing)
        assert all(result[f] > 0 for f in POSITIVE_FIELDS), name
        assert result["peak_memory_bytes"] >= result["memory_ready_bytes"] >= result["memory_baseline_bytes"]
        assert len(result["step_times_s"]) == 3 and not result["timing_includes_warmup"]
        assert result["median_step_time_s"] == pytest.approx(statistics.median(result["step_times_s"][1:]))
        assert result["memory_floor_bytes"] == (result["weight_bytes"] + result["gradient_bytes_at_once"]
                                                + result["optimizer_state_bytes"]
                                                + result["activation_bytes_largest_segment"])
        assert all(torch.isfinite(torch.tensor(result["losses"]))) and len(result["losses"]) == 3
        assert 0 < result["encoder_flops_per_step"] < result["flops_per_step"]
        assert result["floor_step_time_s"] == pytest.approx(
            step_floor_seconds({"total": result["flops_per_step"], "encoder": result["encoder_flops_per_step"]},
                               result["gemm_flops_per_second"], result["bf16"]))
        assert result["step_time_over_floor"] == pytest.approx(result["median_step_time_s"] / result["floor_step_time_s"])
    efficient = data["methods"]["medsaga_efficient+bf16"]
    assert efficient["base_method"] == "medsaga" and all(efficient["memory_config"].values()) and efficient["bf16"]
    samed = data["methods"]["samed"]
    assert not any(samed["memory_config"].values()) and not samed["bf16"]
    # checkpointing recomputes the encoder's forward: more FLOPs counted than the plain step
    assert efficient["encoder_flops_per_step"] > samed["encoder_flops_per_step"]
    # per-layer steps: only the largest single gradient is counted, not all of them
    assert efficient["gradient_bytes_at_once"] < 4 * efficient["trainable_parameters"]
    samed = data["methods"]["samed"]
    assert samed["gradient_bytes_at_once"] == 4 * samed["trainable_parameters"]


def test_ratios_match_the_raw_numbers(report):
    _, data, _ = report
    methods, ratios = data["methods"], data["ratios"]
    for name in METHODS:
        for field in ("peak_memory_bytes", "peak_above_baseline_bytes", "median_step_time_s", "optimizer_state_bytes",
                      "trainable_parameters"):
            assert ratios[name][f"{field}/samed"] == pytest.approx(methods[name][field] / methods["samed"][field])
        assert not any(key.endswith("/full") for key in ratios[name])  # full did not run: no ratio to it
    assert ratios["samed"]["peak_memory_bytes/samed"] == 1.0


def test_markdown_has_a_row_per_method_in_both_tables(report):
    _, data, markdown = report
    rows = [line for line in markdown.splitlines() if line.startswith("| ")]
    for name in METHODS:
        mine = [r for r in rows if r.startswith(f"| {name} |")]
        assert len(mine) == 3, (name, mine)  # absolute figures, ratios, compute floor
        peak_vs_samed = f"{data['ratios'][name]['peak_memory_bytes/samed']:.2f}"
        cells = [c.strip() for c in mine[1].split("|")[2:-1]]
        assert cells[0] == "n/a" and cells[1] == peak_vs_samed  # peak / full, peak / samed
        assert f"{data['methods'][name]['trainable_parameters']:,}" in mine[0]
    # the command that reproduces the table is written above it
    assert (f"Command: `medsaga benchmark --backbone vit_tiny --image_size 32 --batch 2 --steps 3 "
            f"--methods {','.join(METHODS)} --threads 1 --out DIR`") in markdown


def test_method_variants_name_their_switches():
    assert parse_method_variant("samed") == ("samed", MemoryConfig.off(), False)
    assert parse_method_variant("medsaga_efficient") == ("medsaga", MemoryConfig(), False)
    base, config, bf16 = parse_method_variant("medsaga+ckpt+layerwise")
    assert base == "medsaga" and config.activation_checkpointing and config.layerwise_steps
    assert not config.frozen_without_grad and not bf16
    assert parse_method_variant("ssam+bf16") == ("ssam", MemoryConfig.off(), True)
    with pytest.raises(ValueError, match="unknown switch"):
        parse_method_variant("medsaga+fast")
    with pytest.raises(ValueError, match="unknown method"):
        parse_method_variant("lora_efficient")
    # fire hands "a,b" over as a tuple and "a,b+c" as one string
    assert method_list(("full", "samed")) == method_list("full,samed") == ["full", "samed"]


def test_optimizer_state_bytes_include_projection_matrices():
    class Projector:  # the shape of galore-torch's GaLoreProjector
        def __init__(self):
            self.rank = 4
            self.ortho_matrix = torch.zeros(4, 32)

    shared = torch.zeros(10)
    state = {0: {"step": 3, "exp_avg": torch.zeros(96, 4), "projector": Projector(), "alias": shared},
             1: {"exp_avg": shared}}
    assert tensor_bytes_in(state) == 4 * (96 * 4 + 4 * 32 + 10)


def test_live_allocator_settings_reach_the_workers_and_keep_the_users_tunables(monkeypatch):
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")
    environment = _worker_environment(CPU_ALLOCATORS["live"])
    assert environment["MALLOC_MMAP_THRESHOLD_"] == "131072"
    assert environment["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    monkeypatch.delenv("GLIBC_TUNABLES")
    assert _worker_environment(CPU_ALLOCATORS["live"])["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
    assert "GLIBC_TUNABLES" not in _worker_environment(CPU_ALLOCATORS["default"])


def test_a_linear_steps_counted_flops_are_forward_plus_two_backward_matmuls():
    layer = torch.nn.Linear(64, 32, bias=False)
    x = torch.rand(8, 64, requires_grad=True)
    counted = count_step_flops(lambda: layer(x).sum().backward(), "Linear", encoder_name="none")
    assert counted == {"total": 3 * 2 * 8 * 64 * 32, "encoder": 0}  # y = xW^T; dx, dW


def test_the_floor_takes_the_encoder_at_the_bf16_rate_only_under_bf16():
    flops, rates = {"total": 300, "encoder": 200}, {"float32": 100.0, "bfloat16": 400.0}
    assert step_floor_seconds(flops, rates, bf16=False) == pytest.approx(3.0)
    assert step_floor_seconds(flops, rates, bf16=True) == pytest.approx(0.5 + 1.0)


def test_a_depthwise_convolutions_backward_is_counted_as_two_forward_convolutions():
    """torch's own formula ignores groups (TinyViT's depthwise convolutions, counted channels-fold)."""
    conv = torch.nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False)
    x = torch.rand(2, 16, 8, 8, requires_grad=True)
    forward = 2 * 2 * 16 * 8 * 8 * 3 * 3  # 2 FLOPs per multiply-add, batch, channels, positions, kernel
    assert count_step_flops(lambda: conv(x), "Conv2d", encoder_name="none")["total"] == forward
    assert count_step_flops(lambda: conv(x).sum().backward(), "Conv2d", encoder_name="none")["total"] == 3 * forward
