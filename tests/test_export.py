"""tunelab export: GGUF files that transformers reads back to the source's logits, LoRA GGUFs that rebuild the
adapter's deltas through gguf's reader, Modelfiles, vLLM checks, and no half-written output on errors."""

import json

import pytest
import torch

from tests.test_merge import make_adapter
from tunelab.errors import TunelabError
from tunelab.export import export
from tunelab.runs import lineage, roots

PROMPTS = torch.tensor([[1, 504, 3014, 28, 905, 17], [1, 44, 9000, 377, 12, 2]])
# max |logit difference| / max |source logit| allowed per GGUF tensor type (tiny random Llama, fixed seed)
TOLERANCE = {"f32": 1e-5, "f16": 2e-3, "q8_0": 2e-2, "q4_0": 0.25}


def logits(model):
    with torch.no_grad():
        return model(PROMPTS).logits.float()


@pytest.mark.parametrize("quant", list(TOLERANCE))
def test_gguf_round_trip_through_transformers(quant, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    res = export(str(tiny_model_dir), tmp_path / "g", "gguf", quant=quant)
    name = res.info["gguf_file"]
    back = AutoModelForCausalLM.from_pretrained(res.out, gguf_file=name, dtype=torch.float32)
    src = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    want, got = logits(src), logits(back)
    rel = ((got - want).abs().max() / want.abs().max()).item()
    print(f"{quant}: max relative logit error {rel:.2e}")
    assert rel < TOLERANCE[quant]
    assert sorted(p.name for p in res.out.iterdir()) == sorted([name, "Modelfile", "export.json"])
    assert 'PARAMETER stop "<|im_end|>"' in (res.out / "Modelfile").read_text()
    assert {n["name"] for n in roots(lineage(str(res.out))).get("base_model", [])}


@pytest.mark.parametrize("quant", ["q4_0", "q5_1"])
def test_low_bit_gguf_keeps_the_head_at_q8_0(quant, tiny_model_dir, tmp_path):
    """As llama.cpp's quantizer does: a 4/5-bit file holds the output head (token_embd when tied) at 8 bits."""
    from gguf import GGUFReader

    res = export(str(tiny_model_dir), tmp_path / "g", "gguf", quant=quant)
    types = {t.name: t.tensor_type.name for t in GGUFReader(res.out / res.info["gguf_file"]).tensors}
    heads = [n for n in ("output.weight", "token_embd.weight") if n in types]
    assert heads and all(types[n] == "Q8_0" for n in heads), types
    assert types["blk.0.attn_q.weight"] == quant.upper()


def test_gguf_tokenizer_matches_llama_cpps_own_conversion(tiny_model_dir, tmp_path):
    """The bundled SmolLM2 GGUF was written by llama.cpp's converter: our tokenizer metadata must equal its."""
    import gguf

    from tunelab.models import bundled_gguf_path

    res = export(str(tiny_model_dir), tmp_path / "g", "gguf", quant="f16")
    ours = gguf.GGUFReader(str(res.out / res.info["gguf_file"])).fields
    ref = gguf.GGUFReader(str(bundled_gguf_path())).fields
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                "tokenizer.chat_template", "general.architecture"):
        assert ours[key].contents() == ref[key].contents(), key


def test_unsupported_architecture_is_refused_and_nothing_is_left(tokenizer, tmp_path):
    from tunelab.models import tiny_model

    model, tok = tiny_model("qwen2", tokenizer=tokenizer)
    model.save_pretrained(tmp_path / "qwen")
    tok.save_pretrained(tmp_path / "qwen")
    with pytest.raises(TunelabError, match="Qwen2ForCausalLM is not one the GGUF writer supports"):
        export(str(tmp_path / "qwen"), tmp_path / "out", "gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["qwen"]


def test_gguf_lora_rebuilds_each_delta(tiny_model_dir, tmp_path):
    import gguf
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tunelab.models.gguf_write import permute_qk

    adapter = make_adapter(tiny_model_dir, tmp_path / "ad", r=4, seed=9, use_rslora=True,
                           alpha_pattern={"v_proj": 3.0})
    res = export(str(adapter), tmp_path / "lora", "gguf-lora")
    reader = gguf.GGUFReader(str(res.out / res.info["gguf_file"]))
    assert reader.fields["general.type"].contents() == "adapter"
    assert reader.fields["adapter.type"].contents() == "lora"
    alpha = reader.fields["adapter.lora.alpha"].contents()
    t = {x.name: torch.from_numpy(x.data.copy()) for x in reader.tensors}
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(adapter))
    for hf, name, heads in (("q_proj", "attn_q", 4), ("v_proj", "attn_v", None)):
        want = peft.get_submodule(f"base_model.model.model.layers.0.self_attn.{hf}").get_delta_weight("default")
        if heads:
            want = permute_qk(want, heads)  # llama.cpp's row order
        a, b = t[f"blk.0.{name}.weight.lora_a"], t[f"blk.0.{name}.weight.lora_b"]
        got = (alpha / a.shape[0]) * b @ a  # llama.cpp: scale = alpha / rank
        torch.testing.assert_close(got, want.detach(), atol=1e-6, rtol=1e-5)
    assert "ADAPTER ./" in (res.out / "Modelfile").read_text()


def test_vllm_limits(tiny_model_dir, tmp_path):
    adapter = make_adapter(tiny_model_dir, tmp_path / "ad", r=32, seed=10)
    with pytest.raises(TunelabError, match="rank 32 exceeds --max-lora-rank 16; serve with --max-lora-rank 32"):
        export(str(adapter), tmp_path / "v", "vllm")
    with pytest.raises(TunelabError, match="vLLM accepts"):
        export(str(adapter), tmp_path / "v", "vllm", max_lora_rank=24)
    dora = make_adapter(tiny_model_dir, tmp_path / "dora", r=8, seed=11, use_dora=True)
    with pytest.raises(TunelabError, match="DoRA"):
        export(str(dora), tmp_path / "v", "vllm")
    res = export(str(adapter), tmp_path / "v", "vllm", max_lora_rank=64)
    assert "--lora-modules ad=" in res.info["commands"][0]
    assert json.loads((res.out / "adapter_config.json").read_text())["r"] == 32


def test_cli_export_hf(tunelab, tiny_model_dir, tmp_path):
    code, out, err = tunelab("export", tiny_model_dir, "--format", "hf", "--out", tmp_path / "hf")
    assert code == 0, err
    assert (tmp_path / "hf" / "model.safetensors").is_file() and "wrote hf export" in out
