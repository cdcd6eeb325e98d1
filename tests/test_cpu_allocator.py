"""keep_freed_cpu_memory: large tensors freed and allocated again stop costing page faults."""

import subprocess
import sys

import pytest

SCRIPT = """
import resource, sys, torch
from medsaga_components.engine import keep_freed_cpu_memory
taken = keep_freed_cpu_memory(enabled=sys.argv[1] == "on")
for _ in range(3):  # warm-up: the heap grows
    torch.ones(64 << 18)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):  # 64 MiB each: above glibc's largest mmap threshold (32 MiB)
    torch.ones(64 << 18)
print(taken, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(setting: str) -> tuple[str, int]:
    run = subprocess.run([sys.executable, "-c", SCRIPT, setting], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    taken, faults = run.stdout.split()
    return taken, int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt exists only on Linux")
def test_freed_memory_is_reused_without_page_faults():
    taken_off, faults_off = _faults("off")
    taken_on, faults_on = _faults("on")
    assert (taken_off, taken_on) == ("False", "True")
    # glibc's defaults: every 64 MiB tensor is a fresh mapping, 16,384 faults of 4 KiB each
    assert faults_off > 20 * 16_000
    # kept: at most an occasional growth of the heap (one tensor's worth was seen once)
    assert faults_on < faults_off / 5, (faults_on, faults_off)
