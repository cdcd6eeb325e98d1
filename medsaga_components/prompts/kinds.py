"""The prompt kinds every method builds on (MCP-MedSAM's is in ``mcp.py``).

A prompt kind turns a batch's prompts into SAM prompt embeddings for Q queries per image:
sparse ``[B, Q, T, D]`` and dense ``[B, Q, D, h, w]``. Each query is decoded once. Kinds
with ``per_class = True`` ask one query per class (Q = N) and read one mask per query;
the others ask one query per image and read N + 1 class masks from a widened decoder.

New kinds subclass :class:`PromptKind` and are named in ``prompts/__init__.py``'s
``PROMPT_KINDS``; the segmenter does not change.
"""

from __future__ import annotations

import hashlib
from typing import Mapping, NamedTuple, Sequence

import torch
from torch import nn

from medsaga_components._segment_anything import PromptEncoder


class PromptEmbeddings(NamedTuple):
    sparse: torch.Tensor  # [B, Q, T, D]
    dense: torch.Tensor  # [B, Q, D, h, w]


class PromptKind(nn.Module):
    """Base class: one query per image, no prompt tokens (SAMed/MedSAGa's class masks)."""

    per_class = False
    # What a user gives this kind: "boxes", "points" or None (nothing; MONAI Label then offers
    # automatic segmentation only). Prompts made from labels and the app read it from here.
    user_input: str | None = None
    needs_image = False  # True: SamSegmenter passes the input image as prompts["image"] (content prompts)
    required_keys: tuple[str, ...] = ()

    def __init__(self, num_classes: int, embed_dim: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.embed_dim = embed_dim

    def check(self, prompts: Mapping[str, torch.Tensor] | None) -> Mapping[str, torch.Tensor]:
        prompts = prompts or {}
        missing = [k for k in self.required_keys if k not in prompts]
        if missing:
            raise ValueError(f"{type(self).__name__} needs prompt keys {missing}, got {sorted(prompts)}")
        return prompts

    def class_logits(self, foreground: torch.Tensor) -> torch.Tensor:
        """The per-class foreground logits ``[B, N, h, w]`` read from the decoder's masks
        (per-class kinds only); the identity unless a kind calibrates them."""
        return foreground

    def forward(self, prompt_encoder: PromptEncoder, batch_size: int,
                prompts: Mapping[str, torch.Tensor] | None) -> PromptEmbeddings:
        self.check(prompts)
        sparse, dense = prompt_encoder(points=None, boxes=None, masks=None)  # [1, 0, D], [1, D, h, w]
        return PromptEmbeddings(sparse.expand(batch_size, -1, -1)[:, None], dense.expand(batch_size, -1, -1, -1)[:, None])


class NoPrompt(PromptKind):
    """No prompt: the decoder emits N + 1 masks (background first), read with softmax."""


class BoxPrompt(PromptKind):
    """Boxes ``prompts["boxes"]`` ``[B, Q, 4]`` (x0, y0, x1, y1 in input pixels), one query per class."""

    per_class = True
    user_input = "boxes"
    required_keys = ("boxes",)

    def forward(self, prompt_encoder, batch_size, prompts):
        boxes = self.check(prompts)["boxes"]
        b, q, _ = boxes.shape
        sparse, dense = prompt_encoder(points=None, boxes=boxes.reshape(b * q, 4).float(), masks=None)
        return PromptEmbeddings(sparse.view(b, q, *sparse.shape[1:]), dense.expand(b * q, -1, -1, -1).reshape(b, q, *dense.shape[1:]))


def check_points_inside(points: torch.Tensor, labels: torch.Tensor, image_size: tuple[int, int]) -> None:
    """Refuse clicks (labels other than -1 padding) outside the ``image_size`` (H, W) frame."""
    height, width = image_size
    x, y = points[..., 0], points[..., 1]
    outside = (labels != -1) & ((x < 0) | (y < 0) | (x > width - 1) | (y > height - 1))
    if bool(outside.any()):
        where = torch.nonzero(outside)[0].tolist()
        raise ValueError(f"point {points[tuple(where)].tolist()} (x, y) at prompts['points'][{', '.join(map(str, where))}] "
                         f"lies outside the {width} x {height} image (x in 0..{width - 1}, y in 0..{height - 1})")


class PointPrompt(PromptKind):
    """Points ``prompts["points"]`` ``[B, Q, P, 2]`` (x, y in input pixels) with
    ``prompts["point_labels"]`` ``[B, Q, P]`` (1 inside, 0 outside, -1 padding); one query per class."""

    per_class = True
    user_input = "points"
    required_keys = ("points", "point_labels")

    def forward(self, prompt_encoder, batch_size, prompts):
        prompts = self.check(prompts)
        points, labels = prompts["points"], prompts["point_labels"]
        b, q, p, _ = points.shape
        check_points_inside(points, labels, prompt_encoder.input_image_size)
        sparse, dense = prompt_encoder(points=(points.reshape(b * q, p, 2).float(), labels.reshape(b * q, p)),
                                       boxes=None, masks=None)
        return PromptEmbeddings(sparse.view(b, q, *sparse.shape[1:]), dense.expand(b * q, -1, -1, -1).reshape(b, q, *dense.shape[1:]))


class ClassPointPrompt(PointPrompt):
    """Points as ``PointPrompt`` plus one learned **class token** per class (cheap_lunch).

    SAM's point tokens say where, not which class: a click is read as "the object here",
    whatever class its query stands for. The class token names the class, so a query still
    means something without any click: with ``prompts["points"]`` missing every query is its
    class token alone (SAM's "no point" padding beside it). Training sends a share of the
    queries without clicks (``PromptsFromLabels(promptless_prob=...)``), and inference without
    clicks runs that first, then clicks the middle of each class it found
    (``inference.two_pass``). The tokens start like SAM's own prompt tokens (N(0, 1)).
    This is this project's addition to Cheap Lunch's plain point prompts.

    LiteMedSAM learned from boxes only: asked with a click on a demo slice it answers "no
    object", logits of -20 to -23 on every pixel (-20.6 inside the clicked class, -22.5
    outside), and 10 steps of training left validation Dice at 0.01. So each class also gets
    ``ClassTokenPrompt``'s logit offset, set once from the first training batch to minus the
    mean start logit of that class, and trained.
    """

    required_keys = ()

    def __init__(self, num_classes: int, embed_dim: int) -> None:
        super().__init__(num_classes, embed_dim)
        self.class_tokens = nn.Parameter(torch.randn(num_classes, embed_dim))
        self.class_logit_bias = nn.Parameter(torch.zeros(num_classes))
        self.register_buffer("logit_bias_calibrated", torch.tensor(False))

    def class_logits(self, foreground: torch.Tensor) -> torch.Tensor:
        """``[B, N, h, w]`` decoder logits plus each class's offset (see the class docstring)."""
        return ClassTokenPrompt.class_logits(self, foreground)

    def forward(self, prompt_encoder, batch_size, prompts):
        prompts = dict(prompts or {})
        if prompts.get("points") is None:  # no clicks: one padding point per query
            device = self.class_tokens.device
            prompts["points"] = torch.zeros(batch_size, self.num_classes, 1, 2, device=device)
            prompts["point_labels"] = torch.full((batch_size, self.num_classes, 1), -1, dtype=torch.long, device=device)
        elif prompts.get("point_labels") is None:
            raise ValueError("prompts['points'] needs prompts['point_labels'] [B, N, P] (1 inside, 0 outside, -1 padding)")
        if prompts["points"].shape[1] != self.num_classes:
            raise ValueError(f"prompts['points'] must hold one query per class ({self.num_classes}), got "
                             f"{tuple(prompts['points'].shape)} ([B, N, P, 2])")
        sparse, dense = super().forward(prompt_encoder, batch_size, prompts)
        tokens = self.class_tokens[None, :, None, :].expand(sparse.shape[0], -1, -1, -1).to(sparse.dtype)
        return PromptEmbeddings(torch.cat([sparse, tokens], dim=2), dense)


# Start scale of learned class embeddings. Through the default-initialised projection a unit
# normal embedding becomes a token of norm about 9, the norm of SAM's own point tokens (about 11).
# At 0.02 (norm 0.6) every class query looked alike to the pretrained decoder: the two demo
# classes' start logits correlated 0.999 (0.63 at 1.0).
CLASS_EMBEDDING_STD = 1.0


def name_keyed_embeddings(names: Sequence[str], dim: int, std: float = CLASS_EMBEDDING_STD) -> torch.Tensor:
    """``[N, dim]`` starting embeddings keyed by class name: the same name always gets the same
    vector (a generator seeded by the name's sha256), whatever its position in dataset.json."""
    rows = []
    for name in names:
        seed = int.from_bytes(hashlib.sha256(name.strip().lower().encode()).digest()[:8], "little")
        rows.append(torch.randn(dim, generator=torch.Generator().manual_seed(seed)) * std)
    return torch.stack(rows)


class ClassTokenPrompt(PromptKind):
    """One learned sparse token per class (S-SAM's class-name prompts); needs no user input.

    ``class_embeddings`` ``[N, E]`` (a text encoder's embeddings of the class names, or
    :func:`name_keyed_embeddings`) are projected to the prompt dimension and trained; without
    them each class starts from a small random embedding.

    A learned token is no prompt SAM has seen: the pretrained decoder answers it with "no
    object", foreground logits of about -24 on every pixel (LiteMedSAM on the demo slices).
    There the sigmoid's gradient is e^-24, Dice learns nothing, and a few-shot run ends before
    the tokens have moved the logits past 0 (S-SAM trains for 1000 epochs). So each class also
    has a logit offset ``class_logit_bias`` ``[N]``, set once from the first training batch to
    minus the mean start logit of that class (every class then starts at logit 0 on average,
    as the widened decoder of the prompt-free methods does) and trained with the tokens.
    """

    per_class = True

    def __init__(self, num_classes: int, embed_dim: int, class_embeddings: torch.Tensor | None = None) -> None:
        super().__init__(num_classes, embed_dim)
        if class_embeddings is None:
            class_embeddings = torch.randn(num_classes, embed_dim) * CLASS_EMBEDDING_STD
        if class_embeddings.shape[0] != num_classes:
            raise ValueError(f"class_embeddings has {class_embeddings.shape[0]} rows, expected one per class ({num_classes})")
        self.class_embeddings = nn.Parameter(class_embeddings.clone().float())
        self.projection = nn.Linear(class_embeddings.shape[1], embed_dim)
        self.class_logit_bias = nn.Parameter(torch.zeros(num_classes))
        # Saved with the weights: a trained or reloaded model is never calibrated again.
        self.register_buffer("logit_bias_calibrated", torch.tensor(False))

    def class_logits(self, foreground: torch.Tensor) -> torch.Tensor:
        """``[B, N, h, w]`` decoder logits plus each class's offset (calibrated on the first
        training batch, see the class docstring)."""
        if self.training and not bool(self.logit_bias_calibrated):
            with torch.no_grad():
                start = foreground.detach().float().mean(dim=(0, 2, 3))
                if torch.distributed.is_available() and torch.distributed.is_initialized():
                    # every process of a torchrun job must start from the same offsets
                    torch.distributed.all_reduce(start)
                    start /= torch.distributed.get_world_size()
                self.class_logit_bias.copy_(-start)
                self.logit_bias_calibrated.fill_(True)
        return foreground + self.class_logit_bias.view(1, -1, 1, 1).to(foreground.dtype)

    def forward(self, prompt_encoder, batch_size, prompts):
        tokens = self.projection(self.class_embeddings)  # [N, D]
        sparse = tokens[None, :, None, :].expand(batch_size, -1, -1, -1)
        dense = prompt_encoder.no_mask_embed.weight.reshape(1, 1, -1, 1, 1).expand(
            batch_size, self.num_classes, -1, *prompt_encoder.image_embedding_size)
        return PromptEmbeddings(sparse, dense)
