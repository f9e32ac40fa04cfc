"""The escalation ladder: prompt -> few-shot -> constrained -> RAG -> LoRA, measured, with a recommendation."""

from tunelab.ladder.climb import run_ladder
from tunelab.ladder.recommend import Target, recommend
from tunelab.ladder.results import LadderResult, Recommendation, RungResult, paired
from tunelab.ladder.rungs import RUNGS, plan_rungs

__all__ = ["RUNGS", "LadderResult", "Recommendation", "RungResult", "Target", "paired", "plan_rungs",
           "recommend", "run_ladder"]
