"""``medsaga plan``: the largest batch that fits a memory budget, per method, with and without
the memory-efficient switches, and the bundle overrides that get there.

    medsaga plan --backbone vit_b --image_size 1024 --memory 8GB [--method medsaga]

The memory model, for one configuration (method, backbone, image size, mode), predicts the peak
above the runtime (what ``torch.cuda.max_memory_allocated`` counts on a GPU; on a CPU the peak
resident set above the one after the imports):

    peak(batch) = static + batch * k[mode] * activations + c[mode]

* ``static``: weights and buffers, the gradients that coexist (all trainable ones in the plain
  mode, the largest single one with per-layer steps) and the optimiser state after a step:
  counted exactly on the method's network built with random weights (:func:`static_bytes`).
* ``activations``: what one image's training forward keeps for backward, counted on the meta
  device (shapes only, any image size in a fraction of a second, :func:`activation_bytes_per_image`).
  Plain mode: every saved tensor, and in a SAM ViT the largest attention's backward transient
  (:func:`attention_backward_bytes`). Memory-efficient mode: the inputs of the checkpointed encoder
  segments, the largest segment's activations (recomputed one at a time; in a SAM ViT block with
  its attention in checkpointed chunks of query rows, the queries, keys and values plus one
  chunk's attention, :func:`chunked_attention_bytes`) and everything saved outside the encoder.
* ``k`` and ``c`` per mode: fitted by least squares on peaks measured in fresh processes
  (``medsaga plan-fit``), so that what the count leaves out (the forward's temporaries,
  allocator slack) is carried by measurement, not guessed. The fit shipped with the package is
  ``memory_model.json`` beside this file; docs/memory_and_speed.md has its validation table.

Float32 throughout: under bf16 autocast the encoder keeps some activations in bf16, so a bf16
run needs at most what is predicted here.
"""

from __future__ import annotations

import copy
import json
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from medsaga_components.benchmark import (CPU_ALLOCATORS, method_list, run_worker_in_fresh_process, saved_activation_bytes,
                                          static_memory_bytes, storage_key, synthetic_training_batch)
from medsaga_components.io.atomic import write_json_atomic, write_text_atomic
from medsaga_components.methods import METHODS, build_network, build_optimizer
from medsaga_components.training.chunked_attention import (CHUNKS, attend_query_rows, set_chunked_attention,
                                                          vit_attention_modules)
from medsaga_components.training.memory import MemoryConfig, encoder_segments, set_segment_forwards

MODES = ("plain", "memory_efficient")
MODEL_PATH = Path(__file__).with_name("memory_model.json")
NUM_CLASSES = 2
OUTSIDE = "outside encoder segments"


@dataclass(frozen=True)
class TrainingSetup:
    """One configuration the model predicts for (the batch is the model's variable)."""

    method: str
    backbone: str
    image_size: int
    memory_efficient: bool

    @property
    def mode(self) -> str:
        return MODES[self.memory_efficient]

    @property
    def benchmark_name(self) -> str:
        return f"{self.method}_efficient" if self.memory_efficient else self.method


# --- the two counted terms ---------------------------------------------------------------------

def _build(setup: TrainingSetup) -> nn.Module:
    torch.manual_seed(0)
    return build_network(setup.method, setup.backbone, num_classes=NUM_CLASSES, checkpoint=None,
                         image_size=setup.image_size)


def static_bytes(setup: TrainingSetup, network: nn.Module | None = None) -> dict[str, int]:
    """Weights and buffers, coexisting gradients and optimiser state of ``setup`` (float32)."""
    network = _build(setup) if network is None else network
    trainable = [p for p in network.parameters() if p.requires_grad]
    optimizer = build_optimizer(setup.method, network)
    for p in trainable:  # one step on random gradients creates the state (GaLore: its projections)
        p.grad = torch.randn_like(p)
    optimizer.step()
    for p in trainable:
        p.grad = None
    # the memory-efficient mode steps per layer: one gradient at a time
    return static_memory_bytes(network, optimizer, layerwise_steps=setup.memory_efficient)


