"""Full models and task vectors merged by mergekit (an optional, LGPL-3.0 extra): a YAML as it is, or one built."""

from __future__ import annotations

import tempfile
from pathlib import Path

import yaml

from tunelab.errors import TunelabError
from tunelab.merge._sources import adapter_config, base_spec, registry_ref
from tunelab.merge.adapters import MergeResult
from tunelab.models import identity, resolve
from tunelab.runs import layout, register_base_model, register_folder

METHODS = ("linear", "slerp", "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "della",
           "model_stock", "passthrough")
NO_BASE = ("linear", "passthrough")  # every other method merges deltas from (or interpolates with) a base
PRUNING = ("ties", "dare_ties", "dare_linear", "breadcrumbs", "della")  # sparsify each delta to --density
DTYPES = ("float32", "bfloat16", "float16")
INSTALL = "pip install 'tunelab[merge]' (mergekit 0.1.5, LGPL-3.0)"
# config fields that fix weight shapes: models differing in one cannot be merged tensor by tensor
SHAPE_FIELDS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim")


def _mergekit():
    """mergekit's config class, run_merge and MergeOptions, or a TunelabError with the install line."""
    try:
        from mergekit.config import MergeConfiguration
        from mergekit.merge import MergeOptions, run_merge
    except ImportError:
        raise TunelabError(f"merging full models needs mergekit, an optional extra: {INSTALL}.") from None
    return MergeConfiguration, run_merge, MergeOptions


def _hf_folder(spec: str, flag: str, adapter: str = "") -> str:
    """A model spec as mergekit can read it: an HF folder's absolute path or a hub id; GGUF refused."""
    source = resolve(spec)
    if source.kind in ("bundled", "gguf"):
        name = f"DIR+{adapter}" if adapter else "DIR"
        raise TunelabError(f"{flag}: {spec!r} is a GGUF file; mergekit reads HF folders (safetensors). Convert it "
                           f"first: `tunelab export {spec} --format hf --out DIR`, then name {name}.")
    return str(source.path.resolve()) if source.path else source.spec


def model_reference(spec: str, flag: str = "--models") -> str:
    """mergekit's name for `spec`: an HF folder or hub id; BASE+ADAPTER; or an adapter folder alone, which
    becomes its own base (run.json / adapter_config.json) + itself (mergekit merges the LoRA first)."""
    base, plus, adapter = spec.partition("+")
    if not plus and (Path(spec) / layout.ADAPTER_CONFIG).is_file():
        base, adapter = base_spec(spec), spec
    if adapter:
        adapter_config(adapter)  # a LoRA folder, or the error says what it lacks
        return f"{_hf_folder(base, flag, adapter)}+{Path(adapter).resolve()}"
    return _hf_folder(spec, flag)


def _numbers(values: list[float] | None, n: int, flag: str, default: float) -> list[float]:
    if values is None:
        return [default] * n
    if len(values) != n:
        raise TunelabError(f"{flag} has {len(values)} values for {n} models; give one per merged model.")
    return list(values)


