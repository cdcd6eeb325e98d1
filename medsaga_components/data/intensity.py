"""Intensity scaling to [0, 1], chosen by modality.

CT values are Hounsfield units, comparable across scanners, so a fixed window is used
(default [-125, 275] HU: the abdominal soft-tissue window). MRI intensities are arbitrary
per scan, so each volume is scaled between its own low and high percentiles.
"""

from __future__ import annotations

import numpy as np

CT_WINDOW = (-125.0, 275.0)
MRI_PERCENTILES = (1.0, 99.0)


def is_ct(modality: str) -> bool:
    return modality.strip().upper() == "CT"


def window_to_unit(volume: np.ndarray, low: float, high: float) -> np.ndarray:
    """Clip to [low, high] and map linearly to [0, 1] (float32, same shape)."""
    if high <= low:
        # A constant volume has no contrast to scale; zeros keep it in range instead of NaN.
        return np.zeros(volume.shape, dtype=np.float32)
    scaled = (volume.astype(np.float32) - np.float32(low)) / np.float32(high - low)
    return np.clip(scaled, 0.0, 1.0).astype(np.float32)


def scale_intensity(
    volume: np.ndarray,
    modality: str,
    ct_window: tuple[float, float] = CT_WINDOW,
    mri_percentiles: tuple[float, float] = MRI_PERCENTILES,
) -> np.ndarray:
    """Volume (any shape, raw intensities) -> float32 in [0, 1], same shape.

    CT: clip to ``ct_window`` (HU). Anything else (MRI, PNG photographs, ultrasound): scale
    between the volume's ``mri_percentiles`` and clip; when those percentiles coincide (mostly
    background), fall back to the volume's min and max.
    """
    if is_ct(modality):
        return window_to_unit(volume, float(ct_window[0]), float(ct_window[1]))
    low, high = np.percentile(volume, mri_percentiles)
    if high <= low:
        low, high = float(volume.min()), float(volume.max())
    return window_to_unit(volume, float(low), float(high))