class _EncoderOnly(nn.Module):
    """The backbone's image encoder, run the way ``saved_activation_bytes`` runs a network."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, images: torch.Tensor, prompts: Any = None) -> torch.Tensor:
        return self.backbone.embed_images(images)


def chunked_attention_bytes(attention: nn.Module, x_shape: Sequence[int], chunks: int = CHUNKS,
                            dtype: torch.dtype = torch.float32) -> int:
    """What a SAM ViT ``Attention`` in checkpointed row chunks (``RowChunkedAttention``) holds in a
    block's recomputation beyond what the block saves outside its chunks: the queries, keys and
    values that every chunk reads, and the saved tensors of one chunk (recomputed one at a time).

    ``x_shape``: the attention's input, ``[B, H, W, dim]`` (B counts windows in a windowed block),
    of ``dtype``. Counted on the meta device.
    """
    batch, height, width, dim = (int(n) for n in x_shape)
    heads = attention.num_heads
    rows = -(-height // min(chunks, height))

    def meta(*shape: int) -> torch.Tensor:
        return torch.zeros(*shape, dtype=dtype, device="meta", requires_grad=True)

    q = meta(batch * heads, rows * width, dim // heads)
    k, v = meta(batch * heads, height * width, dim // heads), meta(batch * heads, height * width, dim // heads)
    rel = [meta(rows, height, dim // heads), meta(width, width, dim // heads)] if attention.use_rel_pos else [None, None]
    inputs = {storage_key(t) for t in (q, k, v, *rel) if t is not None}
    chunk: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if storage_key(t) not in inputs:
            chunk[storage_key(t)] = t.untyped_storage().nbytes()
        return t

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        attend_query_rows(q, k, v, *rel, attention.scale, height, width)
    return 3 * batch * height * width * dim * dtype.itemsize + sum(chunk.values())


def attention_backward_bytes(attention: nn.Module, x_shape: Sequence[int], dtype: torch.dtype = torch.float32) -> int:
    """The transient of a whole SAM ViT ``Attention``'s backward: the gradients of its attention
    probabilities and of its logits, two ``[B * heads, N, N]`` matrices beyond what it saved
    (``x_shape``: its input ``[B, H, W, dim]``). At 1024 px a global block's is 1.6 GB per image;
    without it plain samed at 1024 px was predicted 18 % below its measured peak."""
    batch, height, width, _ = (int(n) for n in x_shape)
    tokens = height * width
    return 2 * batch * attention.num_heads * tokens * tokens * dtype.itemsize


def _encoder_activations(network: nn.Module,
                         memory_efficient: bool) -> tuple[dict[str, int], int, torch.Size, int]:
    """On a meta copy of the encoder: saved bytes per segment, bytes of the segment inputs that
    need a gradient (what checkpointing keeps), the embedding's shape and the largest transient of
    a whole attention's backward (plain mode, SAM ViT; 0 otherwise), for one image."""
    encoder_only = _EncoderOnly(copy.deepcopy(network.backbone)).to("meta").train()
    encoder = encoder_only.backbone.image_encoder
    # frozen leading segments run without autograd in the memory-efficient mode; nothing is
    # checkpointed here, so that each segment's own activations are counted
    set_segment_forwards(encoder, checkpointed=False, no_grad_when_frozen=memory_efficient)
    chunked = memory_efficient and MemoryConfig().chunked_attention
    set_chunked_attention(encoder, chunked)  # its chunks save nothing in the block: counted below
    attentions = vit_attention_modules(encoder)
    inputs: dict[int, int] = {}
    attention_inputs: dict[nn.Module, torch.Tensor] = {}

    def keep_input(module: nn.Module, args: Any) -> None:
        x = args[0] if args else None
        if torch.is_grad_enabled() and isinstance(x, torch.Tensor):
            inputs[storage_key(x)] = x.untyped_storage().nbytes()

    def keep_attention_input(module: nn.Module, args: Any) -> None:
        if torch.is_grad_enabled():
            attention_inputs[module] = args[0]

    handles = [s.register_forward_pre_hook(keep_input) for s in encoder_segments(encoder)]
    handles += [a.register_forward_pre_hook(keep_attention_input) for a in attentions]
    images = torch.zeros(1, 1, network.image_size, network.image_size, device="meta")
    try:
        saved = saved_activation_bytes(encoder_only, images)
        with torch.no_grad():
            shape = encoder_only(images).shape
    finally:
        for h in handles:
            h.remove()
    saved.pop(OUTSIDE)  # the pixel normalisation, counted with the rest below
    backward = 0
    for i, block in enumerate(encoder.blocks if attentions else ()):
        if block.attn in attention_inputs:
            x = attention_inputs[block.attn]
            if chunked:
                saved[f"backbone.image_encoder.blocks.{i}"] += chunked_attention_bytes(block.attn, x.shape, dtype=x.dtype)
            elif not memory_efficient:
                backward = max(backward, attention_backward_bytes(block.attn, x.shape, x.dtype))
    return saved, sum(inputs.values()), shape, backward


