"""Accuracy-based automatic calibration core (reference §3.1): the binary search on synthetic
pass/fail oracles, the cosine sensitivity against hand computations, the layer ranking."""
import math

import numpy as np
import pytest

from amct_core.auto_calibration import (
    BinarySearchStrategy,
    CosineSimilarity,
    SensitivityBase,
    StrategyBase,
    StrategyError,
    Trial,
    rank_layers,
    resolve_sensitivity,
    resolve_strategy,
)
from amct_core.errors import AmctTypeError, AmctValueError


def run_search(strategy, ranking, oracle):
    """Drive ``strategy`` like a framework driver; ``oracle(rolled_back) -> passed``."""
    strategy.initialize(ranking)
    calls = []
    while (trial := strategy.next_trial()) is not None:
        assert strategy.next_trial() == trial  # asking twice gives the same trial
        passed = oracle(trial)
        calls.append(list(trial))
        strategy.record(trial, passed, 0.0 if passed else 1.0)
    return calls


def names(n):
    return [f"layer{i:02d}" for i in range(n)]


# --- binary search ---------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7, 8, 9, 16, 17, 31])
def test_monotone_oracle_finds_minimal_k_within_budget(n):
    ranking = names(n)
    for k_star in range(1, n + 1):
        strategy = BinarySearchStrategy()
        calls = run_search(strategy, ranking, lambda t, k=k_star: len(t) >= k)
        assert strategy.best() == ranking[:k_star]
        assert len(calls) <= math.ceil(math.log2(n + 1))
        assert len(calls) <= BinarySearchStrategy.max_trials(n) <= 1 + math.ceil(math.log2(n + 1))
        assert [list(t.rolled_back) for t in strategy.history] == calls
        # Every trial rolls back a prefix of the ranking.
        assert all(c == ranking[:len(c)] for c in calls)


@pytest.mark.parametrize("n", [1, 2, 5, 8, 13, 32])
def test_assume_all_rolled_back_passes_meets_issue_budget(n):
    ranking = names(n)
    for k_star in range(1, n + 1):
        strategy = BinarySearchStrategy(assume_all_rolled_back_passes=True)
        calls = run_search(strategy, ranking, lambda t, k=k_star: len(t) >= k)
        assert strategy.best() == ranking[:k_star]
        # Float + initial quantized evaluations + trials <= 2 + ceil(log2(n)).
        assert 2 + len(calls) <= 2 + math.ceil(math.log2(n))
        assert len(calls) <= BinarySearchStrategy.max_trials(n, True)


@pytest.mark.parametrize("n", [1, 4, 6, 10])
def test_never_passing_check_gives_none_with_all_trials_recorded(n):
    ranking = names(n)
    strategy = BinarySearchStrategy()
    calls = run_search(strategy, ranking, lambda t: False)
    assert strategy.best() is None
    assert strategy.done
    assert len(calls) == len(strategy.history) == math.ceil(math.log2(n + 1))
    assert all(not t.passed and t.loss == 1.0 for t in strategy.history)
    # The last trial rolled back every layer, so "nothing passes" is established.
    assert list(strategy.history[-1].rolled_back) == ranking


def test_one_sensitive_layer_is_rolled_back_alone():
    # Similarities as a driver would measure them: only "fragile" is far from its float output.
    sims = {f"conv{i}": 0.999 - 0.0001 * i for i in range(9)}
    sims["fragile"] = 0.71
    ranking = [name for name, _ in rank_layers(sims)]
    assert ranking[0] == "fragile"
    strategy = BinarySearchStrategy()
    run_search(strategy, ranking, lambda t: "fragile" in t)
    assert strategy.best() == ["fragile"]
    assert len(strategy.history) <= math.ceil(math.log2(len(ranking) + 1))


def test_non_monotone_oracle_still_returns_a_passing_trial():
    ranking = names(10)
    strategy = BinarySearchStrategy()
    run_search(strategy, ranking, lambda t: len(t) in (3, 5))
    best = strategy.best()
    if best is not None:
        assert any(t.passed and list(t.rolled_back) == best for t in strategy.history)


