"""The routed engine (tunelab.infer.routed): every case of the engine contract; a request alone runs on llama.cpp,
one arriving meanwhile batched, both with the batched engine's tokens (fp32: equal); an adapter runs batched until
its merged GGUF is ready, never waiting for it; and the real server streams on it, alone and 8 at once.
Needs the llamacpp extra (see Makefile)."""

import threading
import time

import pytest

pytest.importorskip("llama_cpp", reason="the routed engine needs the llamacpp extra (see Makefile)")

from test_engine_contract import *  # noqa: E402,F403 -- the contract's cases, run on the engine below
from test_engine_contract import SCHEMA, _req  # noqa: E402

from tunelab.errors import TunelabError  # noqa: E402
from tunelab.infer import Request, SamplingParams  # noqa: E402

BUNDLED = "smollm2-135m-instruct"


def _tiny(tokenizer):
    from tunelab.models import tiny_model

    return tiny_model("llama", tokenizer=tokenizer, initializer_range=0.4)[0]  # greedy outputs vary


def _routed(tokenizer):
    from tunelab.infer.routed import RoutedEngine
    from tunelab.models import local_dir, resolve

    eng = RoutedEngine(_tiny(tokenizer), tokenizer, local_dir(resolve(BUNDLED)))  # the tiny models' tokenizer
    assert eng.wait_prepared(120) and eng.ready(None) and not eng.failed
    return eng


def _drain(engine) -> list:
    finished = []
    while engine.has_unfinished():
        finished += engine.step()
    return finished


@pytest.fixture(scope="module")
def engine(tokenizer, adapter_dir):  # the contract suite's `engine`, here the routed one
    eng = _routed(tokenizer)
    eng.add_adapter("a", adapter_dir)
    eng.generate([_req(0, adapter="a", max_new_tokens=1)])  # alone: its llama.cpp model is prepared meanwhile
    assert eng.wait_prepared(120) and eng.ready("a")
    eng.served.clear()
    yield eng
    assert not eng.has_unfinished()
    assert eng.served["llamacpp"] > 0 and eng.served["batched"] > 0  # the cases ran on both engines
    eng.close()


@pytest.fixture(scope="module")
def reference(tokenizer, adapter_dir):
    from tunelab.infer.engine import BatchEngine

    ref = BatchEngine(_tiny(tokenizer), tokenizer)
    ref.add_adapter("a", adapter_dir)
    return ref


def test_alone_on_llamacpp_meanwhile_batched_with_the_batched_tokens(tokenizer, adapter_dir, reference):
    eng = _routed(tokenizer)
    grammar = eng.compile_grammar(schema=SCHEMA)  # one grammar object for both engines
    reqs = [_req(0, max_new_tokens=16), _req(1, max_new_tokens=24, grammar=grammar),
            _req(2, max_new_tokens=12, temperature=1.0, top_p=0.9, seed=3), _req(3, max_new_tokens=12, stop=["a"])]
    lone = eng.add_request(reqs[0])
    assert eng.served == {"llamacpp": 1}
    eng.step()
    others = [eng.add_request(q) for q in reqs[1:]]  # one is in flight: these are batched
    assert eng.served == {"llamacpp": 1, "batched": 3}
    eng.step()  # a step runs both: one more token on llama.cpp, a batched row's first ones
    assert len(lone.token_ids) == 2 and others[0].token_ids
    pieces = [lone.new_text()]
    while eng.has_unfinished():
        eng.step()
        pieces.append(lone.new_text())  # streaming from the llama.cpp side
    want = reference.generate([Request(q.prompt, q.adapter, q.params) for q in reqs])
    got = [h.completion() for h in [lone, *others]]
    assert [c.token_ids for c in got] == [c.token_ids for c in want]
    assert [(c.text, c.finish_reason, c.prompt_tokens) for c in got] == \
        [(c.text, c.finish_reason, c.prompt_tokens) for c in want]
    assert "".join(pieces) == want[0].text and all(c.ttft is not None and c.ttft >= 0 for c in got)
    # the grammar and the seeded sampling alone, on llama.cpp this time: the same answers
    again = [eng.generate([Request(q.prompt, q.adapter, q.params)])[0] for q in reqs[1:3]]
    assert eng.served["llamacpp"] == 3 and [c.token_ids for c in again] == [c.token_ids for c in want[1:3]]
    assert again[0].grammar == want[1].grammar and again[0].cached_tokens > 0  # llama.cpp kept the prompt's KV
    eng.close()


