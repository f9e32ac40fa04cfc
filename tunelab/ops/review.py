"""The review queue: logged answers (with content) picked for a person to accept, correct or reject against a rubric.

Items are sampled from an adapter's request log rows by reason, in this order: flagged by an output check,
rated low by a user, inside the window where the drift monitor last alerted, cut at max tokens
(`length_closed`), and a seeded random share of the rest. A review is stored as feedback on the response
(name "review", label accept / correct / reject, score 1 / 0.5 / 0, the correction), the same record the
web UI's Review page writes; the explanation holds the rubric verdicts, the comment and the reviewer as JSON
(the UI's is a plain comment, read as such).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from tunelab.errors import TunelabError
from tunelab.ops.requestlog import LogRow, RequestLog

REVIEW_NAME = "review"  # gen_ai.evaluation.name of a review
VERDICTS = {"accept": 1.0, "correct": 0.5, "reject": 0.0}  # label -> score (as the web UI stores them)
REASONS = ("flagged", "low_feedback", "drift", "length_closed", "random")
DEFAULT_RUBRIC = ("answers what was asked", "facts right", "required format", "safe and polite")
LOW_LABELS = ("bad", "wrong", "thumbs_down", "down")


@dataclass
class ReviewItem:
    """One logged response to review and why it was picked."""

    row: LogRow
    reasons: list[str]

    def to_dict(self) -> dict:
        return {"response_id": self.row.response_id, "adapter": self.row.adapter, "model": self.row.model,
                "outcome": self.row.outcome, "flags": self.row.flags, "reasons": self.reasons,
                "prompt": self.row.prompt, "answer": self.row.answer}


@dataclass
class Review:
    """A reviewer's verdict on one answer: accept, correct (with the right answer) or reject; the rubric's
    requirements each pass (True) or fail (False); a free comment."""

    verdict: str
    correction: str | None = None
    rubric: dict[str, bool] = field(default_factory=dict)
    comment: str | None = None
    reviewer: str | None = None

    def check(self) -> None:
        if self.verdict not in VERDICTS:
            raise TunelabError(f"review verdict {self.verdict!r}: one of {', '.join(VERDICTS)}.")
        if self.verdict == "correct" and not (self.correction or "").strip():
            raise TunelabError("a 'correct' review needs the correction: the right answer, written out.")
        if self.verdict != "correct" and self.correction:
            raise TunelabError(f"a correction goes with the verdict 'correct', not {self.verdict!r}.")

    def explanation(self) -> str:
        return json.dumps({"rubric": self.rubric, "comment": self.comment, "reviewer": self.reviewer},
                          ensure_ascii=False, sort_keys=True)


def served_by(row: LogRow, adapter: str) -> bool:
    """Whether `row` was served by `adapter`: its exact name (orders@v1), or any version of the alias (orders)."""
    served = row.adapter or ""
    return served == adapter or row.model == adapter or served.split("@")[0] == adapter


def parse_explanation(text: str | None) -> dict:
    """A review's explanation as {rubric, comment, reviewer}; the web UI's plain comment becomes the comment."""
    if not text:
        return {"rubric": {}, "comment": None, "reviewer": None}
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if isinstance(value, dict) and "rubric" in value:
        return {"rubric": value.get("rubric") or {}, "comment": value.get("comment"),
                "reviewer": value.get("reviewer")}
    return {"rubric": {}, "comment": text, "reviewer": None}


def _drift_window(adapter: str, monitor_root: Path | None) -> tuple[float, float] | None:
    """[since, until] of the adapter's latest monitor report when it alerted, else None."""
    from tunelab.ops.monitor import MONITOR_JSON, monitor_dir

    folder = monitor_root / adapter if monitor_root is not None else monitor_dir(adapter)
    path = folder / MONITOR_JSON
    try:
        report = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (OSError, ValueError):
        return None
    if not isinstance(report, dict) or not report.get("alert"):
        return None
    return float(report["since"]), float(report["until"])


def _low(fb: dict) -> bool:
    return fb["name"] != REVIEW_NAME and ((fb["score"] is not None and fb["score"] < 0.5)
                                          or (fb["label"] or "").lower() in LOW_LABELS)


