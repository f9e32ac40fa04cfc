"""Two-sample statistics for the drift monitor: MMD with a permutation p-value, rank and proportion tests, Holm.

Every test returns a `Test` (statistic, p-value, effect with a 95% CI) and is seeded, so a window gives the same
verdict on every run. The monitor (tunelab.ops.monitor) makes one `Signal` per quantity and controls the
family-wise error rate across the signals with Holm's step-down procedure (`holm`, `decide`): at level alpha the
chance that any signal of an unshifted window alerts is at most alpha, whatever the dependence between them.

A distribution signal (embeddings, lengths) has several references: each data set the adapter was trained or
evaluated on (train, validation, each eval). The window is tested against each and the signal's p-value is the
largest (an intersection-union test): it alerts only when the window differs from every one of them, and under
"the window is distributed like one of them" that p-value is still valid. (The bundled tasks' splits use
disjoint phrasings by design, so traffic like the test split differs from train, yet is what the adapter was
evaluated on.) Traffic that mixes several of them in new proportions can alert: that is a change too.

- `mmd_test`: maximum mean discrepancy (biased V-statistic) with a Gaussian kernel whose bandwidth is the median
  pairwise distance of the pooled sample; p-value from label permutations, (1 + #{perm >= observed}) / (1 + B),
  which is exact (never below the level) for any B. Used for sentence embeddings (N, D).
- `rank_test`: Mann-Whitney U with the normal approximation (tie-corrected), two- or one-sided; the effect is
  the difference of medians with a bootstrap CI. Used for prompt lengths, latency and feedback scores.
- `rate_test`: Fisher's exact test on two proportions (hypergeometric tail), one- or two-sided; the effect is the
  window's rate with its Wilson CI. Used for the shares of length_closed, schema failures and refusals.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

ALTERNATIVES = ("two-sided", "greater", "less")  # "greater": the window's values are larger than the reference's


@dataclass(frozen=True)
class Test:
    """One two-sample test: the window against the reference."""

    method: str
    statistic: float
    p_value: float
    effect: float | None = None  # what a person reads: a rate, a difference of medians, the MMD itself
    ci: tuple[float, float] | None = None  # 95% CI of `effect`
    effect_name: str = ""


def _check_alternative(alternative: str) -> None:
    if alternative not in ALTERNATIVES:
        raise ValueError(f"alternative must be one of {ALTERNATIVES}, got {alternative!r}")


# --- MMD ------------------------------------------------------------------------------------------------------
def _sq_dists(z: np.ndarray) -> np.ndarray:
    sq = (z * z).sum(1)
    return np.maximum(sq[:, None] + sq[None, :] - 2.0 * z @ z.T, 0.0)  # (N, N)


def mmd_test(x: np.ndarray, y: np.ndarray, n_perm: int = 1000, seed: int = 0) -> Test:
    """MMD^2 between samples x (n, D) and y (m, D), Gaussian kernel (median heuristic), permutation p-value."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"mmd_test wants two (N, D) arrays with the same D, got {x.shape} and {y.shape}")
    n, m = len(x), len(y)
    d2 = _sq_dists(np.concatenate([x, y]))  # (n + m, n + m)
    off = d2[np.triu_indices(n + m, 1)]
    bw = float(np.median(off[off > 0])) if (off > 0).any() else 1.0
    k = np.exp(-d2 / bw).astype(np.float32)
    rng = np.random.default_rng(seed)
    labels = np.zeros((n_perm + 1, n + m), dtype=bool)  # row 0: the observed split; then permutations
    labels[0, :n] = True
    for i in range(1, n_perm + 1):
        labels[i, rng.permutation(n + m)[:n]] = True
    w = np.where(labels, np.float32(1.0 / n), np.float32(-1.0 / m))  # (P, N): MMD^2 = w K w^T
    stats = np.einsum("pi,pi->p", w @ k, w, dtype=np.float64)
    obs = float(stats[0])
    p = (1 + int((stats[1:] >= obs - 1e-9).sum())) / (1 + n_perm)
    return Test("MMD permutation", obs, p, effect=obs, effect_name="MMD^2")


