"""``medsaga benchmark``: memory and time of every method on the same backbone, size, batch and data.

    medsaga benchmark --backbone lite_medsam --image_size 256 --batch 4 --steps 6 \\
        --methods full,samed,medsaga,ssam,medsaga+ckpt,medsaga+layerwise,medsaga_efficient --out DIR

Each method trains for ``steps`` steps in a fresh Python process (``python -m
medsaga_components.benchmark --worker ...``), so no method inherits another's allocator
high-water mark, and writes one JSON file; the parent collects them into ``benchmark.json``
and ``benchmark.md``. Every worker imports the same modules (galore-torch included, even for
methods that do not use it) so that the import baselines are equal.

Method names: a registry method (``full``, ``medsaga``, ``samed``, ``ssam``, ``cheap_lunch``,
``mcp_medsam``), optionally with memory switches (``training.memory.MemoryConfig``):
``<method>_efficient`` turns every switch on; ``+ckpt``, ``+layerwise``, ``+nograd``, ``+chunks`` turn on
one each (``medsaga+ckpt+layerwise``). ``+bf16`` runs the image encoder under bf16 autocast
(``precision.py``, forced on, as the bundles' ``bf16`` key does where the device has native bf16).
Plain names run the plain mode (no checkpointing, standard optimiser step, float32): ``samed``
is SAMed's reference configuration.

Recorded per method:

* trainable parameters; optimiser-state bytes (every tensor in ``optimizer.state``, GaLore
  projection matrices included);
* peak memory: CUDA ``torch.cuda.max_memory_allocated``; CPU the process's peak resident set
  (``getrusage().ru_maxrss``), together with the resident set after the imports ("import
  baseline": the torch/MONAI runtime) and after building model, optimiser and batch ("ready"),
  so that what training itself adds is visible;
* median step time over the steps after the first (warm-up; GaLore's first SVDs), with the
  machine's 1-minute load average before and after the steps (timings on a shared machine);
* the compute floor of a step (``compute_floor.py``): its counted FLOPs at this machine's
  measured GEMM rate of the same dtype and threads, and the step time over that floor;
* inference seconds per slice: the network's forward on one image without autograd (eval mode),
  median of three after a warm-up;
* a memory-floor estimate: all weights and buffers + the gradients that coexist (all trainable
  ones for a standard step, the largest single one with per-layer steps) + optimiser state +
  the largest encoder segment's saved activations. The activations are measured after the
  timed steps (so they cannot raise the recorded peak) with ``saved_tensors_hooks`` on one
  plain forward of a batch of one, scaled by the batch size; each storage is counted once and
  weights are excluded. It ignores the forward's temporaries, the segment inputs
  checkpointing keeps, the activations outside the encoder (decoder, loss) and the runtime.

CPU allocator: glibc keeps freed heap memory below a threshold that grows up to 32 MiB, so
peak RSS also measures how that heap fragments. ``--cpu_allocator live`` runs every worker
with ``MALLOC_MMAP_THRESHOLD_=131072`` so that freed tensors go back to the system and peak
RSS follows live memory, the CPU counterpart of ``max_memory_allocated``, and with
``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` so that those mappings use transparent huge pages;
``--cpu_allocator heap`` with what bundle training sets (``engine.keep_freed_cpu_memory``: all
tensors from the heap, freed memory kept for reuse). See ``CPU_ALLOCATORS``.

Data: random images (uniform in [0, 1]) and random labels in {0..N}, from a fixed seed: memory
and time do not depend on pixel values.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from medsaga_components.compute_floor import count_step_flops, gemm_flops_per_second, step_floor_seconds
from medsaga_components.io.atomic import write_text_atomic
from medsaga_components.precision import use_bf16
from medsaga_components.training.cpu_allocator import TRIM_THRESHOLD_BYTES
from medsaga_components.training.memory import MemoryConfig, enable_memory_efficient_training, encoder_segments, set_segment_forwards
from medsaga_components.prompts.from_labels import PROMPT_FROM_LABEL_KINDS, prompts_from_labels
from .methods import METHODS, build_loss, build_network, build_optimizer

DEFAULT_METHODS = (*METHODS, "medsaga+ckpt", "medsaga+layerwise", "medsaga_efficient")
REFERENCES = ("full", "samed")
# glibc: every allocation above 128 KiB gets its own mapping, returned to the system when freed,
# so that peak RSS follows live memory (the CPU counterpart of CUDA's max_memory_allocated)
# instead of the heap glibc keeps after freeing tensors below its dynamic threshold (up to 32 MiB).
# Those mappings are backed by transparent huge pages (glibc >= 2.35; ignored by older ones):
# with 4 KiB pages every freshly mapped tensor costs a page fault per 4 KiB, which at 256 px and
# batch 4 made 26 to 36 million faults and a third of the step time, more for the modes that
# allocate more often (activation checkpointing recomputes), so the timings measured the kernel.
# "heap": what bundle training sets with engine.keep_freed_cpu_memory (the same two mallopt
# parameters, through glibc's environment variables).
CPU_ALLOCATORS = {
    "default": {},
    "live": {"MALLOC_MMAP_THRESHOLD_": "131072", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"},
    "heap": {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD_BYTES)},
}
CPU_ALLOCATOR_NOTES = {
    "default": "glibc's defaults: freed heap memory below a threshold that grows up to 32 MiB stays with the "
               "process, so peak RSS includes how that heap fragments",
    "live": "`MALLOC_MMAP_THRESHOLD_=131072 GLIBC_TUNABLES=glibc.malloc.hugetlb=1`: freed tensors go back to "
            "the system, so peak RSS follows live memory, the CPU counterpart of CUDA's max_memory_allocated; "
            "their mappings use transparent huge pages, so that page faults do not dominate the step times",
    "heap": f"`MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_={TRIM_THRESHOLD_BYTES}`, what bundle training sets "
            "(`keep_freed_cpu_memory`): every tensor comes from the heap and freed memory stays there for reuse, "
            "so peak RSS is the heap's high-water mark",
}
SWITCHES = {"ckpt": "activation_checkpointing", "layerwise": "layerwise_steps", "nograd": "frozen_without_grad",
            "chunks": "chunked_attention"}
BF16_SWITCH = "bf16"
EFFICIENT_SUFFIX = "_efficient"
DATA_NOTE = "random images (uniform in [0, 1]) and random labels in {0..N} from a fixed seed"
RATIO_FIELDS = ("peak_memory_bytes", "peak_above_baseline_bytes", "median_step_time_s", "optimizer_state_bytes",
                "trainable_parameters")


def parse_method_variant(name: str) -> tuple[str, MemoryConfig, bool]:
    """``"medsaga+ckpt+bf16"`` -> ``("medsaga", MemoryConfig(activation_checkpointing=True, others off), True)``:
    the method, its memory switches and whether the image encoder runs under bf16 autocast."""
    base, *extras = name.split("+")
    config = MemoryConfig.off()
    if base.endswith(EFFICIENT_SUFFIX):
        base, config = base[: -len(EFFICIENT_SUFFIX)], MemoryConfig()
    if base not in METHODS:
        raise ValueError(f"unknown method {name!r}: expected one of {sorted(METHODS)}, optionally with "
                         f"{EFFICIENT_SUFFIX!r} or +{'/+'.join([*SWITCHES, BF16_SWITCH])}")
    for extra in extras:
        if extra != BF16_SWITCH and extra not in SWITCHES:
            raise ValueError(f"unknown switch +{extra} in {name!r}; expected one of {sorted([*SWITCHES, BF16_SWITCH])}")
        if extra in SWITCHES:
            config = replace(config, **{SWITCHES[extra]: True})
    return base, config, BF16_SWITCH in extras


# --- measurements ------------------------------------------------------------------------

def _rss_peak_bytes() -> int:
    """The process's peak resident set size: Linux's ``VmHWM`` (this program's own, since its
    exec), else ``ru_maxrss`` (KiB on Linux, bytes on macOS). On Linux ``ru_maxrss`` starts from
    the parent's resident set at the fork: a worker started by a parent that had grown (the
    planner's fit builds networks between workers) would otherwise report the parent's peak."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def memory_bytes(device: torch.device, peak: bool) -> int:
    """CUDA: allocated (or peak allocated) tensor memory; CPU: peak resident set (``peak`` ignored:
    the CPU has no cheap "current" figure that excludes freed-but-kept allocator memory)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device) if peak else torch.cuda.memory_allocated(device))
    return _rss_peak_bytes()


def tensor_bytes_in(obj: Any, seen: set[int] | None = None) -> int:
    """Bytes of every tensor reachable in ``obj`` (dicts, lists, object attributes such as a
    GaLoreProjector's ``ortho_matrix``), each storage counted once."""
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        storage = obj.untyped_storage()
        if storage.data_ptr() in seen:
            return 0
        seen.add(storage.data_ptr())
        return storage.nbytes()
    if isinstance(obj, dict):
        return sum(tensor_bytes_in(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes_in(v, seen) for v in obj)
    if hasattr(obj, "__dict__") and not isinstance(obj, (nn.Module, type)):
        return tensor_bytes_in(vars(obj), seen)
    return 0


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return tensor_bytes_in(dict(optimizer.state))


def static_memory_bytes(network: nn.Module, optimizer: torch.optim.Optimizer, layerwise_steps: bool) -> dict[str, int]:
    """What training holds whatever the batch: ``weights`` (parameters and buffers), the
    ``gradients`` that coexist (every trainable one, or the largest single one with per-layer
    steps) and the ``optimizer_state`` (after a step)."""
    gradient_sizes = [p.numel() * p.element_size() for p in network.parameters() if p.requires_grad] or [0]
    return {
        "weights": sum(t.numel() * t.element_size() for t in [*network.parameters(), *network.buffers()]),
        "gradients": max(gradient_sizes) if layerwise_steps else sum(gradient_sizes),
        "optimizer_state": optimizer_state_bytes(optimizer),
    }


def storage_key(t: torch.Tensor) -> int:
    """What identifies ``t``'s storage, shared by its views; also on the meta device, where every
    ``data_ptr()`` is 0 (the storage implementation's address, ``_cdata``)."""
    return t.untyped_storage()._cdata


def saved_activation_bytes(network: nn.Module, images: torch.Tensor,
                           encoder_name: str = "backbone.image_encoder", prompts: dict | None = None,
                           **forward_kwargs: Any) -> dict[str, int]:
    """Bytes that one training forward (``network(images, prompts, **forward_kwargs)``) saves for
    backward, by encoder segment.

    Returns ``{segment qualified name: bytes}`` for every segment, plus ``"outside encoder
    segments"`` (decoder, prompt modules, glue). Weights (and views of them) are excluded;
    a storage saved twice counts once. Checkpointed segments save only what lies outside
    them: measure a segment's own activations with checkpointing off. Runs on the meta device
    too (shapes only: the planner sizes activations at any image size that way).
    """
    encoder = network.get_submodule(encoder_name)
    names = {id(m): f"{encoder_name}.{n}" for n, m in encoder.named_modules()}
    segments = encoder_segments(encoder)
    totals = {names[id(s)]: 0 for s in segments}
    outside = "outside encoder segments"
    totals[outside] = 0
    weights = {storage_key(t) for t in [*network.parameters(), *network.buffers()]}
    seen: set[int] = set()
    active: list[str] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = storage_key(t)
        if key not in weights and key not in seen:
            seen.add(key)  # safe: every saved tensor stays alive until the pass ends
            totals[active[-1] if active else outside] += t.untyped_storage().nbytes()
        return t

    def enter(module: nn.Module, args: Any) -> None:
        active.append(names[id(module)])

    def leave(module: nn.Module, args: Any, output: Any) -> None:
        active.pop()

    handles = [h for s in segments for h in (s.register_forward_pre_hook(enter), s.register_forward_hook(leave))]
    try:
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            network(images, prompts, **forward_kwargs)
    finally:
        for h in handles:
            h.remove()
    return totals


def synthetic_batch(batch: int, image_size: int, num_classes: int, seed: int,
                    device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``images [B, 1, S, S]`` uniform in [0, 1] and ``labels [B, 1, S, S]`` in {0..N}."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, 1, image_size, image_size, generator=generator)
    labels = torch.randint(0, num_classes + 1, (batch, 1, image_size, image_size), generator=generator)
    return images.to(device), labels.to(device)


def synthetic_training_batch(method: str, batch: int, image_size: int, num_classes: int, seed: int,
                             device: torch.device) -> tuple[torch.Tensor, torch.Tensor, dict | None]:
    """:func:`synthetic_batch` and the prompts a bundle derives from the labels for ``method``
    (its box or point kind), or None for a method without prompts: ``(images, labels, prompts)``."""
    images, labels = synthetic_batch(batch, image_size, num_classes, seed, device)
    kind = METHODS[method].prompt
    prompts = prompts_from_labels(labels, num_classes, kind) if kind in PROMPT_FROM_LABEL_KINDS else None
    return images, labels, prompts


# --- one method, in its own process --------------------------------------------------------

def run_worker(method: str, backbone: str, image_size: int | None, batch: int, steps: int, device: str,
               num_classes: int = 2, seed: int = 0, checkpoint: str | None = None,
               threads: int | None = None) -> dict[str, Any]:
    """Train ``method`` for ``steps`` steps on a synthetic batch and measure it (see module doc)."""
    import galore_torch  # noqa: F401  every worker pays the same import baseline

    if threads:
        torch.set_num_threads(threads)

    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    baseline = memory_bytes(dev, peak=False)
    base, memory_config, bf16 = parse_method_variant(method)
    if checkpoint is None:
        checkpoint = "pretrained" if backbone == "lite_medsam" else None
    torch.manual_seed(seed)
    network = build_network(base, backbone, num_classes=num_classes, checkpoint=checkpoint,
                            image_size=image_size).to(dev)
    use_bf16(network, bf16)
    network.train()
    optimizer = enable_memory_efficient_training(network, build_optimizer(base, network), memory_config)
    loss_function = build_loss(base)
    size = network.image_size
    images, labels, prompts = synthetic_training_batch(base, batch, size, num_classes, seed, dev)
    ready = memory_bytes(dev, peak=False)

    losses, step_times = [], []

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)  # the order of MONAI's SupervisedTrainer iteration
        loss = loss_function(network(images, prompts), labels)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))

    load_before = _load_average()
    for _ in range(steps):
        _synchronize(dev)
        start = time.perf_counter()
        step()
        _synchronize(dev)
        step_times.append(time.perf_counter() - start)
    peak = memory_bytes(dev, peak=True)  # read before the measurements below
    load_after = _load_average()
    timed = step_times[1:] or step_times

    # the compute floor: one more step, counted; the GEMM rates of this process's threads
    flops = count_step_flops(step, type(network).__name__)
    losses.pop()
    rates = {"float32": gemm_flops_per_second(torch.float32, dev), "bfloat16": gemm_flops_per_second(torch.bfloat16, dev)}
    floor = step_floor_seconds(flops, rates, bf16)
    inference = inference_seconds_per_slice(network, images[:1], None if prompts is None else
                                            {k: v[:1] for k, v in prompts.items()}, dev)
    network.train()

    trainable = [p for p in network.parameters() if p.requires_grad]
    static = static_memory_bytes(network, optimizer, memory_config.layerwise_steps)
    weight_bytes, gradients_at_once, state_bytes = static["weights"], static["gradients"], static["optimizer_state"]
    # what one segment saves, measured without checkpointing (bf16 autocast, where on, stays on)
    set_segment_forwards(network.backbone.image_encoder, checkpointed=False,
                         no_grad_when_frozen=memory_config.frozen_without_grad)
    activations = {k: v * batch for k, v in saved_activation_bytes(
        network, images[:1], prompts=None if prompts is None else {k: v[:1] for k, v in prompts.items()}).items()}
    segment_activations = {k: v for k, v in activations.items() if k != "outside encoder segments"}
    largest = max(segment_activations, key=segment_activations.get)
    return {
        "method": method,
        "base_method": base,
        "memory_config": memory_config.as_dict(),
        "bf16": bf16,
        "backbone": backbone,
        "checkpoint": None if checkpoint is None else str(checkpoint),
        "image_size": size,
        "batch": batch,
        "steps": steps,
        "device": str(dev),
        "cpu_threads": torch.get_num_threads(),
        "cpu_allocator": next((name for name, settings in CPU_ALLOCATORS.items()
                               if settings and all(os.environ.get(k, "").endswith(v) for k, v in settings.items())),
                              "default"),
        "load_average_1min": [load_before, load_after],
        "trainable_parameters": sum(p.numel() for p in trainable),
        "total_parameters": sum(p.numel() for p in network.parameters()),
        "weight_bytes": weight_bytes,
        "gradient_bytes_at_once": gradients_at_once,
        "optimizer_state_bytes": state_bytes,
        "memory_measure": "torch.cuda.max_memory_allocated" if dev.type == "cuda" else "peak RSS (ru_maxrss)",
        "memory_baseline_bytes": baseline,
        "memory_ready_bytes": ready,
        "peak_memory_bytes": peak,
        "peak_above_baseline_bytes": peak - baseline,
        "training_increment_bytes": peak - ready,
        "activation_bytes_total": sum(activations.values()),
        "activation_bytes_largest_segment": segment_activations[largest],
        "largest_segment": largest,
        "activation_bytes_outside_segments": activations["outside encoder segments"],
        "memory_floor_bytes": weight_bytes + gradients_at_once + state_bytes + segment_activations[largest],
        "step_times_s": step_times,
        "median_step_time_s": statistics.median(timed),
        "timing_includes_warmup": len(step_times) < 2,
        "flops_per_step": flops["total"],
        "encoder_flops_per_step": flops["encoder"],
        "gemm_flops_per_second": rates,
        "floor_step_time_s": floor,
        "step_time_over_floor": statistics.median(timed) / floor,
        "inference_s_per_slice": inference,
        "losses": losses,
    }


