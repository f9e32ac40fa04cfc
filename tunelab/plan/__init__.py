"""Plan a finetune before running it: the advisor (`tunelab plan`) and the recipe linter and preflight (`tunelab lint`).

    plan("meta-llama/Llama-3.1-8B", "24GB", examples=5000).to_json()  # `tunelab plan` draws it as a table
    lint(recipe, budget_bytes)  # the guide's checks, each finding with its reason and fix
    preflight(recipe)  # lint + memory vs this device, before `tunelab train`
"""

from tunelab.plan.advisor import FinetunePlan, plan
from tunelab.plan.lint import Finding, available_memory, lint, preflight

__all__ = ["FinetunePlan", "Finding", "available_memory", "lint", "plan", "preflight"]
