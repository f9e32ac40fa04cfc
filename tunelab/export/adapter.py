"""A PEFT LoRA adapter as a llama.cpp LoRA GGUF (scalings folded in) or as a folder vLLM's --lora-modules serves."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import torch

from tunelab.errors import TunelabError
from tunelab.merge._sources import base_spec, registry_ref
from tunelab.models import identity, load_config, resolve
from tunelab.models.gguf_write import SUPPORTED, permute_qk
from tunelab.runs import layout
from tunelab.runs.adapter_folder import read_adapter_folder

VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's allowed --max-lora-rank values
KEY = re.compile(r"^base_model\.model\.(.+)\.lora_([AB])\.weight$")


def _pattern(patterns: dict, module: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: the first key that matches the end of the module name."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?{key}$", module):
            return value
    return default


def module_scaling(cfg: dict, module: str, rank: int) -> float:
    """The scale PEFT applies to `module`'s B @ A: alpha/r, or alpha/sqrt(r) for rsLoRA, per-module patterns first."""
    alpha = float(_pattern(cfg.get("alpha_pattern"), module, cfg.get("lora_alpha", cfg["r"])))
    return alpha / (rank ** 0.5) if cfg.get("use_rslora") else alpha / rank


def lora_tensors(folder: Path, cfg: dict, config) -> dict[str, torch.Tensor]:
    """{llama.cpp name: A or B} with each module's scale folded into B so that llama.cpp's one global
    alpha (scale = alpha / rank of the module) reproduces PEFT's delta; Q/K rows permuted as in the model."""
    import gguf
    from safetensors.torch import load_file

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in load_file(str(folder / layout.ADAPTER_WEIGHTS)).items():
        m = KEY.match(key)
        if m is None:
            raise TunelabError(f"{folder}: weight {key!r} is not a LoRA A/B matrix of a linear layer; llama.cpp "
                               "LoRA GGUFs hold only those (no embeddings, no modules_to_save).")
        pairs.setdefault(m.group(1), {})[m.group(2)] = t.to(torch.float32)
    alpha = float(cfg.get("lora_alpha", cfg["r"]))
    out = {}
    for module, ab in sorted(pairs.items()):
        a, b = ab["A"], ab["B"]  # (r, in), (out, r)
        rank = a.shape[0]
        b = b * (module_scaling(cfg, module, rank) * rank / alpha)
        if module.endswith("q_proj"):
            b = permute_qk(b, config.num_attention_heads)
        elif module.endswith("k_proj"):
            b = permute_qk(b, config.num_key_value_heads)
        name = names.get_name(module + ".weight", try_suffixes=(".weight",))
        if name is None:
            raise TunelabError(f"{folder}: module {module!r} has no llama.cpp tensor name.")
        out[f"{name}.lora_a"], out[f"{name}.lora_b"] = a, b
    return out


def _check_common(folder: Path, cfg: dict, what: str) -> None:
    if cfg.get("use_dora"):
        raise TunelabError(f"{folder}: a DoRA adapter; {what} does not run DoRA. Merge it into the base "
                           "(`tunelab merge --unload`) and export the model instead.")
    saved = [m for m in cfg.get("modules_to_save") or [] if re.search(r"embed|lm_head|wte|output", m)]
    if saved:
        raise TunelabError(f"{folder}: modules_to_save {saved} (full embedding/head copies); {what} cannot load "
                           "them. Merge the adapter into the base (`tunelab merge --unload`) instead.")


def write_gguf_lora(folder: Path, cfg: dict, config, path: Path, name: str) -> dict:
    import gguf

    archs = list(getattr(config, "architectures", None) or [])
    arch = next((SUPPORTED[a] for a in archs if a in SUPPORTED), None)
    if arch is None:
        raise TunelabError(f"{folder}: the base's architecture {archs} is not one the GGUF writer supports "
                           f"({', '.join(SUPPORTED)}).")
    tensors = lora_tensors(folder, cfg, config)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_name(name)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(cfg.get("lora_alpha", cfg["r"])))
    for tname, t in tensors.items():
        writer.add_tensor(tname, t.numpy().astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"architecture": arch, "tensors": len(tensors), "alpha": float(cfg.get("lora_alpha", cfg["r"]))}


def check_vllm(folder: Path, cfg: dict, max_lora_rank: int) -> int:
    """vLLM's limits: --max-lora-rank in its set, every module's rank within it, no DoRA, no embedding copies."""
    if max_lora_rank not in VLLM_MAX_LORA_RANKS:
        raise TunelabError(f"--max-lora-rank {max_lora_rank}: vLLM accepts {', '.join(map(str, VLLM_MAX_LORA_RANKS))}.")
    _check_common(folder, cfg, "vLLM")
    rank = max([int(cfg["r"]), *map(int, (cfg.get("rank_pattern") or {}).values())])
    if rank > max_lora_rank:
        fit = next((r for r in VLLM_MAX_LORA_RANKS if r >= rank), None)
        raise TunelabError(f"{folder}: rank {rank} exceeds --max-lora-rank {max_lora_rank}; "
                           + (f"serve with --max-lora-rank {fit}." if fit else "vLLM serves ranks up to 512."))
    return rank


def export_adapter(folder: Path, out: Path, fmt: str, model: str | None, max_lora_rank: int) -> tuple[dict, dict]:
    """Write `folder` as a gguf-lora or vllm export at `out`; returns (manifest info, registry parents)."""
    adapter = read_adapter_folder(folder)
    cfg = adapter.lora_config()
    adapter.safetensors()  # only safetensors weights are read: a pickled .bin is refused with the fix
    spec = base_spec(folder, model)
    config = load_config(spec)
    name = folder.resolve().name
    with layout.atomic_folder(out) as tmp:
        if fmt == "gguf-lora":
            _check_common(folder, cfg, "llama.cpp")
            fname = f"{name}-lora-f32.gguf"
            info = write_gguf_lora(folder, cfg, config, tmp / fname, name)
            source = resolve(spec)
            base_gguf = str(source.path) if source.kind in ("gguf", "bundled") else "./base.gguf"
            from tunelab.export.ollama import modelfile

            (tmp / "Modelfile").write_text(modelfile(base_gguf, None, [], adapter=fname), encoding="utf-8")
            info.update(files=[fname, "Modelfile"], gguf_file=fname, commands=[
                f"llama-server -m {base_gguf} --lora {out}/{fname}", f"ollama create {name} -f {out}/Modelfile"])
        else:
            rank = check_vllm(folder, cfg, max_lora_rank)
            for f in folder.iterdir():
                if f.name in (layout.ADAPTER_CONFIG, layout.ADAPTER_WEIGHTS) or f.name.startswith("tokenizer"):
                    shutil.copy2(f, tmp / f.name)
            info = {"rank": rank, "files": sorted(p.name for p in tmp.iterdir()), "commands": [
                f"vllm serve {spec} --enable-lora --max-lora-rank {next(r for r in VLLM_MAX_LORA_RANKS if r >= rank)} "
                f"--lora-modules {name}={out.resolve()}"]}
        info = {"format": fmt, "made_from": [str(folder.resolve())], "base_model": identity(spec), **info}
        layout.write_manifest(tmp, "export", info)
    return info, {"adapter": registry_ref(folder)}