def test_empty_ranking_has_no_trials():
    strategy = BinarySearchStrategy()
    strategy.initialize([])
    assert strategy.next_trial() is None
    assert strategy.best() is None
    assert BinarySearchStrategy.max_trials(0) == 0


def test_history_to_dict_and_reinitialize():
    strategy = BinarySearchStrategy()
    run_search(strategy, names(3), lambda t: len(t) >= 2)
    assert strategy.history[0].to_dict() == {"rolled_back": ["layer00", "layer01"],
                                             "passed": True, "loss": 0.0}
    strategy.initialize(names(2))
    assert strategy.history == []
    assert strategy.next_trial() == ["layer00"]


def test_strategy_errors():
    strategy = BinarySearchStrategy()
    with pytest.raises(StrategyError, match="initialize"):
        strategy.next_trial()
    with pytest.raises(StrategyError, match="initialize"):
        strategy.best()
    with pytest.raises(AmctTypeError, match="sequence of layer names"):
        strategy.initialize("conv1")
    with pytest.raises(AmctTypeError, match="rank_layers"):
        strategy.initialize([("conv1", 0.9)])
    with pytest.raises(AmctValueError, match=r"more than once: \['a'\]"):
        strategy.initialize(["a", "b", "a"])
    strategy.initialize(["a", "b", "c"])
    with pytest.raises(StrategyError, match="pending trial rolls back"):
        strategy.record(["c"], True, 0.0)
    with pytest.raises(AmctTypeError, match="passed must be a bool"):
        strategy.record(strategy.next_trial(), 1, 0.0)
    with pytest.raises(AmctTypeError, match="loss must be a real number"):
        strategy.record(strategy.next_trial(), True, "high")
    assert strategy.history == []
    run = ["a", "b"]
    strategy.record(run, True, 0.1)
    strategy.record(["a"], True, 0.2)
    with pytest.raises(StrategyError, match="search is over"):
        strategy.record(["a"], True, 0.2)
    with pytest.raises(AmctTypeError, match="assume_all_rolled_back_passes"):
        BinarySearchStrategy(assume_all_rolled_back_passes="yes")
    with pytest.raises(AmctValueError, match="num_layers"):
        BinarySearchStrategy.max_trials(-1)


def test_user_strategy_object_through_the_protocol():
    class RollBackOneByOne(StrategyBase):
        name = "OneByOne"

        def initialize(self, ranking):
            super().initialize(ranking)
            self.k = 1
            self.found = None

        def next_trial(self):
            if self.found is not None or self.k > len(self.ranking):
                return None
            return self.ranking[:self.k]

        def _update(self, trial: Trial):
            if trial.passed:
                self.found = list(trial.rolled_back)
            self.k += 1

        def best(self):
            return self.found

    user = RollBackOneByOne()
    assert resolve_strategy(user) is user
    run_search(user, names(5), lambda t: len(t) >= 3)
    assert user.best() == names(3)
    assert len(user.history) == 3
    assert isinstance(resolve_strategy("BinarySearch"), BinarySearchStrategy)
    with pytest.raises(AmctValueError, match="Unknown strategy 'Greedy'"):
        resolve_strategy("Greedy")
    with pytest.raises(AmctTypeError, match="StrategyBase instance"):
        resolve_strategy(3)
    with pytest.raises(TypeError):
        StrategyBase()


# --- cosine similarity -----------------------------------------------------------------------

