"""The engine contract (tunelab.infer.Engine), the same cases on every engine: the batched one, the generate-based
one and the FakeEngine, each built in code (a tiny Llama, one LoRA adapter)."""

import json

import pytest
import torch

from tunelab.errors import TunelabError
from tunelab.infer import Request, SamplingParams, chat_prompt

SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "qty": {"type": "integer"}},
          "required": ["name", "qty"]}
ANSWER = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi"  # FakeEngine's


def _prompt(i: int = 0) -> list[dict]:
    return [{"role": "system", "content": "You are a terse assistant."},
            {"role": "user", "content": f"Item {i}: describe it" + " in detail" * i}]


def _req(i: int = 0, adapter=None, **params) -> Request:
    return Request(_prompt(i), adapter, SamplingParams(**params))


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, tokenizer):
    from peft import LoraConfig, get_peft_model

    from tunelab.models import tiny_model

    folder = tmp_path_factory.mktemp("contract-adapter")
    torch.manual_seed(1)
    model = tiny_model("llama", tokenizer=tokenizer, initializer_range=0.4)[0]
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                          init_lora_weights=False))
    pm.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module", params=["batched", "generate", "fake"])
def engine(request, tokenizer, adapter_dir):
    from tunelab.infer.engine import BatchEngine
    from tunelab.infer.hf import GenerateEngine
    from tunelab.infer.testing import FakeEngine
    from tunelab.models import tiny_model

    if request.param == "fake":
        eng = FakeEngine(lambda q: ANSWER, tokenizer=tokenizer)
    else:
        model = tiny_model("llama", tokenizer=tokenizer, initializer_range=0.4)[0]  # greedy outputs vary
        eng = (BatchEngine if request.param == "batched" else GenerateEngine)(model, tokenizer)
    eng.add_adapter("a", adapter_dir)
    yield eng
    assert not eng.has_unfinished()  # every case leaves the engine empty


def _drain(engine) -> list:
    finished = []
    while engine.has_unfinished():
        finished += engine.step()
    return finished


def test_generate_answers_in_order_and_reports_progress(engine):
    reqs = [_req(0, max_new_tokens=5), _req(1, max_new_tokens=3), _req(2, adapter="a", max_new_tokens=5)]
    seen = []
    out = engine.generate(reqs, progress=seen.append)
    assert [c.id for c in out] == [q.id for q in reqs]
    assert [len(c.token_ids) <= q.params.max_new_tokens for c, q in zip(out, reqs)] == [True] * 3
    assert all(c.prompt_tokens == len(q.prompt_ids) and c.ttft >= 0 for c, q in zip(out, reqs))
    assert seen[-1] == 3 and seen == sorted(seen)


def test_step_returns_each_request_once_and_matches_generate(engine):
    handles = [engine.add_request(_req(i, adapter=[None, "a"][i % 2], max_new_tokens=4 + i)) for i in range(4)]
    assert engine.has_unfinished() and not any(h.finished for h in handles)
    finished = _drain(engine)
    assert sorted(id(h) for h in finished) == sorted(id(h) for h in handles)
    want = engine.generate([_req(i, adapter=[None, "a"][i % 2], max_new_tokens=4 + i) for i in range(4)])
    assert [h.completion().token_ids for h in handles] == [c.token_ids for c in want]
    assert [h.completion().text for h in handles] == [c.text for c in want]


PARAMS = {"greedy": {"max_new_tokens": 12}, "stop": {"max_new_tokens": 12},
          "seeded": {"max_new_tokens": 12, "temperature": 1.0, "top_p": 0.9, "seed": 7},
          "ignore_eos": {"max_new_tokens": 12, "ignore_eos": True}}


