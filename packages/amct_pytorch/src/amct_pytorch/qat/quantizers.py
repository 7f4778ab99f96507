"""QAT quantizer modules: ULQ for activations, ARQ/ULQ retrain for weights (reference §3.4).

:class:`UlqActivationQuantizer` owns the learnable clips ``clip_max``/``clip_min``
(``nn.Parameter`` of one element) and the buffer ``initialized``. Unless both clips are
configured, they are initialised by asymmetric IFMR over the first ``batch_num`` training-mode
forwards (:func:`amct_core.quant.ulq.ifmr_initial_clips`); during those forwards the
activations pass through in float (plus ``0·(clip_max + clip_min)``, so that
DistributedDataParallel sees the clips used and needs no ``find_unused_parameters``). When
``torch.distributed`` is initialised with more than one process, the initial clips are
all-reduced and averaged (reference §3.4: "Under DDP the clips are all-gathered and averaged"),
so every rank holds the same values. ``nn.DataParallel`` is not supported (reference §3.1): its
replicas would each initialise and update their own copy of the clips.

:class:`ArqWeightQuantizer` has no state (min-max of the current weight on each step);
:class:`UlqWeightQuantizer` owns one learnable clip per channel (or one), set to ``max|w|`` on
its first forward.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import nn

from amct_core.errors import AmctValueError, QuantizationError
from amct_core.logger import get_logger
from amct_core.quant.arq_retrain import ulq_weight_initial_clip
from amct_core.quant.ifmr import IfmrCalibrator
from amct_core.quant.scale_offset import check_num_bits
from amct_core.quant.ulq import clips_from_factors, ulq_scale_offset
from amct_pytorch.qat.functional import (
    ArqRetrainFunction,
    ExportFactors,
    UlqActivationFunction,
    UlqWeightFunction,
    arq_retrain_scale,
    ulq_weight_scale,
)

LOGGER = get_logger("amct_pytorch")


def check_not_replica(module: nn.Module, name: str) -> None:
    """Raise if ``module`` is a DataParallel replica (torch marks them ``_is_replica``)."""
    if getattr(module, "_is_replica", False):
        raise AmctValueError(
            f"{name}: torch.nn.DataParallel is not supported by QAT layers (each replica would "
            "initialise and train its own quantization clips). Use "
            "torch.nn.parallel.DistributedDataParallel instead.")


def _distributed_world_size() -> int:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def _exporting() -> bool:
    return bool(torch.onnx.is_in_onnx_export())


def _host(tensor: torch.Tensor) -> np.ndarray:
    """The values of ``tensor`` as numpy, without recording anything while tracing."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tensor.detach().cpu().numpy().copy()


def _flag(buffer: torch.Tensor) -> bool:
    """A boolean buffer's value (no TracerWarning while exporting)."""
    if not torch.jit.is_tracing():
        return bool(buffer.item())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return bool(buffer.item())


