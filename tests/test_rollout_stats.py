"""The canary comparison's statistics (tunelab.ops.sequential): on simulated A/A data (seeded) the always-valid
test's false-alarm rate stays below alpha though it looks after every request, where a fixed-sample z-test
looked at as often does not; a planted difference is found; the decision reads promote, hold or rollback."""

from statistics import NormalDist

import numpy as np
import pytest

from tunelab.ops.requestlog import LogRow
from tunelab.ops.sequential import MIN_N, compare, compare_rollout, compare_versions, decide, verdict

ALPHA = 0.05
SIMS = 200


def _arms(rng, n: int, share: float = 0.1) -> np.ndarray:
    return rng.random(n) < share  # True: the canary (a 90/10 split)


def _peeking_z_alarm(x: np.ndarray, canary: np.ndarray) -> bool:
    """A fixed-sample two-sided z-test at every look from MIN_N per arm on: the practice the test replaces."""
    z_crit = NormalDist().inv_cdf(1 - ALPHA / 2)
    n1 = np.cumsum(canary)
    n0 = np.arange(1, len(x) + 1) - n1
    s1, s0 = np.cumsum(np.where(canary, x, 0.0)), np.cumsum(np.where(canary, 0.0, x))
    q1, q0 = np.cumsum(np.where(canary, x * x, 0.0)), np.cumsum(np.where(canary, 0.0, x * x))
    ok = (n0 >= MIN_N) & (n1 >= MIN_N)
    n0, n1, s0, s1, q0, q1 = (a[ok].astype(float) for a in (n0, n1, s0, s1, q0, q1))
    m0, m1 = s0 / n0, s1 / n1
    v = (q0 / n0 - m0 ** 2) / n0 + (q1 / n1 - m1 ** 2) / n1
    return bool(np.any(np.abs(m1 - m0) > z_crit * np.sqrt(np.maximum(v, 1e-12))))


@pytest.mark.parametrize("kind", ["share", "latency"])
def test_false_alarms_stay_below_alpha_under_a_look_after_every_request(kind):
    """A/A: both arms from one distribution, 2,000 requests, a look after each. The always-valid test alarms in
    at most alpha of the seeded runs; the z-test peeked at as often alarms far more (so this test can fail)."""
    always, naive = 0, 0
    for seed in range(SIMS):
        rng = np.random.default_rng(seed)
        canary = _arms(rng, 2000)
        x = (rng.random(2000) < 0.1).astype(float) if kind == "share" else rng.lognormal(-1.0, 0.6, 2000)
        cmp = compare(x if kind == "share" else np.log(x), canary, alpha=ALPHA, binary=kind == "share")
        always += cmp.p_value <= ALPHA
        naive += _peeking_z_alarm(x if kind == "share" else np.log(x), canary)
    assert always / SIMS <= ALPHA, (always, naive)
    assert naive / SIMS > 2 * ALPHA, (always, naive)  # looking often inflates a fixed-sample test


def test_a_planted_difference_is_found():
    """length share 10% on the stable version, 20% on a 10% canary: found within 3,000 requests in >= 95% of
    seeded runs, and the confidence sequence holds the true difference."""
    found, covered = 0, 0
    for seed in range(100):
        rng = np.random.default_rng(1000 + seed)
        canary = _arms(rng, 3000)
        x = (rng.random(3000) < np.where(canary, 0.2, 0.1)).astype(float)
        cmp = compare(x, canary, alpha=ALPHA, binary=True)
        found += verdict(cmp, "higher", 0.03) == "worse"  # the p-value fell to alpha, the canary higher
        covered += cmp.lo <= 0.1 <= cmp.hi
    assert found >= 95 and covered >= 95, (found, covered)


def test_the_p_value_only_falls_as_requests_arrive():
    """Always valid: reading the test after 100, 200, ... requests never raises the p-value or widens the
    interval, so when someone looks changes nothing."""
    rng = np.random.default_rng(7)
    canary = _arms(rng, 1500, 0.3)
    x = (rng.random(1500) < np.where(canary, 0.16, 0.1)).astype(float)
    seen = [compare(x[:t], canary[:t], binary=True) for t in range(100, 1501, 100)]
    ps, widths = [c.p_value for c in seen], [c.hi - c.lo for c in seen]
    assert all(b <= a + 1e-9 for a, b in zip(ps, ps[1:])) and all(b <= a + 1e-9 for a, b in zip(widths, widths[1:]))
    assert ps[0] == 1.0 and ps[-1] < 0.1  # (float rounding aside)


def _rows(rng, n: int, share: float, length: dict, latency: dict, t0: float = 1e9) -> list[LogRow]:
    out = []
    for i in range(n):
        v = "v2" if rng.random() < share else "v1"
        out.append(LogRow(f"chatcmpl-{i}", t0 + i, "shop", "orders", f"orders@{v}", v,
                          finish_reason="length" if rng.random() < length[v] else "stop",
                          latency_s=float(rng.lognormal(latency[v], 0.3))))
    return out


def test_decisions_rollback_hold_promote():
    rng = np.random.default_rng(0)
    same = {"v1": 0.05, "v2": 0.05}
    worse = _rows(rng, 2000, 0.1, {"v1": 0.05, "v2": 0.30}, {"v1": -1.0, "v2": -1.0})
    res = compare_versions(worse, [], "v1", "v2")
    by = {r["signal"]: r for r in res}
    assert by["length"]["verdict"] == "worse" and by["schema"]["verdict"] == "no data"
    decision, version, reasons = decide({"v2": res})
    assert (decision, version) == ("rollback", "v2") and "worse on length" in reasons[0]

    few = _rows(rng, 60, 0.5, same, {"v1": -1.0, "v2": -1.0})
    assert decide({"v2": compare_versions(few, [], "v1", "v2")})[0] == "hold"

    many = _rows(rng, 6000, 0.5, same, {"v1": -1.0, "v2": -1.0})
    fb = [{"response_ts": r.ts, "version": r.version, "score": 1.0} for r in many[:600]]
    s = compare_rollout("orders", {"v1": 50.0, "v2": 50.0}, "v1", many, fb, 0.0)
    assert s["decision"] == "promote" and s["version"] == "v2", s["reasons"]
    assert s["requests"]["v1"] + s["requests"]["v2"] == 6000

    slower = _rows(rng, 4000, 0.5, same, {"v1": -1.0, "v2": -0.6})  # v2 50% slower
    s = compare_rollout("orders", {"v1": 50.0, "v2": 50.0}, "v1", slower, [], 0.0)
    assert s["decision"] == "rollback" and "latency" in s["reasons"][0]