def inference_seconds_per_slice(network: nn.Module, image: torch.Tensor, prompts: dict | None,
                                device: torch.device, repeats: int = 3) -> float:
    """Median seconds of the network's forward on one ``[1, C, S, S]`` image without autograd
    (eval mode), after one warm-up call."""
    network.eval()
    times = []
    with torch.no_grad():
        for i in range(repeats + 1):
            _synchronize(device)
            start = time.perf_counter()
            network(image, prompts)
            _synchronize(device)
            if i:
                times.append(time.perf_counter() - start)
    return statistics.median(times)


def _load_average() -> float | None:
    """The machine's 1-minute load average: timings on a shared machine need it beside them."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- the command -------------------------------------------------------------------------

def benchmark_command(backbone: str = "lite_medsam", image_size: int | None = None, batch: int = 4, steps: int = 6,
                      methods: str | Iterable[str] = ",".join(DEFAULT_METHODS), out: str = "benchmark",
                      device: str | None = None, num_classes: int = 2, seed: int = 0,
                      checkpoint: str | None = None, threads: int | None = None, cpu_allocator: str = "default") -> str:
    """Benchmark methods, each in a fresh process; writes ``benchmark.json`` and ``benchmark.md`` in ``out``.

    ``methods``: comma-separated names (see the module doc). ``checkpoint``: backbone weights
    (default: LiteMedSAM's shipped weights for ``lite_medsam``, random weights otherwise).
    ``threads``: CPU threads per worker (default: torch's default, one per core).
    ``cpu_allocator``: ``default``; ``live`` to run the workers with glibc settings under
    which peak RSS follows live memory; ``heap`` for bundle training's setting (see ``CPU_ALLOCATORS``).
    Returns the path of ``benchmark.md``.
    """
    names = method_list(methods)
    for name in names:
        parse_method_variant(name)  # fail before starting any process
    if cpu_allocator not in CPU_ALLOCATORS:
        raise ValueError(f"cpu_allocator must be one of {sorted(CPU_ALLOCATORS)}, got {cpu_allocator!r}")
    if steps < 1 or batch < 1:
        raise ValueError(f"steps and batch must be >= 1, got steps={steps}, batch={batch}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {}
    for name in names:
        print(f"[benchmark] {name}: {steps} steps on {backbone}, batch {batch}, {device}", file=sys.stderr, flush=True)
        results[name] = run_worker_in_fresh_process(name, out_dir, CPU_ALLOCATORS[cpu_allocator], backbone=backbone,
                                                    image_size=image_size, batch=batch, steps=steps, device=device,
                                                    num_classes=num_classes, seed=seed, checkpoint=checkpoint,
                                                    threads=threads)
    report = {
        "settings": {"backbone": backbone, "image_size": image_size, "batch": batch, "steps": steps, "device": device,
                     "device_name": _device_name(device), "num_classes": num_classes, "seed": seed,
                     "torch": torch.__version__, "threads": threads, "cpu_threads": threads or torch.get_num_threads(),
                     "cpu_allocator": cpu_allocator},
        "data": DATA_NOTE,
        "methods": results,
        "ratios": reference_ratios(results),
    }
    # Atomic: a benchmark stopped while writing leaves the previous report, never half of one.
    write_text_atomic(out_dir / "benchmark.json", json.dumps(report, indent=2))
    markdown = render_markdown(report)
    md_path = write_text_atomic(out_dir / "benchmark.md", markdown)
    print(markdown)
    failed = [name for name, result in results.items() if "error" in result]
    if failed:
        raise RuntimeError(f"benchmark workers failed for {failed}; their logs are in {out_dir}")
    return str(md_path)


def method_list(methods: str | Iterable[str]) -> list[str]:
    """fire hands ``a,b`` over as a tuple and ``a,b+c`` as a string: accept both."""
    items = [methods] if isinstance(methods, str) else list(methods)
    names = [n.strip() for item in items for n in str(item).split(",") if n.strip()]
    if not names:
        raise ValueError("no methods given")
    return list(dict.fromkeys(names))


def run_worker_in_fresh_process(method: str, out_dir: Path, environment: dict[str, str], file_name: str | None = None,
                          **settings: Any) -> dict[str, Any]:
    json_path = out_dir / f"{file_name or method}.json"
    log_path = out_dir / f"{file_name or method}.log"
    json_path.unlink(missing_ok=True)
    command = [sys.executable, "-m", "medsaga_components.benchmark", "--worker", "--method", method,
               "--json", str(json_path)]
    for key, value in settings.items():
        if value is not None:
            command += [f"--{key}", str(value)]
    with open(log_path, "w") as log:
        code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=_worker_environment(environment)).returncode
    if code != 0 or not json_path.exists():
        tail = log_path.read_text()[-2000:]
        print(f"[benchmark] {method} failed (exit code {code}); log: {log_path}\n{tail}", file=sys.stderr)
        return {"method": method, "error": f"worker exited with code {code}", "log": str(log_path)}
    return json.loads(json_path.read_text())


def _worker_environment(allocator: dict[str, str]) -> dict[str, str]:
    """This process's environment plus the allocator's settings (glibc tunables the user set are kept)."""
    environment = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for key, value in allocator.items():
        earlier = environment.get(key) if key == "GLIBC_TUNABLES" else None
        environment[key] = f"{earlier}:{value}" if earlier else value
    return environment


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def reference_ratios(results: dict[str, dict]) -> dict[str, dict[str, float]]:
    """``{method: {"<field>/<reference>": value / reference value}}`` for the references that ran."""
    ratios: dict[str, dict[str, float]] = {}
    for name, result in results.items():
        if "error" in result:
            continue
        ratios[name] = {}
        for ref in REFERENCES:
            reference = results.get(ref)
            if reference is None or "error" in reference:
                continue
            for field in RATIO_FIELDS:
                if reference[field] > 0:
                    ratios[name][f"{field}/{ref}"] = result[field] / reference[field]
    return ratios


# --- the Markdown report -------------------------------------------------------------------

def _mib(n: float) -> str:
    return f"{n / 2 ** 20:,.1f} MiB"


def _load(load: list[float | None]) -> str:
    return "n/a" if None in load else f"{load[0]:.1f} to {load[1]:.1f}"


def _ratio(ratios: dict[str, float], key: str) -> str:
    return f"{ratios[key]:.2f}" if key in ratios else "n/a"


def _command_line(report: dict[str, Any]) -> str:
    """The ``medsaga benchmark`` command that reproduces ``report`` (output folder left as DIR)."""
    s = report["settings"]
    words = ["medsaga benchmark", f"--backbone {s['backbone']}"]
    if s["image_size"]:
        words.append(f"--image_size {s['image_size']}")
    words += [f"--batch {s['batch']}", f"--steps {s['steps']}", f"--methods {','.join(report['methods'])}"]
    if s.get("threads"):
        words.append(f"--threads {s['threads']}")
    if s["device"] == "cpu" and s.get("cpu_allocator", "default") != "default":
        words.append(f"--cpu_allocator {s['cpu_allocator']}")
    return " ".join(words + ["--out DIR"])


def render_markdown(report: dict[str, Any]) -> str:
    """Two tables (absolute figures; ratios to ``full`` and ``samed``) with the settings and notes."""
    s = report["settings"]
    results, ratios = report["methods"], report["ratios"]
    measure = next((r["memory_measure"] for r in results.values() if "memory_measure" in r), "n/a")
    lines = [
        "# medsaga benchmark",
        "",
        f"Backbone `{s['backbone']}`, image size {s['image_size'] or 'default'}, batch {s['batch']}, "
        f"{s['steps']} steps per method, device {s['device']} ({s['device_name']}), torch {s['torch']}, "
        f"{s['cpu_threads']} CPU threads. Data: {report['data']} (seed {s['seed']}). Each method ran in a fresh process.",
        "",
        f"Command: `{_command_line(report)}`",
        "",
        f"Peak memory: {measure}"
        + (f", CPU allocator `{s['cpu_allocator']}` ({CPU_ALLOCATOR_NOTES[s['cpu_allocator']]})"
           if s["device"] == "cpu" else "")
        + ". \"Above baseline\" subtracts the memory after the imports (the torch/MONAI "
        "runtime, equal for every method); \"training increment\" subtracts the memory after building model, "
        "optimiser and batch. The floor estimate is weights + coexisting gradients + optimiser state + the largest "
        "encoder segment's saved activations (see medsaga_components/benchmark.py).",
        "",
        "| method | trainable params | optimizer state | peak memory | peak above baseline | training increment "
        "| floor estimate | median step | machine load |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error']} | | | | | | | |")
            continue
        lines.append(
            f"| {name} | {r['trainable_parameters']:,} | {_mib(r['optimizer_state_bytes'])} | {_mib(r['peak_memory_bytes'])} "
            f"| {_mib(r['peak_above_baseline_bytes'])} | {_mib(r['training_increment_bytes'])} "
            f"| {_mib(r['memory_floor_bytes'])} | {r['median_step_time_s']:.2f} s | {_load(r['load_average_1min'])} |")
    lines += [
        "",
        "Ratios (method / reference; `samed` is SAMed's reference configuration: LoRA, no checkpointing, fp32):",
        "",
        "| method | peak / full | peak / samed | above baseline / full | above baseline / samed | step time / full "
        "| step time / samed | optimizer state / full | optimizer state / samed |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in ratios.items():
        cells = [_ratio(r, f"{field}/{ref}") for field in ("peak_memory_bytes", "peak_above_baseline_bytes",
                                                             "median_step_time_s", "optimizer_state_bytes")
                 for ref in REFERENCES]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    largest = {name: r for name, r in results.items() if "error" not in r}
    lines += ["", "Largest encoder segment's saved activations (measured, batch-scaled) per method:", ""]
    lines += [f"- {name}: {r['largest_segment']} {_mib(r['activation_bytes_largest_segment'])}; all saved activations "
              f"in plain mode {_mib(r['activation_bytes_total'])}" for name, r in largest.items()]
    lines += compute_floor_table(results)
    return "\n".join(lines) + "\n"


def compute_floor_table(results: dict[str, dict]) -> list[str]:
    """Markdown lines: each method's step time against its compute floor, and its inference time."""
    lines = ["", "Time against the compute floor (`compute_floor.py`: FLOPs counted over one step, at the best rate "
             "of 1024 x 1024 matmuls in the same dtype and threads; the encoder's FLOPs at the bf16 rate where it "
             "runs under bf16 autocast), and the forward on one slice without autograd:", "",
             "| method | encoder | GFLOPs per step (encoder) | GEMM GFLOP/s fp32 / bf16 | floor | median step "
             "| step / floor | inference per slice |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        if "error" in r or "flops_per_step" not in r:
            continue
        rates = r["gemm_flops_per_second"]
        lines.append(
            f"| {name} | {'bf16' if r['bf16'] else 'fp32'} | {r['flops_per_step'] / 1e9:,.0f} "
            f"({r['encoder_flops_per_step'] / 1e9:,.0f}) | {rates['float32'] / 1e9:,.0f} / {rates['bfloat16'] / 1e9:,.0f} "
            f"| {r['floor_step_time_s']:.2f} s | {r['median_step_time_s']:.2f} s | {r['step_time_over_floor']:.2f} "
            f"| {r['inference_s_per_slice']:.2f} s |")
    return lines


# --- worker entry point ----------------------------------------------------------------------

def _worker_main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="one benchmark worker (used by `medsaga benchmark`)")
    parser.add_argument("--worker", action="store_true", required=True)
    parser.add_argument("--method", required=True)
    parser.add_argument("--json", required=True)
    parser.add_argument("--backbone", default="lite_medsam")
    parser.add_argument("--image_size", type=int, default=None)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--num_classes", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    result = run_worker(args.method, args.backbone, args.image_size, args.batch, args.steps, args.device,
                        num_classes=args.num_classes, seed=args.seed, checkpoint=args.checkpoint, threads=args.threads)
    write_text_atomic(args.json, json.dumps(result, indent=2))  # the parent never reads half a result


if __name__ == "__main__":
    _worker_main()
