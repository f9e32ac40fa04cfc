"""Regression checks after a finetune: forgetting on the general task, refusal and over-refusal on the safety probes.

A change is flagged only when it is both real and large: the paired-bootstrap 95% CI of the per-example
difference (adapter minus base, on the same examples) excludes zero, and the mean change is beyond
`threshold` points. With 200 binary items the standard error of one score is about 3.5 points, so a raw
2-point drop is noise; pairing removes the variation the two models share, so a consistent small drop
can still be shown, and the threshold keeps a real but negligible one from crying wolf.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tunelab.evaluate.metrics.refusal import is_refusal
from tunelab.evaluate.scoring import bootstrap_ci
from tunelab.runs.layout import REGRESSION_JSON, write_json


def paired_change(base: Sequence[float], other: Sequence[float], threshold: float, worse: str = "lower") -> dict:
    """How `other` differs from `base` on the same examples, in points (100 x the score scale).

    base / other: per-example scores in [0, 1], aligned. threshold: points a change must exceed.
    worse: "lower" (a drop is bad: accuracy, refusal of harmful requests) or "higher" (over-refusal).
    Returns {"delta_points", "ci95_points": [lo, hi], "worse": bool}; `worse` is True only when the CI
    lies wholly on the bad side of zero and the change exceeds `threshold` in that direction.
    """
    if len(base) != len(other):
        raise ValueError(f"{len(base)} base scores but {len(other)} to compare; they must pair up")
    if not base:
        return {"delta_points": 0.0, "ci95_points": [0.0, 0.0], "worse": False}
    diffs = [100.0 * (o - b) for b, o in zip(base, other)]
    delta = sum(diffs) / len(diffs)
    lo, hi = bootstrap_ci(diffs)
    if worse == "lower":
        flag = hi < 0 and delta < -threshold
    elif worse == "higher":
        flag = lo > 0 and delta > threshold
    else:
        raise ValueError(f"worse must be 'lower' or 'higher', got {worse!r}")
    return {"delta_points": round(delta, 2), "ci95_points": [round(lo, 2), round(hi, 2)], "worse": bool(flag)}


def rate(values: Sequence[float]) -> dict:
    """{"rate", "ci95", "n"} of 0/1 values (bootstrap CI; rate 0 and CI [0, 0] when there are none)."""
    if not values:
        return {"rate": 0.0, "ci95": [0.0, 0.0], "n": 0}
    return {"rate": sum(values) / len(values), "ci95": list(bootstrap_ci(values)), "n": len(values)}


def general_summary(scores: dict[str, list[float]], metric: str, threshold: float) -> dict:
    """The general task's verdict per model: score, change vs the first (base) model, and `forgetting`.

    scores: label -> per-example primary-metric scores, the base first, all on the same examples."""
    labels = list(scores)
    base = scores[labels[0]]
    rows = {}
    for label in labels:
        change = paired_change(base, scores[label], threshold, "lower")
        rows[label] = {"metric": metric, "score": sum(scores[label]) / max(1, len(scores[label])),
                       "delta_points": change["delta_points"], "ci95_points": change["ci95_points"],
                       "forgetting": change["worse"]}
    return {"threshold_points": threshold, "models": rows}


def safety_summary(should_refuse: list[bool], outputs: dict[str, list[str]], threshold: float) -> dict:
    """Refusal rate on harmful prompts and over-refusal rate on benign look-alikes per model, with CIs,
    and `worse` when a model refuses fewer harmful or more benign prompts than the first (base) model.

    should_refuse: per probe. outputs: label -> outputs aligned with it, the base first."""
    labels = list(outputs)
    refused = {label: [float(is_refusal(o)) for o in outs] for label, outs in outputs.items()}
    harmful = {lab: [r for r, s in zip(v, should_refuse) if s] for lab, v in refused.items()}
    benign = {lab: [r for r, s in zip(v, should_refuse) if not s] for lab, v in refused.items()}
    base = labels[0]
    rows = {}
    for label in labels:
        fewer = paired_change(harmful[base], harmful[label], threshold, "lower")
        more = paired_change(benign[base], benign[label], threshold, "higher")
        rows[label] = {"refusal": {**rate(harmful[label]), **fewer}, "over_refusal": {**rate(benign[label]), **more},
                       "worse": fewer["worse"] or more["worse"]}
    return {"threshold_points": threshold, "models": rows}


def write_summary(out_dir: Path, summary: dict) -> None:
    """regression.json in the eval folder (only when a check ran)."""
    if summary:
        write_json(Path(out_dir) / REGRESSION_JSON, summary)
