"""Accuracy-based automatic calibration, framework-free (reference §3.1).

Sensitivity measures (:class:`SensitivityBase`, :class:`CosineSimilarity`), the ranking of
layers (:func:`rank_layers`) and the ask/tell search strategies (:class:`StrategyBase`,
:class:`BinarySearchStrategy`) that the framework drivers run.
"""
from amct_core.auto_calibration.sensitivity import (
    CosineSimilarity,
    SensitivityBase,
    check_outputs,
    rank_layers,
    resolve_sensitivity,
)
from amct_core.auto_calibration.strategy import (
    BinarySearchStrategy,
    StrategyBase,
    StrategyError,
    Trial,
    resolve_strategy,
)

__all__ = [
    "BinarySearchStrategy",
    "CosineSimilarity",
    "SensitivityBase",
    "StrategyBase",
    "StrategyError",
    "Trial",
    "check_outputs",
    "rank_layers",
    "resolve_sensitivity",
    "resolve_strategy",
]
