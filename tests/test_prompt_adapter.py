"""A soft prompt trained from a bundled prompt recipe (TEXT init) goes on: train -> eval -> serve -> export
(issue 27.1: its adapter_config.json said prompt_tuning_init TEXT with no tokenizer, which PEFT refuses)."""

import json
import shutil
from pathlib import Path

import pytest
from conftest import Server, single_thread

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*-prompt.yaml"))

one_thread = pytest.fixture(autouse=True, scope="module")(single_thread)


def test_every_bundled_prompt_recipe_initialises_from_text():
    from tunelab.config.recipe import load_recipe

    assert RECIPES and all(load_recipe(p).prompt.init_text for p in RECIPES)


def _tunelab(*args) -> tuple[int, str, str]:
    """`tunelab ARGS` in a process of its own (this test also serves in-process: no CLI state shared with it)."""
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-m", "tunelab", *map(str, args)], capture_output=True, text=True,
                       timeout=900)
    return p.returncode, p.stdout, p.stderr


@pytest.mark.slow
def test_a_bundled_prompt_recipes_adapter_evaluates_serves_and_exports(tmp_path):
    from peft import PeftConfig

    from tunelab.infer.hf import GenerateEngine
    from tunelab.runs.adapter_folder import AdapterRoot
    from tunelab.server.app import load_serving_engine
    from tunelab.server.service import ServeService

    adapter = tmp_path / "adapters" / "orders-prompt"
    code, _, err = _tunelab("train", ROOT / "recipes" / "orders-json-prompt.yaml", "train.max_steps=1",
                           "train.effective_batch=4", "data.limit_train=16", "data.limit_validation=2",
                           "validation.every=null", f"output_dir={adapter}")
    assert code == 0, err
    saved = json.loads((adapter / "adapter_config.json").read_text())
    assert saved["peft_type"] == "PROMPT_TUNING"
    assert saved["prompt_tuning_init_text"] == "Extract the order as one line of JSON."  # the init is recorded
    PeftConfig.from_pretrained(str(adapter))  # raised: "When prompt_tuning_init='TEXT', tokenizer_name_or_path ..."

    code, out, err = _tunelab("eval", "--task", "orders-json", "--adapter", adapter, "--limit", 1,
                             "--out", tmp_path / "ev")
    assert code == 0, err
    assert len(list((tmp_path / "ev").glob("*/predictions.jsonl"))) == 2  # the base and the adapter

    root = AdapterRoot(adapter.parent)
    engine = load_serving_engine("smollm2-135m-instruct", root, dtype="fp32")  # what `tunelab serve` loads
    assert isinstance(engine, GenerateEngine)  # the batched one refuses soft prompts (it was loaded before)
    srv = Server(ServeService(engine, "smollm2", root, default_max_tokens=4))
    try:
        r = srv.client("x").chat.completions.create(
            model="orders-prompt", messages=[{"role": "user", "content": "Ada wants 3 apples."}], max_tokens=4)
        assert r.choices[0].message.role == "assistant" and r.usage.completion_tokens >= 1
    finally:
        srv.stop()

    code, _, err = _tunelab("export", adapter, "--out", tmp_path / "gguf")
    assert code != 0 and "PROMPT_TUNING" in err and "only LoRA adapters" in err, err  # a soft prompt has no delta
    assert not (tmp_path / "gguf").exists() or not any((tmp_path / "gguf").iterdir())
    shutil.rmtree(tmp_path / "adapters")


def test_a_text_initialised_soft_prompt_saves_a_config_peft_loads(tiny_llama, tmp_path):
    """The virtual tokens start from the init text's embedding; the saved config loads without a tokenizer name."""
    import torch
    from peft import PeftConfig, PeftModel

    from tunelab.config.recipe import PromptConfig
    from tunelab.models import tiny_model
    from tunelab.models.methods import apply_method

    model, tok = tiny_llama
    text = "Extract the order as one line of JSON."
    wrapped = apply_method(model, "prompt", prompt=PromptConfig(num_virtual_tokens=4, init_text=text), tokenizer=tok)
    ids = tok(text, add_special_tokens=False)["input_ids"][:4]
    prompt = wrapped.prompt_encoder["default"].embedding.weight
    assert torch.equal(prompt, model.get_input_embeddings().weight[ids])  # initialised from the text
    wrapped.save_pretrained(tmp_path / "p")
    assert PeftConfig.from_pretrained(str(tmp_path / "p")).prompt_tuning_init_text == text
    loaded = PeftModel.from_pretrained(tiny_model("llama", tokenizer=tok)[0], str(tmp_path / "p"))
    assert torch.equal(loaded.prompt_encoder["default"].embedding.weight, prompt)