def test_cosine_values_by_hand():
    cos = CosineSimilarity()
    assert cos.name == "CosineSimilarity"
    # (1, 0) vs (1, 1): cos = 1/sqrt(2).
    assert cos.compare(np.array([1.0, 0.0]), np.array([1.0, 1.0])) == pytest.approx(
        0.5 + 0.5 / math.sqrt(2), abs=1e-15)
    # (1, 2, 3) vs (4, 5, 6): dot 32, norms sqrt(14), sqrt(77).
    assert cos.compare(np.array([1, 2, 3]), np.array([4.0, 5.0, 6.0])) == pytest.approx(
        0.5 + 0.5 * 32 / math.sqrt(14 * 77), abs=1e-15)
    # Flattened over any shape; identical, opposite and orthogonal outputs.
    a = np.arange(1, 13, dtype=np.float32).reshape(2, 3, 2)
    assert cos.compare(a, a) == pytest.approx(1.0, abs=1e-15)
    assert cos.compare(a, 3 * a) == pytest.approx(1.0, abs=1e-15)
    assert cos.compare(a, -a) == pytest.approx(0.0, abs=1e-15)
    assert cos.compare(np.array([[1.0, 0.0]]), np.array([[0.0, 2.0]])) == 0.5
    # Huge values do not overflow the dot product.
    assert cos.compare(np.array([1e300, 1e300]), np.array([1e300, 0.0])) == pytest.approx(
        0.5 + 0.5 / math.sqrt(2))


def test_cosine_zero_norms():
    cos = CosineSimilarity()
    zeros = np.zeros((2, 3))
    assert cos.compare(zeros, zeros) == 1.0
    assert cos.compare(zeros, np.ones((2, 3))) == 0.5
    assert cos.compare(np.ones((2, 3)), zeros) == 0.5


def test_cosine_errors():
    cos = CosineSimilarity()
    with pytest.raises(AmctValueError, match=r"same shape, got \(2, 3\) and \(3, 2\)"):
        cos.compare(np.ones((2, 3)), np.ones((3, 2)))
    with pytest.raises(AmctValueError, match="float_output is empty"):
        cos.compare(np.ones((0, 3)), np.ones((0, 3)))
    with pytest.raises(AmctValueError, match="quant_output contains 1 NaN or Inf"):
        cos.compare(np.ones(3), np.array([1.0, np.nan, 1.0]))
    with pytest.raises(AmctValueError, match="float_output contains 2 NaN or Inf"):
        cos.compare(np.array([np.inf, -np.inf]), np.ones(2))
    with pytest.raises(AmctValueError, match="real numeric array"):
        cos.compare(np.array(["a"]), np.array(["a"]))


def test_resolve_sensitivity_and_user_measure():
    assert isinstance(resolve_sensitivity("CosineSimilarity"), CosineSimilarity)

    class NegativeMse(SensitivityBase):
        name = "NegativeMse"

        def compare(self, float_output, quant_output):
            return -float(np.mean((np.asarray(float_output) - quant_output) ** 2))

    user = NegativeMse()
    assert resolve_sensitivity(user) is user
    with pytest.raises(AmctValueError, match="Unknown sensitivity 'L2'"):
        resolve_sensitivity("L2")
    with pytest.raises(AmctTypeError, match="SensitivityBase instance"):
        resolve_sensitivity(None)


# --- ranking ---------------------------------------------------------------------------------

def test_rank_layers_ascending_ties_by_name():
    ranked = rank_layers({"b": 0.9, "a": 0.9, "c": 0.5, "d": np.float32(0.99), "e": 1})
    assert ranked == [("c", 0.5), ("a", 0.9), ("b", 0.9), ("d", float(np.float32(0.99))),
                      ("e", 1.0)]
    assert all(isinstance(v, float) for _, v in ranked)
    assert rank_layers({}) == []


def test_rank_layers_errors():
    with pytest.raises(AmctValueError, match="Similarity of layer 'x' is nan"):
        rank_layers({"x": float("nan")})
    with pytest.raises(AmctTypeError, match="must be a real number"):
        rank_layers({"x": "0.5"})
    with pytest.raises(AmctTypeError, match="Layer names must be strings"):
        rank_layers({1: 0.5})
    with pytest.raises(AmctTypeError, match="mapping"):
        rank_layers([("x", 0.5)])
