"""The evaluator: test loss and accuracy of a model version, off the request path.

Batch-norm statistics are re-estimated on ``CALIBRATION_IMAGES`` training images, augmented as
the recipe trains, for the evaluated weights (``recalibrate_bn``): aggregated statistics do not
match aggregated weights. The served model keeps its aggregated statistics.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from models.local import load_arrays, recalibrate_bn
from models.train import evaluate

CALIBRATION_IMAGES = 1024  # training images that re-estimate batch-norm statistics before each evaluation


class Evaluator:
    def __init__(self, model: torch.nn.Module, test_x: np.ndarray, test_y: np.ndarray, calib_x: np.ndarray,
                 crop_pad: int = 0, flip: bool = False, reflect: bool = False):
        """``model`` is this evaluator's own module (its weights are overwritten on each call);
        ``crop_pad``, ``flip``, ``reflect``: the recipe's augmentation (``crop_reflect``), applied to the
        calibration images."""
        self.model, self.crop_pad, self.flip, self.reflect = model, crop_pad, flip, reflect
        self.test_x, self.test_y = torch.from_numpy(test_x), torch.from_numpy(test_y)
        self.calib_x = torch.from_numpy(np.ascontiguousarray(calib_x[:CALIBRATION_IMAGES]))

    def __call__(self, state: dict[str, np.ndarray]) -> tuple[float, float | None]:
        """(test accuracy, test loss or None when not finite) of ``state``. Blocking: run it in a thread."""
        load_arrays(self.model, state)
        recalibrate_bn(self.model, self.calib_x, crop_pad=self.crop_pad, flip=self.flip, reflect=self.reflect)
        loss, acc = evaluate(self.model, self.test_x, self.test_y)
        return acc, loss if math.isfinite(loss) else None
