"""Always-valid comparison of a canary with the stable version: p-values and confidence sequences that may be read
after every request without inflating false alarms (a mixture sequential probability ratio test).

Method: the normal-mixture SPRT (mSPRT) of Johari, Koomen, Pekelis & Walsh, "Always Valid Inference: Continuous
Monitoring of A/B Tests", Operations Research 70(3), 2022 (arXiv:1512.04922), after Robbins, "Statistical methods
related to the law of the iterated logarithm", Ann. Math. Statist. 41, 1970. For the difference d (canary - base)
with variance v, the likelihood ratio mixed over true differences ~ N(0, tau^2) is

    L = sqrt(v / (v + tau^2)) * exp(tau^2 d^2 / (2 v (v + tau^2)))

a martingale (in information time 1/v) when there is no difference, so by Ville's inequality
P(L ever reaches 1/alpha) <= alpha: p_t = min(1, min_{s<=t} 1/L_s) is a p-value valid at every look (for a
share, v is the variance under "no difference", from both arms' share), and

    d +- sqrt(v (v + tau^2) / tau^2 * (2 log(1/alpha) + log((v + tau^2) / v)))

holds for all t at once (a confidence sequence; its running intersection is one too). v comes from plug-in
variances, which makes both asymptotically valid (Waudby-Smith, Arbour, Sinha, Kennedy & Ramdas, "Time-uniform
central limit theory and asymptotic confidence sequences", Annals of Statistics 52(6), 2024). tau is `rho` pooled
standard deviations: the size of difference the test is most sensitive to. Every prefix of the time-ordered data
is a look, so the answer does not depend on when anyone asks.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

RHO = 0.1  # mixture scale in pooled standard deviations (the effect size the test is tuned to)
MIN_N = 20  # looks start once each arm has this many observations (the normal approximation needs a few)


@dataclass(frozen=True)
class Comparison:
    """A canary against the base on one signal, from every look so far."""

    n_base: int
    n_canary: int
    base: float  # mean of the base arm (a share for 0/1 signals)
    canary: float
    diff: float  # canary - base, now
    lo: float  # the confidence sequence for diff (running intersection); nan before the first look
    hi: float
    p_value: float  # always-valid p-value for "no difference" (1.0 before the first look)
    alpha: float

    @property
    def looked(self) -> bool:
        return not math.isnan(self.lo)

    def as_dict(self) -> dict:
        return asdict(self)


def mixture_ratio(d: np.ndarray, v: np.ndarray, tau2: np.ndarray) -> np.ndarray:
    """The mSPRT likelihood ratio L for differences `d` with variances `v` (elementwise); 1 where v is 0."""
    v = np.asarray(v, float)
    safe = np.where(v > 0, v, 1.0)
    log_l = 0.5 * np.log(safe / (safe + tau2)) + tau2 * np.square(d) / (2 * safe * (safe + tau2))
    return np.where(v > 0, np.exp(np.minimum(log_l, 700.0)), 1.0)


def half_width(v: np.ndarray, tau2: np.ndarray, alpha: float) -> np.ndarray:
    """Half the width of the mSPRT's confidence sequence at variance `v`; inf where v is 0."""
    v = np.asarray(v, float)
    safe = np.where(v > 0, v, 1.0)
    w = np.sqrt(safe * (safe + tau2) / tau2 * (2 * math.log(1 / alpha) + np.log((safe + tau2) / safe)))
    return np.where(v > 0, w, np.inf)


