"""MONAI Label app serving every medsaga bundle of ``bundles/``.

For each bundle ``<name>`` (a folder with ``configs/inference.json`` and ``configs/metadata.json``):

* infer model ``<name>``: automatic segmentation of a volume with the trained bundle;
* infer model ``<name>_prompted``: segmentation from a user's points or boxes, for methods
  whose prompt kind takes them (``PromptKind.user_input``);
* trainer ``<name>``: few-shot training from the saved final labels with the bundle's
  ``configs/train.json``; the next inference uses the new ``models/model.pt``.

Configuration (``monailabel start_server ... --conf KEY VALUE``):

* ``bundles``: the bundles folder (default: ``bundles/`` beside this app);
* ``overrides``: JSON of top-level keys for every bundle's inference and train configs,
  the settings its model was trained with (e.g. ``{"backbone": "lite_medsam_tiny", "image_size": 64}``);
* ``train_overrides``: JSON of further train.json keys for every training (e.g. ``{"epochs": 4}``);
* ``modality``: the studies' modality for intensity scaling (default ``MRI``; ``CT`` for CT).

Start it with ``bash monailabel_app/start_server.sh STUDIES_DIR`` (binds 127.0.0.1). STUDIES_DIR
may be a DICOMweb URL (a PACS, ``http://host:8042/dicom-web``): MONAI Label's DICOMweb
datastore, final labels stored back as DICOM SEG (``medsaga_label/dicomweb.py``).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from fastapi import HTTPException
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.exception import MONAILabelError, MONAILabelException

APP_DIR = Path(__file__).resolve().parent
if str(APP_DIR) not in sys.path:  # MONAI Label imports main.py by path
    sys.path.insert(0, str(APP_DIR))

from medsaga_label.bundles import discover_bundles  # noqa: E402
from medsaga_label.dicomweb import dicomweb_datastore  # noqa: E402
from medsaga_label.infer import BundleSegmentation, PromptedBundleSegmentation  # noqa: E402
from medsaga_label.train import BundleFewShotTraining  # noqa: E402

logger = logging.getLogger(__name__)

# MONAI Label answers any task error with a bare "500 Internal Server Error"; these reach the
# user with their message: no model yet (train first) and bad prompts.
HTTP_STATUS_OF_ERROR = {MONAILabelError.INFERENCE_ERROR: 409, MONAILabelError.INVALID_INPUT: 422}


def _json_conf(conf: dict, key: str) -> dict:
    raw = conf.get(key)
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--conf {key} must be a JSON object, got {raw!r}: {exc}") from exc
    if not isinstance(value, dict):
        raise ValueError(f"--conf {key} must be a JSON object, got {raw!r}")
    return value


class MedsagaApp(MONAILabelApp):
    def __init__(self, app_dir: str, studies: str, conf: dict) -> None:
        conf = conf or {}
        self.bundles = discover_bundles(conf.get("bundles") or APP_DIR.parent / "bundles", _json_conf(conf, "overrides"))
        self.train_overrides = {**_json_conf(conf, "overrides"), **_json_conf(conf, "train_overrides")}
        self.modality = conf.get("modality", "MRI")
        logger.info("medsaga bundles served: %s", ", ".join(self.bundles))
        super().__init__(app_dir=app_dir, studies=studies, conf=conf, name="medsaga",
                         description="Few-shot SAM adaptation (medsaga bundles): automatic and prompted "
                                     "segmentation, training from saved labels", version="0.1.0")

    def _init_dicomweb_datastore(self):
        # MONAI Label's DICOMweb datastore, its DICOM SEG written without dcmqi's downloaded binary.
        labels = {}
        for bundle in self.bundles.values():
            labels.update({k: v for k, v in bundle.labels.items() if k not in labels})
        by_model = {name: b.labels for name, b in self.bundles.items()}
        by_model.update({f"{name}_prompted": b.labels for name, b in self.bundles.items()})
        return dicomweb_datastore(self.studies, by_model, labels)

    def init_infers(self):
        infers = {}
        for name, bundle in self.bundles.items():
            infers[name] = BundleSegmentation(bundle)
            if bundle.prompt_input is not None:
                infers[f"{name}_prompted"] = PromptedBundleSegmentation(bundle)
        return infers

    def init_trainers(self):
        # A PACS (DICOMweb URL): beside MONAI Label's local cache of its series.
        store = self.datastore()
        work_dir = Path(getattr(store, "cache_path", self.studies)) / ".medsaga_training"
        return {name: BundleFewShotTraining(bundle, work_dir, self.train_overrides, self.modality)
                for name, bundle in self.bundles.items() if bundle.train_config is not None}

    def infer(self, request, datastore=None):
        try:
            return super().infer(request, datastore)
        except MONAILabelException as exc:
            status = HTTP_STATUS_OF_ERROR.get(exc.error)
            if status is None:
                raise
            raise HTTPException(status_code=status, detail=exc.msg) from exc
