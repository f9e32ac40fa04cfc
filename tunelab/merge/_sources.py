"""Adapter folders as merge/export inputs: their config, their base model, and their registry row."""

from __future__ import annotations

from pathlib import Path

from tunelab.errors import TunelabError
from tunelab.models import identity
from tunelab.runs import layout, record_training_run, register_base_model, register_folder, show
from tunelab.runs.adapter_folder import is_adapter_folder, read_adapter_folder


def adapter_config(folder: str | Path) -> dict:
    """The adapter_config.json of a PEFT LoRA folder, or a TunelabError naming what the folder lacks."""
    return read_adapter_folder(folder).lora_config("merge and export")


def base_spec(folder: str | Path, given: str | None = None) -> str:
    """The base model an adapter was trained on: `given` (--model) wins, then run.json, then adapter_config."""
    if given:
        return given
    spec = read_adapter_folder(folder).base_model
    if not spec:
        raise TunelabError(f"{folder}: neither run.json nor adapter_config.json names the base model; "
                           "pass it with --model.")
    return spec


def same_base(folders: list[Path], given: str | None) -> str:
    """The one base all adapters share, or a TunelabError naming the two that differ."""
    specs = {str(f): base_spec(f, given) for f in folders}
    if given:
        return given
    hashes = {f: identity(s).get("hash") or s for f, s in specs.items()}
    first = str(folders[0])
    for f, h in hashes.items():
        if h != hashes[first]:
            raise TunelabError(f"adapters are on different bases: {first} on {specs[first]!r}, {f} on {specs[f]!r}; "
                               "only adapters on the same base merge (full models merge through mergekit).")
    return specs[first]


def registry_ref(folder: str | Path) -> int:
    """The registry row of an input folder, registering it first: a training run with its lineage, else the
    adapter or model folder on its own."""
    folder = Path(folder).resolve()
    if layout.is_run_folder(folder):
        return record_training_run(folder)
    if is_adapter_folder(folder):
        return register_folder("adapter", folder, {})
    if layout.folder_kind(folder) in layout.MANIFESTS:  # a merge/export folder: registered when written
        return show(str(folder))["id"]
    return register_base_model(identity(str(folder)))
