"""`tunelab lint` / preflight: each rule fires on its mistake and stays quiet on a clean recipe."""

import json

import pytest

from tunelab.config.recipe import Recipe, apply_overrides
from tunelab.errors import TunelabError
from tunelab.memory.units import GiB
from tunelab.plan.lint import CODES, Finding, available_memory, lint, preflight

MODEL = "Qwen/Qwen2.5-0.5B"  # catalog entry: bf16 checkpoint, apache-2.0, 32k context


@pytest.fixture
def data(tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"Order {i}: two apples"},
                          {"role": "assistant", "content": json.dumps({"item": "apple", "qty": 2})}]}
            for i in range(80)]  # enough rows for the batch rules (fewer: the trainer fits the batch)
    train, val = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    train.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    val.write_text(json.dumps(rows[0]) + "\n")
    return str(train), str(val)


def _recipe(data, *overrides: str) -> Recipe:
    train, val = data
    base = {"model": {"spec": MODEL}, "data": {"task": None, "train": train, "validation": val},
            "train": {"effective_batch": 64, "batch_size": 4, "max_length": 128}}
    return Recipe.model_validate(apply_overrides(base, list(overrides)))


def _codes(findings: list[Finding]) -> dict[str, str]:
    return {f.code: f.level for f in findings}


def test_clean_recipe_has_no_findings(data):
    assert lint(_recipe(data), budget_bytes=80 * GiB) == []


@pytest.mark.parametrize("overrides,code,level", [
    (["model.dtype=fp16"], "precision-mismatch", "error"),
    (["train.precision=fp16"], "precision-mismatch", "error"),
    (["train.lr=1e-3"], "lr-range", "warning"),
    (["method=full", "train.lr=2e-4"], "lr-range", "warning"),
    (["train.effective_batch=4"], "batch-unstable", "warning"),
    (["train.effective_batch=16"], "batch-small", "warning"),
    (["lora.r=128", "lora.alpha=128"], "lora-rank", "warning"),
    (["lora.r=16", "lora.alpha=256"], "lora-alpha", "warning"),
    (["lora.dropout=0.3"], "lora-dropout", "warning"),
    (["train.warmup_ratio=0.2"], "warmup", "warning"),
    (["data.validation=null", "data.validation_fraction=0"], "no-validation", "warning"),
    (["train.epochs=10"], "epochs", "warning"),
    (["train.max_length=65536"], "max-length", "warning"),
    (["train.packing=false", "train.max_length=1024"], "packing-off", "warning"),
    (["method=qlora", "qlora.compute_dtype=fp16"], "qlora-compute", "warning"),
    (["lora.targets=[q_proj, wq]"], "lora-targets", "error"),
])
def test_rule_fires(data, overrides, code, level):
    findings = lint(_recipe(data, *overrides))
    assert _codes(findings).get(code) == level, findings
    f = next(f for f in findings if f.code == code)
    assert f.reason and f.fix and f.message
    assert set(f.to_json()) == {"level", "code", "message", "reason", "fix"}
    assert code in CODES  # so lint.allow can name it


def test_no_kv_cache_warning_with_gradient_checkpointing(data):
    """tunelab train switches the cache off itself (apply_method), so a warning about it would be noise."""
    assert lint(_recipe(data, "train.grad_checkpointing=true"), budget_bytes=80 * GiB) == []


def test_train_switches_the_cache_off(tiny_llama):
    from tunelab.models.methods import apply_method

    model, tok = tiny_llama
    assert model.config.use_cache
    assert apply_method(model, "lora", tokenizer=tok, grad_checkpointing=True).config.use_cache is False


def test_rope_scaling_stretches_the_context_the_linter_checks(data):
    assert "max-length" in _codes(lint(_recipe(data, "train.max_length=65536")))
    scaled = lint(_recipe(data, "train.max_length=65536", "model.rope_scaling={type: yarn, factor: 4}"))
    assert "max-length" not in _codes(scaled)
    too_long = lint(_recipe(data, "train.max_length=262144", "model.rope_scaling={type: yarn, factor: 4}"))
    assert "131072 positions" in next(f for f in too_long if f.code == "max-length").message


