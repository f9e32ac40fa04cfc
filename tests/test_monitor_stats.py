"""The drift monitor's statistics (tunelab.ops.drift): seeded, a planted shift is detected, no shift is not
flagged (and the tests hold their level), p-values agree with scipy's, Holm's correction."""

import numpy as np
import pytest

from tunelab.ops.drift import holm, mmd_test, rank_test, rate_test, wilson


def test_mmd_finds_a_planted_shift_and_is_seeded():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(200, 16))
    same = rng.normal(size=(100, 16))
    moved = rng.normal(size=(100, 16))
    moved[:, :2] += 0.6  # a shift in two of 16 dimensions
    assert mmd_test(moved, ref, n_perm=200, seed=0).p_value <= 1 / 201 + 1e-9
    assert mmd_test(same, ref, n_perm=200, seed=0).p_value > 0.05
    assert mmd_test(same, ref, n_perm=200, seed=3) == mmd_test(same, ref, n_perm=200, seed=3)


def test_mmd_holds_its_level_without_a_shift():
    """40 windows from the reference's own distribution: about 5% of p-values at or below 0.05, never many."""
    rng = np.random.default_rng(1)
    ref = rng.normal(size=(150, 8))
    ps = [mmd_test(rng.normal(size=(60, 8)), ref, n_perm=100, seed=s).p_value for s in range(40)]
    assert sum(p <= 0.05 for p in ps) <= 5
    assert np.mean(ps) > 0.35  # uniform under the null: mean 0.5


def test_rank_test_matches_scipy_and_sees_the_direction():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(2)
    x = rng.integers(0, 30, 80).astype(float)  # ties
    y = rng.integers(3, 33, 120).astype(float)
    for alt in ("two-sided", "less", "greater"):
        ours = rank_test(x, y, alt).p_value
        theirs = stats.mannwhitneyu(x, y, alternative=alt, method="asymptotic", use_continuity=True).pvalue
        assert ours == pytest.approx(theirs, rel=1e-6)
    t = rank_test(y + 10, y, "greater")
    assert t.p_value < 1e-6 and t.effect == pytest.approx(10.0)
    assert t.ci[0] <= 10.0 <= t.ci[1]
    assert rank_test(y, y + 10, "greater").p_value > 0.99  # the other direction is not an alert


def test_rate_test_matches_fishers_exact_test():
    stats = pytest.importorskip("scipy.stats")
    for k, n, k0, n0 in [(9, 50, 2, 200), (0, 30, 0, 40), (3, 40, 5, 60), (20, 100, 1, 150)]:
        for alt in ("greater", "less", "two-sided"):
            ours = rate_test(k, n, k0, n0, alt).p_value
            theirs = stats.fisher_exact([[k, n - k], [k0, n0 - k0]], alternative=alt).pvalue
            assert ours == pytest.approx(theirs, rel=1e-6, abs=1e-12)
    t = rate_test(9, 50, 2, 200)
    assert t.effect == pytest.approx(0.18) and t.ci == wilson(9, 50)


def test_wilson_interval():
    lo, hi = wilson(0, 20)
    assert lo == 0.0 and hi == pytest.approx(0.1611, abs=1e-4)
    lo, hi = wilson(10, 20)
    assert lo == pytest.approx(0.2993, abs=1e-4) and hi == pytest.approx(0.7007, abs=1e-4)


def test_holm_adjusts_in_step_down_order():
    # sorted p: 0.01 (x4 = 0.04), 0.02 (x3 = 0.06), 0.03 (x2 = 0.06 after the running max), 0.5 (x1)
    assert holm([0.03, 0.5, 0.01, 0.02]) == pytest.approx([0.06, 0.5, 0.04, 0.06])
    # the running maximum: 2 x 0.011 = 0.022 would rank below 3 x 0.01 = 0.03, so it is raised to 0.03
    assert holm([0.011, 0.5, 0.01]) == pytest.approx([0.03, 0.5, 0.03])
    assert holm([]) == []
    assert holm([0.2]) == [0.2]
