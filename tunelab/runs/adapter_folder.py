"""PEFT adapter folders: the one reader (config, weights, trained base, rope scaling, hashes) and adapter roots.

Every workflow that takes an adapter folder (inference, serving, merge, export) reads it here, so a folder
that is not an adapter, holds only pickled weights, or was trained on another base is refused with the same
clear message everywhere. An adapter root (`tunelab serve --adapters DIR`) is a folder whose subfolders are
adapters, or one adapter folder on its own.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from tunelab.errors import TunelabError
from tunelab.runs import layout

# what a served adapter may be called; NAME@vN is version N of the alias NAME (tunelab.ops.rollout)
ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}(@v[1-9][0-9]{0,5})?")
PICKLED_WEIGHTS = "adapter_model.bin"


@dataclass(frozen=True)
class AdapterFolder:
    """A PEFT adapter folder, read: its adapter_config.json, weights file and what its run.json records."""

    path: Path
    config: dict  # adapter_config.json
    weights: Path | None  # adapter_model.safetensors; None when the folder has none (e.g. only a pickled .bin)
    run: dict | None  # run.json, when `tunelab train` wrote the folder

    @property
    def peft_type(self) -> str | None:
        return self.config.get("peft_type")

    @property
    def trained_on(self) -> dict:
        """The identity record of the base it was trained on (run.json's base_model), {} when unknown."""
        return (self.run or {}).get("base_model") or {}

    @property
    def base_model(self) -> str | None:
        """The base model spec: run.json's path or spec, else adapter_config's base_model_name_or_path."""
        spec = self.trained_on.get("path") or self.trained_on.get("spec") or self.config.get("base_model_name_or_path")
        return str(spec) if spec else None

    @property
    def rope_scaling(self) -> dict | None:
        """The `model.rope_scaling` it was trained with (run.json's recipe); None when none or unknown."""
        return (((self.run or {}).get("recipe") or {}).get("model") or {}).get("rope_scaling")

    @cached_property
    def weights_sha256(self) -> str | None:
        """sha256 of the weights file (the registry's content key), None without one."""
        return layout.file_sha256(self.weights) if self.weights else None

    def safetensors(self) -> Path:
        """The weights file, or a TunelabError: pickled .bin weights are never loaded (they can run code)."""
        if self.weights is None:
            has_bin = (self.path / PICKLED_WEIGHTS).is_file()
            raise TunelabError(f"{self.path} has no {layout.ADAPTER_WEIGHTS}" + (
                f" (only {PICKLED_WEIGHTS}: pickled weights are never loaded); re-save it with PEFT's "
                "save_pretrained(..., safe_serialization=True)." if has_bin else "; re-save it with PEFT's "
                "save_pretrained."))
        return self.weights

    def lora_config(self, purpose: str = "merge and export") -> dict:
        """The config of a plain LoRA adapter, or a TunelabError naming its peft_type."""
        if self.peft_type != "LORA":
            raise TunelabError(f"{self.path / layout.ADAPTER_CONFIG}: peft_type {self.peft_type!r}; only LoRA "
                               f"adapters {purpose} (prompt-learning adapters have no weight delta).")
        return self.config

    def check_base(self, base_spec: str, same_model: Callable[[dict, str], bool | None]) -> None:
        """Refuse a base other than the one run.json records; `same_model(record, spec)` compares them
        (tunelab.models.same_model: False when they differ, None when it cannot tell)."""
        if self.run is None or not self.trained_on or same_model(self.trained_on, base_spec) is not False:
            return
        spec = self.trained_on.get("spec") or self.trained_on.get("path") or self.trained_on.get("hub_id")
        raise TunelabError(f"adapter {self.path} was trained on {spec!r} ({self.path / layout.RUN_JSON}), not "
                           f"{base_spec!r}; load it with --model {spec}.")

    def check_rope(self, running: dict | None) -> None:
        """Refuse a base loaded with another rope scaling than the adapter learned (`running`: the base
        config's rope_parameters)."""
        rope, running = self.rope_scaling, running or {}
        if rope and (running.get("rope_type") != rope["type"] or running.get("factor") != rope["factor"]):
            raise TunelabError(f"adapter {self.path} was trained with model.rope_scaling {rope} "
                               f"({self.path / layout.RUN_JSON}); the loaded base runs with {running or 'none'}. "
                               "Load the base with the same scaling.")

    def check_hidden_size(self, hidden: int | None) -> None:
        """A prompt-tuning adapter's token_dim must be the base's hidden size."""
        dim = self.config.get("token_dim")
        if self.peft_type == "PROMPT_TUNING" and hidden and dim not in (None, hidden):
            raise TunelabError(f"adapter {self.path} expects hidden size {dim}, the base has {hidden}.")


def is_adapter_folder(path: str | Path) -> bool:
    return (Path(path) / layout.ADAPTER_CONFIG).is_file()


def read_adapter_folder(path: str | Path) -> AdapterFolder:
    """Read a PEFT adapter folder; a TunelabError naming what it lacks when it is not one."""
    path = Path(path)
    if not is_adapter_folder(path):
        why = "it does not exist" if not path.exists() else f"no {layout.ADAPTER_CONFIG}"
        raise TunelabError(f"{path} is not a PEFT adapter folder ({why}); give the folder `tunelab train` wrote or "
                           "one PEFT's save_pretrained wrote.")
    config = layout.read_json(path / layout.ADAPTER_CONFIG, "adapter config PEFT's save_pretrained writes")
    if not isinstance(config, dict):
        raise TunelabError(f"{path / layout.ADAPTER_CONFIG}: expected a JSON object; re-save the adapter.")
    weights = path / layout.ADAPTER_WEIGHTS
    run = layout.read_run_json(path) if layout.is_run_folder(path) else None
    return AdapterFolder(path, config, weights if weights.is_file() else None, run)


@dataclass
class AdapterScan:
    """What an adapter root holds: adapters to serve, adapter folders refused, other subfolders ignored."""

    root: Path
    found: dict[str, Path] = field(default_factory=dict)  # name -> folder
    refused: dict[str, str] = field(default_factory=dict)  # adapter folder name -> why it is not served
    ignored: dict[str, str] = field(default_factory=dict)  # other subfolder -> why it is not an adapter

    def lines(self) -> list[str]:
        """The scan in words, one line each (what `tunelab serve` says at start)."""
        head = (f"{len(self.found)} adapter(s) in {self.root}: {', '.join(self.found)}" if self.found else
                f"no adapters in {self.root} (a subfolder with {layout.ADAPTER_CONFIG} and "
                f"{layout.ADAPTER_WEIGHTS} is one); only the base is served")
        return [head, *(f"  refused {n}: {why}" for n, why in self.refused.items()),
                *(f"  skipped {n}: {why}" for n, why in self.ignored.items())]


class AdapterRoot:
    """The adapters a server may load: the subfolders of `path` that are adapter folders, or `path` itself
    when it is one (served under its folder's name). Read on each call: adapters copied in later are found."""

    def __init__(self, path: str | Path):
        self.path = Path(path).resolve()
        if not self.path.is_dir():
            what = "is a file, not a folder" if self.path.exists() else "does not exist"
            raise TunelabError(f"--adapters {path}: {what}; give a folder whose subfolders are adapter folders "
                               "(or one adapter folder).")
        self.single = is_adapter_folder(self.path)

    def _candidates(self) -> list[Path]:
        return [self.path] if self.single else sorted(p for p in self.path.iterdir() if p.is_dir())

    def scan(self) -> AdapterScan:
        out = AdapterScan(self.path)
        for p in self._candidates():
            if not is_adapter_folder(p):
                out.ignored[p.name] = f"no {layout.ADAPTER_CONFIG}: not an adapter folder"
            elif not ADAPTER_NAME.fullmatch(p.name):
                out.refused[p.name] = ("its name is not a model name (letters, digits, '.', '_', '-'; up to 64, "
                                       "starting with a letter or digit; NAME@vN for a version): rename the folder")
            elif not (p / layout.ADAPTER_WEIGHTS).is_file():
                out.refused[p.name] = (f"no {layout.ADAPTER_WEIGHTS} (pickled weights are never loaded): re-save "
                                       "it with PEFT's save_pretrained(..., safe_serialization=True)")
            else:
                out.found[p.name] = p
        return out

    def names(self) -> list[str]:
        return list(self.scan().found)

    def folder(self, name: str, rel: str | None = None) -> Path:
        """The folder of adapter `name` (or of `rel`, a path under the root); KeyError when there is none,
        a TunelabError for a path that leaves the root."""
        if not ADAPTER_NAME.fullmatch(name):
            raise KeyError(name)
        if self.single:
            if rel is None and name == self.path.name:
                return self.path
            raise KeyError(name)
        p = (self.path / (rel or name)).resolve()
        if self.path not in p.parents:
            raise TunelabError(f"adapter path {rel or name!r} is outside the adapters folder {self.path}")
        if not p.is_dir():
            raise KeyError(name)
        return p