def _saved_outside_encoder(network: nn.Module, method: str, embedding_shape: torch.Size) -> int:
    """Bytes the decoder, prompt modules and glue save for one image, on CPU from a stand-in
    embedding that needs a gradient (as the encoder's output does in training). Prompt kinds read
    values (points inside the image, first-batch calibration), so this part cannot run on meta."""
    images, _, prompts = synthetic_training_batch(method, 1, network.image_size, NUM_CLASSES, 0, torch.device("cpu"))
    embeddings = torch.zeros(embedding_shape, requires_grad=True)  # the encoder does not run: all is outside it
    return saved_activation_bytes(network.train(), images, prompts=prompts, embeddings=embeddings)[OUTSIDE]


def activation_bytes_per_image(setup: TrainingSetup, network: nn.Module | None = None) -> int:
    """What one image's training forward keeps for backward in ``setup``'s mode: the encoder counted
    on the meta device (shapes only), the rest on CPU from a stand-in embedding."""
    network = _build(setup) if network is None else network
    segments, inputs, embedding_shape, attention_backward = _encoder_activations(network, setup.memory_efficient)
    outside = _saved_outside_encoder(network, setup.method, embedding_shape)
    if not setup.memory_efficient:
        return sum(segments.values()) + outside + attention_backward
    # checkpointing keeps each segment's input and recomputes one segment at a time in backward
    return inputs + max(segments.values()) + outside


def features(method: str, backbone: str, image_size: int) -> dict[str, dict[str, int]]:
    """``{mode: {"static", its parts, "activations"}}`` for both modes, from one built network."""
    both = [TrainingSetup(method, backbone, image_size, efficient) for efficient in (False, True)]
    network = _build(both[0])
    statics = [static_bytes(setup, network) for setup in both]
    return {setup.mode: {**static, "static": sum(static.values()),
                         "activations": activation_bytes_per_image(setup, network)}
            for setup, static in zip(both, statics)}


# --- the fitted model --------------------------------------------------------------------------

