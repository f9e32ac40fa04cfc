"""A Llama-family HF model as a GGUF file: llama.cpp's tensor names, its Q/K row order, f16/bf16/q8_0/q4/q5."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from tunelab.errors import TunelabError
from tunelab.models._gguf_vocab import add_tokenizer, tokenizer_model

SUPPORTED = {"LlamaForCausalLM": "llama"}  # HF architecture -> GGUF architecture
QUANTS = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")


def check_exportable(config, folder: Path, quant: str) -> str:
    """The GGUF architecture name, or a TunelabError (raised before any file is written)."""
    if quant not in QUANTS:
        raise TunelabError(f"--quant {quant!r}: one of {', '.join(QUANTS)}.")
    archs = list(getattr(config, "architectures", None) or [type(config).__name__])
    arch = next((SUPPORTED[a] for a in archs if a in SUPPORTED), None)
    if arch is None:
        raise TunelabError(f"{folder}: architecture {', '.join(archs)} is not one the GGUF writer supports "
                           f"({', '.join(SUPPORTED)}); use llama.cpp's convert_hf_to_gguf.py, or --format hf.")
    tokenizer_model(folder)
    return arch


def permute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF's rotary layout (halves) -> llama.cpp's (interleaved pairs), per head, on the output rows. # (out, in)"""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tensor_type(quant: str, name: str, array: np.ndarray, tied: bool):
    """The GGML type a tensor is stored as: 1-D tensors stay f32; rows that do not fill a block fall back to f16;
    at 4 and 5 bits the output head (token_embd when `tied`: llama.cpp then reads it as the head) is kept at
    q8_0, as llama.cpp's own quantizer does: it gives the head q6_K, or q8_0 when rows do not fill q6_K's
    256-blocks (the bundled SmolLM2 Q4_1 file holds token_embd as Q8_0), and gguf-py cannot write q6_K. An
    untied token_embd takes the file's type, as there."""
    import gguf

    if quant == "f32" or array.ndim == 1:
        return gguf.GGMLQuantizationType.F32
    if quant[:2] in ("q4", "q5") and (name == "output.weight" or (tied and name == "token_embd.weight")):
        quant = "q8_0"
    qtype = gguf.GGMLQuantizationType[quant.upper()]
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    return qtype if array.shape[-1] % block == 0 else gguf.GGMLQuantizationType.F16


def _file_type(quant: str) -> int:
    import gguf

    plain = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "bf16": gguf.LlamaFileType.MOSTLY_BF16}  # ALL_F32 is 0: look it up, never `or` past it
    return plain[quant] if quant in plain else gguf.LlamaFileType[f"MOSTLY_{quant.upper()}"]


def llama_tensors(state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """HF state dict -> {GGUF name: tensor} with Q/K permuted; a TunelabError for a tensor with no GGUF name."""
    import gguf

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    out = {}
    for key, w in state.items():
        if key == "lm_head.weight" and config.tie_word_embeddings:
            continue  # llama.cpp uses token_embd when output.weight is absent
        if key.endswith("rotary_emb.inv_freq"):
            continue
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise TunelabError(f"tensor {key!r} has no llama.cpp name; the model is not a plain Llama.")
        if key.endswith("q_proj.weight"):
            w = permute_qk(w, config.num_attention_heads)
        elif key.endswith("k_proj.weight"):
            w = permute_qk(w, config.num_key_value_heads)
        out[name] = w
    return out


def write_gguf(model, tokenizer, folder: Path, path: Path, quant: str = "f16", name: str | None = None,
               license: str | None = None, description: str | None = None, pre: str | None = None) -> dict:
    """Write `model` (a loaded Llama, HF folder `folder` for the tokenizer files) as a GGUF file at `path`."""
    import gguf

    config = model.config
    arch = check_exportable(config, folder, quant)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope = (getattr(config, "rope_parameters", None) or {}).get("rope_theta") or getattr(config, "rope_theta", 1e4)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name or folder.name)
    if license:
        writer.add_license(license)
    if description:
        writer.add_description(description)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(float(rope))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(head_dim)
    writer.add_file_type(_file_type(quant))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    pre_used = add_tokenizer(writer, folder, tokenizer, config.vocab_size, pre)
    types: dict[str, str] = {}
    tensors = llama_tensors(model.state_dict(), config)
    for tname, w in tensors.items():
        array = w.detach().to(torch.float32).cpu().numpy()
        qtype = _tensor_type(quant, tname, array, tied="output.weight" not in tensors)
        if qtype == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(tname, array)
        elif qtype == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(tname, array.astype(np.float16))
        else:
            writer.add_tensor(tname, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
        types[qtype.name] = types.get(qtype.name, 0) + 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"architecture": arch, "quant": quant, "tensor_types": types, "pre_tokenizer": pre_used}
