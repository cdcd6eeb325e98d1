"""Imaging modalities: the names a modality prompt knows (the vocabulary the data and the
prompts share; a case's modality is read by ``data.decathlon.case_modalities``).

A Decathlon ``dataset.json`` names one ``modality`` for the whole dataset; a mixed dataset
may also name one per case (``{"image": ..., "label": ..., "modality": "CT"}`` in any split),
which then wins for that case. MCP-MedSAM learns one embedding per modality, so the names are
mapped onto a fixed vocabulary: by default the eleven modalities of the CVPR 2024 "MedSAM on
laptop" challenge that MCP-MedSAM was trained on. Common spellings map onto them (``MR`` and
MR sequences such as ``T1w`` or ``FLAIR`` are ``MRI``; ``XRay`` is ``X-ray``). A name outside
the vocabulary is an error naming it, the file or case it came from, and the names expected.
"""

from __future__ import annotations

from typing import Sequence

MODALITIES: tuple[str, ...] = ("CT", "MRI", "PET", "US", "X-ray", "Endoscopy", "Dermoscopy", "Fundus",
                               "Microscopy", "OCT", "Mammography")

# Other spellings -> a MODALITIES name (compared upper-case, without spaces, '-' or '_').
ALIASES: dict[str, str] = {
    "MR": "MRI", "T1": "MRI", "T1W": "MRI", "T1GD": "MRI", "T1CE": "MRI", "T2": "MRI", "T2W": "MRI",
    "FLAIR": "MRI", "ADC": "MRI", "DWI": "MRI", "PD": "MRI",
    "XRAY": "X-ray", "CXR": "X-ray", "ULTRASOUND": "US", "MAMMO": "Mammography", "MICROSCOPE": "Microscopy",
}


class UndeclaredModalityError(ValueError):
    """A modality name that the modality vocabulary does not declare."""


def _key(name: str) -> str:
    return "".join(ch for ch in name.upper() if ch not in " -_")


def modality_index(name: str, modalities: Sequence[str] = MODALITIES, where: str = "") -> int:
    """Index of ``name`` (or its alias) in ``modalities``; ``where`` names its source in the error."""
    if not isinstance(name, str) or not name.strip():
        raise UndeclaredModalityError(f"{where + ': ' if where else ''}modality must be a non-empty name, got {name!r}")
    keys = {_key(m): i for i, m in enumerate(modalities)}
    key = _key(name)
    if key not in keys and key in ALIASES:
        key = _key(ALIASES[key])
    if key not in keys:
        raise UndeclaredModalityError(
            f"{where + ': ' if where else ''}modality {name!r} is not declared; expected one of {list(modalities)} "
            f"(or an alias: {sorted(ALIASES)})")
    return keys[key]


def check_modalities(modalities: Sequence[str]) -> tuple[str, ...]:
    """``modalities`` as a tuple, refusing an empty list and names that collide."""
    names = tuple(modalities)
    if not names or not all(isinstance(m, str) and m.strip() for m in names):
        raise ValueError(f"modalities must be a non-empty list of names, got {modalities!r}")
    keys = [_key(m) for m in names]
    if len(set(keys)) != len(keys):
        raise ValueError(f"modalities {list(names)} name the same modality twice")
    return names


__all__ = ["MODALITIES", "ALIASES", "UndeclaredModalityError", "modality_index", "check_modalities"]
