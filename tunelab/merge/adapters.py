"""Adapters on one base merged by PEFT's add_weighted_adapter, or one adapter merged into its base (--unload).

PEFT's pitfalls are handled here rather than inherited: a merged name that is already loaded makes PEFT
return without merging (refused); element-wise methods need equal ranks (the error names them); DoRA
magnitude vectors and modules_to_save copies have no weighted-sum meaning (refused; --unload merges them);
per-module ranks only line up through `cat` or an `_svd` method; and PEFT copies the first adapter's
`use_rslora` into the merged config although every method folds each adapter's scaling into the new
matrices, so a merge of rsLoRA adapters would reload sqrt(r) times too strong (the flag is cleared).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path

from tunelab.errors import TunelabError
from tunelab.merge._sources import adapter_config, registry_ref, same_base
from tunelab.merge.storage import StorageReport
from tunelab.models import identity, load_model
from tunelab.runs import layout, register_folder

ELEMENTWISE = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")  # A and B merged separately
SVD = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")  # merged on B @ A
METHODS = (*ELEMENTWISE, "cat", *SVD)
NEEDS_DENSITY = tuple(m for m in METHODS if m.startswith(("ties", "dare", "magnitude_prune")))
SIGN_METHODS = ("total", "frequency")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


@dataclass
class MergeResult:
    """What a merge wrote: the folder, what it holds, and the storage report when asked for."""

    out: Path
    kind: str  # "adapter" (a PEFT folder) or "model" (an HF folder)
    info: dict
    registry_id: int | None = None
    storage: StorageReport | None = field(default=None)

    def text(self) -> str:
        lines = [f"wrote {self.kind} {self.out} ({self.info.get('method', 'unload')}"
                 + (f", rank {self.info['rank']}" if self.info.get("rank") else "")
                 + (f", dtype {self.info['dtype']}" if self.info.get("dtype") else "") + ")"]
        if self.registry_id is not None:
            lines.append(f"registered as #{self.registry_id} (`tunelab runs lineage {self.registry_id}`)")
        if self.storage is not None:
            lines.append(self.storage.text())
        return "\n".join(lines)


def _names(folders: list[Path]) -> list[str]:
    """Adapter names for PEFT: the folder names, made unique."""
    names: list[str] = []
    for f in folders:
        name, i = f.name or "adapter", 1
        while name in names:
            i += 1
            name = f"{f.name}_{i}"
        names.append(name)
    return names


def check_merge(configs: dict[str, dict], method: str, name: str, weights: list[float],
                density: float | None, majority_sign_method: str) -> None:
    """Refuse what add_weighted_adapter would merge wrongly, silently or not at all, naming the fix."""
    if method not in METHODS:
        raise TunelabError(f"--method {method!r}: choose one of {', '.join(METHODS)}.")
    if name in configs:
        raise TunelabError(f"--name {name!r} is already the name of an input adapter; PEFT would return without "
                           "merging. Pick another --name.")
    if len(weights) != len(configs):
        raise TunelabError(f"--weights has {len(weights)} values for {len(configs)} adapters; give one per adapter.")
    if method in NEEDS_DENSITY and (density is None or not 0 < density <= 1):
        raise TunelabError(f"--method {method} prunes each delta: give --density in (0, 1] (e.g. 0.5 keeps half).")
    if majority_sign_method not in SIGN_METHODS:
        raise TunelabError(f"--majority-sign {majority_sign_method!r}: one of {', '.join(SIGN_METHODS)}.")
    for n, cfg in configs.items():
        if cfg.get("use_dora"):
            raise TunelabError(f"adapter {n!r} is DoRA: its magnitude vectors have no weighted-sum merge and PEFT "
                               "would drop them. Merge it into the base with --unload instead.")
        if cfg.get("modules_to_save"):
            raise TunelabError(f"adapter {n!r} saves full copies of {cfg['modules_to_save']} (modules_to_save), "
                               "which are not low-rank deltas; merge it into the base with --unload instead.")
        if cfg.get("rank_pattern") and method in ELEMENTWISE:
            raise TunelabError(f"adapter {n!r} has per-module ranks (rank_pattern {cfg['rank_pattern']}); "
                               f"--method {method} adds A and B matrices element-wise and needs one rank "
                               "everywhere. Use --method cat or an _svd method.")
    ranks = {n: int(cfg["r"]) for n, cfg in configs.items()}
    if method in ELEMENTWISE and len(configs) > 1 and len(set(ranks.values())) > 1:
        listed = ", ".join(f"{n} r={r}" for n, r in ranks.items())
        raise TunelabError(f"--method {method} needs adapters of equal rank; got {listed}. Use --method cat "
                           "(rank = the sum) or an _svd method (rank = --svd-rank, default the largest).")


def merge_adapters(adapters: list[Path], out: Path, method: str = "cat", weights: list[float] | None = None,
                   density: float | None = None, majority_sign_method: str = "total", svd_rank: int | None = None,
                   name: str = "merged", model: str | None = None) -> MergeResult:
    """Merge LoRA adapters on one base into one PEFT adapter folder at `out`.

    adapters: PEFT adapter folders (training runs or not). method: one of METHODS. weights: one per
    adapter (default 1.0 each: the sum of the deltas). density: the kept fraction for ties/dare/
    magnitude_prune. svd_rank: the output rank of the _svd methods. model: the base (default: the adapters')."""
    from peft import PeftModel

    folders = [Path(a) for a in adapters]
    if not folders:
        raise TunelabError("tunelab merge needs at least one adapter folder.")
    names = _names(folders)
    configs = {n: adapter_config(f) for n, f in zip(names, folders)}
    weights = list(weights) if weights else [1.0] * len(folders)
    check_merge(configs, method, name, weights, density, majority_sign_method)
    spec = same_base(folders, model)
    with layout.atomic_folder(out) as tmp:
        base, tok = load_model(spec, dtype="fp32")
        peft_model = PeftModel.from_pretrained(base, str(folders[0]), adapter_name=names[0])
        for n, f in zip(names[1:], folders[1:]):
            peft_model.load_adapter(str(f), adapter_name=n)
        try:
            # svd_full_matrices=False: the same leading singular vectors as PEFT's default full SVD (which
            # also computes the discarded (out x out) U), 1.6x faster on a 1536 x 576 MLP delta
            peft_model.add_weighted_adapter(names, weights, name, combination_type=method, svd_rank=svd_rank,
                                            density=density, majority_sign_method=majority_sign_method,
                                            svd_full_matrices=False)
        except (ValueError, TypeError, RuntimeError) as e:
            raise TunelabError(f"PEFT could not merge {', '.join(names)} by {method}: {e}") from None
        merged = peft_model.peft_config[name]
        # every method folds each adapter's scaling into the new A/B: the merged adapter scales by alpha/r = 1
        peft_model.peft_config[name] = replace(merged, use_rslora=False, lora_alpha=merged.r)
        peft_model.save_pretrained(str(tmp / "peft"), selected_adapters=[name])
        saved = tmp / "peft" / name if (tmp / "peft" / name).is_dir() else tmp / "peft"
        for f in saved.iterdir():
            f.rename(tmp / f.name)
        shutil.rmtree(tmp / "peft")
        for fname in TOKENIZER_FILES:
            if (folders[0] / fname).is_file():
                shutil.copy2(folders[0] / fname, tmp / fname)
        info = {"made_from": [str(f.resolve()) for f in folders], "method": method, "weights": weights,
                "density": density, "majority_sign_method": majority_sign_method, "rank": merged.r,
                "base_model": identity(spec)}
        layout.write_manifest(tmp, "merge", info)
    parents: dict[str, str | int] = {f"adapter:{n}": registry_ref(f) for n, f in zip(names, folders)}
    rid = register_folder("merge", out, parents, meta={k: info[k] for k in ("method", "weights", "density", "rank")})
    return MergeResult(out, "adapter", info, rid)


def unload_adapter(adapter: Path, out: Path, model: str | None = None) -> MergeResult:
    """Merge one adapter into its base (PEFT's merge_and_unload) and save an HF folder in the base's dtype."""
    from peft import PeftModel

    adapter = Path(adapter)
    adapter_config(adapter)
    spec = same_base([adapter], model)
    with layout.atomic_folder(out) as tmp:
        base, tok = load_model(spec, dtype="checkpoint")
        dtype = str(next(base.parameters()).dtype).removeprefix("torch.")
        try:
            merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
        except (ValueError, KeyError, RuntimeError) as e:
            raise TunelabError(f"adapter {adapter} does not fit the base {spec!r}: {e}") from None
        merged.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
        info = {"made_from": [str(adapter.resolve())], "method": "unload", "dtype": dtype,
                "base_model": identity(spec)}
        layout.write_manifest(tmp, "merge", info)
    rid = register_folder("merge", out, {"adapter": registry_ref(adapter)}, meta={"method": "unload", "dtype": dtype})
    return MergeResult(out, "model", info, rid)