def _prefix_stats(x: np.ndarray, binary: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Counts, means and variances of every prefix of `x` (a 1-D array), shape (T,) each."""
    n = np.arange(1, len(x) + 1, dtype=float)
    shift = float(x.mean()) if len(x) else 0.0  # centred sums keep the variance accurate
    s1, s2 = np.cumsum(x - shift), np.cumsum(np.square(x - shift))
    mean = s1 / n + shift
    if binary:  # smoothed share: a 0/20 arm still has a variance
        p = (s1 + shift * n + 0.5) / (n + 1)
        var = p * (1 - p)
    else:
        var = np.maximum((s2 - np.square(s1) / n) / np.maximum(n - 1, 1), 1e-12)  # a constant arm: ~0, not 0
    return n, mean, var


def compare(values, canary, *, alpha: float = 0.05, rho: float = RHO, min_n: int = MIN_N,
            binary: bool = False) -> Comparison:
    """Compare the canary arm with the base arm at every prefix of time-ordered observations.

    values: one number per observation (0/1 for a share when binary), oldest first; canary: a bool per
    observation (True: the canary arm). Returns the comparison now, with the always-valid p-value and the
    running intersection of the confidence sequence over all looks."""
    x, c = np.asarray(values, float), np.asarray(canary, bool)
    if x.shape != c.shape:
        raise ValueError("values and canary must have one entry per observation")
    n0, n1 = int((~c).sum()), int(c.sum())
    m0 = float(x[~c].mean()) if n0 else math.nan
    m1 = float(x[c].mean()) if n1 else math.nan
    nan = Comparison(n0, n1, m0, m1, m1 - m0, math.nan, math.nan, 1.0, alpha)
    if n0 < min_n or n1 < min_n:
        return nan
    # the arms' prefix statistics, carried forward to every time step (T,)
    idx0, idx1 = np.cumsum(~c) - 1, np.cumsum(c) - 1
    stats0, stats1 = _prefix_stats(x[~c], binary), _prefix_stats(x[c], binary)
    look = (idx0 >= min_n - 1) & (idx1 >= min_n - 1)
    k0, k1 = idx0[look], idx1[look]
    (cnt0, mean0, var0), (cnt1, mean1, var1) = ((s[0][k], s[1][k], s[2][k]) for s, k in ((stats0, k0), (stats1, k1)))
    d = mean1 - mean0
    v = var0 / cnt0 + var1 / cnt1  # (T',) the interval's variance: each arm its own
    pooled = ((cnt0 - 1) * var0 + (cnt1 - 1) * var1) / np.maximum(cnt0 + cnt1 - 2, 1)
    tau2 = np.maximum(rho * rho * pooled, 1e-12)
    v_test, tau2_test = v, tau2
    if binary:  # the test of "no difference" uses the share of both arms, as the two-proportion z-test does:
        # with each arm's own, a rare event in the small arm alarmed in 7.5% of A/A runs at alpha 0.05
        p = (mean0 * cnt0 + mean1 * cnt1 + 0.5) / (cnt0 + cnt1 + 1)
        v_test, tau2_test = p * (1 - p) * (1 / cnt0 + 1 / cnt1), np.maximum(rho * rho * p * (1 - p), 1e-12)
    ratio = mixture_ratio(d, v_test, tau2_test)
    w = half_width(v, tau2, alpha)
    lo, hi = float(np.max(d - w)), float(np.min(d + w))
    return Comparison(n0, n1, m0, m1, m1 - m0, lo, hi, float(min(1.0, 1.0 / np.max(ratio))), alpha)


def verdict(cmp: Comparison, worse_if: str, margin: float) -> str:
    """What one comparison says about the canary: "worse" or "better" (the always-valid p-value fell to alpha),
    "within margin" (the confidence sequence allows no harm beyond `margin`), "undecided", or "no data".
    worse_if: "higher" or "lower" (which direction of the signal is harm)."""
    if not cmp.looked:
        return "no data"
    sign = 1.0 if worse_if == "higher" else -1.0
    if cmp.p_value <= cmp.alpha:
        return "worse" if sign * cmp.diff > 0 else "better"
    lo, hi = (cmp.lo, cmp.hi) if sign > 0 else (-cmp.hi, -cmp.lo)  # in units of harm
    return "within margin" if lo <= hi and hi < margin else "undecided"


# --- the request log's signals --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Signal:
    """One thing the request log says about a version, compared between versions."""

    name: str
    worse_if: str  # "higher" or "lower"
    margin: float  # harm below this (in the signal's units) is no reason to hold a promotion
    binary: bool  # a share (0/1 per request) rather than a mean
    doc: str


SIGNALS = (
    Signal("length", "higher", 0.03, True, "share of answers cut at max_tokens (finish_reason length)"),
    Signal("schema", "higher", 0.03, True, "share of structured answers closed early or re-sampled"),
    Signal("failed", "higher", 0.02, True, "share of requests that failed or were blocked"),
    Signal("flagged", "higher", 0.03, True, "share of answers an output check flagged"),
    Signal("feedback", "lower", 0.1, False, "mean feedback score"),
    Signal("latency", "higher", math.log(1.2), False, "mean log latency (a difference of 0.18 is 20% slower)"),
)


def _version(item) -> str | None:
    """The version a log row (or a feedback dict) was served by: its `version`, else the @vN of its adapter."""
    get = item.get if isinstance(item, dict) else lambda k: getattr(item, k, None)
    version = get("version")
    if version is None and "@" in str(get("adapter") or ""):
        version = str(get("adapter")).rpartition("@")[2]
    return version


def observations(signal: Signal, rows: list, feedback: list[dict]) -> list[tuple[float, str, float]]:
    """(time, version, value) of `signal` for each log row (LogRow) or feedback dict it applies to."""
    if signal.name == "feedback":
        return [(f.get("response_ts") or f.get("ts") or 0.0, _version(f), float(f["score"])) for f in feedback
                if f.get("score") is not None and _version(f)]
    out = []
    for r in rows:
        v = _version(r)
        if v is None:
            continue
        if signal.name == "length":
            out.append((r.ts, v, float(r.finish_reason == "length")))
        elif signal.name == "schema" and r.grammar:
            out.append((r.ts, v, float(r.outcome in ("length_closed", "resampled"))))
        elif signal.name == "failed":
            out.append((r.ts, v, float(r.outcome in ("error", "blocked"))))
        elif signal.name == "flagged":
            out.append((r.ts, v, float(bool(r.flags))))
        elif signal.name == "latency":
            out.append((r.ts, v, math.log(max(r.latency_s, 1e-4))))
    return out


def compare_versions(rows: list, feedback: list[dict], base: str, canary: str, *, alpha: float = 0.05,
                     signals: tuple[Signal, ...] = SIGNALS) -> list[dict]:
    """Each signal's comparison of `canary` with `base` (the versions' names), one dict per signal: the
    Comparison's fields, the signal's name, doc, worse_if, margin and verdict. Each signal is tested at
    alpha / len(signals) (Bonferroni), so a false alarm on any of them stays below alpha at every look."""
    out = []
    for s in signals:
        obs = sorted(o for o in observations(s, rows, feedback) if o[1] in (base, canary))
        cmp = compare([o[2] for o in obs], [o[1] == canary for o in obs], alpha=alpha / len(signals),
                      binary=s.binary)
        out.append({"signal": s.name, "doc": s.doc, "worse_if": s.worse_if, "margin": s.margin,
                    "verdict": verdict(cmp, s.worse_if, s.margin), **cmp.as_dict()})
    return out


def decide(results: dict[str, list[dict]]) -> tuple[str, str | None, list[str]]:
    """("rollback" | "promote" | "hold", the version it concerns, reasons) from each canary's compare_versions:
    roll back when any canary is worse on any signal; promote a single canary that is within the margin (or
    better) on every signal with data; otherwise hold."""
    reasons, worse = [], []
    for version, res in results.items():
        for r in res:
            if r["verdict"] == "worse":
                worse.append(version)
                reasons.append(f"{version} is worse on {r['signal']}: {r['canary']:.4g} vs {r['base']:.4g} "
                               f"(difference {r['diff']:+.4g}, always-valid CI [{r['lo']:+.4g}, {r['hi']:+.4g}], "
                               f"p = {r['p_value']:.3g})")
    if worse:
        return "rollback", worse[0], reasons
    if len(results) != 1:
        return "hold", None, ["compare one canary at a time: " + (", ".join(results) or "no canary has traffic")]
    version, res = next(iter(results.items()))
    pending = [r for r in res if r["verdict"] == "undecided"]
    seen = [r for r in res if r["verdict"] != "no data"]
    if seen and not pending:
        return "promote", version, [f"{version} is within the margin or better on {', '.join(r['signal'] for r in seen)}"]
    if not seen:
        return "hold", version, [f"not enough requests yet ({MIN_N} per version per signal start the test)"]
    return "hold", version, [f"{r['signal']}: the interval [{r['lo']:+.4g}, {r['hi']:+.4g}] still allows harm "
                             f"above the margin {r['margin']:.3g}" for r in pending]


def compare_rollout(alias: str, weights: dict[str, float], stable: str, rows: list, feedback: list[dict],
                    since: float, alpha: float = 0.05) -> dict:
    """A rollout's requests per version (log rows since `since`), each canary's comparison with the stable
    version on every signal, and the decision: promote, hold or rollback, with the version and the reasons."""
    counts: dict[str, int] = {}
    for r in rows:
        v = _version(r)
        if v is not None:
            counts[v] = counts.get(v, 0) + 1
    base = stable
    canaries = sorted({v for v in counts if v != base} | {v for v, w in weights.items() if w > 0 and v != base},
                      key=lambda v: int(v[1:]))
    results = {v: compare_versions(rows, feedback, base, v, alpha=alpha) for v in canaries if counts.get(v)}
    if not counts.get(base) and results:
        decision, version, reasons = "hold", None, [f"the stable version {base} served no request since then"]
    elif not results:
        decision, version, reasons = "hold", None, [f"only {base} served requests since then: nothing to compare"]
    else:
        decision, version, reasons = decide(results)
    return {"alias": alias, "weights": weights, "stable": base, "since": since, "alpha": alpha,
            "requests": dict(sorted(counts.items(), key=lambda kv: int(kv[0][1:]))), "comparisons": results,
            "decision": decision, "version": version, "reasons": reasons}