def build_config(method: str, models: list[str], base: str | None = None, weights: list[float] | None = None,
                 density: float | None = None, t: float | None = None, layers: list[tuple[int, int]] | None = None,
                 dtype: str | None = None) -> dict:
    """A mergekit YAML (as a dict) for the common cases.

    method: one of METHODS. models: model specs (HF folder, hub id, BASE+ADAPTER, adapter folder); the base
    may be among them. base: the model the deltas are taken from (slerp: default the first model, t=0).
    weights: one per non-base model (default 1 each). density: the kept fraction of each delta (ties, dare_*,
    breadcrumbs, della). t: slerp's position from the base (0) to the other model (1). layers: passthrough's
    (start, end) layer range per model, stacked in order. dtype: float32, bfloat16 or float16."""
    if method not in METHODS:
        raise TunelabError(f"--method {method!r}: mergekit merges full models by one of {', '.join(METHODS)}.")
    if not models:
        raise TunelabError(f"--method {method} needs --models (two or more; passthrough: one or more).")
    refs = [model_reference(m) for m in models]
    base_ref = model_reference(base, "--base") if base else None
    if method == "slerp" and base_ref is None:
        base_ref = refs[0]
    if method in NO_BASE and base_ref is not None:
        raise TunelabError(f"--method {method} has no base model; drop --base.")
    if method not in NO_BASE and base_ref is None:
        raise TunelabError(f"--method {method} merges each model's delta from a base: give --base.")
    others = [r for r in refs if r != base_ref]
    if method == "slerp" and len(others) != 1:
        raise TunelabError(f"--method slerp interpolates between the base and ONE other model; got {len(others)} "
                           "others. Use linear or a task-vector method (ties, ...) for more.")
    if method == "model_stock" and len(others) < 2:
        raise TunelabError("--method model_stock needs a base and at least two other models.")
    if t is not None and method != "slerp":
        raise TunelabError("--t is slerp's position between the two models; other methods take --weights.")
    if (density is not None) != (method in PRUNING):
        raise TunelabError(f"--density is the kept fraction of each delta for {', '.join(PRUNING)}: "
                           + (f"give it for {method} (e.g. 0.5)." if density is None else f"not for {method}."))
    if density is not None and not 0 < density <= 1:
        raise TunelabError(f"--density {density}: give a fraction in (0, 1].")
    if (layers is not None) != (method == "passthrough"):
        raise TunelabError("--layers gives passthrough one START:END layer range per model (e.g. 0:2,1:2)"
                           + (", and only passthrough." if layers is not None else "; give it."))
    if dtype is not None and dtype not in DTYPES:
        raise TunelabError(f"--dtype {dtype!r}: one of {', '.join(DTYPES)} (default: the models' own).")
    cfg: dict = {"merge_method": method}
    if method == "passthrough":
        ranges = list(layers or [])
        if len(ranges) != len(refs):
            raise TunelabError(f"--layers has {len(ranges)} ranges for {len(refs)} models; give one per model.")
        cfg["slices"] = [{"sources": [{"model": r, "layer_range": list(span)}]} for r, span in zip(refs, ranges)]
    elif method == "slerp":
        cfg["models"] = [{"model": base_ref}, {"model": others[0]}]
        cfg["parameters"] = {"t": 0.5 if t is None else t}
    else:
        ws = _numbers(weights, len(others), "--weights", 1.0)
        params = [{} if method == "model_stock" else {"weight": w} for w in ws]
        if density is not None:
            params = [{**p, "density": density} for p in params]
        cfg["models"] = [{"model": r, **({"parameters": p} if p else {})} for r, p in zip(others, params)]
    if base_ref is not None:
        cfg["base_model"] = base_ref
    if dtype:
        cfg["dtype"] = dtype
    return cfg


def _field(loc: tuple) -> str:
    return ".".join(str(p) for p in loc) or "(top level)"


