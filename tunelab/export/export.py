"""`tunelab export`: one source (model spec, adapter, merge folder) to one format, written atomically, registered."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tunelab.errors import TunelabError
from tunelab.merge._sources import adapter_config, base_spec, registry_ref
from tunelab.models import identity, load_model, local_dir, resolve
from tunelab.runs import layout, register_folder
from tunelab.runs.adapter_folder import is_adapter_folder
from tunelab.runs.record import model_license

FORMATS = ("hf", "gguf", "gguf-lora", "vllm")


@dataclass
class ExportResult:
    """What an export wrote, and the commands that serve it."""

    out: Path
    info: dict
    registry_id: int | None = None

    def text(self) -> str:
        lines = [f"wrote {self.info['format']} export {self.out}: {', '.join(self.info['files'])}"]
        lines += [f"  {c}" for c in self.info.get("commands", [])]
        if self.registry_id is not None:
            lines.append(f"registered as #{self.registry_id} (`tunelab runs lineage {self.registry_id}`)")
        return "\n".join(lines)


def _load_source(source: str, model: str | None):
    """(model, tokenizer, tokenizer folder, base spec, adapter folder or None) for a model or adapter source."""
    path = Path(source)
    if is_adapter_folder(path):
        from peft import PeftModel

        adapter_config(path)  # a LoRA folder, or the error says what it lacks
        spec = base_spec(path, model)
        base, tok = load_model(spec, dtype="checkpoint")
        merged = PeftModel.from_pretrained(base, str(path)).merge_and_unload()
        return merged, tok, Path(local_dir(resolve(spec))), spec, path
    m, tok = load_model(source, dtype="checkpoint")
    folder = local_dir(resolve(source))
    if not isinstance(folder, Path):
        raise TunelabError(f"{source}: export reads the model's files; give a local folder or .gguf file.")
    return m, tok, folder, source, None


def _gguf(model, tok, folder: Path, tmp: Path, stem: str, quant: str, spec: str, pre: str | None) -> dict:
    from tunelab.export.ollama import write_modelfile
    from tunelab.models.gguf_write import check_exportable, write_gguf

    check_exportable(model.config, folder, quant)
    name = f"{stem}-{quant}.gguf"
    info = write_gguf(model, tok, folder, tmp / name, quant, name=stem, license=model_license(identity(spec)),
                      description=f"exported by tunelab from {spec}", pre=pre)
    write_modelfile(tmp, name, tok)
    return {**info, "files": [name, "Modelfile"], "gguf_file": name,
            "commands": [f"ollama create {stem} -f {{out}}/Modelfile", f"llama-server -m {{out}}/{name}"]}


def export(source: str, out: Path, format: str = "gguf", quant: str = "f16", model: str | None = None,
           pre_tokenizer: str | None = None, max_lora_rank: int = 16) -> ExportResult:
    """Export `source` (a model spec or folder, or a PEFT adapter folder: merged into its base first, except for
    gguf-lora and vllm) to `out` as `format` (hf, gguf, gguf-lora, vllm). quant: the GGUF tensor type.
    model: the adapter's base (default: the one it records). pre_tokenizer: llama.cpp's name, when the probe
    does not recognise the tokenizer. max_lora_rank: vLLM's --max-lora-rank the adapter must fit."""
    if format not in FORMATS:
        raise TunelabError(f"--format {format!r}: one of {', '.join(FORMATS)}.")
    stem = Path(source).name.removesuffix(".gguf") or "model"
    if format in ("gguf-lora", "vllm"):
        from tunelab.export.adapter import export_adapter

        info, parents = export_adapter(Path(source), out, format, model, max_lora_rank)
    else:
        m, tok, folder, spec, adapter = _load_source(source, model)
        with layout.atomic_folder(out) as tmp:
            if format == "hf":
                m.save_pretrained(str(tmp), safe_serialization=True)
                tok.save_pretrained(str(tmp))
                info = {"files": sorted(p.name for p in tmp.iterdir()), "dtype": str(m.dtype).removeprefix("torch.")}
            else:
                info = _gguf(m, tok, folder, tmp, stem, quant, spec, pre_tokenizer)
            info = {"format": format, "made_from": [str(Path(source).resolve()) if adapter else spec],
                    "base_model": identity(spec), **info}
            info["commands"] = [c.format(out=out) for c in info.get("commands", [])]
            layout.write_manifest(tmp, "export", info)
        parents = {"adapter": registry_ref(adapter)} if adapter else {"model": registry_ref(folder)}
    rid = register_folder("export", out, parents, meta={k: info.get(k) for k in ("format", "quant")})
    return ExportResult(out, json.loads(json.dumps(info, default=str)), rid)
