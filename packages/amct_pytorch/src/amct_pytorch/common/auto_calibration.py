"""The evaluator users implement for accuracy-based automatic calibration (reference §3.1).

:func:`amct_pytorch.accuracy_based_auto_calibration` never touches the user's data: it calls
the three methods of an :class:`AutoCalibrationEvaluatorBase` subclass.

The seed's example writes ``calibration(self, model_file, weights_file)`` and
``evaluate(self, model_file, weights_file)`` (the Caffe signature). The PyTorch reference passes
the torch model itself, and so does this package: ``calibration(model)`` and ``evaluate(model)``.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from torch import nn


class AutoCalibrationEvaluatorBase(ABC):
    """Calibrates and evaluates the models the search builds, and judges the accuracy loss.

    Subclasses implement:

    - :meth:`calibration` — run the calibration model on exactly ``batch_num`` batches (the
      ``batch_num`` of the quantization config), as after :func:`quantize_model`;
    - :meth:`evaluate` — the metric of a torch model: the original float model, or a
      calibration model after its ``batch_num`` batches, which computes the quantized result;
    - :meth:`metric_eval` — ``(passed, loss)``: whether ``new_metric`` is close enough to
      ``original_metric``; ``loss`` (a real number) is logged and recorded.
    """

    @abstractmethod
    def calibration(self, model: nn.Module) -> None:
        """Run ``model`` (a calibration model) on ``batch_num`` calibration batches."""

    @abstractmethod
    def evaluate(self, model: nn.Module) -> Any:
        """The accuracy metric of ``model`` (float, or calibrated and so quantized)."""

    @abstractmethod
    def metric_eval(self, original_metric: Any, new_metric: Any) -> tuple[bool, float]:
        """``(True, loss)`` if ``new_metric`` meets the requirement, else ``(False, loss)``."""
