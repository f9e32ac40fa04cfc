"""The OpenAI-compatible server, driven by the official `openai` SDK over a loopback port: a tiny Llama in
the batched engine with LoRA adapters on disk, tenants from a keys file, errors in OpenAI's shape."""

import json
import threading
import time

import httpx2 as httpx
import jsonschema
import pytest

openai = pytest.importorskip("openai")

from conftest import Server, wait_for_health  # noqa: E402

from tunelab.infer import Request, SamplingParams, load_engine  # noqa: E402
from tunelab.server import Keys, ServeService, hash_key  # noqa: E402

ADMIN, ACME, GLOBEX = "sk-admin", "sk-acme", "sk-globex"
SCHEMA = {"type": "object", "required": ["name", "qty"], "properties": {
    "name": {"type": "string"}, "qty": {"type": "integer"}}}


@pytest.fixture(scope="module")
def world(tmp_path_factory, tokenizer):
    """A tiny model folder, three adapters under one root, and a keys file for two tenants and an admin."""
    from peft import LoraConfig, get_peft_model

    from tunelab.models import tiny_model

    root = tmp_path_factory.mktemp("serve")

    def make():
        return tiny_model("llama", tokenizer=tokenizer, initializer_range=0.4)[0]

    make().save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    for i, name in enumerate(["acme-support", "acme-sql", "globex-bot"]):
        import torch

        torch.manual_seed(i)
        pm = get_peft_model(make(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                               init_lora_weights=False))
        pm.save_pretrained(root / "adapters" / name)
    (root / "adapters" / "pickled").mkdir()
    (root / "adapters" / "pickled" / "adapter_config.json").write_text("{}")
    (root / "adapters" / "pickled" / "adapter_model.bin").write_bytes(b"not loaded")
    keys = root / "keys.yaml"
    keys.write_text(f"""tenants:
  acme: {{key_sha256: [{hash_key(ACME)}], adapters: [acme-support, acme-sql, pickled]}}
  globex: {{key_sha256: [{hash_key(GLOBEX)}], adapters: [globex-bot]}}
  ops: {{key_sha256: [{hash_key(ADMIN)}], admin: true}}
""")
    return root


@pytest.fixture(scope="module")
def server(world):
    engine = load_engine(str(world / "model"), dtype="fp32", kind="batched")
    srv = Server(ServeService(engine, "tiny", world / "adapters", Keys.load(world / "keys.yaml"), capacity=2,
                              default_max_tokens=12))
    yield srv
    srv.stop()


MSGS = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Name three colours."}]


def test_chat_completions_and_models(server, world):
    c = server.client(ACME)
    r = c.chat.completions.create(model="acme-support", messages=MSGS, temperature=0, max_tokens=8)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.usage.completion_tokens == 8 and r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens > 10 and r.usage.total_tokens == r.usage.prompt_tokens + 8
    # the same as the engine gives for the same request, and the adapter changes the answer
    ref = load_engine(str(world / "model"), {"acme-support": str(world / "adapters" / "acme-support")},
                      dtype="fp32", kind="batched")
    want = ref.generate([Request(MSGS, adapter="acme-support", params=SamplingParams(max_new_tokens=8))])[0].text
    assert r.choices[0].message.content == want
    base = c.chat.completions.create(model="tiny", messages=MSGS, temperature=0, max_tokens=8).choices[0].message.content
    assert base != want
    ids = [m.id for m in c.models.list().data]
    assert ids == ["tiny", "acme-sql", "acme-support"]  # globex-bot is another tenant's; pickled is refused


