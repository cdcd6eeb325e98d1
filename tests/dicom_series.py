"""A small synthetic CT series written with pydicom, for the tests of DICOM input and output.

``write_ct_series`` takes the volume in the layout MONAI's ``PydicomReader`` returns for a
series folder, ``[X, Y, Z]`` = [columns, rows, slices in InstanceNumber order], so that
``LoadImage(image_only=True, reader=PydicomReader())(folder)`` gives the same array back (the
reader sorts the slices by InstanceNumber and swaps rows and columns). The files carry the
attributes a real CT series has and DICOM SEG needs (study, series, frame of reference and SOP
instance UIDs, patient and study modules, geometry, rescale slope and intercept), under
shuffled names, so that nothing downstream can rely on file-name order.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID, generate_uid

RESCALE_INTERCEPT = -1024.0
RESCALE_SLOPE = 1.0


def write_ct_series(folder: str | Path, volume_xyz: np.ndarray, spacing=(0.8, 0.8, 2.5),
                    origin=(-20.0, -16.0, 30.0), descending_z: bool = True, shuffle: bool = True,
                    seed: int = 0) -> list[Path]:
    """Write ``volume_xyz`` (int16 Hounsfield units, [X, Y, Z]) as one axial CT series.

    ``spacing`` is (column spacing, row spacing, slice spacing) in mm; ``origin`` is the
    ImagePositionPatient (LPS, mm) of the first slice (InstanceNumber 1, z index 0). With
    ``descending_z`` the slices go down in patient z as the index grows (as scanners number
    CT slices head first), else up. Pixels are stored as ``(HU - intercept) / slope``.
    Returns the written files in z order; their names are shuffled when ``shuffle``.
    """
    volume = np.asarray(volume_xyz)
    if volume.ndim != 3:
        raise ValueError(f"volume_xyz must be [X, Y, Z], got shape {volume.shape}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    columns, rows, depth = volume.shape
    dx, dy, dz = (float(s) for s in spacing)
    step = -dz if descending_z else dz
    rng = np.random.default_rng(seed)
    names = rng.permutation(depth) if shuffle else np.arange(depth)
    study, series, frame_of_reference = generate_uid(), generate_uid(), generate_uid()
    written = []
    for z in range(depth):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        path = folder / f"IM{int(names[z]):04d}.dcm"
        ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.is_little_endian, ds.is_implicit_VR = True, False
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame_of_reference
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Phantom^CT", "PHANTOM01", "19700101", "O"
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20240101", "120000", "1", "A1"
        ds.ReferringPhysicianName = ""
        ds.Modality, ds.Manufacturer, ds.SeriesNumber, ds.InstanceNumber = "CT", "medsaga tests", 3, z + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.PositionReferenceIndicator = ""
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.ImagePositionPatient = [float(origin[0]), float(origin[1]), float(origin[2]) + z * step]
        ds.SliceLocation = ds.ImagePositionPatient[2]
        ds.PixelSpacing = [dy, dx]  # DICOM: row spacing (between rows), then column spacing
        ds.SliceThickness = dz
        ds.Rows, ds.Columns = rows, columns
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = RESCALE_INTERCEPT, RESCALE_SLOPE, "HU"
        stored = np.round((volume[:, :, z].T.astype(np.float64) - RESCALE_INTERCEPT) / RESCALE_SLOPE)
        ds.PixelData = np.ascontiguousarray(stored.astype(np.int16)).tobytes()  # [rows, columns]
        pydicom.dcmwrite(str(path), ds, write_like_original=False)
        written.append(path)
    return written
