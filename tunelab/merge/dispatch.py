"""`tunelab merge`: a mergekit YAML or full models through mergekit, else LoRA adapters through PEFT."""

from __future__ import annotations

import inspect
from pathlib import Path

from tunelab.errors import TunelabError
from tunelab.merge.adapters import MergeResult, merge_adapters, unload_adapter
from tunelab.merge.models import build_config, merge_models
from tunelab.merge.storage import storage_report
from tunelab.runs import layout

YAML_SUFFIXES = (".yaml", ".yml")


def merge(adapters: list[Path], out: Path, unload: bool = False, tenants: int | None = None,
          models: list[str] | None = None, seed: int = 0, **options) -> MergeResult:
    """`tunelab merge`, by what it is given:

    - one .yaml/.yml file: a mergekit config, run as it is (merge_models);
    - models: full models merged by mergekit, the YAML built from options (build_config's arguments);
    - adapters: LoRA adapters on one base into one adapter (options as merge_adapters), or with unload=True
      one adapter into its base.
    tenants: with adapters, also report the storage of that many tenants, adapters vs merged copies.
    seed: mergekit's random methods (dare_*, della)."""
    adapters = [Path(a) for a in adapters or []]
    is_yaml = len(adapters) == 1 and adapters[0].suffix.lower() in YAML_SUFFIXES
    if is_yaml or models:
        if adapters and models:
            raise TunelabError("give either adapter folders / one mergekit YAML, or --models; not both.")
        if unload or tenants:
            raise TunelabError("--unload and --tenants apply to adapter merges, not to mergekit merges.")
        if is_yaml and options:
            raise TunelabError(f"{adapters[0]} is a mergekit config, run as it is: put {_flags(options)} in the "
                               "YAML instead of on the command line.")
        if not is_yaml and "method" not in options:
            raise TunelabError("--models needs --method (linear, slerp, ties, ...).")
        _check_options(options, build_config, "full-model (--models) merges")
        config = adapters[0] if is_yaml else build_config(models=list(models or []), **options)
        return merge_models(config, out, seed=seed)
    if not adapters:
        raise TunelabError("tunelab merge needs adapter folders, one mergekit YAML, or --models.")
    for a in adapters:
        if (a / "config.json").is_file() and not (a / layout.ADAPTER_CONFIG).is_file():
            raise TunelabError(f"{a} is a full model, not an adapter: merge full models with mergekit, "
                               f"e.g. `tunelab merge --method linear --models {a},OTHER --out DIR`.")
    if unload:
        if len(adapters) != 1:
            raise TunelabError(f"--unload merges one adapter into its base; got {len(adapters)} adapters.")
        _check_options(options, unload_adapter, "--unload")
        res = unload_adapter(adapters[0], out, **options)
    else:
        _check_options(options, merge_adapters, "adapter merges")
        res = merge_adapters(adapters, out, **options)
    if tenants:
        served = [res.out] if res.kind == "adapter" else list(adapters)
        res.storage = storage_report(res.info["base_model"], served, tenants,
                                     merged=res.out if res.kind == "model" else None)
    return res


def _flags(options: dict) -> str:
    return ", ".join("--" + k.replace("_", "-") for k in options)


def _check_options(options: dict, fn, what: str) -> None:
    """Refuse an option the chosen merge does not take (e.g. --svd-rank with --models), naming it."""
    extra = {k: v for k, v in options.items() if k not in inspect.signature(fn).parameters}
    if extra:
        raise TunelabError(f"{_flags(extra)} {'does' if len(extra) == 1 else 'do'} not apply to {what}.")
