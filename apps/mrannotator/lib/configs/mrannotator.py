"""Task config: what the MRAnnotator models provide to MONAI Label (infers, trainer, strategies, scoring)."""

from __future__ import annotations

import re

from monailabel.interfaces.config import TaskConfig

from lib.activelearning.handout import FirstStrategy, RandomStrategy
from lib.activelearning.uncertainty import SoftmaxEntropy
from lib.infers.refine import RefineInfer, ScribblesInfer
from lib.infers.segment import SegmentInfer
from lib.scoring.dice import MultiClassDice
from lib.service import ModelService
from lib.trainers.finetune import NnUNetFineTune


def region_task_name(dataset: str) -> str:
    """``Dataset001_Abdomen`` -> ``mrannotator_abdomen``."""
    return "mrannotator_" + re.sub(r"^Dataset\d+_", "", dataset).lower()


class MRAnnotatorConfig(TaskConfig):
    def init(self, name, model_dir, conf, planner, service: ModelService | None = None, **kwargs):
        super().init(name, model_dir, conf, planner, **kwargs)
        self.service = service

    def infer(self):
        tasks = {self.name: SegmentInfer(self.service)}
        for model in self.service.segmenter().models:
            tasks[region_task_name(model.dataset)] = SegmentInfer(self.service, model.dataset)
        tasks[f"{self.name}_refine"] = RefineInfer(self.service)  # click correction (Slicer SmartEdit)
        tasks[f"{self.name}_scribbles"] = ScribblesInfer(self.service)  # scribble correction (Slicer Scribbles)
        return tasks

    def trainer(self):
        return NnUNetFineTune(self.service)

    def strategy(self):
        reserve = self.service.settings.reserve_seconds
        return {"random": RandomStrategy(reserve), "first": FirstStrategy(reserve),
                "uncertainty": SoftmaxEntropy(self.service)}

    def scoring_method(self):
        return {"dice": MultiClassDice(self.service)}