class UlqActivationQuantizer(nn.Module):
    """ULQ activation fake-quant with learnable clips (module docstring).

    ``num_bits`` 4, 8 or 16; ``batch_num`` training batches for the IFMR initialisation;
    ``fixed_min`` (after a ReLU) keeps ``clip_min = 0`` and does not learn it; ``clip_max`` and
    ``clip_min`` both given skip IFMR. ``name`` appears in messages.
    """

    def __init__(self, num_bits: int = 8, batch_num: int = 1, fixed_min: bool = False,
                 clip_max: float | None = None, clip_min: float | None = None,
                 name: str = "UlqActivationQuantizer", device=None) -> None:
        super().__init__()
        self.num_bits = check_num_bits(num_bits)
        self.batch_num = int(batch_num)
        self.fixed_min = bool(fixed_min)
        self.name = name
        configured = clip_max is not None and clip_min is not None
        start_max = float(clip_max) if configured else 1.0
        start_min = 0.0 if (fixed_min or not configured) else float(clip_min)
        self.clip_max = nn.Parameter(torch.tensor([start_max], dtype=torch.float32,
                                                  device=device))
        self.clip_min = nn.Parameter(torch.tensor([start_min], dtype=torch.float32,
                                                  device=device),
                                     requires_grad=not self.fixed_min)
        self.register_buffer("initialized", torch.tensor(configured, device=device))
        self._calibrator: IfmrCalibrator | None = None
        self._warned_uninitialized = False

    def extra_repr(self) -> str:
        return (f"num_bits={self.num_bits}, batch_num={self.batch_num}, "
                f"fixed_min={self.fixed_min}")

    @property
    def is_initialized(self) -> bool:
        """True once the clips hold configured or IFMR values."""
        return _flag(self.initialized)

    def _calibrate(self, x: torch.Tensor) -> None:
        if self._calibrator is None:
            self._calibrator = IfmrCalibrator(num_bits=self.num_bits, symmetric=False)
        self._calibrator.update(_host(x))
        if self._calibrator.num_batches < self.batch_num:
            return
        scale, offset = self._calibrator.result()
        self._calibrator = None
        clip_max, clip_min = clips_from_factors(scale, offset, self.num_bits)
        clips = torch.tensor([clip_max, 0.0 if self.fixed_min else min(clip_min, 0.0)],
                             dtype=torch.float32, device=self.clip_max.device)
        world = _distributed_world_size()
        if world > 1:
            torch.distributed.all_reduce(clips)
            clips /= world
        with torch.no_grad():
            self.clip_max.copy_(clips[:1])
            self.clip_min.copy_(clips[1:])
            self.initialized.fill_(True)
        LOGGER.info("%s: ULQ clips initialised by IFMR over %d batch(es): clip_max=%.6g, "
                    "clip_min=%.6g", self.name, self.batch_num, float(clips[0]),
                    float(clips[1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_not_replica(self, self.name)
        if not self.is_initialized:
            if self.training and not _exporting():
                self._calibrate(x)
                # zero contribution: keeps the clips in the graph for DDP's reducer
                touch = self.clip_max * 0.0
                if self.clip_min.requires_grad:
                    touch = touch + self.clip_min * 0.0
                return x + touch.reshape(())
            if not self._warned_uninitialized:
                self._warned_uninitialized = True
                message = (f"{self.name}: the ULQ clips are not initialised yet (run "
                           f"{self.batch_num} training-mode forward(s) first or configure "
                           "clip_max/clip_min); the activations pass through unquantized.")
                LOGGER.warning(message)
                warnings.warn(message, UserWarning, stacklevel=2)
            return x
        factors = self.export_factors() if _exporting() else None
        return UlqActivationFunction.apply(x, self.clip_max, self.clip_min, self.num_bits,
                                           self.fixed_min, factors)

    def scale_offset(self) -> tuple[float, int]:
        """``(scale_d, offset_d)`` of the current clips
        (:func:`amct_core.quant.ulq.ulq_scale_offset`)."""
        if not self.is_initialized:
            raise QuantizationError(
                f"{self.name}: the ULQ clips are not initialised; run {self.batch_num} "
                "training-mode forward(s) (or configure clip_max and clip_min) first.")
        clip_max = float(_host(self.clip_max).reshape(-1)[0])
        clip_min = float(_host(self.clip_min).reshape(-1)[0])
        return ulq_scale_offset(clip_max, clip_min, self.num_bits, self.fixed_min)

    def export_factors(self) -> ExportFactors:
        """The per-tensor factors for the ONNX QuantizeLinear/DequantizeLinear pair."""
        scale, offset = self.scale_offset()
        return ExportFactors(scales=(scale,), zero_points=(offset,), axis=None,
                             num_bits=self.num_bits, name=self.name)


class ArqWeightQuantizer(nn.Module):
    """ARQ-retrain weight fake-quant: symmetric min-max of the current weight on every step
    (per channel along ``axis`` when ``channel_wise``); straight-through gradient."""

    def __init__(self, num_bits: int = 8, channel_wise: bool = True, axis: int = 0,
                 name: str = "ArqWeightQuantizer") -> None:
        super().__init__()
        self.num_bits = check_num_bits(num_bits)
        self.channel_wise = bool(channel_wise)
        self.axis = int(axis)
        self.name = name

    def extra_repr(self) -> str:
        return f"num_bits={self.num_bits}, channel_wise={self.channel_wise}, axis={self.axis}"

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        factors = self.export_factors(weight) if _exporting() else None
        return ArqRetrainFunction.apply(weight, self.num_bits, self.channel_wise, self.axis,
                                        factors)

    def scale_offset(self, weight: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """``(scale_w, offset_w)`` of ``weight`` (float32 and int64 arrays)."""
        scale = _host(arq_retrain_scale(weight, self.num_bits, self.channel_wise, self.axis))
        return scale.astype(np.float32), np.zeros(scale.shape, dtype=np.int64)

    def export_factors(self, weight: torch.Tensor) -> ExportFactors:
        scale, offset = self.scale_offset(weight)
        return ExportFactors(scales=tuple(float(v) for v in scale),
                             zero_points=tuple(int(v) for v in offset),
                             axis=self.axis if self.channel_wise else None,
                             num_bits=self.num_bits, name=self.name)


class UlqWeightQuantizer(nn.Module):
    """ULQ-retrain weight fake-quant: learnable symmetric clip(s) ``clip`` (``channels``
    values, or one), set to ``max|w|`` on the first forward; buffer ``initialized``."""

    def __init__(self, channels: int, num_bits: int = 8, channel_wise: bool = True,
                 axis: int = 0, name: str = "UlqWeightQuantizer", device=None) -> None:
        super().__init__()
        self.num_bits = check_num_bits(num_bits)
        self.channel_wise = bool(channel_wise)
        self.axis = int(axis)
        self.name = name
        size = int(channels) if self.channel_wise else 1
        self.clip = nn.Parameter(torch.ones(size, dtype=torch.float32, device=device))
        self.register_buffer("initialized", torch.tensor(False, device=device))

    def extra_repr(self) -> str:
        return f"num_bits={self.num_bits}, channel_wise={self.channel_wise}, axis={self.axis}"

    def _initialise(self, weight: torch.Tensor) -> None:
        values = ulq_weight_initial_clip(_host(weight), self.channel_wise, self.axis)
        with torch.no_grad():
            self.clip.copy_(torch.from_numpy(values).to(self.clip.device))
            self.initialized.fill_(True)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if _exporting():
            # state is not changed while tracing; uninitialised clips export as max|w|
            factors = self.export_factors(weight)
            return UlqWeightFunction.apply(weight, self._clip_values(weight), self.num_bits,
                                           self.axis, factors)
        if not _flag(self.initialized):
            self._initialise(weight)
        return UlqWeightFunction.apply(weight, self.clip, self.num_bits, self.axis, None)

    def _clip_values(self, weight: torch.Tensor) -> torch.Tensor:
        if _flag(self.initialized):
            return self.clip
        values = ulq_weight_initial_clip(_host(weight), self.channel_wise, self.axis)
        return torch.from_numpy(values).to(weight.device)

    def scale_offset(self, weight: torch.Tensor | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(scale_w, offset_w)`` of the clips (of ``max|weight|`` while they are not yet
        initialised)."""
        if not _flag(self.initialized) and weight is None:
            raise QuantizationError(
                f"{self.name}: the ULQ-retrain weight clips are not initialised; run one "
                "forward first.")
        clip = self._clip_values(weight) if weight is not None else self.clip
        scale = _host(ulq_weight_scale(clip, self.num_bits)).astype(np.float32)
        return scale, np.zeros(scale.shape, dtype=np.int64)

    def export_factors(self, weight: torch.Tensor | None = None) -> ExportFactors:
        scale, offset = self.scale_offset(weight)
        return ExportFactors(scales=tuple(float(v) for v in scale),
                             zero_points=tuple(int(v) for v in offset),
                             axis=self.axis if self.channel_wise else None,
                             num_bits=self.num_bits, name=self.name)
