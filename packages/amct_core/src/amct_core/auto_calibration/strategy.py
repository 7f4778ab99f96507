"""Search strategies for accuracy-based automatic calibration (reference §3.1).

After the float model and the model quantized with the initial config have been evaluated and
the accuracy check has failed, the layers are ranked from least to most similar (see
:func:`~amct_core.auto_calibration.sensitivity.rank_layers`) and a strategy decides which of
them to roll back (``quant_enable = false``) in each further trial.

Strategies follow an ask/tell protocol, so a driver in any framework can run them::

    strategy.initialize([name for name, _ in rank_layers(similarities)])
    while (rolled_back := strategy.next_trial()) is not None:
        passed, loss = evaluate_with_rolled_back(rolled_back)   # the framework's work
        strategy.record(rolled_back, passed, loss)
    result = strategy.best()          # layers to roll back, or None: nothing passes
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from amct_core.errors import AmctError, AmctTypeError, AmctValueError


class StrategyError(AmctError, RuntimeError):
    """A strategy was driven out of order (a result for a trial it did not propose ...)."""


@dataclass(frozen=True)
class Trial:
    """One evaluated configuration: the layers rolled back, the check's verdict and loss."""

    rolled_back: tuple[str, ...]
    passed: bool
    loss: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, as written to the search-history file."""
        return {"rolled_back": list(self.rolled_back), "passed": self.passed,
                "loss": self.loss}


def _check_ranking(ranking: Sequence[str]) -> list[str]:
    """The ranking as a list of unique layer names, worst first; raises on bad input."""
    if isinstance(ranking, (str, bytes)) or not isinstance(ranking, Sequence):
        raise AmctTypeError(
            f"ranking must be a sequence of layer names (least similar first), got "
            f"{type(ranking).__name__}.")
    names = list(ranking)
    for name in names:
        if not isinstance(name, str):
            raise AmctTypeError(
                f"ranking must hold layer names (str), got {name!r}; pass "
                "[name for name, _ in rank_layers(similarities)].")
    seen: set[str] = set()
    duplicates = sorted({name for name in names if name in seen or seen.add(name)})
    if duplicates:
        raise AmctValueError(f"ranking names these layers more than once: {duplicates}.")
    return names


class StrategyBase(ABC):
    """Ask/tell search over which layers to roll back (reference §3.1).

    Protocol: :meth:`initialize` with the layer names ordered from least to most similar,
    then repeatedly :meth:`next_trial` (the layers to roll back next, ``None`` when the search
    is over) and :meth:`record` with that trial's outcome; finally :meth:`best`. Every recorded
    trial is appended to :attr:`history`.

    Subclasses implement :meth:`initialize`, :meth:`next_trial`, :meth:`best` and
    :meth:`_update`; :meth:`record` validates its arguments, appends to :attr:`history` and
    calls :meth:`_update`. A subclass's :meth:`initialize` must call ``super().initialize``.
    """

    #: Short name, as accepted by the ``strategy`` argument of the framework drivers.
    name: str = ""

    def __init__(self) -> None:
        self.history: list[Trial] = []
        self.ranking: list[str] = []

    def initialize(self, ranking: Sequence[str]) -> None:
        """Start a search over ``ranking`` (layer names, least similar first)."""
        self.ranking = _check_ranking(ranking)
        self.history = []

    @abstractmethod
    def next_trial(self) -> list[str] | None:
        """The layers to roll back in the next evaluation, or ``None`` when the search is over.

        Calling it again before :meth:`record` returns the same trial.
        """

    def record(self, rolled_back: Sequence[str], passed: bool, loss: float) -> None:
        """Report the outcome of evaluating the model with ``rolled_back`` layers in float."""
        if isinstance(rolled_back, (str, bytes)) or not isinstance(rolled_back, Sequence):
            raise AmctTypeError(
                f"rolled_back must be a sequence of layer names, got "
                f"{type(rolled_back).__name__}.")
        if not isinstance(passed, bool):
            raise AmctTypeError(
                f"passed must be a bool (the first value metric_eval returns), got {passed!r}.")
        try:
            loss_value = float(loss)
        except (TypeError, ValueError):
            raise AmctTypeError(
                f"loss must be a real number (the second value metric_eval returns), got "
                f"{loss!r}.") from None
        trial = Trial(tuple(rolled_back), passed, loss_value)
        self._update(trial)
        self.history.append(trial)

    @abstractmethod
    def _update(self, trial: Trial) -> None:
        """Take ``trial``'s outcome into account (called by :meth:`record`)."""

    @abstractmethod
    def best(self) -> list[str] | None:
        """The layers to roll back in the final config, or ``None`` if no trial passed."""


