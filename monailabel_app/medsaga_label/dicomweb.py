"""A hospital's PACS as the studies: MONAI Label's own DICOMweb datastore (``--studies
http(s)://host/dicom-web``), with two changes.

* DICOM SEG is written by pydicom-seg, MONAI Label's own second writer
  (``nifti_to_dicom_seg(..., use_itk=False)``), instead of dcmqi's ``itkimage2segimage``, a
  binary that MONAI Label downloads from GitHub when the app starts (no download here).
* Each segment gets the name of its label value from the served bundles' labels (MONAI Label
  names them by position among the values present, "unknown" without a ``label_info``).

Everything else is MONAI Label 0.8.5's: the series of the search filter (``Modality`` CT by
default) are the images, downloaded by WADO-RS and converted to NIfTI in a local cache;
a label saved with tag ``final`` (``PUT /datastore/label``, or an infer request with
``{"save_label": true, "label_tag": "final"}``) is stored back by STOW-RS as a DICOM SEG that
references the image series; every SEG in the PACS that references an image series is that
image's final label for training.
"""

from __future__ import annotations

import logging
import os
import pathlib
from typing import Any, Dict, Mapping

import numpy as np
import SimpleITK
from dicomweb_client import DICOMwebClient
from dicomweb_client.ext.gcp.session_utils import create_session_from_gcp_credentials
from dicomweb_client.session_utils import create_session_from_user_pass
from fastapi import HTTPException
from monailabel.config import settings
from monailabel.datastore.dicom import DICOMwebClientX, DICOMWebDatastore
from monailabel.datastore.local import LocalDatastore
from monailabel.datastore.utils.convert import binary_to_image, nifti_to_dicom_seg
from monailabel.datastore.utils.dicom import dicom_web_upload_dcm
from monailabel.interfaces.datastore import DefaultLabelTag

logger = logging.getLogger(__name__)


class DicomWebSegDatastore(DICOMWebDatastore):
    """MONAI Label's ``DICOMWebDatastore``, its DICOM SEG written with pydicom-seg and named.

    Args:
        labels_by_model: ``{model: {label name: value}}`` of the infer models (a saved infer
            result names its segments after its model's labels).
        labels: ``{label name: value}`` for labels saved without a model (``PUT /datastore/label``).
    """

    def __init__(self, client: DICOMwebClient, search_filter: Dict[str, Any], cache_path: str | None,
                 labels_by_model: Mapping[str, Mapping[str, int]], labels: Mapping[str, int], **kwargs) -> None:
        self.labels_by_model = {m: dict(v) for m, v in labels_by_model.items()}
        self.labels = dict(labels)
        super().__init__(client, search_filter, cache_path, **kwargs)

    @property
    def cache_path(self) -> str:
        return self._datastore_path

    def segment_info(self, label_file: str, label_info: Mapping[str, Any]) -> list[dict]:
        """MONAI Label's ``label_info`` (one entry per label value present, in increasing order)."""
        values = np.unique(SimpleITK.GetArrayFromImage(SimpleITK.ReadImage(label_file))).astype(int)
        names = {v: k for k, v in self.labels_by_model.get(label_info.get("model"), self.labels).items()}
        return [{"name": names.get(int(v), f"label {int(v)}"), "model_name": label_info.get("model", "MONAI Label")}
                for v in values if v != 0]

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: Dict[str, Any],
                   label_id: str = "") -> str:
        """As MONAI Label's, the SEG written by pydicom-seg; an empty ``final`` label is refused (422)."""
        image_uri = self.get_image_uri(image_id)  # downloads and converts the series on first use
        converted = ""
        if "".join(pathlib.Path(label_filename).suffixes) == ".bin":
            label_filename = converted = binary_to_image(image_uri, label_filename)
        try:
            if label_tag == DefaultLabelTag.FINAL:
                segments = self.segment_info(label_filename, label_info)
                if not segments:  # FastAPI answers it as it is, from PUT /datastore/label and from infer
                    raise HTTPException(422, f"the label of {image_id} is empty: a DICOM SEG needs at least one "
                                             "segment; nothing was stored")
                segments = label_info.get("label_info") or segments  # a client's own names (OHIF) first
                image_dir = os.path.realpath(os.path.join(self._datastore.image_path(), image_id))
                seg_file = nifti_to_dicom_seg(image_dir, label_filename, segments, use_itk=False)
                try:
                    series_id = dicom_web_upload_dcm(seg_file, self._client)
                finally:
                    os.unlink(seg_file)
                image_info = self.get_image_info(image_id)
                label_info.update({"SeriesInstanceUID": series_id, "Modality": image_info.get("Modality"),
                                   "PatientID": image_info.get("PatientID"),
                                   "StudyInstanceUID": image_info.get("StudyInstanceUID")})
                logger.info("label of %s stored as DICOM SEG series %s", image_id, series_id)
            return LocalDatastore.save_label(self, image_id, label_filename, label_tag, label_info)
        finally:
            if converted:
                os.unlink(converted)


def dicomweb_datastore(url: str, labels_by_model: Mapping[str, Mapping[str, int]],
                       labels: Mapping[str, int]) -> DicomWebSegDatastore:
    """The datastore of a DICOMweb URL, with MONAI Label 0.8.5's client and settings
    (``MONAILabelApp._init_dicomweb_datastore`` less the dcmqi download): Google Cloud
    credentials for googleapis.com, else HTTP basic authentication from
    ``MONAI_LABEL_DICOMWEB_USERNAME`` / ``MONAI_LABEL_DICOMWEB_PASSWORD`` when both are set."""
    if "googleapis.com" in url:
        client = DICOMwebClient(url=url, session=create_session_from_gcp_credentials())
    else:
        session = None
        if settings.MONAI_LABEL_DICOMWEB_USERNAME and settings.MONAI_LABEL_DICOMWEB_PASSWORD:
            session = create_session_from_user_pass(settings.MONAI_LABEL_DICOMWEB_USERNAME,
                                                    settings.MONAI_LABEL_DICOMWEB_PASSWORD)
        client = DICOMwebClientX(url=url, session=session, qido_url_prefix=settings.MONAI_LABEL_QIDO_PREFIX,
                                 wado_url_prefix=settings.MONAI_LABEL_WADO_PREFIX,
                                 stow_url_prefix=settings.MONAI_LABEL_STOW_PREFIX)
    cache_path = (settings.MONAI_LABEL_DICOMWEB_CACHE_PATH or "").strip()
    return DicomWebSegDatastore(client, settings.MONAI_LABEL_DICOMWEB_SEARCH_FILTER, cache_path or None,
                                labels_by_model, labels, fetch_by_frame=settings.MONAI_LABEL_DICOMWEB_FETCH_BY_FRAME,
                                convert_to_nifti=settings.MONAI_LABEL_DICOMWEB_CONVERT_TO_NIFTI)
