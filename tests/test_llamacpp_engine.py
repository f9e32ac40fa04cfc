"""The llama.cpp engine (tunelab.infer.llamacpp): every case of the engine contract, and the batched engine's
tokens (fp32 weights as an f32 GGUF: llama.cpp's logits equal transformers' to 1e-5), base, merged LoRA and
grammar, on a tiny Llama and (slow) on the bundled model. Needs the llamacpp extra (see Makefile)."""

import pytest
import torch

pytest.importorskip("llama_cpp", reason="the llama.cpp engine needs the llamacpp extra (see Makefile)")

from test_engine_contract import *  # noqa: E402,F403 -- the contract's cases, run on the engine below
from test_engine_contract import ANSWER, SCHEMA, _req  # noqa: E402,F401

from tunelab.infer import Request, SamplingParams, load_engine  # noqa: E402

BUNDLED = "smollm2-135m-instruct"


def _tiny(tokenizer):
    from tunelab.models import tiny_model

    return tiny_model("llama", tokenizer=tokenizer, initializer_range=0.4)[0]  # greedy outputs vary


def _folder():
    from tunelab.models import local_dir, resolve

    return local_dir(resolve(BUNDLED))  # the tiny models' tokenizer files


@pytest.fixture(scope="module")
def engine(tokenizer, adapter_dir):  # the contract suite's `engine`, here the llama.cpp one
    from tunelab.infer.llamacpp import LlamaCppEngine

    eng = LlamaCppEngine(_tiny(tokenizer), tokenizer, _folder())
    eng.add_adapter("a", adapter_dir)
    yield eng
    assert not eng.has_unfinished()
    eng.close()


def test_same_tokens_as_the_batched_engine(tokenizer, adapter_dir):
    from tunelab.infer.engine import BatchEngine
    from tunelab.infer.llamacpp import LlamaCppEngine

    fast, ref = LlamaCppEngine(_tiny(tokenizer), tokenizer, _folder()), BatchEngine(_tiny(tokenizer), tokenizer)
    for e in (fast, ref):
        e.add_adapter("a", adapter_dir)
    grammar = ref.compile_grammar(schema=SCHEMA)
    reqs = [_req(i, adapter=a, max_new_tokens=16, grammar=g) for i in range(3) for a in (None, "a")
            for g in (None, grammar)]
    got, want = fast.generate(reqs), ref.generate(reqs)
    assert [c.token_ids for c in got] == [c.token_ids for c in want]
    assert got[0].token_ids != got[2].token_ids  # the adapter changes the output
    # each model (the base, the merged adapter) keeps its previous prompt's KV: the common prefix is reused
    assert [c.cached_tokens > 0 for c in got] == [False, True, False] + [True] * 9
    fast.close()


def test_refuses_what_it_cannot_run(tokenizer):
    from tunelab.errors import TunelabError
    from tunelab.infer.llamacpp import LlamaCppEngine
    from tunelab.models import tiny_model

    with pytest.raises(TunelabError, match="llama.cpp runs LlamaForCausalLM here, not Qwen2ForCausalLM"):
        LlamaCppEngine(tiny_model("qwen2", tokenizer=tokenizer)[0], tokenizer, _folder())
    eng = LlamaCppEngine(_tiny(tokenizer), tokenizer, _folder())
    with pytest.raises(TunelabError, match="exceed the llama.cpp engine's context of 2048"):
        eng.add_request(_req(0, max_new_tokens=2048))


def test_lookup_draft():
    from tunelab.infer.llamacpp import lookup_draft

    ids = [5, 6, 7, 8, 9, 1, 2, 6, 7]
    assert lookup_draft(ids, 2) == [8, 9]  # the last 2 tokens (6, 7) followed earlier by 8, 9
    assert lookup_draft([1, 2, 3, 9, 1, 2, 3, 4, 1, 2, 3], 3) == [4, 1, 2]  # the most recent occurrence
    assert lookup_draft([1, 2, 3, 4], 4) == []  # nothing repeats
    assert lookup_draft(ids, 0) == []


def test_drafts_keep_the_tokens_of_one_token_per_step(tokenizer, adapter_dir, monkeypatch):
    """Greedy rows decode a prompt-lookup draft per step; the picker takes it only while it holds, so the tokens
    (base, adapter, grammar, stop strings) are those of one token per step, and greedy ones only are drafted."""
    from tunelab.infer import llamacpp
    from tunelab.infer.llamacpp import LlamaCppEngine
    from tunelab.models import tiny_model

    model = tiny_model("llama", tokenizer=tokenizer, initializer_range=0.1)[0]  # falls into loops: drafts hold
    eng = LlamaCppEngine(model, tokenizer, _folder())
    eng.add_adapter("a", adapter_dir)
    grammar = eng.compile_grammar(schema=SCHEMA)
    reqs = [_req(i, adapter=a, max_new_tokens=40, grammar=g) for i in range(3) for a in (None, "a")
            for g in (None, grammar)] + [_req(1, max_new_tokens=40, stop=(" the",)),
                                         _req(2, max_new_tokens=40, temperature=0.8, seed=3)]
    drafted = eng.generate(reqs)
    assert 0 < eng.drafts["taken"] < eng.drafts["drafted"]  # some drafts held, some did not
    assert eng.drafts["forwards"] < sum(len(c.token_ids) for c in drafted)
    monkeypatch.setattr(llamacpp, "DRAFT_TOKENS", 0)
    plain = eng.generate(reqs)
    assert [c.token_ids for c in drafted] == [c.token_ids for c in plain]
    assert [c.finish_reason for c in drafted] == [c.finish_reason for c in plain]
    eng.close()


@pytest.mark.slow
def test_bundled_model_same_tokens_as_the_batched_engine(tmp_path):
    """The bundled model in fp32 with a random LoRA (every linear layer), orders-json prompts and schema:
    load_engine picks llama.cpp for one request at a time on the CPU (max_batch=1)."""
    from peft import LoraConfig, get_peft_model

    from tunelab.models import load_model
    from tunelab.tasks import load_task

    torch.manual_seed(0)
    pm = get_peft_model(load_model(BUNDLED, dtype="fp32")[0], LoraConfig(r=8, lora_alpha=16, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], init_lora_weights=False))
    for n, p in pm.named_parameters():
        if "lora_B" in n:
            p.data.mul_(0.02)  # a nudge: the answers stay JSON-like
    pm.save_pretrained(tmp_path / "ad")
    ads = {"ad": str(tmp_path / "ad")}
    fast = load_engine(BUNDLED, ads, dtype="fp32", device="cpu", max_batch=1)
    ref = load_engine(BUNDLED, ads, dtype="fp32", device="cpu", kind="batched")
    assert type(fast).__name__ == "LlamaCppEngine"
    task = load_task("orders-json")
    grammar = ref.compile_grammar(schema=task.schema())
    reqs = [Request(task.messages(e), adapter=a, params=SamplingParams(max_new_tokens=32, grammar=g))
            for e in task.examples("test", limit=2) for a in (None, "ad") for g in (None, grammar)]
    got, want = fast.generate(reqs), ref.generate(reqs)
    assert [c.token_ids for c in got] == [c.token_ids for c in want]
    assert fast.drafts["taken"] > 0  # prompt-lookup drafts ran (the answers copy the e-mails)
    fast.close()