def test_completions_n_seed_and_stop(server):
    c = server.client(ACME)
    r = c.completions.create(model="tiny", prompt="Once upon a time", max_tokens=10, temperature=1.0, seed=3, n=2)
    assert len(r.choices) == 2 and r.usage.completion_tokens <= 20
    again = c.completions.create(model="tiny", prompt="Once upon a time", max_tokens=10, temperature=1.0, seed=3,
                                 n=2)
    assert [x.text for x in r.choices] == [x.text for x in again.choices]
    full = c.completions.create(model="tiny", prompt="Once upon a time", max_tokens=10, temperature=0).choices[0].text
    stop = full[3:6]
    cut = c.completions.create(model="tiny", prompt="Once upon a time", max_tokens=10, temperature=0, stop=[stop]).choices[0]
    assert cut.finish_reason == "stop" and cut.text == full[:full.find(stop)]


def test_streaming_gives_the_same_text(server):
    c = server.client(ACME)
    whole = c.chat.completions.create(model="acme-sql", messages=MSGS, temperature=0, max_tokens=10).choices[0].message.content
    chunks = list(c.chat.completions.create(model="acme-sql", messages=MSGS, temperature=0, max_tokens=10, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole and chunks[-2].choices[0].finish_reason == "length" and len(chunks) > 3
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10


def test_json_schema_response_format_is_valid(server):
    c = server.client(ACME)
    r = c.chat.completions.create(model="acme-support", messages=MSGS, temperature=0, max_tokens=40,
                                  response_format={"type": "json_schema",
                                                   "json_schema": {"name": "item", "schema": SCHEMA}})
    jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)
    r = c.chat.completions.create(model="tiny", messages=MSGS, temperature=0, max_tokens=30, response_format={"type": "json_object"})
    assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_errors_in_openai_shape(server):
    c = server.client(ACME)
    with pytest.raises(openai.NotFoundError) as e:
        c.chat.completions.create(model="nope", messages=MSGS)
    missing = e.value.body
    with pytest.raises(openai.NotFoundError) as e:  # another tenant's adapter: indistinguishable from missing
        c.chat.completions.create(model="globex-bot", messages=MSGS)
    assert e.value.body["message"].replace("globex-bot", "nope") == missing["message"]
    assert e.value.body["code"] == missing["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="tiny", messages=MSGS, temperature=5)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "word " * 5000}])
    assert e.value.body["code"] == "context_length_exceeded" and "maximum context length" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError, match="safetensors"):
        c.chat.completions.create(model="pickled", messages=MSGS)
    with pytest.raises(openai.AuthenticationError):
        server.client("sk-wrong").models.list()
    r = httpx.get(server.url + "/v1/models")
    assert r.status_code == 401 and set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_overload_is_429_with_retry_after(world):
    engine = load_engine(str(world / "model"), dtype="fp32", kind="batched")
    srv = Server(ServeService(engine, "tiny", max_waiting=0))
    try:
        r = httpx.post(srv.url + "/v1/chat/completions", json={"model": "tiny", "messages": MSGS})
        assert r.status_code == 429 and r.headers["retry-after"] == "1" and r.json()["error"]["type"] == \
            "rate_limit_error"
    finally:
        srv.stop()


def test_hot_load_unload_under_traffic_and_lru(server):
    admin, acme = server.client(ADMIN), server.client(ACME)
    errors, texts = [], []

    def traffic():
        try:
            for _ in range(3):
                texts.append(acme.chat.completions.create(model="acme-support", messages=MSGS, temperature=0, max_tokens=6))
        except Exception as e:  # noqa: BLE001 - recorded for the assertion
            errors.append(e)

    threads = [threading.Thread(target=traffic) for _ in range(4)]
    for t in threads:
        t.start()
    with pytest.raises(openai.PermissionDeniedError):
        acme.post("/load_lora_adapter", body={"lora_name": "globex-bot"}, cast_to=str)
    assert "Success" in admin.post("/load_lora_adapter", body={"lora_name": "globex-bot"}, cast_to=str)
    admin.chat.completions.create(model="globex-bot", messages=MSGS, temperature=0, max_tokens=4)
    assert "Success" in admin.post("/unload_lora_adapter", body={"lora_name": "globex-bot"}, cast_to=str)
    for t in threads:
        t.join()
    assert not errors and len(texts) == 12
    pool = server.service.adapters
    assert len(pool.resident) <= pool.capacity and "globex-bot" not in pool.resident
    for name in ("acme-sql", "acme-support", "acme-sql"):  # capacity 2: the LRU evicts, never grows
        acme.chat.completions.create(model=name, messages=MSGS, temperature=0, max_tokens=2)
        assert len(pool.resident) <= 2
    m = httpx.get(server.url + "/metrics").text
    assert "tunelab_adapters_resident" in m and "tunelab_request_seconds_bucket" in m
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


def test_fake_engine_and_retrieval_per_request(tmp_path, tokenizer):
    """The service over a FakeEngine (no batching API: whole requests) and a real BM25 index: a request that
    names the index gets the passage in its prompt; an unknown index is a 404 naming the param."""
    from tunelab.infer.testing import FakeEngine
    from tunelab.rag import build_index

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join(json.dumps(d) for d in [
        {"id": "a", "title": "Parking", "text": "Visitors park in lot C behind the Lisbon office."},
        {"id": "b", "title": "Leave", "text": "Everyone gets 27 days of annual leave."}]) + "\n")
    index = build_index(corpus, tmp_path / "idx", kind="bm25")
    srv = Server(ServeService(FakeEngine(lambda q: q.prompt[-1]["content"], tokenizer=tokenizer), "fake",
                              indexes={"handbook": index}))
    try:
        c = srv.client("x")
        q = [{"role": "user", "content": "How many days of annual leave?"}]
        plain = c.chat.completions.create(model="fake", messages=q).choices[0].message.content
        aug = c.chat.completions.create(model="fake", messages=q, extra_body={"rag_index": "handbook", "rag_k": 1})
        assert "27 days" not in plain and "27 days" in aug.choices[0].message.content
        assert "lot C" not in aug.choices[0].message.content  # k=1: the best passage only
        with pytest.raises(openai.NotFoundError) as e:
            c.chat.completions.create(model="fake", messages=q, extra_body={"rag_index": "nope"})
        assert e.value.body["param"] == "rag_index"
    finally:
        srv.stop()


