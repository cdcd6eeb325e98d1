"""Where a training step's time goes beyond its compute floor: torch.profiler over a few steps of one
method (the benchmark's synthetic batch), the operators with the most self CPU time.

    .venv/bin/python scripts/profile_training_step.py --method medsaga --bf16 true --steps 3

Prints the seconds of each phase of a step (forward, backward, optimiser step; timed without the
profiler), each operator's share of the profiled time and the share of the matrix products
(``aten::mm``/``addmm``/``bmm``/convolutions: what the compute floor counts) against the rest.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from medsaga_components.benchmark import synthetic_training_batch
from medsaga_components.config_values import as_bool
from medsaga_components.methods import METHODS, build_loss, build_network, build_optimizer
from medsaga_components.precision import use_bf16
from medsaga_components.training.memory import enable_memory_efficient_training

MATRIX_PRODUCTS = ("aten::mm", "aten::addmm", "aten::bmm")  # and every operator with "conv" in its name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="medsaga", choices=sorted(METHODS))
    parser.add_argument("--backbone", default="lite_medsam")
    parser.add_argument("--image_size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--bf16", default="false")
    parser.add_argument("--memory_efficient", default="false")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()

    network = use_bf16(build_network(args.method, args.backbone, num_classes=2, image_size=args.image_size,
                                     checkpoint="pretrained" if args.backbone == "lite_medsam" else None), args.bf16)
    optimizer = enable_memory_efficient_training(network, build_optimizer(args.method, network),
                                                 as_bool(args.memory_efficient, "memory_efficient"))
    loss_function = build_loss(args.method)
    images, labels, prompts = synthetic_training_batch(args.method, args.batch, network.image_size, 2, 0,
                                                       torch.device("cpu"))

    phases = {"forward": 0.0, "backward": 0.0, "optimiser step": 0.0}

    def step() -> None:
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = loss_function(network(images, prompts), labels)
        forward = time.perf_counter()
        loss.backward()  # with the memory-efficient mode's per-layer steps, these run inside it
        backward = time.perf_counter()
        optimizer.step()
        for name, seconds in zip(phases, (forward - start, backward - forward, time.perf_counter() - backward)):
            phases[name] += seconds

    network.train()
    for _ in range(2):  # warm-up: GaLore's first projections, oneDNN's kernel choices
        step()
    phases.update(dict.fromkeys(phases, 0.0))
    for _ in range(args.steps):
        step()
    print("  ".join(f"{name} {seconds / args.steps:.3f} s" for name, seconds in phases.items()), "(per step, unprofiled)")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            step()
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    print(f"{args.method} {args.backbone} {args.image_size} px, batch {args.batch}, bf16={args.bf16}, "
          f"memory_efficient={args.memory_efficient}: {total / 1e6 / args.steps:.2f} s of operator time per step")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:args.top]:
        print(f"  {e.key:<45} {e.self_cpu_time_total / total:6.1%}  ({e.count // args.steps} calls per step)")
    matrix = sum(e.self_cpu_time_total for e in events if e.key in MATRIX_PRODUCTS or "conv" in e.key)
    print(f"  matrix products and convolutions: {matrix / total:.1%}; everything else: {1 - matrix / total:.1%}")


if __name__ == "__main__":
    main()