def test_lint_allow_accepts_a_warning_with_its_reason(data):
    allowed = lint(_recipe(data, "train.lr=1e-3", "train.effective_batch=4",
                           "lint.allow={lr-range: short run}"))
    assert _codes(allowed) == {"lr-range": "allowed", "batch-unstable": "warning"}
    assert "short run" in next(f for f in allowed if f.code == "lr-range").message
    assert [f.level for f in allowed] == ["warning", "allowed"]  # allowed ones come last
    listed = lint(_recipe(data, "train.lr=1e-3", "lint.allow=[lr-range]"))
    assert _codes(listed) == {"lr-range": "allowed"}
    errors = lint(_recipe(data, "model.dtype=fp16", "lint.allow=[precision-mismatch]"))
    assert _codes(errors)["precision-mismatch"] == "error"  # errors cannot be allowed
    with pytest.raises(TunelabError, match="lr-rnage.*the codes are"):
        lint(_recipe(data, "lint.allow=[lr-rnage]"))


def test_demo_recipe_passes_its_own_linter(tmp_path):
    """What `make demo` trains: each ladder's LoRA recipe as the ladder builds it, for the demo's steps."""
    from tunelab.config.paths import DEFAULT_MODEL
    from tunelab.demo import LADDERS
    from tunelab.ladder.climb import train_recipe
    from tunelab.tasks import load_task

    for task, (_, steps) in LADDERS.items():
        findings = lint(train_recipe(load_task(task), DEFAULT_MODEL, steps, tmp_path / task))
        assert _codes(findings) == {"lr-range": "allowed", "batch-unstable": "allowed"}, (task, findings)
        assert all("allowed by lint.allow: " in f.message and "see the recipe" not in f.message for f in findings)


def test_errors_come_first(data):
    """The memory check runs last, yet its error leads; a warning the recipe allows goes after the warnings."""
    findings = lint(_recipe(data, "train.lr=1e-2", "train.effective_batch=2", "train.batch_size=2",
                            "lint.allow={batch-unstable: 'two rows per step keep the test small'}"), budget_bytes=GiB)
    assert [(f.code, f.level) for f in findings] == [("memory", "error"), ("lr-range", "warning"),
                                                     ("batch-unstable", "allowed")]


def test_memory_budget(data):
    assert "memory" not in _codes(lint(_recipe(data), budget_bytes=80 * GiB))
    small = lint(_recipe(data), budget_bytes=GiB)
    assert _codes(small)["memory"] == "error"
    assert "grad_checkpointing" in next(f for f in small if f.code == "memory").fix


@pytest.mark.parametrize("spec,code", [("Qwen/Qwen2.5-3B", "license-restrictive"),
                                       ("meta-llama/Llama-3.2-1B", "license-conditional")])
def test_license(data, spec, code):
    assert code in _codes(lint(_recipe(data, f"model.spec={spec}")))


def test_license_unknown_for_a_folder_without_one(data, tmp_path):
    from transformers import LlamaConfig

    folder = tmp_path / "m"
    LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=256).save_pretrained(folder)
    assert "license-unknown" in _codes(lint(_recipe(data, f"model.spec={folder}")))


def test_preflight_checks_the_device_memory(data):
    device, avail = available_memory("cpu")
    assert device == "cpu" and avail > 0
    assert _codes(preflight(_recipe(data), device_memory_bytes=1 << 20, device="cpu"))["memory"] == "error"
    assert "memory" not in _codes(preflight(_recipe(data), device_memory_bytes=64 * GiB, device="cpu"))


def test_preflight_divides_by_the_processes_and_their_sharding(data):
    """A full finetune that does not fit one GPU fits 8 under ZeRO-3 / FSDP full sharding, not under DDP."""
    rec = _recipe(data, "method=full", "train.grad_checkpointing=true", "train.batch_size=1")
    from tunelab.memory.estimate import estimate_recipe

    one = estimate_recipe(rec, device="cuda")
    sharded = estimate_recipe(rec, device="cuda", gpus=8, zero=3)
    budget = (one.bytes["total"] + sharded.bytes["total"]) // 2
    assert _codes(preflight(rec, device_memory_bytes=budget, device="cuda"))["memory"] == "error"
    assert _codes(preflight(rec, device_memory_bytes=budget, device="cuda", processes=8))["memory"] == "error"
    assert "memory" not in _codes(preflight(rec, device_memory_bytes=budget, device="cuda", processes=8, zero=3))
    msg = next(f for f in preflight(rec, device_memory_bytes=1 << 20, device="cuda", processes=8, zero=3)
               if f.code == "memory").message
    assert "per process of 8 (ZeRO-3 sharding)" in msg
    # on a CPU the processes share the machine's RAM: each one's estimate is checked against its share
    cpu_one = estimate_recipe(rec, device="cpu").bytes["total"]
    ram = int(cpu_one * 1.5)
    assert "memory" not in _codes(preflight(rec, device_memory_bytes=ram, device="cpu"))
    assert _codes(preflight(rec, device_memory_bytes=ram, device="cpu", processes=2))["memory"] == "error"
