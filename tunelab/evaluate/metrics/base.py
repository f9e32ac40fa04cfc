"""The two shapes every metric shares: a scored result with an optional reason, and a registry entry."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

# What a metric expects in the `reference` slot; scoring checks references against this before scoring.
#   text    - a string (non-strings are compared as compact JSON text)
#   json    - a JSON value, or a string holding JSON text
#   sql     - the gold SQL string
#   pattern - a regular expression string
#   none    - the reference is ignored (format and refusal metrics)
ReferenceKind = Literal["text", "json", "sql", "pattern", "none"]


class MetricResult(NamedTuple):
    """A score in [0, 1] and, when the output failed for a nameable reason, that reason."""

    score: float
    detail: str | None = None


@dataclass(frozen=True)
class Metric:
    """A registry entry: the per-example function, what it needs, and how to report a corpus score.

    `fn(output, reference, **opts) -> float` is the plain metric. `explain`, when set, returns a
    `MetricResult` with a reason for failures (parse error, SQL error). `needs` names the extra inputs
    (`schema`: a JSON Schema dict, `db`: a SQLite path) passed as keyword arguments. `corpus`, when set,
    computes a corpus-level score from all outputs and references (BLEU, chrF).
    """

    name: str
    fn: Callable[..., float]
    reference: ReferenceKind
    needs: tuple[str, ...] = ()
    explain: Callable[..., MetricResult] | None = None
    corpus: Callable[[Sequence[str], Sequence[str]], float] | None = None

    @property
    def summary(self) -> str:
        """The first line of the metric function's docstring."""
        return (self.fn.__doc__ or "").strip().splitlines()[0]

    def compute(self, output: str, reference: Any, **inputs: Any) -> MetricResult:
        """Score one example, with a failure reason when the metric can give one."""
        if self.explain is not None:
            return self.explain(output, reference, **inputs)
        return MetricResult(float(self.fn(output, reference, **inputs)))