@pytest.mark.slow
def test_bundled_model_served(tmp_path):
    """The bundled model behind the server, through the openai SDK: a chat answer and a schema-valid one."""
    engine = load_engine("smollm2-135m-instruct", dtype="auto", kind="batched")
    srv = Server(ServeService(engine, "smollm2", default_max_tokens=16))
    try:
        c = srv.client("x")
        r = c.chat.completions.create(model="smollm2", messages=MSGS, temperature=0, max_tokens=16)
        assert r.choices[0].message.content.strip() and r.usage.completion_tokens <= 16
        r = c.chat.completions.create(model="smollm2", messages=MSGS, temperature=0, max_tokens=48,
                                      response_format={"type": "json_schema",
                                                       "json_schema": {"name": "item", "schema": SCHEMA}})
        jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)
    finally:
        srv.stop()


def test_a_cold_adapter_waits_for_a_slot_then_429(world):
    """Every resident slot pinned or in use: the request waits (bounded) for one to free instead of failing."""
    engine = load_engine(str(world / "model"), dtype="fp32", kind="batched")
    service = ServeService(engine, "tiny", world / "adapters", Keys.load(world / "keys.yaml"), capacity=1,
                           pinned=["acme-sql"], adapter_wait_s=0.5)
    srv = Server(service)
    try:
        acme = srv.client(ACME)
        acme.chat.completions.create(model="acme-sql", messages=MSGS, temperature=0, max_tokens=2)
        t0 = time.perf_counter()
        with pytest.raises(openai.RateLimitError, match="pinned or in use"):
            acme.with_options(max_retries=0).chat.completions.create(model="acme-support", messages=MSGS,
                                                                     max_tokens=2)
        assert time.perf_counter() - t0 >= 0.5  # it waited before giving up
        service.adapters.wait_s = 30.0
        threading.Timer(0.3, lambda: service.adapters.unpin("acme-sql")).start()  # a slot frees
        r = acme.with_options(max_retries=0).chat.completions.create(model="acme-support", messages=MSGS,
                                                                     temperature=0, max_tokens=2)
        assert r.choices[0].message.content is not None and list(service.adapters.resident) == ["acme-support"]
    finally:
        srv.stop()


