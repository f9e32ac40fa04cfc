"""run.json: what made an artifact (base model and hash, data hashes, versions, metrics, time, memory)."""

from __future__ import annotations

import importlib.metadata
import json
import platform
import resource
import sys
from pathlib import Path

from tunelab.config.recipe import Recipe
from tunelab.models import resolve
from tunelab.models.resolve import fingerprint

LIBRARIES = ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "tunelab")


def peak_rss_bytes() -> int:
    """Peak resident memory of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def base_model_info(spec: str) -> dict:
    source = resolve(spec)
    info = {"spec": spec, "kind": source.kind, "hub_id": source.hub_id,
            "path": str(source.path) if source.path else None}
    if source.path is not None:
        weights = source.path if source.path.is_file() else next(
            iter(sorted(source.path.glob("*.safetensors"))), source.path / "config.json")
        if weights.exists():
            info["hash"] = fingerprint(weights)
    return info


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
    info = {"base_model": base_model_info(recipe.model.spec), "method": recipe.method, "data": data_sources,
            "versions": versions(), "metrics": metrics, "wall_time_s": round(wall_s, 2),
            "peak_rss_bytes": peak_rss, "recipe": recipe.model_dump(mode="json")}
    tmp = out / "run.json.tmp"
    tmp.write_text(json.dumps(info, indent=2, default=str))
    tmp.replace(out / "run.json")
    return out / "run.json"