def test_abort_on_either_side(tokenizer):
    eng = _routed(tokenizer)
    lone = eng.add_request(_req(0, max_new_tokens=30, ignore_eos=True))
    eng.step()
    batched = eng.add_request(_req(1, max_new_tokens=30, ignore_eos=True))
    eng.step()
    eng.abort(lone)
    assert lone.finish_reason == "cancelled" and not eng.single.has_unfinished() and eng.has_unfinished()
    later = eng.add_request(_req(2, max_new_tokens=4))  # the batched request is still in flight
    assert eng.served == {"llamacpp": 1, "batched": 2}
    eng.abort(batched)
    assert batched.finish_reason == "cancelled" and later in _drain(eng) and not eng.has_unfinished()
    assert len(lone.token_ids) < 30 and len(batched.token_ids) < 30
    alone = eng.generate([_req(3, max_new_tokens=4)])[0]  # both idle again: llama.cpp
    assert eng.served["llamacpp"] == 2 and alone.finish_reason in ("stop", "length")
    too_long = eng.add_request(_req(0, max_new_tokens=eng.single.context))  # past llama.cpp's context: batched
    assert eng.served["batched"] == 3
    eng.abort(too_long)
    assert not eng.has_unfinished()
    eng.close()


def test_an_adapter_runs_batched_until_its_llamacpp_model_is_ready(tokenizer, adapter_dir, reference, monkeypatch):
    eng = _routed(tokenizer)
    gate, prepare = threading.Event(), eng.single.prepare
    monkeypatch.setattr(eng.single, "prepare", lambda name: (gate.wait(120), prepare(name)))  # a slow GGUF write
    eng.add_adapter("a", adapter_dir)
    want = reference.generate([_req(0, adapter="a", max_new_tokens=12)])[0]
    first = eng.generate([_req(0, adapter="a", max_new_tokens=12)])[0]  # alone, but its model is not ready
    assert eng.served == {"batched": 1} and not eng.ready("a") and not eng.wait_prepared(0)  # it did not wait
    gate.set()
    assert eng.wait_prepared(120) and eng.ready("a") and eng.single.adapters == ["a"]
    lone = eng.add_request(_req(0, adapter="a", max_new_tokens=12))
    assert eng.served == {"batched": 1, "llamacpp": 1}
    eng.add_adapter("b", adapter_dir)
    meanwhile = eng.add_request(_req(1, adapter="b", max_new_tokens=12))  # batched
    for name in ("a", "b"):  # in use on either side
        with pytest.raises(TunelabError, match=f"adapter '{name}' is in use"):
            eng.remove_adapter(name)
    _drain(eng)
    assert first.token_ids == lone.token_ids == want.token_ids and meanwhile.finish_reason in ("stop", "length")
    eng.remove_adapter("a")
    eng.add_adapter("a", adapter_dir)  # loaded again: its llama.cpp model is made again before use
    assert not eng.ready("a") and sorted(eng.adapters) == ["a", "b"]
    eng.remove_adapter("a")
    assert eng.wait_prepared(120) and eng.single.adapters == []  # the worker dropped its llama.cpp model
    eng.close()


def test_server_streams_alone_on_llamacpp_and_eight_at_once(tmp_path, tokenizer):
    """The real app on loopback, its engine as `tunelab serve` loads it (kind auto, interactive): a lone streamed
    chat completion runs on llama.cpp, 8 sent at once are answered (one on llama.cpp, 7 batched), all with the
    batched engine's text."""
    from concurrent.futures import ThreadPoolExecutor

    from conftest import Server

    from tunelab.infer import load_engine
    from tunelab.infer.routed import RoutedEngine
    from tunelab.server import ServeService
    from tunelab.server.app import load_serving_engine

    _tiny(tokenizer).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    engine = load_serving_engine(str(tmp_path / "model"), None, dtype="fp32")
    assert isinstance(engine, RoutedEngine) and engine.wait_prepared(120)
    msgs = [{"role": "user", "content": "Name three colours."}]
    want = load_engine(str(tmp_path / "model"), dtype="fp32", kind="batched").generate(
        [Request(msgs, params=SamplingParams(max_new_tokens=16))])[0]
    srv = Server(ServeService(engine, "tiny", default_max_tokens=16))
    try:
        c = srv.client("x")

        def ask(_=None):
            chunks = list(c.chat.completions.create(model="tiny", messages=msgs, temperature=0, max_tokens=16,
                                                    stream=True, stream_options={"include_usage": True}))
            return "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices), chunks[-1].usage

        text, usage = ask()
        assert engine.served == {"llamacpp": 1}
        assert text == want.text and usage.completion_tokens == len(want.token_ids)
        gate, scheduler = threading.Event(), srv.service.scheduler
        hold = threading.Thread(target=scheduler.call, args=(lambda: gate.wait(60),))  # the engine thread waits
        hold.start()
        with ThreadPoolExecutor(8) as pool:
            answers = pool.map(ask, range(8))
            for _ in range(600):
                if scheduler.waiting == 8:
                    break
                time.sleep(0.05)
            gate.set()  # all 8 reach the engine together
            answers = list(answers)
        hold.join()
        assert [a[0] for a in answers] == [want.text] * 8
        assert engine.served == {"llamacpp": 2, "batched": 7}
    finally:
        srv.stop()
        engine.close()
