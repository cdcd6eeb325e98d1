"""Declared label values <-> contiguous class indices.

A dataset.json may declare label values with gaps (BraTS: 0, 1, 2, 4). The network predicts
class indices 0..N instead, in ascending order of the declared values: index 0 is background
(value 0), index i is the i-th declared value.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class UndeclaredLabelError(ValueError):
    """A label map holds values that the dataset's ``labels`` do not declare."""

    def __init__(self, values: list[int], declared: tuple[int, ...]):
        self.values = values
        super().__init__(f"label values {values} are not declared in 'labels' (declared: {list(declared)})")


@dataclass(frozen=True)
class ClassMap:
    """``label_values[i]`` is the value stored in label files for class index ``i``."""

    label_values: tuple[int, ...]
    names: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.label_values) != len(self.names):
            raise ValueError(f"{len(self.label_values)} label values but {len(self.names)} names")
        if not self.label_values or self.label_values[0] != 0:
            raise ValueError(f"label values must start with 0 (background), got {list(self.label_values)}")
        if list(self.label_values) != sorted(set(self.label_values)):
            raise ValueError(f"label values must be unique and ascending, got {list(self.label_values)}")

    @property
    def num_classes(self) -> int:
        """Number of classes including background."""
        return len(self.label_values)

    def undeclared_values(self, label_values: np.ndarray) -> list[int]:
        present = np.unique(label_values)
        return [int(v) for v in present if int(v) not in self.label_values]

    def to_indices(self, label_values: np.ndarray) -> np.ndarray:
        """Label values (any shape, integer) -> class indices (same shape, int64)."""
        undeclared = self.undeclared_values(label_values)
        if undeclared:
            raise UndeclaredLabelError(undeclared, self.label_values)
        return np.searchsorted(np.asarray(self.label_values), label_values).astype(np.int64)

    def to_values(self, class_indices: np.ndarray) -> np.ndarray:
        """Class indices (any shape, 0..N) -> declared label values (same shape, int64)."""
        class_indices = np.asarray(class_indices)
        if class_indices.size and (class_indices.min() < 0 or class_indices.max() >= self.num_classes):
            raise ValueError(f"class indices must lie in 0..{self.num_classes - 1}, got range "
                             f"{int(class_indices.min())}..{int(class_indices.max())}")
        return np.asarray(self.label_values, dtype=np.int64)[class_indices]
