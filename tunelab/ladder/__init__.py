"""The escalation ladder: prompt -> few-shot -> constrained -> RAG -> LoRA, measured, with a recommendation."""

from tunelab.ladder.recommend import Recommendation, Target, recommend
from tunelab.ladder.results import RungResult, paired
from tunelab.ladder.run import LadderResult, run_ladder
from tunelab.ladder.rungs import RUNGS, plan_rungs

__all__ = ["RUNGS", "LadderResult", "Recommendation", "RungResult", "Target", "paired", "plan_rungs",
           "recommend", "run_ladder"]
