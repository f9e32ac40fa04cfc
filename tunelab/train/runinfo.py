"""run.json: what made an artifact (base model and hash, data hashes, versions, metrics, time, memory)."""

from __future__ import annotations

import importlib.metadata
import platform
import resource
import sys
from pathlib import Path

from tunelab.config.recipe import Recipe
from tunelab.models import identity
from tunelab.runs.layout import write_run_json as _write

LIBRARIES = ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "tunelab")


def peak_rss_bytes() -> int:
    """Peak resident memory of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def versions() -> dict:
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for lib in LIBRARIES:
        try:
            out[lib] = importlib.metadata.version(lib)
        except importlib.metadata.PackageNotFoundError:
            out[lib] = None
    return out


def _system_prompt(recipe: Recipe) -> str | None:
    """The bundled task's system prompt the training conversations carry (None for data files)."""
    if recipe.data.train is not None or recipe.data.task is None:
        return None
    from tunelab.tasks import load_task

    return load_task(recipe.data.task).spec.system_prompt


def write_run_json(out: Path, recipe: Recipe, data_sources: dict, metrics: dict, wall_s: float,
                   peak_rss: int) -> Path:
    info = {"base_model": identity(recipe.model.spec), "method": recipe.method, "data": data_sources,
            "system_prompt": _system_prompt(recipe), "versions": versions(), "metrics": metrics,
            "wall_time_s": round(wall_s, 2), "peak_rss_bytes": peak_rss, "recipe": recipe.model_dump(mode="json")}
    return _write(out, info)