def test_requests_hold_their_adapter_until_they_end_and_cold_ones_queue_in_order(world):
    """A request holds its adapter while it is in the engine (so an eviction never has to ask the engine which
    adapters are busy); requests for cold adapters wait for a slot in arrival order, and get it as soon as the
    request holding it ends, with no 429."""
    engine = load_engine(str(world / "model"), dtype="fp32", kind="batched")
    service = ServeService(engine, "tiny", world / "adapters", Keys.load(world / "keys.yaml"), capacity=1)
    loads, add = [], engine.add_adapter
    engine.add_adapter = lambda name, path, slot=None: (loads.append(name), add(name, path, slot))[1]
    srv, gate, out = Server(service), threading.Event(), {}
    try:
        acme, globex = srv.client(ACME).with_options(max_retries=0), srv.client(GLOBEX).with_options(max_retries=0)
        acme.chat.completions.create(model="acme-sql", messages=MSGS, max_tokens=1)
        threading.Thread(target=service.scheduler.call, args=(gate.wait,)).start()  # holds the engine thread

        def ask(client, model):
            out[model] = client.chat.completions.create(model=model, messages=MSGS, temperature=0, max_tokens=3)

        first = threading.Thread(target=ask, args=(acme, "acme-sql"))
        first.start()
        deadline = time.monotonic() + 10
        while service.scheduler.waiting == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert service.adapters.using == {"acme-sql": 1}  # queued for the engine, and holding its adapter
        waiting = [threading.Thread(target=ask, args=(globex, "globex-bot")),
                   threading.Thread(target=ask, args=(acme, "acme-support"))]
        for t in waiting:
            t.start()
            time.sleep(0.3)  # globex-bot asked first
        assert loads == ["acme-sql"]  # both wait: the one slot is in use
        gate.set()
        for t in [first, *waiting]:
            t.join(30)
        assert sorted(out) == ["acme-sql", "acme-support", "globex-bot"]
        assert all(r.usage.completion_tokens == 3 for r in out.values())
        assert loads == ["acme-sql", "globex-bot", "acme-support"]
        for _ in range(100):  # a request lets go of its adapter when it leaves the engine, just after its answer
            if not service.adapters.using:
                break
            time.sleep(0.05)
        assert not service.adapters.using
    finally:
        gate.set()
        srv.stop()


def test_cold_requests_wait_while_the_queue_moves_and_fail_when_it_is_stuck(world):
    """`adapter_wait_s` bounds a wait with no progress, not a wait in a moving queue: a request that waited
    longer than it behind another that got a slot still gets its own; with every slot held and none freeing,
    the waiter gets a 429 after `adapter_wait_s`."""
    import asyncio

    from tunelab.infer.testing import FakeEngine
    from tunelab.server.auth import OPEN
    from tunelab.server.schemas import ApiError

    service = ServeService(FakeEngine(), "fake", world / "adapters", capacity=1, adapter_wait_s=0.6)

    async def use(name, hold_s, log):
        async with service.models.adapter_for(OPEN, name):
            log.append((name, round(time.monotonic() - t0, 1)))
            await asyncio.sleep(hold_s)

    async def main():
        log = []
        held = asyncio.create_task(use("acme-sql", 0.5, log))  # holds the one slot for 0.5 s
        await asyncio.sleep(0.05)
        waiters = [asyncio.create_task(use("acme-support", 0.5, log))]
        await asyncio.sleep(0.05)
        waiters.append(asyncio.create_task(use("globex-bot", 0.0, log)))  # its slot frees after ~0.9 s
        await asyncio.gather(held, *waiters)
        assert [n for n, _ in log] == ["acme-sql", "acme-support", "globex-bot"] and log[-1][1] >= 0.9
        service.adapters.acquire("acme-sql")  # held and never released: the queue is stuck
        t = time.monotonic()
        with pytest.raises(ApiError, match="pinned or in use") as e:
            await use("acme-support", 0, log)
        assert e.value.status == 429 and 0.6 <= time.monotonic() - t < 2

    t0 = time.monotonic()
    try:
        asyncio.run(main())
    finally:
        service.close()


