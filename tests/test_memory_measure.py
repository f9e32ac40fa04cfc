"""Estimate vs exact tensor accounting on tiny models, every method through the same check."""

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from tunelab.config.recipe import Recipe
from tunelab.memory._tracker import LiveTensors
from tunelab.memory.arch import arch_from_config
from tunelab.memory.estimate import estimate
from tunelab.memory.measure import COMPARED, compare, measure_model, prepare_model
from tunelab.models.build import quantize

DIMS = dict(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)


def _config(arch: str):
    if arch == "qwen2":
        return Qwen2Config(**DIMS)
    return LlamaConfig(head_dim=16, **DIMS)


def _check(arch, method, ckpt, batch, seq, *, precision="fp32", attention="sdpa", dropout=0.05, loss="hf",
           autocast=False):
    """Measure a tiny model's step and estimate it. autocast: bf16 compute as tunelab train runs it
    (fp32 master weights for full finetuning, a bf16 base for LoRA, fp32 around 4-bit for QLoRA)."""
    torch.manual_seed(0)
    cfg = _config(arch)
    rec = Recipe.model_validate({"method": method, "lora": {"r": 8, "dropout": dropout},
                                 "prompt": {"init_text": None},
                                 "train": {"grad_checkpointing": ckpt, "batch_size": batch, "max_length": seq,
                                           "precision": precision}})
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    if autocast and method in ("full", "qlora"):
        dtype = torch.float32
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation=attention)
    if method == "qlora":
        model = quantize(model, rec.qlora)
    model = prepare_model(model, rec)
    meas = measure_model(model, batch=batch, seq=seq, loss=loss, autocast=torch.bfloat16 if autocast else None)
    est = estimate(arch_from_config(cfg, name=arch), method, rec.train, rec.lora, rec.prompt, rec.qlora,
                   attention=attention, device="cpu", loss=loss, autocast=autocast)
    return compare(est, meas), meas


CASES = [  # (arch, method, ckpt, batch, seq)
    ("llama", "full", False, 2, 32), ("llama", "full", True, 2, 32),
    ("llama", "lora", False, 1, 64), ("llama", "lora", True, 4, 32),
    ("llama", "qlora", False, 2, 32), ("llama", "qlora", True, 2, 32),
    ("llama", "prompt", False, 2, 32), ("llama", "prompt", True, 2, 32),
    ("qwen2", "full", False, 2, 32), ("qwen2", "lora", True, 2, 32),
]


@pytest.mark.parametrize("arch,method,ckpt,batch,seq", CASES)
def test_estimate_matches_measurement(arch, method, ckpt, batch, seq):
    cmp, _ = _check(arch, method, ckpt, batch, seq)
    for c in COMPARED:
        tol = 0.05 if c == "total" else 0.10
        assert abs(cmp.error(c)) <= tol, (c, cmp.to_json())
    assert cmp.within()


@pytest.mark.parametrize("kw", [dict(precision="bf16"), dict(attention="eager"), dict(dropout=0.0),
                                dict(loss="chunked")])
def test_variants_match_measurement(kw):
    cmp, _ = _check("llama", "lora", False, 2, 32, **kw)
    assert cmp.within(), cmp.to_json()


@pytest.mark.parametrize("method,ckpt", [("full", False), ("full", True), ("lora", True), ("qlora", False)])
def test_autocast_as_tunelab_train_runs_it(method, ckpt):
    cmp, meas = _check("llama", method, ckpt, 2, 32, precision="bf16", autocast=True, loss="chunked")
    assert cmp.within(), cmp.to_json()
    if method == "full":  # fp32 master weights, gradients and states
        assert 4 * meas.params_total <= meas.bytes["weights"] < 4 * meas.params_total + 1024  # + rope buffers
        assert meas.bytes["gradients"] == 4 * meas.params_trainable


def test_full_finetuning_step_accounting_is_exact():
    cmp, meas = _check("llama", "full", False, 2, 32)
    n = sum(p.numel() for p in AutoModelForCausalLM.from_config(_config("llama")).parameters())
    assert meas.bytes["gradients"] == 4 * n
    assert meas.bytes["optimizer"] == 8 * n + 4 * 20  # two fp32 moments + a step counter per tensor
    assert meas.bytes["logits"] == 2 * 32 * 512 * 16  # held fp32 logits, log-softmax, two gradients
    assert meas.saved_for_backward <= meas.bytes["activations"] + meas.bytes["logits"]


def test_tracker_counts_storages_once_and_frees():
    live = LiveTensors(vocab_size=None)
    with live:
        a = torch.ones(1000)  # 4000 bytes
        view = a[:10]
        b = a * 2
        del b
        c = torch.ones(250)
    assert live.peak == 8000 and live.total == 5000
    del a, view, c
    assert live.total == 0


def test_saved_hooks_see_what_autograd_keeps():
    live = LiveTensors()
    w = torch.nn.Parameter(torch.randn(8, 8))
    with live:
        x = torch.randn(4, 8)
        with live.saved_hooks():
            y = torch.tanh(x @ w)  # mm keeps x; tanh keeps its output
        kept = live.saved_bytes(("temp",))
    assert kept == 2 * 4 * 8 * 4
    y.sum().backward()
