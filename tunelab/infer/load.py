"""Pick and build an engine: the batched one where it runs the model and adapters, else the generate-based one."""

from __future__ import annotations

from pathlib import Path

import torch

from tunelab.errors import TunelabError
from tunelab.infer.hf import GenerateEngine, check_adapter
from tunelab.models import check_load_in, quantization_info
from tunelab.runs.adapter_folder import read_adapter_folder

KINDS = ("auto", "batched", "generate", "llamacpp", "routed")


def resolve_device(device: str = "auto") -> str:
    """auto: CUDA when present, else the CPU. An explicit device that is not there is an error."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise TunelabError(f"--device {device}: no CUDA device is visible here; use --device cpu or auto.")
    if device != "cpu" and not device.startswith("cuda"):
        raise TunelabError(f"--device {device!r}: use auto, cpu, cuda or cuda:N.")
    return device


def adapter_names(adapters) -> dict[str, str]:
    """{name: folder}; a list gets the names adapter-1, adapter-2, ... in order."""
    if isinstance(adapters, dict):
        return {str(k): str(v) for k, v in adapters.items()}
    return {f"adapter-{i + 1}": str(a) for i, a in enumerate(adapters)}


def trained_rope_scaling(folders) -> dict | None:
    """The `model.rope_scaling` the adapters were trained with (their run.json), so the base runs with the
    positions they learned; adapters trained with different scalings cannot share one base: an error."""
    import json

    seen = {str(f): read_adapter_folder(f).rope_scaling for f in folders if (Path(f) / "run.json").is_file()}
    found = {json.dumps(v, sort_keys=True) for v in seen.values()}
    if len(found) > 1:
        listing = "; ".join(f"{k}: {v}" for k, v in seen.items())
        raise TunelabError(f"these adapters were trained with different model.rope_scaling ({listing}); "
                           "evaluate or serve them on separate engines.")
    return next(iter(seen.values()), None)


def _batched_reason(model, configs: dict[str, dict]) -> str | None:
    """Why the batched engine cannot run this model and these adapters (None: it can)."""
    from tunelab.infer.decoder import check_supported

    try:
        check_supported(model)
    except TunelabError as e:
        return str(e)
    if getattr(model, "hf_quantizer", None) is not None and quantization_info(model) is None:
        return "quantized weights other than bitsandbytes' int8 / NF4 run on the generate-based engine"
    from tunelab.infer.lora import unsupported

    for name, cfg in configs.items():
        why = unsupported(cfg)
        if why:
            return f"adapter {name}: {why}"
    return None


def _llamacpp_runs(model) -> bool:
    from tunelab.infer.llamacpp import available, unsupported

    return available() and unsupported(model) is None


def _folder(spec: str) -> Path:
    """The model's local folder (a GGUF written from its weights takes the tokenizer files there)."""
    from tunelab.models import local_dir, resolve

    return local_dir(resolve(spec))


def kind_for(adapters: dict[str, str | Path]) -> tuple[str, str | None]:
    """The engine kind that runs every one of these adapter folders, and why when it is not the batched one:
    a server loads its adapters later, on demand, so it picks the engine from the folders it will serve."""
    from tunelab.infer.lora import unsupported

    for name, folder in adapters.items():
        why = unsupported(read_adapter_folder(folder).config)
        if why:
            return "generate", f"adapter {name}: {why} run on the generate-based engine"
    return "auto", None


def load_engine(spec: str, adapters=(), dtype: str = "auto", device: str = "auto", kind: str = "auto",
                max_batch: int = 64, batch_size: int = 16, merge: str | Path | None = None,
                chat_template: str | None = None, rope_scaling: dict | None = None, load_in: str | None = None,
                interactive: bool = False):
    """Load `spec` once with each adapter folder attached under its name.

    kind: auto (the batched engine when the model is a Llama-family one and every adapter is plain LoRA,
    else the generate-based engine; on the CPU with max_batch=1, one request at a time, the llama.cpp engine
    where it runs them), batched, generate, llamacpp (tunelab.infer.llamacpp: llama.cpp on a GGUF of these
    weights, one request at a time) or routed (tunelab.infer.routed: a request alone on llama.cpp, more at
    once batched). interactive: requests come as users send them, often one at a time (a server, the
    playground): auto then picks the routed engine on the CPU where llama.cpp runs the model. Evaluation
    keeps the batched engine (its results do not depend on what else runs). dtype: auto = bf16 where the
    device runs it fast.
    chat_template: a .jinja file or `chatml` replacing the model's chat template. rope_scaling
    ({"type", "factor"}): default, the one the adapters were trained with (their run.json), else none.
    load_in: 8bit | 4bit: the base's linear layers in bitsandbytes int8 / NF4 (both engines run them; LoRA
    adapters stay in `dtype` beside them).
    """
    from tunelab.models import load_model

    if kind not in KINDS:
        raise TunelabError(f"engine kind {kind!r} is not one of {', '.join(KINDS)}.")
    device = resolve_device(device)
    if check_load_in(load_in) and merge is not None:
        raise TunelabError(f"--merged with --load-in {load_in}: merging into quantized weights rounds them twice; "
                           f"merge first (`tunelab merge {merge} --unload --out DIR`) and load DIR with --load-in.")
    named = adapter_names(adapters)
    if rope_scaling is None:
        rope_scaling = trained_rope_scaling([*named.values(), *([merge] if merge is not None else [])])
    model, tok = load_model(spec, dtype=dtype, device=device, chat_template=chat_template, rope_scaling=rope_scaling,
                            load_in=load_in)
    if merge is not None:
        from peft import PeftModel

        check_adapter(Path(merge), spec, model.config)
        model = PeftModel.from_pretrained(model, str(merge)).merge_and_unload()
    configs = {n: check_adapter(Path(p), spec, model.config) for n, p in named.items()}
    why = _batched_reason(model, configs)
    if kind in ("batched", "routed") and why:
        raise TunelabError(f"the {kind} engine cannot run this: {why}; use the generate-based engine.")
    auto_llamacpp = kind == "auto" and not why and (max_batch == 1 or interactive) and _llamacpp_runs(model)
    if kind == "llamacpp" or (auto_llamacpp and max_batch == 1):
        from tunelab.infer.llamacpp import LlamaCppEngine

        engine = LlamaCppEngine(model, tok, _folder(spec))
    elif kind == "routed" or auto_llamacpp:
        from tunelab.infer.routed import RoutedEngine

        engine = RoutedEngine(model, tok, _folder(spec), device, max_batch=max_batch)
    elif kind == "generate" or why:
        engine = GenerateEngine(model, tok, device, batch_size)
    else:
        from tunelab.infer.engine import BatchEngine

        engine = BatchEngine(model, tok, device, max_batch=max_batch)
    for n, p in named.items():
        engine.add_adapter(n, p)
    engine.spec = spec
    return engine