# --- ranks ----------------------------------------------------------------------------------------------------
def _ranks(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Average ranks (1-based) of `v` and the sizes of its tie groups."""
    _, inv, counts = np.unique(v, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    avg = ends - (counts - 1) / 2.0
    return avg[inv], counts


def _normal_sf(z: float) -> float:
    return 0.5 * math.erfc(z / math.sqrt(2.0))


def _bootstrap_median_diff(x: np.ndarray, y: np.ndarray, seed: int, n_boot: int = 1000) -> tuple[float, float]:
    rng = np.random.default_rng(seed + 1)
    bx = np.median(x[rng.integers(0, len(x), (n_boot, len(x)))], axis=1)
    by = np.median(y[rng.integers(0, len(y), (n_boot, len(y)))], axis=1)
    lo, hi = np.quantile(bx - by, [0.025, 0.975])
    return float(lo), float(hi)


def rank_test(x, y, alternative: str = "two-sided", seed: int = 0) -> Test:
    """Mann-Whitney U of window x against reference y (normal approximation, tie-corrected, continuity
    corrected). Effect: median(x) - median(y) with a bootstrap 95% CI."""
    _check_alternative(alternative)
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    n, m = len(x), len(y)
    if n == 0 or m == 0:
        raise ValueError("rank_test needs a non-empty window and reference")
    r, ties = _ranks(np.concatenate([x, y]))
    u = float(r[:n].sum() - n * (n + 1) / 2.0)  # U of x: how often an x beats a y (ties count one half)
    mu = n * m / 2.0
    tie_term = float((ties ** 3 - ties).sum()) / ((n + m) * (n + m - 1)) if n + m > 1 else 0.0
    sigma = math.sqrt(n * m / 12.0 * ((n + m + 1) - tie_term))
    if sigma == 0:
        p = 1.0
    elif alternative == "greater":
        p = _normal_sf((u - mu - 0.5) / sigma)
    elif alternative == "less":
        p = _normal_sf((mu - u - 0.5) / sigma)
    else:
        p = min(1.0, 2 * _normal_sf((abs(u - mu) - 0.5) / sigma))
    diff = float(np.median(x) - np.median(y))
    return Test(f"Mann-Whitney ({alternative})", u / (n * m), p, effect=diff,
                ci=_bootstrap_median_diff(x, y, seed), effect_name="median difference")


# --- proportions ----------------------------------------------------------------------------------------------
def wilson(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson 95% interval of k successes in n."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (max(0.0, mid - half), min(1.0, mid + half))


def _log_comb(n: int, k: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


def _hypergeom_pmf(n_total: int, successes: int, draws: int) -> dict[int, float]:
    lo, hi = max(0, draws - (n_total - successes)), min(draws, successes)
    base = _log_comb(n_total, draws)
    return {k: math.exp(_log_comb(successes, k) + _log_comb(n_total - successes, draws - k) - base)
            for k in range(lo, hi + 1)}


def rate_test(k: int, n: int, k_ref: int, n_ref: int, alternative: str = "greater") -> Test:
    """Fisher's exact test: is the window's rate k/n different from (greater / less than) the reference's
    k_ref/n_ref? Effect: the window's rate with its Wilson 95% CI."""
    _check_alternative(alternative)
    if n == 0 or n_ref == 0:
        raise ValueError("rate_test needs a non-empty window and reference")
    pmf = _hypergeom_pmf(n + n_ref, k + k_ref, n)  # the window's successes given the margins
    if alternative == "greater":
        p = sum(v for j, v in pmf.items() if j >= k)
    elif alternative == "less":
        p = sum(v for j, v in pmf.items() if j <= k)
    else:
        p = sum(v for v in pmf.values() if v <= pmf[k] * (1 + 1e-7))
    return Test(f"Fisher exact ({alternative})", k / n - k_ref / n_ref, min(1.0, p), effect=k / n,
                ci=wilson(k, n), effect_name="rate")


def median_ci(values, seed: int = 0, n_boot: int = 1000) -> tuple[float, tuple[float, float]]:
    """The median of `values` and its bootstrap 95% CI."""
    v = np.asarray(values, dtype=np.float64)
    boots = np.median(v[np.random.default_rng(seed).integers(0, len(v), (n_boot, len(v)))], axis=1)
    lo, hi = np.quantile(boots, [0.025, 0.975])
    return float(np.median(v)), (float(lo), float(hi))


def mean_ci(values, seed: int = 0, n_boot: int = 1000) -> tuple[float, tuple[float, float]]:
    """The mean of `values` and its bootstrap 95% CI (a signal with no reference to test against)."""
    v = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    boots = v[rng.integers(0, len(v), (n_boot, len(v)))].mean(axis=1)
    lo, hi = np.quantile(boots, [0.025, 0.975])
    return float(v.mean()), (float(lo), float(hi))


# --- multiple testing -----------------------------------------------------------------------------------------
def holm(p_values: list[float]) -> list[float]:
    """Holm-adjusted p-values (same order as given): signal i alerts at family-wise level alpha when its
    adjusted p-value is <= alpha. Controls the family-wise error rate under any dependence."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


# --- signals: what the monitor reports --------------------------------------------------------------------------
MIN_WINDOW = 20  # fewer observations than this: the signal is skipped, not tested


@dataclass
class Signal:
    name: str
    verdict: str  # alert | ok | info (no reference: the value and its CI only) | skipped
    n: int = 0  # observations in the window
    n_reference: int = 0
    value: float | None = None  # the window's rate / median / mean (no reference) / MMD^2
    reference: float | None = None  # the reference's rate or median
    ci: tuple[float, float] | None = None
    p_value: float | None = None
    p_adjusted: float | None = None  # Holm
    method: str = ""
    note: str = ""


def skipped(name: str, why: str, n: int = 0) -> Signal:
    return Signal(name, "skipped", n, note=why)


def _closest(name: str, n: int, tests: dict[str, tuple[Test, int, float | None]], note: str = "") -> Signal:
    """The signal of the reference the window is closest to (largest p-value: intersection-union)."""
    label, (t, n_ref, ref_value) = max(tests.items(), key=lambda kv: kv[1][0].p_value)
    where = f"closest to {label} (of {', '.join(tests)})" if len(tests) > 1 else ""
    return Signal(name, "ok", n, n_ref, t.effect, ref_value, t.ci, t.p_value, method=t.method,
                  note="; ".join(x for x in (note, where) if x))


def rate_signal(name: str, hits: list[bool], ref_hits: list[bool], what: str) -> Signal:
    """Is the share of hits in the window larger than in the reference (Fisher, one-sided)?"""
    if len(hits) < MIN_WINDOW:
        return skipped(name, f"{len(hits)} {what} in the window (fewer than {MIN_WINDOW})", len(hits))
    k = sum(hits)
    if not ref_hits:
        return Signal(name, "info", len(hits), 0, k / len(hits), None, wilson(k, len(hits)),
                      note="no reference rate (no eval of this adapter recorded)")
    t = rate_test(k, len(hits), sum(ref_hits), len(ref_hits), "greater")
    return _closest(name, len(hits), {"reference": (t, len(ref_hits), sum(ref_hits) / len(ref_hits))})


def rank_signal(name: str, window: list[float], refs: dict[str, list[float]], alternative: str, seed: int,
                no_ref: str) -> Signal:
    """Mann-Whitney of the window against each reference with enough values; the largest p-value."""
    if len(window) < MIN_WINDOW:
        return skipped(name, f"{len(window)} values in the window (fewer than {MIN_WINDOW})", len(window))
    refs = {k: v for k, v in refs.items() if len(v) >= MIN_WINDOW}
    if not refs:
        mean, ci = mean_ci(window, seed)
        return Signal(name, "info", len(window), 0, mean, None, ci, note=no_ref)
    sig = _closest(name, len(window), {k: (rank_test(window, v, alternative, seed), len(v), float(np.median(v)))
                                       for k, v in refs.items()})
    sig.value, sig.ci = median_ci(window, seed)  # the window's median beside the reference's
    return sig


def mmd_signal(name: str, window: np.ndarray, refs: dict[str, np.ndarray], seed: int, n_perm: int,
               note: str = "") -> Signal:
    """MMD permutation test of window vectors (n, D) against each reference's; the largest p-value."""
    return _closest(name, len(window), {k: (mmd_test(window, v, n_perm, seed), len(v), None)
                                        for k, v in refs.items()}, note)


def decide(signals: list[Signal], alpha: float) -> list[Signal]:
    """Holm-adjust the p-values of the tested signals; alert where the adjusted p-value is <= alpha."""
    tested = [s for s in signals if s.p_value is not None]
    for s, adj in zip(tested, holm([s.p_value for s in tested])):
        s.p_adjusted = adj
        s.verdict = "alert" if adj <= alpha else "ok"
    return signals
