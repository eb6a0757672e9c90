"""MRAnnotator as a MONAI Label app (0.8.5): a thin adapter over the ``mrannotator`` engine.

    monailabel start_server --app apps/mrannotator --studies STUDIES [--conf weights demo] [--conf device cpu]

- infer ``mrannotator``: every served region model, merged in the catalogue's label space; and
  ``mrannotator_<region>`` per region model (lib/infers/segment.py)
- train ``mrannotator``: nnU-Net fine-tuning from the served checkpoints (lib/trainers/finetune.py)
- strategies ``random``, ``first``, ``uncertainty`` (lib/activelearning); scoring ``dice`` (lib/scoring)
- every image id, label, tag and model name is checked before MONAI Label acts on it
  (lib/datastore.py and :meth:`MRAnnotatorApp.infer`): bad input gets a 4xx with a message.
- in the server process, lib/monailabel_adapter/ fixes MONAI Label 0.8.5's server: working token
  auth with roles per route, loopback bind without auth, per-request upload folders removed when the
  request ends, 4xx instead of 500 / 200-then-ERROR.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from fastapi import HTTPException
from lib import monailabel_adapter
from lib.configs.mrannotator import MRAnnotatorConfig
from lib.datastore import MRAnnotatorDatastore, check_name
from lib.dicomweb_datastore import MRAnnotatorDICOMwebDatastore, dicomweb_datastore
from lib.errors import bad_request, not_found, server_error
from lib.label_guard import keep_proposal
from lib.monailabel_adapter import ohif as ohif_fixes
from lib.monailabel_adapter.checks import unknown_task
from lib.monailabel_adapter.concurrency import RoutePools, offload_blocking_routes
from lib.monailabel_adapter.internals import app_datastore, check_version, tasks
from lib.service import CONF_OPTIONS, AppSettings, ModelService
from monailabel.config import settings
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import DefaultLabelTag
from monailabel.interfaces.exception import MONAILabelError, MONAILabelException
from monailabel.interfaces.tasks.infer_v2 import InferType

import mrannotator
from mrannotator.catalogue import load_catalogue
from mrannotator.errors import MRAnnotatorError

logger = logging.getLogger(__name__)


class MRAnnotatorApp(MONAILabelApp):  # MONAI Label's loader wants MONAILabelApp as a direct base
    def __init__(self, app_dir, studies, conf):
        # the server's fixes go in before anything else: another MONAI Label, or a bind that policy refuses,
        # stops the start here
        check_version()
        monailabel_adapter.install(monailabel_adapter.upload_root(settings.MONAI_LABEL_SERVER_PORT))
        try:
            self.settings = AppSettings.from_conf(conf, app_dir)
            self.service = ModelService(self.settings)
        except (ValueError, MRAnnotatorError) as e:
            raise MONAILabelException(MONAILabelError.APP_INIT_ERROR, f"MRAnnotator: {e}") from e
        ohif_fixes.apply()
        self.task_config = MRAnnotatorConfig()
        self.task_config.init("mrannotator", str(self.settings.model_dir), conf, None, service=self.service)
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="MRAnnotator",
            description="MRI multi-structure segmentation (nnU-Net v2 region models, label catalogue ids)",
            version=mrannotator.__version__,
        )
        # blocking MONAI Label routes go to worker threads and a bounded infer queue (no-op in subprocesses)
        offload_blocking_routes(pools=RoutePools(self.settings.infer_queue, self.settings.workers))

    # ------------------------------------------------------------ tasks
    def init_datastore(self):
        served = {s.id for s in self.service.segmenter().structures}
        catalogue = {s.id for s in load_catalogue()}
        if self.studies.startswith(("http://", "https://")):  # a PACS (DICOMweb): MR series, labels as SEGs
            return dicomweb_datastore(self.studies, allowed_label_ids=lambda: served | catalogue)
        return MRAnnotatorDatastore(
            self.studies,
            extensions=settings.MONAI_LABEL_DATASTORE_FILE_EXT,
            auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
            read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY,
            allowed_label_ids=lambda: served | catalogue,
        )

    def init_infers(self):
        return self.task_config.infer()

    def init_trainers(self):
        return {self.task_config.name: self.task_config.trainer()}

    def init_strategies(self):
        return self.task_config.strategy()

    def init_scoring_methods(self):
        return self.task_config.scoring_method()

    def info(self):
        meta = super().info()
        meta["mrannotator"] = {**self.service.describe(), "conf_options": CONF_OPTIONS}
        return meta

    # ------------------------------------------------------------ requests, checked first
    def _session_image(self, path: str) -> bool:
        """The image of a session (PUT /session/, 3D Slicer's local volumes), named by the server itself."""
        store = getattr(self.sessions(), "store_path", None)
        return bool(store) and Path(path).resolve().is_relative_to(Path(store).resolve()) and Path(path).exists()

    def infer(self, request, datastore=None):
        model = request.get("model")
        if unknown_task(self, "infers", model):
            raise not_found(unknown_task(self, "infers", model))
        if request.get("label_tag"):
            check_name(str(request["label_tag"]), "label tag")
        ds = datastore or self.datastore()
        image = request.get("image")
        if not isinstance(image, str) or not image:
            raise bad_request(f"image must be a datastore image id, not {type(image).__name__} {image!r}")
        save_label = listed = False
        if isinstance(ds, (MRAnnotatorDatastore, MRAnnotatorDICOMwebDatastore)):
            if image in ds.list_images():  # resolved here: MONAI Label prefers a file of that name in its cwd
                save_label, listed = bool(request.get("save_label")), True
                request = {**request, "image_id": image, "image": ds.get_image_uri(image), "save_label": False}
            elif request.get("session") and self._session_image(image):
                pass
            elif monailabel_adapter.is_request_upload(image):
                raise bad_request("infer takes a datastore image id: upload the image with PUT /datastore/image "
                                  "(or open a session with PUT /session/) first")
            else:  # MONAI Label would read any path on the server
                raise not_found(f"image {image!r} is not in the datastore")
        try:
            result = super().infer(request, datastore)
            if listed and tasks(self, "infers")[model].type == InferType.SEGMENTATION:
                # the model's proposal a final label of this series is checked against (lib/label_guard.py);
                # not a refinement's answer (scribbles answer one structure's mask as value 1)
                keep_proposal(ds, image, result.get("file"))
            if save_label and result.get("file") and os.path.exists(result["file"]):  # what MONAI Label would do
                tag = request.get("label_tag") or DefaultLabelTag.ORIGINAL
                info = {"model": model, "params": result["params"]}
                result["label"] = ds.save_label(image, result["file"], tag, info)
            return result
        except HTTPException:
            raise
        except Exception as e:
            logger.exception(f"inference with {model} on {image!r} failed")
            raise server_error(f"inference with {model} on {image!r} failed: {type(e).__name__}: {e}") from e

    def next_sample(self, request):
        strategy = request.get("strategy") or "random"
        if unknown_task(self, "strategies", strategy):
            raise not_found(unknown_task(self, "strategies", strategy))
        task = tasks(self, "strategies")[strategy]
        result = task(request, self.datastore())  # no scoring run per hand-out (MONAI Label starts one each time)
        if not result or not result.get("id"):
            return {}
        result["path"] = app_datastore(self).get_image_uri(result["id"])
        return result

    def scoring(self, request, datastore=None):
        if unknown_task(self, "scoring_methods", request.get("method")):
            raise not_found(unknown_task(self, "scoring_methods", request.get("method")))
        return super().scoring(request, datastore)

    def train(self, request):
        if unknown_task(self, "trainers", request.get("model")):
            raise not_found(unknown_task(self, "trainers", request.get("model")))
        return super().train(request)


# MONAI Label runs train/scoring subprocesses with this app dir on PYTHONPATH; keep torch polite there too
os.environ.setdefault("nnUNet_n_proc_DA", "0")