def build_queue(log: RequestLog, adapter: str, *, tenant: str | None = None, since: float | None = None,
                size: int = 20, random_share: float = 0.2, seed: int = 0, monitor_root: Path | None = None,
                include_reviewed: bool = False) -> list[ReviewItem]:
    """Pick up to `size` of `adapter`'s logged answers (content rows only) for review, not yet reviewed.

    Targeted reasons fill up to (1 - random_share) of the queue, flagged first, then low feedback, drift
    (rows inside the window of the latest alerting `tunelab monitor` report), length_closed; the rest is a
    uniform sample (seeded) of the remaining rows. Each item names every reason that applies."""
    if not 0 <= random_share <= 1:
        raise TunelabError(f"random_share {random_share}: a share between 0 and 1.")
    rows = [r for r in log.rows(tenant=tenant, since=since) if r.answer is not None and served_by(r, adapter)]
    feedback = [f for f in log.feedback(tenant=tenant) if f["response_id"] in {r.response_id for r in rows}]
    reviewed = {f["response_id"] for f in feedback if f["name"] == REVIEW_NAME}
    low = {f["response_id"] for f in feedback if _low(f)}
    drift = _drift_window(adapter, monitor_root)
    todo = [r for r in reversed(rows) if include_reviewed or r.response_id not in reviewed]  # newest first

    def reasons(r: LogRow) -> list[str]:
        found = {"flagged": bool(r.flags), "low_feedback": r.response_id in low,
                 "drift": drift is not None and drift[0] <= r.ts <= drift[1],
                 "length_closed": r.outcome == "length_closed"}
        return [k for k in REASONS if found.get(k)]

    targeted = sorted((ReviewItem(r, reasons(r)) for r in todo if reasons(r)),
                      key=lambda it: REASONS.index(it.reasons[0]))
    n_random = round(size * random_share)
    picked = targeted[: size - n_random]
    chosen = {it.row.response_id for it in picked}
    rest = [r for r in todo if r.response_id not in chosen and not reasons(r)]
    rest += [it.row for it in targeted[size - n_random:]]  # targeted ones left over may still be drawn
    rng = random.Random(seed)
    extra = rng.sample(rest, min(len(rest), size - len(picked)))
    picked += [ReviewItem(r, reasons(r) + ["random"]) for r in extra]
    return picked


def save_review(log: RequestLog, response_id: str, review: Review, tenant: str | None = None) -> None:
    """Store `review` as feedback on `response_id` (a TunelabError when the response is not `tenant`'s)."""
    review.check()
    ok = log.add_feedback(response_id, tenant, score=VERDICTS[review.verdict], label=review.verdict,
                          comment=review.explanation(), correction=review.correction, name=REVIEW_NAME)
    if not ok:
        raise TunelabError(f"no logged response {response_id!r}" + (f" of tenant {tenant!r}" if tenant else "")
                           + "; give a response id from the review queue.")


@dataclass
class Reviewed:
    """A logged response with its latest review."""

    row: LogRow
    verdict: str
    correction: str | None
    rubric: dict[str, bool]
    comment: str | None
    reviewer: str
    ts: float

    @property
    def answer(self) -> str | None:
        """What the right answer is: the correction when corrected, the logged answer when accepted."""
        return self.correction if self.verdict == "correct" else self.row.answer if self.verdict == "accept" else None


def reviews(log: RequestLog, adapter: str, *, tenant: str | None = None, since: float | None = None) -> list[Reviewed]:
    """The latest review of each of `adapter`'s responses (reviewed since `since`), oldest response first."""
    latest: dict[str, dict] = {}
    for fb in log.feedback(tenant=tenant, since=since):
        if fb["name"] == REVIEW_NAME and fb["label"] in VERDICTS:
            latest[fb["response_id"]] = fb  # feedback comes oldest first: the last one wins
    out = []
    for rid, fb in latest.items():
        row = log.get(rid)
        if row is None or not served_by(row, adapter):
            continue
        e = parse_explanation(fb["explanation"])
        out.append(Reviewed(row, fb["label"], fb["correction"], e["rubric"], e["comment"],
                            e["reviewer"] or f"ui:{fb['tenant']}", fb["ts"]))
    return sorted(out, key=lambda r: (r.row.ts, r.row.response_id))


def summary(items: list[Reviewed]) -> dict:
    """Counts per verdict and the pass rate of each rubric requirement."""
    verdicts = {v: sum(r.verdict == v for r in items) for v in VERDICTS}
    req: dict[str, list[bool]] = {}
    for r in items:
        for name, ok in r.rubric.items():
            req.setdefault(name, []).append(bool(ok))
    return {"reviewed": len(items), "verdicts": verdicts,
            "rubric": {k: {"pass": sum(v), "n": len(v)} for k, v in sorted(req.items())}}