def test_streamed_answers_are_the_batched_ones(engine):
    """Streaming (stream(), and new_text() per step) goes through the batched code path: the same tokens and
    text with stop strings, seeded sampling and ignore_eos, whatever the request is batched with."""
    full = engine.generate([_req(1, max_new_tokens=12)])[0].text  # the stop case's answer, without a stop
    params = dict(PARAMS, stop={**PARAMS["stop"], "stop": [full[len(full) // 2:][:3]]})
    reqs = [_req(i, **p) for i, p in enumerate(params.values())]
    batched = engine.generate(reqs)
    assert batched[1].finish_reason == "stop"
    for q, want in zip(reqs, batched):
        again = Request(q.prompt, q.adapter, q.params)
        assert "".join(engine.stream(again)) == want.text
        h, pieces = engine.add_request(Request(q.prompt, q.adapter, q.params)), []
        while not h.finished:
            engine.step()
            pieces.append(h.new_text())
        assert h.token_ids == want.token_ids and "".join(pieces) == want.text
        assert h.finish_reason == want.finish_reason
    if type(engine).__name__ != "FakeEngine":  # it does not sample; the others: another seed, other tokens
        assert batched[2].token_ids != engine.generate([_req(2, **{**PARAMS["seeded"], "seed": 8})])[0].token_ids


def test_stop_strings_and_length(engine):
    full = engine.generate([_req(0, max_new_tokens=12)])[0]
    assert full.finish_reason == "length" and len(full.token_ids) == 12
    stop = full.text[len(full.text) // 2:][:3]
    cut = engine.generate([_req(0, max_new_tokens=12, stop=[stop])])[0]
    assert cut.finish_reason == "stop" and cut.text == full.text[:full.text.find(stop)]


def test_abort_leaves_nothing_behind(engine):
    waiting, other = engine.add_request(_req(0, max_new_tokens=6)), engine.add_request(_req(1, max_new_tokens=3))
    engine.abort(waiting)
    assert waiting.finish_reason == "cancelled" and waiting.completion().finish_reason == "cancelled"
    assert waiting not in _drain(engine) and other.finish_reason in ("stop", "length")
    engine.abort(other)  # finished: left as is
    assert other.finish_reason in ("stop", "length")
    running = engine.add_request(_req(2, max_new_tokens=30))
    engine.step()
    engine.abort(running)
    assert running.finished and not engine.has_unfinished()
    pieces = engine.stream(_req(3, max_new_tokens=30))
    next(pieces)
    pieces.close()  # the client went away
    assert not engine.has_unfinished()


def test_adapters_per_request(engine, adapter_dir):
    with pytest.raises(TunelabError, match="no adapter named 'nope'"):
        engine.add_request(_req(0, adapter="nope"))
    with pytest.raises(TunelabError, match="already loaded"):
        engine.add_adapter("a", adapter_dir)
    engine.add_adapter("b", adapter_dir)
    h = engine.add_request(_req(0, adapter="b", max_new_tokens=4))
    with pytest.raises(TunelabError, match="in use"):
        engine.remove_adapter("b")
    _drain(engine)
    engine.remove_adapter("b")
    assert engine.adapters == ["a"]
    assert h.token_ids == engine.generate([_req(0, adapter="a", max_new_tokens=4)])[0].token_ids  # same weights


def test_given_prompt_ids_are_not_tokenized_again(engine):
    ids = engine.generate([_req(1, max_new_tokens=6)])
    other = Request(_prompt(0), params=SamplingParams(max_new_tokens=6),
                    prompt_ids=engine.tokenizer(chat_prompt(engine.tokenizer, _prompt(1)),
                                                add_special_tokens=False)["input_ids"])
    got = engine.generate([other])[0]
    assert got.token_ids == ids[0].token_ids and got.prompt_tokens == ids[0].prompt_tokens


def test_grammar_from_the_engine(engine):
    if type(engine).__name__ == "FakeEngine":
        pytest.skip("the FakeEngine compiles grammars but answers with its own text")
    grammar = engine.compile_grammar(schema=SCHEMA)
    reqs = [_req(i, adapter=a, max_new_tokens=24, grammar=grammar) for i, a in enumerate([None, "a"])]
    for c in engine.generate(reqs) + [engine.generate([reqs[0]])[0]]:
        assert set(json.loads(c.text)) == {"name", "qty"} and c.finish_reason in ("stop", "length_closed")


def test_sampling_params_refuse_bad_values():
    for bad in ({"max_new_tokens": 0}, {"temperature": -1}, {"top_p": 0}):
        with pytest.raises(TunelabError, match=next(iter(bad))):
            SamplingParams(**bad)
    assert SamplingParams(stop=["x"]).stop == ("x",)
