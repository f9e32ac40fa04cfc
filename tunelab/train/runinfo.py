"""run.json: what made an artifact (base model and hash, data hashes, versions, metrics, time, memory)."""

from __future__ import annotations

import importlib.metadata
import json
import platform
import resource
import sys
from pathlib import Path

from tunelab.config.recipe import Recipe
from tunelab.models import identity

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


def write_run_json(out: Path, recipe: Recipe, data_sources: dict, metrics: dict, wall_s: float,
                   peak_rss: int) -> Path:
    info = {"base_model": identity(recipe.model.spec), "method": recipe.method, "data": data_sources,
            "versions": versions(), "metrics": metrics, "wall_time_s": round(wall_s, 2),
            "peak_rss_bytes": peak_rss, "recipe": recipe.model_dump(mode="json")}
    tmp = out / "run.json.tmp"
    tmp.write_text(json.dumps(info, indent=2, default=str))
    tmp.replace(out / "run.json")
    return out / "run.json"
