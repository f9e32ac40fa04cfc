"""Find a model's architecture: the bundled catalog of popular models, or any spec tunelab can resolve.

`model_arch(spec)` accepts a Hugging Face id from the catalog (matched case-insensitively), the bundled
alias, a `config.json` or model folder, or a GGUF file; only configs are read, never weights.
"""

from __future__ import annotations

import difflib
import functools
import re
from importlib import resources
from pathlib import Path

import yaml

from tunelab.errors import TunelabError
from tunelab.memory.arch import Arch, arch_from_config


@functools.cache
def _catalog() -> dict[str, dict]:
    text = resources.files("tunelab.memory").joinpath("catalog.yaml").read_text(encoding="utf-8")
    return yaml.safe_load(text)


def catalog_entries() -> dict[str, dict]:
    """Every catalog entry: key -> {ids, license, published, config}."""
    return dict(_catalog())


def _index() -> dict[str, str]:
    out = {}
    for key, entry in _catalog().items():
        out[key.lower()] = key
        for hf_id in entry["ids"]:
            out[hf_id.lower()] = key
            out[hf_id.split("/")[-1].lower()] = key
    return out


def catalog_key(spec: str) -> str | None:
    """The catalog entry a name refers to (HF id, its last part, or the catalog key), or None."""
    return _index().get(spec.strip().lower())


def catalog_config(key: str):
    """A transformers config built from a catalog entry's hyperparameters."""
    from transformers import AutoConfig

    cfg = dict(_catalog()[key]["config"])
    model_type = cfg.pop("model_type")
    return AutoConfig.for_model(model_type, **cfg)


def _gguf_config(path: Path):
    from transformers import AutoConfig
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    cfg = dict(load_gguf_checkpoint(str(path), return_tensors=False)["config"])
    cfg.pop("_model_name_or_path", None)
    return AutoConfig.for_model(cfg.pop("model_type"), **cfg)


def _card_license(folder: Path) -> str | None:
    """`license:` from a model card's YAML front matter (README.md), if there is one."""
    card = folder / "README.md"
    if not card.is_file():
        return None
    m = re.match(r"^---\s*\n(.*?)\n---", card.read_text(encoding="utf-8", errors="replace"), re.S)
    if not m:
        return None
    try:
        meta = yaml.safe_load(m.group(1)) or {}
    except yaml.YAMLError:
        return None
    lic = meta.get("license") if isinstance(meta, dict) else None
    return str(lic) if lic else None


@functools.lru_cache(maxsize=32)
def model_arch(spec: str) -> Arch:
    """Resolve a model spec to its `Arch` (catalog first, then tunelab's model resolver)."""
    key = catalog_key(spec)
    if key is not None:
        entry = _catalog()[key]
        want = spec.strip().lower()
        name = next((i for i in entry["ids"] if want in (i.lower(), i.split("/")[-1].lower())), entry["ids"][0])
        return arch_from_config(catalog_config(key), name=name, license=entry["license"])
    from tunelab.models import resolve

    try:
        source = resolve(spec)
    except TunelabError as e:
        raise _with_hint(e, spec) from None
    if source.kind in ("bundled", "gguf"):
        from tunelab.models import gguf_metadata

        meta = gguf_metadata(source.path)
        return arch_from_config(_gguf_config(source.path), name=source.name, license=meta.get("general.license"))
    if source.kind == "hf_dir":
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(source.path)
        except (OSError, ValueError) as e:
            raise TunelabError(f"cannot read {source.path / 'config.json'}: {e}") from None
        lic = getattr(config, "license", None) or _card_license(source.path)
        return arch_from_config(config, name=source.name, license=lic)
    from tunelab.models import load_config

    try:
        return arch_from_config(load_config(spec), name=spec)
    except TunelabError as e:
        raise _with_hint(e, spec) from None


def _with_hint(e: TunelabError, spec: str) -> TunelabError:
    near = difflib.get_close_matches(spec.lower(), list(_index()), n=3, cutoff=0.4)
    hint = f" Catalog names close to it: {', '.join(near)}." if near else ""
    return TunelabError(f"{e}{hint} The catalog of architectures (no download needed): "
                        f"{', '.join(x['ids'][0] for x in _catalog().values())}.")


def catalog_rows() -> list[dict]:
    """One row per catalog entry (for `tunelab memory --list`): id, aliases, params, layers, license."""
    rows = []
    for entry in _catalog().values():
        a = model_arch(entry["ids"][0])
        rows.append({"id": entry["ids"][0], "aliases": entry["ids"][1:], "params": a.params_total,
                     "layers": a.layers, "hidden": a.hidden, "kv_heads": a.kv_heads, "vocab": a.vocab,
                     "context": a.context, "tied": a.tied, "license": entry["license"]})
    return rows