@dataclass(frozen=True)
class MemoryModel:
    """``peak = static + batch * k[mode] * activations + c[mode]`` (bytes)."""

    k: dict[str, float]
    c: dict[str, float]
    measured_with: str = ""

    def predict(self, mode: str, static: int, activations: int, batch: int) -> float:
        return static + batch * self.k[mode] * activations + self.c[mode]

    def largest_batch(self, mode: str, static: int, activations: int, budget: float, limit: int = 4096) -> int:
        """The largest batch whose predicted peak fits ``budget``; 0 if not even one image does."""
        room = budget - static - self.c[mode]
        per_image = self.k[mode] * activations
        return 0 if room < per_image else min(limit, int(room // per_image))

    @classmethod
    def fit(cls, rows: Iterable[dict], measured_with: str = "") -> MemoryModel:
        """Least squares per mode over rows ``{mode, static, activations, batch, measured}``."""
        k, c = {}, {}
        rows = list(rows)
        for mode in MODES:
            mine = [r for r in rows if r["mode"] == mode]
            if len(mine) < 2:
                raise ValueError(f"fitting mode {mode!r} needs at least 2 measured configurations, got {len(mine)}")
            x = torch.tensor([float(r["batch"] * r["activations"]) for r in mine], dtype=torch.float64)
            y = torch.tensor([float(r["measured"] - r["static"]) for r in mine], dtype=torch.float64)
            design = torch.stack([x, torch.ones_like(x)], dim=1)
            solution = torch.linalg.lstsq(design, y[:, None]).solution[:, 0]
            k[mode], c[mode] = float(solution[0]), float(solution[1])
        return cls(k, c, measured_with)

    def save(self, path: str | Path, rows: Sequence[dict] = ()) -> Path:
        return write_json_atomic(path, {**asdict(self), "fitted_on": list(rows)})

    @classmethod
    def load(cls, path: str | Path = MODEL_PATH) -> MemoryModel:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
            return cls({m: float(data["k"][m]) for m in MODES}, {m: float(data["c"][m]) for m in MODES},
                       data.get("measured_with", ""))
        except FileNotFoundError:
            raise FileNotFoundError(f"memory model not found: {path} (fit one with `medsaga plan-fit`)") from None
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}: not a memory model (expected k and c for {list(MODES)}): {exc!r}") from exc


# --- medsaga plan --------------------------------------------------------------------------------

_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([KMGT]?i?B?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "K": 10 ** 3, "M": 10 ** 6, "G": 10 ** 9, "T": 10 ** 12,
          "KI": 2 ** 10, "MI": 2 ** 20, "GI": 2 ** 30, "TI": 2 ** 40}


def parse_memory(value: str | float | int) -> float:
    """``"8GB"``, ``"10 GiB"``, ``"16g"`` or a number of bytes -> bytes (GB = 10^9, GiB = 2^30)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    match = _SIZE.match(str(value))
    if not match:
        raise ValueError(f"memory must look like 8GB, 10GiB or a number of bytes, got {value!r}")
    unit = (match.group(2) or "").upper().removesuffix("B")
    return float(match.group(1)) * _UNITS[unit]


def plan(backbone: str, image_size: int, memory: str | float, methods: Sequence[str],
         model: MemoryModel) -> list[dict]:
    """One row per method and mode: the largest batch that fits, its predicted peak, the overrides."""
    budget = parse_memory(memory)
    rows = []
    for method in methods:
        # builds the network and steps its optimiser once (GaLore's SVDs: about a minute for ViT-B)
        print(f"[plan] counting {method} on {backbone} at {image_size} px", file=sys.stderr, flush=True)
        both = features(method, backbone, image_size)
        for efficient in (False, True):
            setup = TrainingSetup(method, backbone, image_size, efficient)
            f = both[setup.mode]
            batch = model.largest_batch(setup.mode, f["static"], f["activations"], budget)
            overrides = (f"--method {method} --backbone {backbone} --image_size {image_size} "
                         f"--memory_efficient {str(efficient).lower()} --batch_size {batch}") if batch else ""
            rows.append({"method": method, "mode": setup.mode, "largest_batch": batch, **f,
                         "predicted_peak_at_batch_1": model.predict(setup.mode, f["static"], f["activations"], 1),
                         "predicted_peak": model.predict(setup.mode, f["static"], f["activations"], batch) if batch else None,
                         "overrides": overrides})
    return rows


def _gb(n: float | None) -> str:
    return "" if n is None else f"{n / 1e9:.2f} GB"


def plan_command(backbone: str = "vit_b", image_size: int = 1024, memory: str = "8GB", method: str | None = None,
                 model: str | None = None) -> str:
    """Print, for each method (or ``method``), the largest batch that fits ``memory`` with and without
    the memory-efficient switches, and the bundle overrides. ``model``: a fitted ``memory_model.json``."""
    methods = method_list(method) if method else list(METHODS)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; expected some of {sorted(METHODS)}")
    memory_model = MemoryModel.load(model or MODEL_PATH)
    rows = plan(backbone, int(image_size), memory, methods, memory_model)
    lines = [f"# What fits {memory} ({backbone}, {image_size} px, float32)", "",
             "| method | mode | largest batch | predicted peak | weights + gradients + optimiser state "
             "| activations per image (counted) | bundle overrides |",
             "|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        batch = r["largest_batch"] or f"none (batch 1 needs {_gb(r['predicted_peak_at_batch_1'])})"
        lines.append(f"| {r['method']} | {r['mode'].replace('_', '-')} | {batch} | {_gb(r['predicted_peak'])} "
                     f"| {_gb(r['static'])} | {_gb(r['activations'])} | {r['overrides'] and '`' + r['overrides'] + '`'} |")
    lines += ["", "Peaks are what the training allocates (CUDA's max_memory_allocated); the CUDA context (a few "
              "hundred MB) comes on top. The model was fitted on measured peaks: " + memory_model.measured_with]
    return "\n".join(lines) + "\n"  # the command line prints it


# --- medsaga plan-fit ----------------------------------------------------------------------------

# Fitted on LiteMedSAM and SAM ViT-B at 256 and 384 px; validated on configurations none of
# which were fitted on: other methods, ViT-B at 512 px (SAMed's own size is 512), other batches.
FIT_SETUPS: tuple[tuple[str, str, int, bool, int], ...] = (
    ("medsaga", "lite_medsam", 256, False, 1), ("medsaga", "lite_medsam", 256, False, 4),
    ("medsaga", "lite_medsam", 256, True, 1), ("medsaga", "lite_medsam", 256, True, 4),
    ("full", "vit_b", 256, False, 1), ("samed", "vit_b", 384, False, 2),
    ("full", "vit_b", 256, True, 2), ("medsaga", "vit_b", 384, True, 2),
)
VALIDATION_SETUPS: tuple[tuple[str, str, int, bool, int], ...] = (
    ("full", "vit_b", 512, False, 2), ("samed", "vit_b", 512, False, 2), ("medsaga", "vit_b", 512, False, 2),
    ("medsaga", "vit_b", 512, True, 2), ("ssam", "vit_b", 512, False, 2),
    ("samed", "lite_medsam", 512, True, 2), ("mcp_medsam", "lite_medsam", 384, False, 3),
    ("medsaga", "vit_b", 1024, True, 1), ("samed", "vit_b", 1024, False, 1),
)


def plan_fit_command(out: str = "plan_fit", steps: int = 2, threads: int | None = None,
                     install: bool = False, reuse: bool = False) -> str:
    """Measure the fit and validation configurations (each in a fresh process, ``steps`` steps,
    live CPU allocator), fit the model, write ``out/memory_model.json`` and ``out/validation.md``
    (``install``: also replace the packaged model). ``reuse``: take a configuration's peak from an
    earlier run's ``out/<configuration>.json`` where it was measured with the same settings (a
    change in what is counted refits in minutes instead of measuring again). Returns the Markdown."""
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for role, setups in (("fit", FIT_SETUPS), ("validation", VALIDATION_SETUPS)):
        for method, backbone, size, efficient, batch in setups:
            setup = TrainingSetup(method, backbone, size, efficient)
            name = f"{setup.benchmark_name}@{backbone}_{size}_b{batch}"
            result = _earlier_measurement(out_dir / f"{name}.json", method=setup.benchmark_name, backbone=backbone,
                                          image_size=size, batch=batch, steps=steps, cpu_threads=threads) if reuse else None
            if result is None:
                print(f"[plan-fit] measuring ({role}) {name}", file=sys.stderr, flush=True)
                result = run_worker_in_fresh_process(setup.benchmark_name, out_dir, CPU_ALLOCATORS["live"],
                                                     file_name=name, backbone=backbone, image_size=size, batch=batch,
                                                     steps=steps, device="cpu", threads=threads)
            if "error" in result:
                raise RuntimeError(f"measuring {name} failed: see {result['log']}")
            rows.append({"role": role, **asdict(setup), "mode": setup.mode, "batch": batch,
                         "measured": result["peak_above_baseline_bytes"]})
    # counted after every measurement: this process grows while it builds the networks
    counted: dict[tuple, dict] = {}
    for row in rows:
        key = (row["method"], row["backbone"], row["image_size"])
        if key not in counted:
            print(f"[plan-fit] counting {' '.join(map(str, key))}", file=sys.stderr, flush=True)
            counted[key] = features(*key)
        row.update(counted[key][row["mode"]])
    note = f"peak RSS above the import baseline, CPU, `--cpu_allocator live`, {steps} steps, random weights"
    model = MemoryModel.fit([r for r in rows if r["role"] == "fit"], measured_with=note)
    for r in rows:
        r["predicted"] = model.predict(r["mode"], r["static"], r["activations"], r["batch"])
        r["error"] = r["predicted"] / r["measured"] - 1
    model.save(out_dir / "memory_model.json", rows)
    if install:
        model.save(MODEL_PATH, rows)
    markdown = validation_markdown(model, rows)
    write_text_atomic(out_dir / "validation.md", markdown)
    return markdown  # the command line prints it


def _earlier_measurement(path: Path, **settings: Any) -> dict | None:
    """A worker's result at ``path`` if it was measured on the CPU with the live allocator and
    ``settings`` (None where a setting is None: any), else None."""
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    wanted = {"device": "cpu", "cpu_allocator": "live", **{k: v for k, v in settings.items() if v is not None}}
    if "peak_above_baseline_bytes" not in result or any(result.get(k) != v for k, v in wanted.items()):
        return None
    print(f"[plan-fit] reusing {path}", file=sys.stderr, flush=True)
    return result


def validation_markdown(model: MemoryModel, rows: Sequence[dict]) -> str:
    lines = [f"Fitted: plain mode k = {model.k['plain']:.3f}, c = {model.c['plain'] / 2 ** 20:,.0f} MiB; "
             f"memory-efficient k = {model.k['memory_efficient']:.3f}, c = {model.c['memory_efficient'] / 2 ** 20:,.0f} MiB "
             f"({model.measured_with}).", "",
             "| role | method | backbone | size | mode | batch | static | activations per image | measured | predicted | error |",
             "|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['role']} | {r['method']} | {r['backbone']} | {r['image_size']} | {r['mode'].replace('_', '-')} "
                     f"| {r['batch']} | {r['static'] / 2 ** 20:,.0f} MiB | {r['activations'] / 2 ** 20:,.0f} MiB "
                     f"| {r['measured'] / 2 ** 20:,.0f} MiB | {r['predicted'] / 2 ** 20:,.0f} MiB | {r['error']:+.1%} |")
    worst = max((abs(r["error"]) for r in rows if r["role"] == "validation"), default=float("nan"))
    lines += ["", f"Largest validation error: {worst:.1%} (target: within 15 %)."]
    return "\n".join(lines) + "\n"


__all__ = ["MemoryModel", "TrainingSetup", "activation_bytes_per_image", "features", "parse_memory", "plan",
           "plan_command", "plan_fit_command", "static_bytes"]