def _concurrently(*fns, timeout: float = 300) -> None:
    threads = [threading.Thread(target=f) for f in fns]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout)


def test_faulty_clients_cost_the_others_nothing(server):
    """Clients that close mid-stream, send malformed JSON or a 1 MB prompt, and name 1,000 random adapters,
    all while a good client runs: the good client's answers are exactly what it gets alone, the bad ones
    get their errors, no adapter is loaded for a bad name, and an abandoned stream stops decoding."""
    import random
    import string

    service = server.service
    acme = server.client(ACME)

    def ask():
        return acme.chat.completions.create(model="acme-support", messages=MSGS, temperature=0, max_tokens=8
                                            ).choices[0].message.content

    alone = ask()
    loads = service.adapters.loads
    engine, cancelled, dropped = service.engine, [], service.scheduler.dropped
    real_abort = engine.abort

    def watch_abort(row):  # observes the real method: how far each dropped row got
        cancelled.append((row.request.adapter, len(row.token_ids), row.finish_reason))
        real_abort(row)

    engine.abort = watch_abort
    good, errors, statuses = [], [], {"malformed": [], "huge": [], "random": []}
    auth = {"Authorization": f"Bearer {ACME}"}
    url = server.url + "/v1/chat/completions"

    def good_client():
        try:
            good.extend(ask() for _ in range(4))
        except Exception as e:  # noqa: BLE001 - recorded for the assertion
            errors.append(e)

    def drop_mid_stream():
        for _ in range(3):
            body = {"model": "acme-sql", "messages": MSGS, "max_tokens": 400, "stream": True}
            with httpx.stream("POST", url, json=body, headers=auth, timeout=30) as r:
                next(r.iter_lines())  # the first event, then hang up

    def malformed():
        for body in (b'{"model": "acme-support", "messages": [', b"\xff\xfe", b'{"messages": 3}'):
            r = httpx.post(url, content=body, headers={**auth, "Content-Type": "application/json"}, timeout=30)
            statuses["malformed"].append((r.status_code, r.json()["error"]["type"]))

    def huge():
        big = "lorem ipsum " * (1_000_000 // 12)  # 1 MB of prompt
        r = httpx.post(url, json={"model": "acme-support", "messages": [{"role": "user", "content": big}]},
                       headers=auth, timeout=60)
        statuses["huge"].append((r.status_code, r.json()["error"].get("code")))

    def random_adapters():
        rng = random.Random(0)
        with httpx.Client(timeout=30) as c:
            for i in range(1000):
                name = "".join(rng.choices(string.ascii_lowercase + "-", k=12))
                if i % 100 == 0:
                    name = "../" * (i // 100 % 3 + 1) + "model"  # path escapes among them
                r = c.post(url, json={"model": name, "messages": MSGS}, headers=auth)
                statuses["random"].append(r.status_code)

    _concurrently(good_client, drop_mid_stream, malformed, huge, random_adapters)
    assert not errors and good == [alone] * 4
    assert statuses["malformed"] == [(400, "invalid_request_error")] * 3
    assert statuses["huge"] == [(400, "context_length_exceeded")]
    assert statuses["random"] == [404] * 1000
    assert service.adapters.loads - loads <= 1  # acme-sql (the dropped streams'), never one for a random name
    for _ in range(100):  # the abandoned streams were cancelled, not decoded to 400 tokens
        if service.scheduler.depth() == 0:
            break
        time.sleep(0.05)
    del engine.abort
    assert service.scheduler.depth() == 0 and not engine.has_unfinished()
    assert service.scheduler.dropped - dropped == 3  # before admission, or mid-decoding (below)
    assert all(a == "acme-sql" and n < 400 and r is None for a, n, r in cancelled)
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    assert ask() == alone


def test_vllm_plan_exports_the_adapters_and_names_them(world, tmp_path, tunelab):
    import shutil

    from tunelab.errors import TunelabError
    from tunelab.server.vllm import plan_vllm

    root = tmp_path / "adapters"
    for name in ("acme-sql", "acme-support"):
        shutil.copytree(world / "adapters" / name, root / name)
    plan = plan_vllm(str(world / "model"), root, tmp_path / "export", upstream_port=9001)
    cmd = plan.command
    assert cmd.startswith(f"vllm serve {world / 'model'} --served-model-name {world / 'model'}")
    assert "--enable-lora --max-lora-rank 8 --max-loras 2 --lora-modules" in cmd and "--port 9001" in cmd
    for name in ("acme-sql", "acme-support"):  # r 4 adapters: vLLM's smallest rank setting above 4 is 8
        assert f"{name}={(tmp_path / 'export' / name).resolve()}" in cmd
        assert (tmp_path / "export" / name / "adapter_model.safetensors").is_file()
    with pytest.raises(TunelabError, match="pickled"):  # an adapter vLLM cannot load is named, not skipped
        plan_vllm(str(world / "model"), world / "adapters", tmp_path / "export2")
    if shutil.which("vllm") is None:
        code, out, err = tunelab("serve", "--engine", "vllm", "--model", world / "model", "--adapters", root,
                                 "--export-dir", tmp_path / "export3", "--run")
        assert code == 2 and "not on PATH" in err
        lines = out.splitlines()  # both commands printed whole, one line each, so they can be pasted
        assert len(lines) == 2 and lines[0].startswith(f"vllm serve {world / 'model'} ") and "acme-sql=" in lines[0]
        assert lines[1] == f"tunelab serve --engine vllm --model {world / 'model'} --upstream http://127.0.0.1:8001 " \
                           "--port 8000", lines


def test_key_proxy_in_front_of_an_openai_compatible_server(world):
    """`serve --engine vllm`'s proxy, in front of a real OpenAI-compatible server with no keys of its own (tunelab's;
    vLLM itself does not run here): the tenants' keys apply, everything else passes through unchanged."""
    from tunelab.server.vllm import build_proxy

    engine = load_engine(str(world / "model"), dtype="fp32", kind="batched")
    upstream = Server(ServeService(engine, "tiny", world / "adapters", None, capacity=2, default_max_tokens=12))
    proxy = Server(None, app=build_proxy(upstream.url, Keys.load(world / "keys.yaml"), "tiny"))
    try:
        direct, acme = upstream.client("none"), proxy.client(ACME)
        want = direct.chat.completions.create(model="acme-sql", messages=MSGS, temperature=0, max_tokens=6)
        got = acme.chat.completions.create(model="acme-sql", messages=MSGS, temperature=0, max_tokens=6)
        assert got.choices[0].message.content == want.choices[0].message.content
        chunks = acme.chat.completions.create(model="acme-sql", messages=MSGS, temperature=0, max_tokens=6,
                                              stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
            want.choices[0].message.content
        plain = [c.completions.create(model="tiny", prompt="Hello", temperature=0, max_tokens=3) for c in (direct, acme)]
        assert plain[1].choices[0].text == plain[0].choices[0].text  # /v1/completions: passed through unchanged
        assert plain[1].usage.completion_tokens == plain[0].usage.completion_tokens <= 3
        with pytest.raises(openai.NotFoundError) as e:  # another tenant's adapter: as if it did not exist
            acme.chat.completions.create(model="globex-bot", messages=MSGS, max_tokens=2)
        assert e.value.body["code"] == "model_not_found"
        with pytest.raises(openai.AuthenticationError):
            proxy.client("sk-wrong").chat.completions.create(model="tiny", messages=MSGS, max_tokens=2)
        ids = [m.id for m in acme.models.list().data]
        assert "tiny" in ids and "acme-sql" in ids and "globex-bot" not in ids
        assert "globex-bot" in [m.id for m in direct.models.list().data]  # the upstream has it; the proxy hides it
    finally:
        proxy.stop()
        upstream.stop()


def test_serve_http_runs_the_engine_on_the_calling_thread(world):
    """`serve_http` (what `tunelab serve` runs): uvicorn on a thread, the engine loop on the thread that loaded the
    model (torch's OpenMP pool is per thread; see tunelab.server.scheduler). A pinned adapter loads before the loop
    starts; the result of `while_serving` comes back; a taken port is a clear error."""
    import socket

    from tunelab.errors import TunelabError
    from tunelab.server import serve_http

    engine = load_engine(str(world / "model"), dtype="fp32", kind="batched")
    threads, step = set(), engine.step
    engine.step = lambda: (threads.add(threading.get_ident()), step())[1]
    service = ServeService(engine, "tiny", world / "adapters", capacity=2, default_max_tokens=8,
                           pinned=["acme-support"], engine_thread=False)
    assert engine.adapters == ["acme-support"]

    def clients(port):
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=60)
        whole = c.chat.completions.create(model="acme-support", messages=MSGS, temperature=0).choices[0]
        parts = c.chat.completions.create(model="acme-support", messages=MSGS, temperature=0, stream=True)
        return whole.message.content, "".join(p.choices[0].delta.content or "" for p in parts if p.choices)

    whole, streamed = serve_http(service, "127.0.0.1", 0, log_level="warning", while_serving=clients)
    assert whole and streamed == whole
    assert threads == {threading.get_ident()}
    assert not service.scheduler._running  # the loop returned when the server stopped

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        other = ServeService(engine, "tiny", engine_thread=False)
        with pytest.raises(TunelabError, match=f"could not listen on 127.0.0.1:{port}"):
            serve_http(other, "127.0.0.1", port, log_level="critical", while_serving=lambda p: None)


def test_tunelab_serve_process_answers_then_stops_on_sigterm(world, tmp_path):
    """The real `tunelab serve` process: it answers over HTTP, and SIGTERM stops it cleanly (exit 0)."""
    import os
    import signal
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "tunelab", "serve", "--model", str(world / "model"), "--adapters",
                             str(world / "adapters"), "--port", str(port)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_health(proc, port)
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=60)
        r = c.chat.completions.create(model="acme-sql", messages=MSGS, max_tokens=4, temperature=0)
        assert r.usage.completion_tokens >= 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        said = proc.stdout.read()  # at start: the adapters found, and why a subfolder is not served
        assert f"3 adapter(s) in {world / 'adapters'}: acme-sql, acme-support, globex-bot" in said
        assert "refused pickled: no adapter_model.safetensors (pickled weights are never loaded)" in said
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_cold_adapter_load_leaves_the_event_loop_free(world):
    """A load waits for the engine thread (after the step in progress); it runs on a worker thread, so the
    server keeps answering meanwhile. It used to run on the event loop and stall every other request."""
    engine = load_engine(str(world / "model"), dtype="fp32", kind="batched")
    real, loading = engine.add_adapter, threading.Event()

    def slow_add(name, path, slot=None):
        loading.set()
        time.sleep(2.0)
        real(name, path, slot)

    engine.add_adapter = slow_add
    srv = Server(ServeService(engine, "tiny", world / "adapters", capacity=2))
    try:
        done = []
        cold = threading.Thread(target=lambda: done.append(srv.client("x").chat.completions.create(
            model="acme-sql", messages=MSGS, temperature=0, max_tokens=2)))
        cold.start()
        assert loading.wait(10)
        t0 = time.perf_counter()
        assert httpx.get(srv.url + "/health").status_code == 200
        models = httpx.get(srv.url + "/v1/models").json()["data"]
        assert time.perf_counter() - t0 < 1.0 and not done  # answered while the load is still running
        assert "acme-sql" in [m["id"] for m in models]
        cold.join()
        assert done and done[0].usage.completion_tokens == 2
    finally:
        srv.stop()


def test_the_scheduler_runs_a_request_before_an_eviction_queued_after_it(world):
    """The scheduler puts a request into the engine before it runs an eviction queued after it, so the engine
    refuses that eviction: a request never reaches the engine after its adapter was unloaded. (The manager never
    evicts an adapter a request holds: tests/test_adapters.py.)"""
    import asyncio

    from tunelab.server.scheduler import Scheduler

    engine = load_engine(str(world / "model"), {"acme-sql": str(world / "adapters" / "acme-sql")}, dtype="fp32",
                         kind="batched")
    sched, gate, outcome = Scheduler(engine), threading.Event(), []
    loop = asyncio.new_event_loop()
    try:
        threading.Thread(target=sched.call, args=(gate.wait,)).start()  # holds the engine thread
        time.sleep(0.2)
        h = sched.submit(Request(MSGS, adapter="acme-sql", params=SamplingParams(max_new_tokens=2)), loop)

        def evict():
            try:
                sched.call(lambda: engine.remove_adapter("acme-sql"))
                outcome.append("removed")
            except Exception as e:  # noqa: BLE001 - the refusal is the point
                outcome.append(str(e))

        t = threading.Thread(target=evict)
        t.start()
        time.sleep(0.2)
        gate.set()  # the engine thread now takes the request and the eviction in one go, in their order
        t.join()
        assert "in use" in outcome[0]

        async def result():
            while True:
                kind, value = await h.events.get()
                if kind in ("done", "error"):
                    return kind, value

        kind, value = loop.run_until_complete(asyncio.wait_for(result(), 30))
        assert kind == "done" and len(value.token_ids) == 2
    finally:
        sched.close()
        loop.close()


def test_a_request_the_engine_refuses_never_strands_a_call_queued_behind_it(world):
    """The engine thread takes a request and then runs an admin call queued after it in the same batch; when
    the engine's submit raises (any exception), that request fails alone and the call still gets its answer
    (a caller blocked on it, e.g. an adapter load under the pool's lock, would otherwise wait forever)."""
    import asyncio

    from tunelab.server.scheduler import Scheduler

    engine = load_engine(str(world / "model"), dtype="fp32", kind="batched")
    add_request = engine.add_request

    def refuse(req):
        if req.params.max_new_tokens == 7:
            raise ValueError("refused")
        return add_request(req)

    engine.add_request = refuse
    sched, gate, answers = Scheduler(engine), threading.Event(), []
    loop = asyncio.new_event_loop()
    try:
        threading.Thread(target=sched.call, args=(gate.wait,)).start()  # holds the engine thread
        time.sleep(0.2)
        h = sched.submit(Request(MSGS, params=SamplingParams(max_new_tokens=7)), loop)
        caller = threading.Thread(target=lambda: answers.append(sched.call(lambda: "answered")), daemon=True)
        caller.start()
        time.sleep(0.2)
        gate.set()  # the request and the call reach the engine thread in one batch, in that order
        caller.join(10)
        assert answers == ["answered"]
        kind, value = loop.run_until_complete(asyncio.wait_for(h.events.get(), 10))
        assert kind == "error" and str(value) == "refused"
    finally:
        gate.set()
        sched.close()
        loop.close()
