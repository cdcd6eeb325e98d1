"""Prompts: what tells SAM where to look, and the one registry of prompt kinds.

* ``kinds.py``: the :class:`PromptKind` base and the kinds every method builds on (none,
  boxes, points, points with class tokens, class tokens);
* ``mcp.py``: MCP-MedSAM's boxes with modality and content prompts;
* ``from_labels.py``: prompts made from a label map (training, validation, the ground-truth
  stand-in for a user, the second pass of box-free inference);
* ``box_batches.py``: the ``prepare_batch`` of box-prompted training (boxes + modality).

To add a prompt kind: subclass ``PromptKind`` (set ``per_class`` and ``user_input``) and name
it in ``PROMPT_KINDS`` below; nothing else changes.
"""

from __future__ import annotations

from medsaga_components.prompts.kinds import (
    BoxPrompt,
    ClassPointPrompt,
    ClassTokenPrompt,
    NoPrompt,
    PointPrompt,
    PromptEmbeddings,
    PromptKind,
    name_keyed_embeddings,
)
from medsaga_components.prompts.mcp import McpPrompt

PROMPT_KINDS: dict[str, type[PromptKind]] = {
    "none": NoPrompt,
    "boxes": BoxPrompt,
    "points": PointPrompt,
    "class_points": ClassPointPrompt,
    "class_tokens": ClassTokenPrompt,
    "mcp": McpPrompt,
}


def user_input_of(kind: str) -> str | None:
    """What a user gives the prompt kind ``kind``: ``"boxes"``, ``"points"`` or None."""
    if kind not in PROMPT_KINDS:
        raise ValueError(f"unknown prompt kind {kind!r}; expected one of {sorted(PROMPT_KINDS)}")
    return PROMPT_KINDS[kind].user_input


def kind_name(prompt: PromptKind) -> str:
    """The ``PROMPT_KINDS`` name of a prompt module (its exact class)."""
    for name, kind in PROMPT_KINDS.items():
        if type(prompt) is kind:
            return name
    raise ValueError(f"{type(prompt).__name__} is not a registered prompt kind ({sorted(PROMPT_KINDS)})")


__all__ = ["PROMPT_KINDS", "kind_name", "PromptKind", "PromptEmbeddings", "NoPrompt", "BoxPrompt", "PointPrompt",
           "ClassPointPrompt", "ClassTokenPrompt", "McpPrompt", "name_keyed_embeddings", "user_input_of"]
