"""Accuracy-based automatic calibration of a torch model (reference §3.1, seed 基于精度的自动量化).

:func:`accuracy_based_auto_calibration` runs the PTQ flow of :mod:`amct_pytorch.ptq.quantize_tool`
several times with configs that differ only in ``quant_enable``:

1. the user's evaluator measures the float model (``original_metric``);
2. the model is quantized with the initial config, calibrated and evaluated; if
   ``metric_eval(original_metric, metric)`` passes, the models are saved and the search ends;
3. otherwise each enabled layer's sensitivity is measured: the layer inputs of the float
   network are cached during that calibration pass, and the layer is run on them once in float
   (``wrapper.module``) and once with its fake-quant factors; the measure (default
   ``0.5 + 0.5·cos``, :class:`~amct_core.auto_calibration.CosineSimilarity`) ranks the layers,
   least similar first (:func:`~amct_core.auto_calibration.rank_layers`);
4. the strategy (default :class:`~amct_core.auto_calibration.BinarySearchStrategy`) proposes
   sets of layers to roll back; each is quantized, calibrated and evaluated again;
5. the configuration the strategy reports as best, if it passed, becomes the result.

Files written:

- ``<dirname(save_dir)>/accuracy_based_auto_calibration_ranking_information.json``: the layers
  and their similarity, least similar first (written whenever the ranking is computed);
- ``./amct_log/accuracy_based_auto_calibration_record.json``: the search history;
- on success only: the final config **overwrites** ``config_file`` (so config, record and
  models agree, and ``save_model`` can be re-run), its factors go to ``record_file``, and
  ``<save_dir>_fake_quant_model.onnx``, ``_deploy_model.onnx`` and ``_qdq_model.onnx`` are
  written. When no configuration passes, ``config_file`` and ``record_file`` are left as they
  were and no model is written.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
from typing import Any

import numpy as np
import torch
from torch import nn

from amct_core.atomic_file import write_atomically
from amct_core.auto_calibration import (
    SensitivityBase,
    StrategyBase,
    rank_layers,
    resolve_sensitivity,
    resolve_strategy,
)
from amct_core.errors import AmctTypeError, AmctValueError
from amct_core.logger import LOG_DIR, get_logger
from amct_core.quant.config import QuantConfig, load_quant_config, write_quant_config
from amct_pytorch.common.auto_calibration import AutoCalibrationEvaluatorBase
from amct_pytorch.ptq.calibration_model import QuantCalibrationLayer
from amct_pytorch.ptq.quantize_tool import quantize_model, save_model

LOGGER = get_logger("amct_pytorch")

RANKING_FILE = "accuracy_based_auto_calibration_ranking_information.json"
RECORD_FILE = "accuracy_based_auto_calibration_record.json"


@dataclasses.dataclass
class _TrialResult:
    rolled_back: tuple[str, ...]
    metric: Any
    passed: bool
    loss: float
    config: QuantConfig
    onnx_file: str
    record_file: str


class _Search:
    """The state of one call: the user's arguments and a folder for the trial files."""

    def __init__(self, model, evaluator, base_config, work_dir, input_data, export_kwargs):
        self.model = model
        self.evaluator = evaluator
        self.base_config = base_config
        self.work_dir = work_dir
        self.input_data = input_data
        self.export_kwargs = export_kwargs
        self.original_metric: Any = None
        self.count = 0

    def config_without(self, rolled_back: tuple[str, ...]) -> QuantConfig:
        layers = {name: (dataclasses.replace(cfg, quant_enable=False)
                         if name in rolled_back else cfg)
                  for name, cfg in self.base_config.layers.items()}
        return dataclasses.replace(self.base_config, layers=layers)

    def quantize(self, rolled_back: tuple[str, ...], capture: bool = False):
        """Quantize with ``rolled_back`` in float, calibrate (caching the float layer inputs
        when ``capture``) and evaluate. Returns the result, the calibration model and the
        cached inputs."""
        self.count += 1
        tag = f"trial{self.count}"
        config = self.config_without(rolled_back)
        config_file = os.path.join(self.work_dir, f"{tag}_config.json")
        onnx_file = os.path.join(self.work_dir, f"{tag}_modified.onnx")
        record_file = os.path.join(self.work_dir, f"{tag}_record.txt")
        write_quant_config(config_file, config)
        calibration = quantize_model(config_file, onnx_file, record_file, self.model,
                                     self.input_data, **self.export_kwargs)
        wrappers = {name: module for name, module in calibration.named_modules()
                    if isinstance(module, QuantCalibrationLayer)}
        cached: dict[str, list[tuple]] = {name: [] for name in wrappers}
        handles = []
        if capture:
            for name, wrapper in wrappers.items():
                def hook(module, args, kwargs, name=name):
                    if not module.quantized:
                        cached[name].append((tuple(a.detach() if isinstance(a, torch.Tensor)
                                                   else a for a in args), dict(kwargs)))
                handles.append(wrapper.register_forward_pre_hook(hook, with_kwargs=True))
        try:
            self.evaluator.calibration(calibration)
        finally:
            for handle in handles:
                handle.remove()
        pending = [name for name, wrapper in wrappers.items() if not wrapper.quantized]
        if pending:
            raise AmctValueError(
                f"accuracy_based_auto_calibration: after model_evaluator.calibration the "
                f"layers {pending[:10]} have no quantization factors: calibration must run "
                f"the model on batch_num={config.batch_num} batch(es) (the config's "
                f"batch_num).")
        metric = self.evaluator.evaluate(calibration)
        passed, loss = _check_verdict(
            self.evaluator.metric_eval(self.original_metric, metric))
        result = _TrialResult(tuple(rolled_back), metric, passed, loss, config, onnx_file,
                              record_file)
        return result, calibration, cached


