"""From measured rungs to a recommendation with its reasons: the guide's decision matrix, driven by numbers.

"Finetuning is for form, retrieval is for facts": the verdict compares, on the same examples, the best
retrieval rung and the best finetuned rung with the best prompted one (paired bootstrap CIs), and reads the
failure classes each removed (format, content, knowledge, refusal). Nothing here knows a task by name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from tunelab.errors import TunelabError
from tunelab.evaluate.failures import CLASSES
from tunelab.ladder.results import Diff, Recommendation, RungResult, paired

PROMPTING, FINETUNED = ("prompt", "few-shot"), ("lora", "lora+constrained")
RETRIEVAL = ("bm25", "hybrid", "hybrid+rerank")


@dataclass(frozen=True)
class Target:
    """`metric >= value` (or `<=`): met by a rung when its 95% CI lies entirely on the right side."""

    metric: str
    op: str
    value: float

    @classmethod
    def parse(cls, text: str) -> Target:
        m = re.fullmatch(r"\s*([A-Za-z_][\w]*)\s*(>=|<=)\s*([0-9.]+)\s*", text)
        if not m:
            raise TunelabError(f"--target {text!r}: write it as METRIC>=VALUE or METRIC<=VALUE, "
                               "e.g. schema_valid>=0.95.")
        return cls(m[1], m[2], float(m[3]))

    def met(self, r: RungResult) -> bool:
        m = r.metrics.get(self.metric)
        if m is None:
            raise TunelabError(f"--target names {self.metric!r}, which rung {r.name} did not measure; "
                               f"its metrics are: {', '.join(r.metrics)}.")
        lo, hi = m["ci95"]
        return lo >= self.value if self.op == ">=" else hi <= self.value

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.value:g}"


def _best(results: dict[str, RungResult], names) -> RungResult | None:
    present = [results[n] for n in names if n in results]
    return max(present, key=lambda r: (r.score, -r.cost)) if present else None


def _classes(base: RungResult, r: RungResult) -> str:
    parts = [f"{c} {base.failures.get(c, 0)}->{r.failures.get(c, 0)}" for c in CLASSES
             if base.failures.get(c, 0) or r.failures.get(c, 0)]
    return ", ".join(parts) or "no failures"


def _group_line(ret: RungResult | None, ft: RungResult | None) -> str | None:
    """On items whose fact is not in the training data: what retrieval and finetuning each scored."""
    if not (ret and ft):
        return None
    for key, groups in ft.groups.items():
        unseen_ft, unseen_ret = groups.get("false"), ret.groups.get(key, {}).get("false")
        if unseen_ft and unseen_ret:
            return (f"on the {unseen_ft['n']} test items whose fact is not in the training data ({key}=false), "
                    f"{ft.label} scores {unseen_ft['score']:.2f} and {ret.label} {unseen_ret['score']:.2f}: "
                    "finetuning cannot teach a fact it never saw; retrieval can fetch it")
    return None


def recommend(results: list[RungResult], target: Target | None = None, primary: str = "score") -> Recommendation:
    """The verdict on measured rungs (in ladder order); see the module docstring."""
    if not results:
        raise TunelabError("the ladder ran no rungs, so there is nothing to recommend.")
    by = {r.name: r for r in results}
    first = results[0]
    ref = _best(by, PROMPTING) or first
    ret, ft = _best(by, RETRIEVAL), _best(by, FINETUNED)
    both, con = by.get("rag+lora"), by.get("constrained")
    d_ret = paired(ref, ret) if ret else None
    d_ft = paired(ref, ft) if ft else None
    diffs: list[Diff] = [paired(ref, r) for r in results if r is not ref]  # one baseline: the reasons' too
    cheapest = next((r.name for r in sorted(results, key=lambda r: r.cost) if target and target.met(r)), None)
    removed = {r.name: {c: [first.failures.get(c, 0), r.failures.get(c, 0)] for c in CLASSES} for r in results}
    own = ", ".join(f"{c} {ref.failures[c]}" for c in CLASSES if ref.failures.get(c)) or "none"
    reasons = [f"{ref.label} (the baseline of every comparison): {primary} {ref.score:.3f}; failures {own}"]
    for name, d, r in (("retrieval", d_ret, ret), ("finetuning", d_ft, ft)):
        if d is not None:
            reasons.append(f"{name} ({r.label}) vs {ref.label}: {d.text()}; failures {_classes(ref, r)}")
    line = _group_line(ret, ft)
    if line:
        reasons.append(line)

    verdict, rung = "none", ref.name
    if cheapest in (*PROMPTING, ref.name):
        verdict, rung = "prompting", cheapest
    elif cheapest == "constrained":
        verdict, rung = "constrained", cheapest
    elif d_ret and d_ret.better and d_ft and d_ft.better:
        head = paired(ret, ft)
        reasons.append(f"{ft.label} vs {ret.label}: {head.text()}")
        verdict, rung = (("finetune", ft.name) if head.better else ("retrieval", ret.name))  # a tie: the cheaper
        if both:
            top = ft if head.better else ret
            d_both = paired(top, both)
            reasons.append(f"{both.label} vs {top.label}: {d_both.text()}")
            if d_both.better:
                verdict, rung = "retrieval+finetune", both.name
    elif d_ret and d_ret.better:
        verdict, rung = "retrieval", ret.name
        if both:  # a LoRA trained on retrieved passages (tunelab.rag.raft) can read them better than the base
            d_both = paired(ret, both)
            reasons.append(f"{both.label} vs {ret.label}: {d_both.text()}")
            if d_both.better:
                verdict, rung = "retrieval+finetune", both.name
    elif d_ft and d_ft.better:
        verdict, rung = "finetune", ft.name
    elif con and paired(ref, con).better:
        verdict, rung = "constrained", con.name
    elif ref.score >= max(r.score for r in results) - 1e-9:
        verdict = "prompting"
    if con and verdict in ("finetune", "none", "prompting"):
        d_con = paired(ref, con)
        reasons.append(f"constrained decoding, the cheap partial fix: {d_con.text()}; failures "
                       f"{_classes(ref, con)}")
    headline = _headline(verdict, by[rung], target, cheapest)
    return Recommendation(verdict, headline, rung, verdict in ("finetune", "retrieval+finetune"), reasons,
                          _next_steps(by[rung], verdict, con is not None), cheapest, removed,
                          [d.to_json() for d in diffs])


def _headline(verdict: str, r: RungResult, target: Target | None, cheapest: str | None) -> str:
    text = {
        "prompting": f"Do not finetune: {r.label} already does the job.",
        "constrained": f"Do not finetune: {r.label} fixes what fails (form), at no training cost.",
        "retrieval": f"Use retrieval ({r.label}), do not finetune: what fails is missing facts.",
        "finetune": f"Finetune ({r.label}): what fails is form, which prompting and retrieval do not fix.",
        "retrieval+finetune": f"Retrieve, and finetune on retrieved passages ({r.label}): the facts come from "
                              "retrieval, reading them well from finetuning.",
        "none": "Do not finetune yet: no rung measurably beat the prompt on these examples.",
    }[verdict]
    if target:
        text += (f" Cheapest rung meeting {target}: {cheapest}." if cheapest else
                 f" No rung met {target} (its 95% CI lower bound).")
    return text


def _next_steps(r: RungResult, verdict: str, can_constrain: bool) -> list[str]:
    left = {c: n for c, n in r.failures.items() if n}
    steps = []
    if left.get("knowledge"):
        rerank = "rerank better (a cross-encoder: --rerank FOLDER)" if "rerank" in r.name else \
            "add a reranker (the hybrid+rerank rung: --rerank)"
        steps.append(f"{left['knowledge']} knowledge failures remain: {rerank}, retrieve more passages "
                     "(-k), or check that the corpus holds those facts")
    if left.get("format"):
        steps.append(f"{left['format']} format failures remain: " +
                     ("constrained decoding removes them" if can_constrain and "constrained" not in r.name
                      else "more training examples of the exact format"))
    if left.get("content"):
        steps.append(f"{left['content']} content failures remain: more (and cleaner) training data, a bigger "
                     "base model, or a longer run" if verdict != "retrieval" else
                     f"{left['content']} content failures remain: finetune on top (RAG + LoRA) for the answer form")
    if left.get("refusal"):
        steps.append(f"{left['refusal']} refusals: check the system prompt; finetune on answered examples")
    if verdict == "none":
        steps.append("collect more labelled failures: the differences are inside the noise at this sample size")
    return steps
