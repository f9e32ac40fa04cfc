"""--chat-template (a file, or chatml for a base model without one) and model.rope_scaling on tiny models."""

import pytest
import torch

from tunelab.config.recipe import load_recipe
from tunelab.errors import TunelabError
from tunelab.models import load_model, load_tokenizer
from tunelab.models.overrides import CHATML

HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, tiny_model_dir):
    """The tiny Llama saved with a tokenizer that has no chat template, like a base model."""
    model, tok = load_model(str(tiny_model_dir), dtype="fp32")
    tok.chat_template = None
    folder = tmp_path_factory.mktemp("tiny-base")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    assert not load_tokenizer(str(folder)).chat_template
    return folder


def test_a_model_without_a_template_names_the_flag(base_dir):
    from tunelab.data import ChatTokenizer
    from tunelab.infer import Request, SamplingParams, load_engine

    with pytest.raises(TunelabError, match="--chat-template FILE.jinja .*--chat-template chatml"):
        ChatTokenizer(load_tokenizer(str(base_dir)))
    engine = load_engine(str(base_dir), dtype="fp32")
    with pytest.raises(TunelabError, match="--chat-template"):
        engine.generate([Request(HI, params=SamplingParams(max_new_tokens=2))])


def test_chatml_and_a_template_file_replace_the_template(base_dir, tmp_path):
    tok = load_tokenizer(str(base_dir), chat_template="chatml")
    assert tok.chat_template == CHATML
    text = tok.apply_chat_template([*HI, {"role": "assistant", "content": "yo"}], tokenize=False)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n"  # eos is <|im_end|>
    jinja = tmp_path / "plain.jinja"
    jinja.write_text("{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                     "{% if add_generation_prompt %}### assistant:{% endif %}")
    _, tok = load_model(str(base_dir), dtype="fp32", chat_template=str(jinja))
    assert tok.apply_chat_template(HI, tokenize=False, add_generation_prompt=True) == "### user: hi\n### assistant:"
    with pytest.raises(TunelabError, match="no such file, and not a built-in template"):
        load_tokenizer(str(base_dir), chat_template=str(tmp_path / "missing.jinja"))


def test_chatml_appends_eos_when_the_tokenizer_ends_turns_otherwise(base_dir):
    tok = load_tokenizer(str(base_dir), chat_template="chatml")
    tok.eos_token = "<|endoftext|>"
    text = tok.apply_chat_template([*HI, {"role": "assistant", "content": "yo"}], tokenize=False)
    assert text.endswith("yo<|im_end|><|endoftext|>\n")


def test_cli_generate_and_train_take_the_flag(tunelab, base_dir, chat_file, tmp_path):
    code, _, err = tunelab("generate", "--model", base_dir, "hi", "--max-new-tokens", 2, "--dtype", "fp32")
    assert code != 0 and "--chat-template" in err
    code, out, err = tunelab("generate", "--model", base_dir, "hi", "--max-new-tokens", 2, "--dtype", "fp32",
                             "--chat-template", "chatml")
    assert code == 0, err
    code, out, err = tunelab("train", f"model.spec={base_dir}", "data.task=null", f"data.train={chat_file}",
                             f"output_dir={tmp_path / 'run'}", "train.max_steps=1", "train.batch_size=2",
                             "train.effective_batch=2", "train.max_length=128", "train.precision=fp32",
                             "checkpoint_every=null", "--chat-template", "chatml")
    assert code == 0, err
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(tmp_path / "run").chat_template == CHATML  # saved with the adapter
    assert "chat_template: chatml" in (tmp_path / "run" / "recipe.yaml").read_text()


def _rotary(model):
    return model.model.rotary_emb


@pytest.mark.parametrize("kind", ["linear", "dynamic", "yarn"])
def test_rope_scaling_is_what_the_model_runs_with(tiny_model_dir, kind):
    plain, _ = load_model(str(tiny_model_dir), dtype="fp32")
    scaled, _ = load_model(str(tiny_model_dir), dtype="fp32", rope_scaling={"type": kind, "factor": 4.0})
    assert scaled.config.rope_parameters["rope_type"] == kind and scaled.config.rope_parameters["factor"] == 4.0
    assert _rotary(scaled).rope_type == kind
    if kind == "linear":  # positions are divided by the factor
        torch.testing.assert_close(_rotary(scaled).inv_freq, _rotary(plain).inv_freq / 4.0)
    if kind == "yarn":
        assert _rotary(scaled).attention_scaling > 1.0
    ids = torch.arange(3000).remainder(500).unsqueeze(0)[:, :2100]  # past max_position_embeddings (2048)
    with torch.no_grad():
        assert not torch.allclose(plain(ids).logits[:, -1], scaled(ids).logits[:, -1])


def test_recipe_rope_scaling_reaches_the_training_model(tiny_model_dir):
    from tunelab.models.build import build_model

    recipe = load_recipe(None, [f"model.spec={tiny_model_dir}", "model.rope_scaling={type: linear, factor: 2}",
                                "train.precision=fp32"])
    model, _, _ = build_model(recipe, "cpu")
    rotary = model.get_base_model().model.rotary_emb
    assert rotary.rope_type == "linear" and model.config.rope_parameters["factor"] == 2.0
    with pytest.raises(TunelabError, match="rope_scaling.factor"):
        load_recipe(None, ["model.rope_scaling={type: linear, factor: 1}"])
    with pytest.raises(TunelabError, match="rope_scaling.type"):
        load_recipe(None, ["model.rope_scaling={type: ntk, factor: 2}"])


@pytest.mark.parametrize("kind", ["batched", "generate"])
def test_an_adapter_runs_on_the_rope_scaling_it_was_trained_with(tiny_model_dir, tmp_path, kind):
    """eval / serve / generate load the base with the adapter's trained model.rope_scaling (its run.json)."""
    import json
    from pathlib import Path

    from peft import LoraConfig, get_peft_model

    from tunelab.infer import load_engine
    from tunelab.infer.hf import check_adapter

    def adapter(name, rope):
        model, _ = load_model(str(tiny_model_dir), dtype="fp32")
        get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(tmp_path / name)
        (tmp_path / name / "run.json").write_text(json.dumps({"recipe": {"model": {"rope_scaling": rope}}}))
        return str(tmp_path / name)

    def rotary(engine):
        return next(m for n, m in engine.model.named_modules() if n.endswith("rotary_emb"))

    linear = adapter("linear", {"type": "linear", "factor": 2.0})
    engine = load_engine(str(tiny_model_dir), {"a": linear}, dtype="fp32", kind=kind)
    assert rotary(engine).rope_type == "linear" and engine.model.config.rope_parameters["factor"] == 2.0
    plain = load_engine(str(tiny_model_dir), {"p": adapter("plain", None)}, dtype="fp32", kind=kind)
    assert rotary(plain).rope_type == "default"
    with pytest.raises(TunelabError, match="trained with model.rope_scaling"):  # the server adds adapters later
        check_adapter(Path(linear), None, plain.model.config)
    with pytest.raises(TunelabError, match="different model.rope_scaling"):
        load_engine(str(tiny_model_dir), {"a": linear, "y": adapter("yarn", {"type": "yarn", "factor": 4.0})},
                    dtype="fp32", kind=kind)
