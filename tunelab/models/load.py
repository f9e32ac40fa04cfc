"""Load model + tokenizer from any spec; GGUF files are converted once into an HF folder in the cache."""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import torch

from tunelab.config.paths import tunelab_home
from tunelab.errors import TunelabError
from tunelab.models.dtypes import resolve_dtype
from tunelab.models.overrides import apply_rope_scaling, set_chat_template
from tunelab.models.quant import bnb_inference_config
from tunelab.models.resolve import ModelSource, fingerprint, resolve

log = logging.getLogger(__name__)


def _need_gguf() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise TunelabError(
            "reading GGUF files needs the `gguf` package: `pip install gguf` (tunelab depends on it; "
            "your environment lacks it)."
        )


def converted_dir(gguf_path: Path) -> Path:
    """The cache folder that holds (or will hold) the HF conversion of a GGUF file."""
    return tunelab_home() / "models" / f"{gguf_path.stem}-{fingerprint(gguf_path)}"


def convert_gguf(gguf_path: Path, out_dir: Path | None = None) -> Path:
    """Dequantize a GGUF file into a plain HF safetensors folder (fp32, lossless), atomically.

    transformers loads GGUF with `gguf_file=`, but the result carries a gguf `quantization_config`
    that makes `save_pretrained` refuse; we drop it and save plain weights once.
    """
    _need_gguf()
    out = out_dir or converted_dir(gguf_path)
    if (out / "config.json").is_file():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    t0 = time.time()
    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
            hf_logging.disable_progress_bar()
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except TunelabError:
        raise
    except Exception as e:  # transformers raises many types for a bad file
        raise TunelabError(
            f"could not read GGUF file {gguf_path}: {type(e).__name__}: {e}. The file may be corrupt or "
            "truncated (re-download it) or use an architecture transformers cannot read from GGUF."
        ) from None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None  # the weights are plain fp32 tensors now
    model.is_quantized = False
    model.config.use_cache = True
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        meta = {"source_gguf": str(gguf_path), "fingerprint": fingerprint(gguf_path),
                "gguf_metadata": gguf_metadata(gguf_path), "seconds": round(time.time() - t0, 1)}
        (tmp / "tunelab_source.json").write_text(json.dumps(meta, indent=2))
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if (out / "config.json").is_file():  # another process finished the same conversion first
            return out
        raise
    return out


def gguf_metadata(gguf_path: Path) -> dict:
    """The scalar `general.*` fields of a GGUF file (name, license, size label, ...).

    Read from the conversion's tunelab_source.json when the file was converted already: parsing a GGUF
    reads its whole vocabulary (seconds for a 49k-token tokenizer)."""
    try:
        return json.loads((converted_dir(gguf_path) / "tunelab_source.json").read_text())["gguf_metadata"]
    except (OSError, ValueError, KeyError):
        pass  # not converted yet (or an older cache): read the GGUF itself below
    _need_gguf()
    import gguf

    try:
        reader = gguf.GGUFReader(str(gguf_path))
    except Exception as e:
        raise TunelabError(f"could not read GGUF file {gguf_path}: {e}; the file may be corrupt.") from None
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("general."):
            try:
                meta[key] = field.contents()
            except Exception:  # some array types have no plain contents
                continue
    return meta


def local_dir(source: ModelSource) -> Path | str:
    """A from_pretrained-able location for a source (converting GGUF on first use)."""
    if source.kind in ("bundled", "gguf"):
        assert source.path is not None
        return convert_gguf(source.path)
    if source.kind == "hf_dir":
        assert source.path is not None
        return source.path
    return source.hub_id or source.spec


def _hub_kwargs(source: ModelSource) -> dict:
    return {"local_files_only": True} if source.kind == "hub" else {}


def _hub_error(source: ModelSource, e: Exception) -> TunelabError:
    return TunelabError(
        f"model {source.spec!r} is not in the local Hugging Face cache and tunelab does not download "
        f"weights at run time ({type(e).__name__}). Download it once with `huggingface-cli download "
        f"{source.spec}` on a connected machine, or point at a local folder or .gguf file."
    )


def load_config(spec: str):
    """Load a model's transformers config (no weights)."""
    from transformers import AutoConfig

    source = resolve(spec)
    try:
        return AutoConfig.from_pretrained(local_dir(source), **_hub_kwargs(source))
    except TunelabError:
        raise
    except (OSError, ValueError) as e:
        if source.kind == "hub":
            raise _hub_error(source, e) from None
        raise TunelabError(f"cannot read the config of {spec!r}: {e}") from None


def load_tokenizer(spec: str, chat_template: str | None = None):
    """Load the tokenizer of a model spec; pad token defaults to eos.

    chat_template: a .jinja file or `chatml` to replace the model's chat template (None: keep it).
    """
    from transformers import AutoTokenizer

    source = resolve(spec)
    try:
        tok = AutoTokenizer.from_pretrained(local_dir(source), **_hub_kwargs(source))
    except TunelabError:
        raise
    except (OSError, ValueError) as e:
        if source.kind == "hub":
            raise _hub_error(source, e) from None
        raise TunelabError(f"cannot load the tokenizer of {spec!r}: {e}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return set_chat_template(tok, chat_template)


def load_model(spec: str, dtype: str = "checkpoint", quantization_config=None, device: str | None = None,
               chat_template: str | None = None, rope_scaling: dict | None = None, load_in: str | None = None):
    """Load (model, tokenizer) for a spec in the checkpoint's dtype unless `dtype` says otherwise.

    dtype: checkpoint | auto | bf16 | fp16 | fp32 (auto picks bf16 where the hardware supports it).
    load_in: 8bit | 4bit quantizes the decoder's linear layers with bitsandbytes on load (int8 / NF4
    computing in `dtype`; tunelab.models.quant); a GGUF file is dequantized first, then quantized.
    chat_template: a .jinja file or `chatml` replacing the model's template (tunelab.models.overrides).
    rope_scaling: {"type": linear | dynamic | yarn, "factor": F} applied to the config before loading.
    """
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # tunelab shows its own progress
    source = resolve(spec)
    where = local_dir(source)
    config = load_config(spec)
    torch_dtype = resolve_dtype(dtype, config, device=device)
    tok = load_tokenizer(spec, chat_template)
    kwargs = dict(dtype=torch_dtype, **_hub_kwargs(source))
    if rope_scaling:
        kwargs["config"] = apply_rope_scaling(config, rope_scaling["type"], rope_scaling["factor"])
    if load_in is not None:
        if quantization_config is not None:
            raise TunelabError("load_model takes load_in or quantization_config, not both.")
        quantization_config = bnb_inference_config(load_in, torch_dtype)
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
        if device:  # bitsandbytes quantizes as the weights land on their device: place them there
            kwargs["device_map"] = {"": device}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = AutoModelForCausalLM.from_pretrained(where, **kwargs)
    except TunelabError:
        raise
    except (OSError, ValueError) as e:
        if source.kind == "hub":
            raise _hub_error(source, e) from None
        raise TunelabError(f"cannot load model weights from {where}: {e}") from None
    if device and quantization_config is None:
        model.to(device)
    model.eval()
    model.tunelab_source = source  # remembered for run.json / adapter checks
    return model, tok
