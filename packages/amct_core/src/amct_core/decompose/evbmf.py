"""Empirical variational Bayes matrix factorisation (EVBMF) for rank estimation.

Reference §2.3, after Nakajima, Sugiyama, Babacan and Tomioka, "Global analytic solution of
fully-observed variational Bayesian matrix factorization", JMLR 14 (2013). For an L×M matrix
(L ≤ M, α = L/M) with singular values γ_h, the noise variance σ² minimises the free energy

    Ω(σ²) = Σ_h ψ0(x_h) + Σ_{h: x_h > x̄} ψ1(x_h),   x_h = γ_h² / (M σ²),
    ψ0(x) = x − ln x,
    ψ1(x) = ln(τ(x) + 1) + α ln(τ(x)/α + 1) − τ(x),
    τ(x) = ½ (x − (1+α) + √((x − (1+α))² − 4α)),
    x̄ = (1 + τ̄)(1 + α/τ̄),   τ̄ = 2.5129 √α,

over [σ²_lo, σ²_hi] with σ²_hi = Σγ²/(LM) and σ²_lo = max(γ²_{e+1}/(M x̄), mean_{h>e} γ_h²/M),
e = min(⌈L/(1+α)⌉ − 1, L) − 1. The EVBMF rank is the number of γ_h > √(M σ² x̄).

Σ ψ0 only needs Σγ² (the constant Σ ln γ² drops out of the argmin), so zero singular values are
harmless. The search runs on σ²/σ²_hi, which makes the estimated rank independent of the
scale of the weights (the bounded Brent search uses xatol = 1e-5 on that scale, 500 iterations).
"""
from __future__ import annotations

import math

import numpy as np
from scipy.optimize import minimize_scalar

TAU_BAR_COEFFICIENT = 2.5129


def _tau(x: np.ndarray, alpha: float) -> np.ndarray:
    shifted = x - (1.0 + alpha)
    return 0.5 * (shifted + np.sqrt(np.maximum(shifted * shifted - 4.0 * alpha, 0.0)))


def evbmf_noise_variance(singular_values: np.ndarray, num_rows: int, num_cols: int) -> float:
    """Return the EVBMF noise variance σ² of an L×M matrix from all its singular values.

    ``singular_values`` must hold all min(L, M) values (any order); L = ``num_rows`` must be the
    smaller dimension. Returns 0.0 for an all-zero matrix.
    """
    s = np.sort(np.asarray(singular_values, dtype=np.float64))[::-1]
    rows, cols = int(num_rows), int(num_cols)
    if rows > cols:
        raise ValueError(f"num_rows ({rows}) must not exceed num_cols ({cols}); transpose first")
    if s.size != rows:
        raise ValueError(f"expected {rows} singular values, got {s.size}")
    energy = float(np.sum(s * s))
    if energy <= 0.0 or not math.isfinite(energy):
        return 0.0
    alpha = rows / cols
    tau_bar = TAU_BAR_COEFFICIENT * math.sqrt(alpha)
    x_bar = (1.0 + tau_bar) * (1.0 + alpha / tau_bar)
    upper = energy / (rows * cols)
    e_index = min(math.ceil(rows / (1.0 + alpha)) - 1, rows) - 1
    tail = s[e_index + 1:]
    lower = max(float(tail[0] ** 2) / (cols * x_bar), float(np.mean(tail * tail)) / cols)
    squared = s * s

    def free_energy(t: float) -> float:
        sigma2 = t * upper
        x = squared / (cols * sigma2)
        value = energy / (cols * sigma2) + rows * math.log(sigma2)
        big = x[x > x_bar]
        if big.size:
            tau = _tau(big, alpha)
            value += float(np.sum(np.log(tau + 1.0) + alpha * np.log(tau / alpha + 1.0) - tau))
        return value

    t_low = min(lower / upper, 1.0)
    if t_low >= 1.0:
        return upper
    result = minimize_scalar(free_energy, bounds=(t_low, 1.0), method="bounded",
                             options={"xatol": 1e-5, "maxiter": 500})
    return float(result.x) * upper


def evbmf_rank(singular_values: np.ndarray, num_rows: int, num_cols: int) -> int:
    """Return the EVBMF rank: the number of singular values above √(M σ² x̄)."""
    sigma2 = evbmf_noise_variance(singular_values, num_rows, num_cols)
    s = np.asarray(singular_values, dtype=np.float64)
    if sigma2 <= 0.0:
        return 0
    alpha = num_rows / num_cols
    tau_bar = TAU_BAR_COEFFICIENT * math.sqrt(alpha)
    threshold = math.sqrt(num_cols * sigma2 * (1.0 + tau_bar) * (1.0 + alpha / tau_bar))
    return int(np.count_nonzero(s > threshold))