class BinarySearchStrategy(StrategyBase):
    """Binary search for the fewest worst-ranked layers to roll back (reference §3.1).

    With the ranking ``r[0..n-1]`` (least similar first), trial ``k`` rolls back ``r[:k]``.
    Assuming the check is monotone in ``k`` (rolling back more never hurts), the strategy finds
    the smallest ``k`` that passes. ``k = 0`` is the initial fully quantized model, which the
    driver has already evaluated and which failed, so the search runs over ``k ∈ 1..n`` with a
    bracket ``lo`` (known to fail) and ``hi`` (known, or assumed, to pass), testing
    ``k = (lo + hi) // 2`` each time.

    Number of trials, after the float and initial quantized evaluations:

    - by default the outcome set is ``{1, ..., n, none}`` and ``hi`` starts at the virtual
      ``n + 1``, so at most ``ceil(log2(n + 1))`` trials; total evaluations
      ``2 + ceil(log2(n + 1))``. When no trial passes, ``k = n`` (every layer rolled back)
      has been tried and :meth:`best` returns ``None``;
    - with ``assume_all_rolled_back_passes=True`` (the driver knows that rolling back every
      layer gives the float model, which passes), ``hi`` starts at ``n`` and at most
      ``ceil(log2(n))`` trials are made: total ``2 + ceil(log2(n))``, the issue's
      ``2 + log2(number of layers)`` budget. :meth:`best` is then never ``None`` for ``n ≥ 1``.

    Both are within ``1 + ceil(log2(n + 1))`` (:meth:`max_trials`). If the check is not
    monotone, the result is still a configuration that passed, but maybe not the smallest.
    """

    name = "BinarySearch"

    def __init__(self, assume_all_rolled_back_passes: bool = False) -> None:
        super().__init__()
        if not isinstance(assume_all_rolled_back_passes, bool):
            raise AmctTypeError(
                f"assume_all_rolled_back_passes must be a bool, got "
                f"{assume_all_rolled_back_passes!r}.")
        self.assume_all_rolled_back_passes = assume_all_rolled_back_passes
        self._lo = 0
        self._hi = 1
        self._initialized = False

    @staticmethod
    def max_trials(num_layers: int, assume_all_rolled_back_passes: bool = False) -> int:
        """Upper bound on the trials for ``num_layers`` ranked layers (see the class doc)."""
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 0:
            raise AmctValueError(f"num_layers must be an int >= 0, got {num_layers!r}.")
        outcomes = num_layers if assume_all_rolled_back_passes else num_layers + 1
        return math.ceil(math.log2(outcomes)) if outcomes > 1 else 0

    def initialize(self, ranking: Sequence[str]) -> None:
        """Start the search; ``ranking`` is least similar first."""
        super().initialize(ranking)
        n = len(self.ranking)
        self._lo = 0
        self._hi = n if (self.assume_all_rolled_back_passes and n > 0) else n + 1
        self._initialized = True

    def _pending_k(self) -> int | None:
        if not self._initialized:
            raise StrategyError("Call initialize(ranking) before next_trial() or record().")
        if self._hi - self._lo <= 1:
            return None
        return (self._lo + self._hi) // 2

    def next_trial(self) -> list[str] | None:
        """``ranking[:k]`` for the next ``k`` to test, or ``None`` when the bracket is closed."""
        k = self._pending_k()
        return None if k is None else self.ranking[:k]

    def _update(self, trial: Trial) -> None:
        k = self._pending_k()
        if k is None:
            raise StrategyError("The search is over; no trial is pending.")
        expected = self.ranking[:k]
        if list(trial.rolled_back) != expected:
            raise StrategyError(
                f"record() got rolled_back={list(trial.rolled_back)}, but the pending trial "
                f"rolls back {expected}; report the trial that next_trial() returned.")
        if trial.passed:
            self._hi = k
        else:
            self._lo = k

    @property
    def done(self) -> bool:
        """Whether the search is over."""
        return self._pending_k() is None

    def best(self) -> list[str] | None:
        """``ranking[:k]`` for the smallest passing ``k`` found, or ``None`` if none passed."""
        if not self._initialized:
            raise StrategyError("Call initialize(ranking) before best().")
        n = len(self.ranking)
        if n == 0 or self._hi > n:
            return None
        return self.ranking[:self._hi]


_STRATEGIES: dict[str, type[StrategyBase]] = {BinarySearchStrategy.name: BinarySearchStrategy}


def resolve_strategy(strategy: str | StrategyBase) -> StrategyBase:
    """The strategy named by ``strategy`` (``'BinarySearch'``), or a user object as is.

    User objects must be instances of :class:`StrategyBase`.
    """
    if isinstance(strategy, StrategyBase):
        return strategy
    if isinstance(strategy, str):
        try:
            return _STRATEGIES[strategy]()
        except KeyError:
            raise AmctValueError(
                f"Unknown strategy {strategy!r}; expected one of {sorted(_STRATEGIES)} or an "
                "instance of a StrategyBase subclass.") from None
    raise AmctTypeError(
        f"strategy must be a name or a StrategyBase instance, got {type(strategy).__name__}.")
