"""What the ladder measured and concluded: one rung's result, paired comparisons between rungs (same examples,
so differences are paired), the recommendation, and a whole run."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from tunelab.evaluate.scoring import bootstrap_ci


@dataclass
class RungResult:
    """One rung on the held-out examples. `scores`: the primary metric per example, in example order."""

    name: str
    label: str
    cost: int
    metrics: dict[str, dict]  # metric -> {"score", "ci95", "n"}
    scores: list[float]
    failures: dict[str, int]  # failure class -> examples
    latency_s: float = 0.0  # generation seconds per example
    peak_rss_mb: float | None = None
    train_seconds: float | None = None
    groups: dict[str, dict] = field(default_factory=dict)  # e.g. fact_in_train -> {"true": {...}, "false": ...}

    @property
    def score(self) -> float:
        return sum(self.scores) / len(self.scores) if self.scores else 0.0

    @property
    def ci95(self) -> tuple[float, float]:
        return tuple(bootstrap_ci(self.scores)) if self.scores else (0.0, 0.0)

    def to_json(self) -> dict:
        d = asdict(self)
        d.update(score=self.score, ci95=list(self.ci95))
        return d

    @classmethod
    def from_json(cls, d: dict) -> RungResult:
        keep = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**keep)


@dataclass(frozen=True)
class Diff:
    """b - a on the same examples: the mean difference and its paired 95% bootstrap CI."""

    a: str
    b: str
    delta: float
    ci95: tuple[float, float]

    @property
    def better(self) -> bool:  # b beats a: the CI of the difference lies above zero
        return self.ci95[0] > 0

    @property
    def worse(self) -> bool:
        return self.ci95[1] < 0

    def text(self) -> str:
        lo, hi = self.ci95
        return f"{self.delta:+.3f} (95% CI {lo:+.3f} to {hi:+.3f})"

    def to_json(self) -> dict:
        return {"a": self.a, "b": self.b, "delta": self.delta, "ci95": list(self.ci95), "better": self.better,
                "worse": self.worse}


def paired(a: RungResult, b: RungResult) -> Diff:
    """b's primary metric minus a's, example by example."""
    if len(a.scores) != len(b.scores):
        raise ValueError(f"rungs {a.name} and {b.name} were scored on different examples")
    diffs = [y - x for x, y in zip(a.scores, b.scores)]
    return Diff(a.name, b.name, sum(diffs) / len(diffs), tuple(bootstrap_ci(diffs)))


@dataclass
class Recommendation:
    """The verdict on measured rungs with its reasons (`recommend` makes it)."""

    verdict: str  # prompting | constrained | retrieval | finetune | retrieval+finetune | none
    headline: str
    rung: str | None  # the rung recommended
    finetune_justified: bool
    reasons: list[str] = field(default_factory=list)
    next_steps: list[str] = field(default_factory=list)
    cheapest_meeting_target: str | None = None
    removed: dict[str, dict[str, list[int]]] = field(default_factory=dict)  # rung -> class -> [first, rung]
    diffs: list[dict] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)

    def text(self) -> str:
        lines = [self.headline, *(f"  - {r}" for r in self.reasons)]
        if self.next_steps:
            lines += ["next:", *(f"  - {s}" for s in self.next_steps)]
        return "\n".join(lines)


@dataclass
class LadderResult:
    """A ladder run: its folder, the rungs measured (in ladder order), the verdict, the rungs not run and why."""

    out_dir: Path
    task: str
    primary: str
    results: list[RungResult]
    recommendation: Recommendation
    skipped: dict[str, str] = field(default_factory=dict)
    report: Path | None = None