def _check_verdict(verdict: Any) -> tuple[bool, float]:
    if not isinstance(verdict, tuple) or len(verdict) != 2:
        raise AmctTypeError(f"model_evaluator.metric_eval must return (bool, loss), got "
                            f"{verdict!r}.")
    passed, loss = verdict
    if not isinstance(passed, (bool, np.bool_)):
        raise AmctTypeError(f"model_evaluator.metric_eval must return (bool, loss); the first "
                            f"value is {passed!r}.")
    try:
        loss_value = float(loss)
    except (TypeError, ValueError):
        raise AmctTypeError(f"model_evaluator.metric_eval must return (bool, loss) with a real "
                            f"loss, got {loss!r}.") from None
    return bool(passed), loss_value


@torch.no_grad()
def layer_similarities(calibration: nn.Module, cached: dict[str, list[tuple]],
                       sensitivity: SensitivityBase) -> dict[str, float]:
    """Each calibrated layer's similarity between its float output (``wrapper.module``) and
    its fake-quant output, both on the float layer inputs cached during calibration."""
    similarities = {}
    for name, module in calibration.named_modules():
        if not isinstance(module, QuantCalibrationLayer) or not cached.get(name):
            continue
        float_out, quant_out = [], []
        for args, kwargs in cached[name]:
            float_out.append(module.module(*args, **kwargs).float().cpu().numpy().ravel())
            quant_out.append(module(*args, **kwargs).float().cpu().numpy().ravel())
        similarities[name] = float(sensitivity.compare(np.concatenate(float_out),
                                                       np.concatenate(quant_out)))
    return similarities


def _jsonable(value: Any) -> Any:
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, float, np.integer, np.floating)):
        number = float(value) if isinstance(value, (float, np.floating)) else int(value)
        return number if not isinstance(number, float) or math.isfinite(number) else str(number)
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return _jsonable(value.item())
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if value is None or isinstance(value, str):
        return value
    return repr(value)


def _write_json(path: str, data: Any) -> None:
    text = json.dumps(_jsonable(data), indent=4, ensure_ascii=False) + "\n"
    write_atomically(path, text.encode("utf-8"))