def load_config(config: str | Path | dict):
    """(MergeConfiguration, YAML text, where it came from) from a YAML file or a dict; errors name the field."""
    MergeConfiguration, _, _ = _mergekit()
    from pydantic import ValidationError

    if isinstance(config, dict):
        where, text, data = "the built config", yaml.safe_dump(config, sort_keys=False), config
    else:
        where = str(config)
        if not Path(config).is_file():
            raise TunelabError(f"{where}: no such mergekit YAML file.")
        text = Path(config).read_text(encoding="utf-8")
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise TunelabError(f"{where} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise TunelabError(f"{where}: a mergekit config is a mapping with merge_method and models/slices.")
    try:
        cfg = MergeConfiguration.model_validate(data)
    except ValidationError as e:
        bad = "; ".join(f"{_field(err['loc'])}: {err['msg']}" for err in e.errors())
        raise TunelabError(f"{where}: {bad}. See mergekit's README for the config fields.") from None
    except (RuntimeError, ValueError) as e:  # mergekit's own validators raise these
        raise TunelabError(f"{where}: {e}.") from None
    from mergekit.merge_methods import registry

    if cfg.merge_method not in {m.spec.name for m in registry.registered_methods()}:
        raise TunelabError(f"{where}: merge_method {cfg.merge_method!r} is not a mergekit 0.1.5 method; "
                           f"tunelab tests {', '.join(METHODS)}.")
    return cfg, text, where


def named_models(cfg) -> list:
    """The model references a config names, once each, in its order with the base first (mergekit's
    referenced_models is a set)."""
    refs = [cfg.base_model] + [m.model for m in cfg.models or []]
    refs += [src.model for piece in cfg.slices or [] for src in piece.sources]
    refs += sorted(cfg.referenced_models(), key=str)  # what `modules:` names
    return list(dict.fromkeys(r for r in refs if r is not None))


def check_compatible(cfg, where: str) -> None:
    """Refuse models whose architectures or weight shapes differ, naming the two (mergekit would refuse or fail
    midway); a vocabulary difference needs the YAML's tokenizer section."""
    seen: dict[str, tuple[str, object]] = {}
    for ref in named_models(cfg):
        try:
            conf = ref.config()
        except (OSError, ValueError) as e:
            raise TunelabError(f"{where}: cannot read model {ref.model}: {e}") from None
        facts = {"architecture": (conf.architectures or [conf.model_type])[0],
                 **{k: getattr(conf, k, None) for k in SHAPE_FIELDS}}
        if not (cfg.tokenizer or cfg.tokenizer_source):
            facts["vocab_size"] = getattr(conf, "vocab_size", None)
        for key, value in facts.items():
            first, was = seen.setdefault(key, (str(ref.model), value))
            if value != was:
                fix = ("add `tokenizer: {source: base}` (or union) to the YAML to align vocabularies"
                       if key == "vocab_size" else "only models of one architecture and size merge")
                raise TunelabError(f"{where}: {first} has {key} {was} but {ref.model} has {value}; {fix}.")


def _parents(cfg) -> dict[str, str | int]:
    """Registry parents: every model and adapter the config names (once each), the base under its own role."""
    parents: dict[str, str | int] = {}
    added: set[str] = set()

    def add(role: str, path: str) -> None:
        if path in added:  # e.g. BASE+ADAPTER next to BASE itself
            return
        added.add(path)
        name, i = f"{role}:{Path(path).name}", 1
        while name in parents:
            i += 1
            name = f"{role}:{Path(path).name}_{i}"
        local = Path(path)
        parents[name] = registry_ref(local) if local.exists() else register_base_model(identity(path))

    for ref in named_models(cfg):
        add("base" if ref == cfg.base_model else "model", ref.model.path)
        if ref.lora:
            add("adapter", ref.lora.path)
    return parents


def merge_models(config: str | Path | dict, out: Path, seed: int = 0, show_progress: bool = True) -> MergeResult:
    """Run a mergekit config (a YAML file, as it is, or build_config's dict) into an HF folder at `out`.

    The folder also holds mergekit_config.yml (rerun it with `mergekit-yaml`), mergekit's README.md model card
    and merge.json; it is registered with every model and adapter the config names as parents.
    seed: for the random methods (dare_*, della), so a rerun gives the same weights."""
    _, run_merge, MergeOptions = _mergekit()
    cfg, text, where = load_config(config)
    for ref in named_models(cfg):
        if ref.lora:
            adapter_config(ref.lora.path)
    check_compatible(cfg, where)
    out = Path(out)
    with layout.atomic_folder(out) as tmp, tempfile.TemporaryDirectory(prefix="tunelab-lora-") as cache:
        # mergekit names its merged-LoRA cache by the paths alone: an adapter retrained in place would reuse a
        # stale merge from a shared cache, so each merge gets a fresh one
        options = MergeOptions(lora_merge_cache=cache, random_seed=seed, quiet=not show_progress)
        try:
            run_merge(cfg, str(tmp), options, config_source=text)
        except (RuntimeError, ValueError, TypeError, OSError) as e:
            raise TunelabError(f"mergekit could not merge {where}: {e}") from None
        info = {"made_from": [str(r) for r in named_models(cfg)], "method": cfg.merge_method,
                "mergekit_config": "mergekit_config.yml", "seed": seed,
                "base_model": identity(cfg.base_model.model.path) if cfg.base_model else None}
        layout.write_manifest(tmp, "merge", info)
    rid = register_folder("merge", out, _parents(cfg), meta={"method": cfg.merge_method, "tool": "mergekit"})
    return MergeResult(out, "model", info, rid)
