"""Errors of the file readers (``volume_io``, ``dicom_series``, ``rtstruct``), in one place so that
each reader can raise them without importing the others."""


class VolumeReadError(ValueError):
    """An image or label file cannot be read as a single-channel 2-D/3-D array."""


class NonFiniteVoxelsError(VolumeReadError):
    """An image holds NaN or infinite voxels and no replacement value was given."""
