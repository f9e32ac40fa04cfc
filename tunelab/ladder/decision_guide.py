"""`tunelab advise`: the ladder's advice from an eval folder's failure classes, or from a short questionnaire.

The guide's decision matrix (shared/finetuning-reference.md, "RAG vs Finetune"), applied to what an eval
measured: knowledge failures point to retrieval, format failures to constrained decoding and then
finetuning, content failures (well-formed, wrong) to few-shot prompting and then finetuning, refusals to
the prompt. With no eval yet, the "Quick Decision Guide" questions give a plan, including when not to.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from tunelab.errors import TunelabError
from tunelab.evaluate.failures import CLASSES
from tunelab.runs.layout import find_eval_folders, read_eval_metrics

MATRIX = {
    "knowledge": ("retrieval", "facts are wrong or missing: add retrieval (BM25, then hybrid), keep the base "
                               "model; `tunelab ladder` measures it"),
    "format": ("constrained+finetune", "output format errors: constrained decoding fixes syntax at no training "
                                       "cost; finetune on schema examples if content is wrong too"),
    "content": ("finetune", "well-formed but wrong: add few-shot examples first; if that does not fix it, "
                            "finetune (LoRA) on curated examples"),
    "refusal": ("prompting", "the model refuses: fix the system prompt first; finetune on answered examples "
                             "only if that fails"),
}


@dataclass
class Advice:
    verdict: str
    headline: str
    reasons: list[str] = field(default_factory=list)
    next_steps: list[str] = field(default_factory=list)

    def text(self) -> str:
        lines = [self.headline, *(f"  - {r}" for r in self.reasons)]
        return "\n".join(lines + (["next:", *(f"  - {s}" for s in self.next_steps)] if self.next_steps else []))


def advise_eval(folder: str | Path) -> Advice:
    """Advice from an eval folder (one model, or a comparison folder holding several)."""
    folders = find_eval_folders(folder)
    if not folders:
        raise TunelabError(f"{folder}: no eval folder here (metrics.json); run `tunelab eval` first.")
    reasons, worst = [], None
    for f in folders:
        m = read_eval_metrics(f)
        fails, n = m.get("failures", {}), m.get("n", 0)
        reasons.append(f"{m.get('model', f.name)}: {n} examples, failures " +
                       (", ".join(f"{c} {fails.get(c, 0)}" for c in CLASSES if fails.get(c)) or "none"))
        total = sum(fails.get(c, 0) for c in CLASSES)
        if worst is None or total > worst[1]:
            worst = (fails, total, n)
    fails, total, n = worst
    if total == 0:
        return Advice("prompting", "Do not finetune: no failures in this eval.", reasons,
                      ["grow the test set until the 95% CI is tight enough to trust"])
    top = max(CLASSES, key=lambda c: fails.get(c, 0))
    verdict, why = MATRIX[top]
    steps = [MATRIX[c][1] for c in CLASSES if c != top and fails.get(c, 0) >= max(1, 0.2 * total)]
    if fails.get("knowledge") and fails.get("format", 0) + fails.get("content", 0):
        steps.append("both facts and form fail: start with retrieval (bigger, cheaper gains), then finetune "
                     "if behaviour issues remain")
    steps.append("measure it: `tunelab ladder TASK` runs each fix on the same examples")
    head = {"retrieval": "Use retrieval, do not finetune (yet):", "constrained+finetune":
            "Constrain decoding first, then finetune:", "finetune": "Finetune (after few-shot):",
            "prompting": "Fix the prompt first:"}[verdict]
    return Advice(verdict, f"{head} {top} failures dominate ({fails.get(top, 0)} of {total} wrong, "
                           f"n={n}). {why}.", reasons, steps)


QUESTIONS = {  # key -> (question, the answer that argues against finetuning, why)
    "metrics": ("Do you have an evaluation set and a metric you trust?", False,
                "without a metric you cannot tell whether finetuning helped: build the eval first"),
    "prompted": ("Have you tried clear instructions and few-shot examples?", False,
                 "exhaust prompt engineering first: it is the cheapest rung"),
    "facts": ("Is what fails facts (wrong, outdated, private or changing)?", True,
              "facts belong in retrieval (RAG), which stays current; finetuning does not teach facts reliably"),
    "general": ("Must the model stay good at many unrelated tasks?", True,
                "task-specific finetuning may degrade other tasks: keep the base and prompt, or mix data"),
    "maintain": ("Can you re-train and re-evaluate when the base model or data change?", False,
                 "a finetuned model needs ongoing maintenance; without it, prefer prompting and RAG"),
    "form": ("Is what fails the form (strict JSON/SQL/DSL, a house dialect, style, safety)?", False,
             "finetuning is for form"),
}


def advise_answers(answers: dict[str, bool]) -> Advice:
    """The quick decision guide: `answers` maps each QUESTIONS key to yes/no."""
    missing = [k for k in QUESTIONS if k not in answers]
    if missing:
        raise TunelabError(f"missing answers: {', '.join(missing)} (questions: "
                           + "; ".join(f"{k}: {QUESTIONS[k][0]}" for k in missing) + ")")
    against = [QUESTIONS[k][2] for k in ("metrics", "prompted", "general", "maintain")
               if answers[k] == QUESTIONS[k][1]]
    if answers["facts"]:
        steps = ["index your documents: `tunelab rag index CORPUS --kind hybrid`",
                 "evaluate with retrieval: `tunelab eval --rag IDX`"]
        if answers["form"]:
            steps.append("form fails too: finetune after retrieval works (RAG + LoRA)")
        return Advice("retrieval", "Do not finetune for facts: use retrieval.", [QUESTIONS["facts"][2], *against],
                      steps)
    if against:
        return Advice("prompting", "Do not finetune yet.", against,
                      ["write an eval set: `tunelab eval --data FILE.jsonl`", "try few-shot prompting"])
    if answers["form"]:
        return Advice("finetune", "Finetune with LoRA: the failures are form, and you can measure and maintain it.",
                      [QUESTIONS["form"][2]], ["size it: `tunelab plan`", "measure first: `tunelab ladder TASK`"])
    return Advice("prompting", "Do not finetune: nothing here is a form problem finetuning fixes.", [],
                  ["collect failures and classify them: `tunelab eval` then `tunelab advise EVAL_DIR`"])