def _trial_entry(result: _TrialResult) -> dict[str, Any]:
    return {"rolled_back": list(result.rolled_back), "metric": result.metric,
            "passed": result.passed, "loss": result.loss}


def _log_trial(index: int | str, result: _TrialResult) -> None:
    LOGGER.info("Auto calibration trial %s: %d layer(s) rolled back %s: metric %s, loss %.6g, "
                "%s.", index, len(result.rolled_back), list(result.rolled_back), result.metric,
                result.loss, "PASS" if result.passed else "FAIL")


def _log_ranking(ranking: list[tuple[str, float]], rolled_back: tuple[str, ...]) -> None:
    width = max([len("layer")] + [len(name) for name, _ in ranking])
    lines = [f"{'rank':>4}  {'layer':<{width}}  {'similarity':>10}  rolled back"]
    for rank, (name, value) in enumerate(ranking, 1):
        lines.append(f"{rank:>4}  {name:<{width}}  {value:>10.6f}  "
                     f"{'yes' if name in rolled_back else 'no'}")
    LOGGER.info("Layer ranking (least similar first):\n%s", "\n".join(lines))


def accuracy_based_auto_calibration(model: nn.Module, model_evaluator: AutoCalibrationEvaluatorBase,
                                    config_file: str | os.PathLike,
                                    record_file: str | os.PathLike,
                                    save_dir: str | os.PathLike, input_data: object,
                                    input_names=None, output_names=None, dynamic_axes=None,
                                    strategy: str | StrategyBase = "BinarySearch",
                                    sensitivity: str | SensitivityBase = "CosineSimilarity"
                                    ) -> None:
    """Quantize ``model`` with the fewest layers rolled back to float that the user's accuracy
    check accepts (reference §3.1; the steps and files are in the module docstring).

    ``config_file`` is the config from :func:`create_quant_config`; ``save_dir`` is the prefix
    of the saved models, as ``save_path`` of :func:`save_model`. ``input_data``,
    ``input_names``, ``output_names`` and ``dynamic_axes`` are passed to
    :func:`quantize_model`. ``strategy`` and ``sensitivity`` are names (``'BinarySearch'``,
    ``'CosineSimilarity'``) or instances of :class:`~amct_core.auto_calibration.StrategyBase`
    and :class:`~amct_core.auto_calibration.SensitivityBase`. The user's model is not changed.
    """
    if not isinstance(model, nn.Module):
        raise AmctTypeError(f"accuracy_based_auto_calibration: model must be a "
                            f"torch.nn.Module, got {type(model).__name__}.")
    if not isinstance(model_evaluator, AutoCalibrationEvaluatorBase):
        raise AmctTypeError(
            f"accuracy_based_auto_calibration: model_evaluator must be an instance of a "
            f"subclass of amct_pytorch.common.auto_calibration.AutoCalibrationEvaluatorBase, "
            f"got {type(model_evaluator).__name__}.")
    search_strategy = resolve_strategy(strategy)
    measure = resolve_sensitivity(sensitivity)
    config_file, record_file, save_dir = (os.fspath(config_file), os.fspath(record_file),
                                          os.fspath(save_dir))
    base_config = load_quant_config(config_file)
    export_kwargs = {"input_names": input_names, "output_names": output_names,
                     "dynamic_axes": dynamic_axes}
    history: dict[str, Any] = {"strategy": type(search_strategy).__name__,
                               "sensitivity": type(measure).__name__}
    history_file = os.path.join(os.getcwd(), LOG_DIR, RECORD_FILE)
    os.makedirs(os.path.dirname(history_file), exist_ok=True)

    with tempfile.TemporaryDirectory(prefix="amct_auto_calibration_") as work_dir:
        search = _Search(model, model_evaluator, base_config, work_dir, input_data,
                         export_kwargs)
        search.original_metric = model_evaluator.evaluate(model)
        history["original_metric"] = search.original_metric
        LOGGER.info("Auto calibration: original model metric %s.", search.original_metric)

        initial, calibration, cached = search.quantize((), capture=True)
        _log_trial("0 (initial config)", initial)
        history["initial"] = _trial_entry(initial)
        if initial.passed:
            del calibration, cached
            history["trials"], history["result"] = [], []
            _write_json(history_file, history)
            _finish(initial, config_file, record_file, save_dir, rewrite_config=False)
            return

        similarities = layer_similarities(calibration, cached, measure)
        del calibration, cached
        ranking = rank_layers(similarities)
        ranking_file = os.path.join(os.path.dirname(os.path.abspath(save_dir)), RANKING_FILE)
        os.makedirs(os.path.dirname(ranking_file), exist_ok=True)
        _write_json(ranking_file, dict(ranking))
        history["ranking"] = dict(ranking)
        LOGGER.info("Auto calibration: the accuracy check failed; %d layer(s) ranked by %s, "
                    "written to %s.", len(ranking), type(measure).__name__, ranking_file)

        results = {(): initial}
        search_strategy.initialize([name for name, _ in ranking])
        known = set(similarities)
        trials = []
        history["trials"] = trials
        while (proposal := search_strategy.next_trial()) is not None:
            rolled_back = _check_proposal(proposal, known)
            result = results.get(rolled_back)
            if result is None:
                result = search.quantize(rolled_back)[0]
                results[rolled_back] = result
            _log_trial(len(trials) + 1, result)
            trials.append(_trial_entry(result))
            _write_json(history_file, history)
            search_strategy.record(list(proposal), result.passed, result.loss)

        best = search_strategy.best()
        chosen = None
        if best is not None:
            key = _check_proposal(best, known)
            chosen = results.get(key)
            if chosen is None:
                chosen = search.quantize(key)[0]
                _log_trial("(strategy's best)", chosen)
            if not chosen.passed:
                LOGGER.error("The configuration the strategy reports as best (%s rolled back) "
                             "does not pass the accuracy check.", list(key))
                chosen = None
        history["result"] = None if chosen is None else list(chosen.rolled_back)
        _write_json(history_file, history)
        if chosen is None:
            _log_ranking(ranking, ())
            LOGGER.error(
                "Auto calibration failed: no configuration tried passes the accuracy check "
                "(%d trial(s); the last rolled back %d of %d layers). No quantized model is "
                "written and %s and %s are unchanged; the search history is in %s.",
                len(trials), len(trials[-1]["rolled_back"]) if trials else 0, len(ranking),
                config_file, record_file, history_file)
            return
        _log_ranking(ranking, chosen.rolled_back)
        _finish(chosen, config_file, record_file, save_dir, rewrite_config=True)


def _check_proposal(proposal: Any, known: set[str]) -> tuple[str, ...]:
    if isinstance(proposal, (str, bytes)) or not isinstance(proposal, (list, tuple)):
        raise AmctTypeError(f"The strategy must propose a list of layer names, got "
                            f"{proposal!r}.")
    unknown = [name for name in proposal if name not in known]
    if unknown:
        raise AmctValueError(f"The strategy proposes rolling back {unknown}, which are not "
                             f"ranked layers (ranked: {sorted(known)[:20]}).")
    return tuple(proposal)


def _finish(result: _TrialResult, config_file: str, record_file: str, save_dir: str,
            rewrite_config: bool) -> None:
    if rewrite_config:
        write_quant_config(config_file, result.config)
    with open(result.record_file, "rb") as stream:
        write_atomically(record_file, stream.read())
    save_model(result.onnx_file, record_file, save_dir)
    LOGGER.info("Auto calibration done: %d layer(s) rolled back %s, metric %s (loss %.6g). "
                "Config %s, record %s, models %s_*.onnx.", len(result.rolled_back),
                list(result.rolled_back), result.metric, result.loss, config_file,
                record_file, save_dir)
