"""The request log behind the server, driven by the official `openai` SDK over loopback: rows carry the GenAI
fields and are committed before the answer leaves; content only for tenants that asked, redacted; a tenant reads
only its own rows; PostgreSQL (pgserver) going down mid-load costs no request and the drops are counted; the
server killed with SIGKILL under load keeps every answered request's row, whole."""

import hashlib
import json
import re
import shutil
import threading
import time

import httpx2 as httpx
import pytest

openai = pytest.importorskip("openai")

from conftest import Server, wait_for_health  # noqa: E402

from tunelab.infer import load_engine  # noqa: E402
from tunelab.infer.testing import FakeEngine  # noqa: E402
from tunelab.ops.redact import redactor  # noqa: E402
from tunelab.ops.requestlog import RequestLog  # noqa: E402
from tunelab.server import Keys, ServeService, hash_key  # noqa: E402

ACME, GLOBEX, ADMIN = "sk-acme", "sk-globex", "sk-admin"
SCHEMA = {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}}
SECRET = ("Ship ORD-123456 to jane.doe@example.com, phone +1 (555) 123-4567, "
          "card 4111 1111 1111 1111, on 2026-12-07.")


@pytest.fixture(scope="module")
def world(tmp_path_factory, tokenizer):
    """A tiny Llama folder, two LoRA adapters, and keys: acme logs content (and redacts order ids), globex
    metadata only, ops is the admin."""
    import torch
    from peft import LoraConfig, get_peft_model

    from tunelab.models import tiny_model

    root = tmp_path_factory.mktemp("reqlog")
    tiny_model("llama", tokenizer=tokenizer, initializer_range=0.4)[0].save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    for i, name in enumerate(["acme-bot", "globex-bot"]):
        torch.manual_seed(i)
        pm = get_peft_model(tiny_model("llama", tokenizer=tokenizer)[0],
                            LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
        pm.save_pretrained(root / "adapters" / name)
    (root / "keys.yaml").write_text(f"""tenants:
  acme: {{key_sha256: [{hash_key(ACME)}], adapters: [acme-bot], log: content, redact: {{order: 'ORD-\\d+'}}}}
  globex: {{key_sha256: [{hash_key(GLOBEX)}], adapters: [globex-bot]}}
  ops: {{key_sha256: [{hash_key(ADMIN)}], admin: true}}
""")
    return root


def logs(srv, key: str, **params) -> dict:
    r = httpx.get(srv.url + "/v1/logs", params=params, headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 200, r.text
    return {a["gen_ai.response.id"]: a for a in r.json()["data"]}


def dropped(srv) -> float:
    m = re.search(r"^tunelab_log_rows_dropped_total (\S+)$", httpx.get(srv.url + "/metrics").text, re.M)
    return float(m.group(1))


def test_rows_carry_the_genai_fields(world, tmp_path):
    store = RequestLog.open(tmp_path / "log.sqlite")
    engine = load_engine(str(world / "model"), dtype="fp32", kind="batched")
    srv = Server(ServeService(engine, "tiny", world / "adapters", Keys.load(world / "keys.yaml"),
                              default_max_tokens=8, request_log=store))
    try:
        c, t0 = srv.client(GLOBEX), time.time()
        r = c.chat.completions.create(model="globex-bot", messages=[{"role": "user", "content": "Hi"}],
                                      temperature=0.7, top_p=0.9, seed=5, max_tokens=6, user="alice",
                                      response_format={"type": "json_schema",
                                                       "json_schema": {"name": "item", "schema": SCHEMA}})
        assert store.get(r.id) is not None  # committed before the answer left, no flush needed
        chunks = list(c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                                max_tokens=5, stream=True, stream_options={"include_usage": True}))
        assert store.get(chunks[0].id) is not None
        t = c.completions.create(model="tiny", prompt="Hello", max_tokens=4, temperature=0)
        rows = logs(srv, GLOBEX)
        assert list(rows) == [r.id, chunks[0].id, t.id]
        a = rows[r.id]
        assert a["gen_ai.operation.name"] == "chat" and a["gen_ai.request.model"] == "globex-bot"
        assert a["gen_ai.response.model"] == "globex-bot" and a["tunelab.adapter"] == "globex-bot"
        assert "tunelab.version" not in a  # not an alias
        assert (a["gen_ai.request.temperature"], a["gen_ai.request.top_p"], a["gen_ai.request.seed"],
                a["gen_ai.request.max_tokens"]) == (0.7, 0.9, 5, 6)
        assert a["gen_ai.usage.input_tokens"] == r.usage.prompt_tokens
        assert a["gen_ai.usage.output_tokens"] == r.usage.completion_tokens
        assert a["gen_ai.response.finish_reasons"] == [r.choices[0].finish_reason]
        assert a["tunelab.grammar"] == "json_schema:" + hashlib.sha256(
            json.dumps(SCHEMA, sort_keys=True).encode()).hexdigest()[:12] and a["gen_ai.output.type"] == "json"
        assert a["tunelab.outcome"] == ("length_closed" if r.choices[0].finish_reason == "length" else "ok")
        assert a["tunelab.tenant"] == "globex"
        assert a["tunelab.user_sha256"] == hashlib.sha256(b"alice").hexdigest()
        assert 0 <= a["tunelab.ttft_s"] <= a["tunelab.latency_s"] < time.time() - t0 + 1
        assert t0 - 1 < a["tunelab.ts"] < time.time()
        assert "gen_ai.input.messages" not in a and "gen_ai.output.messages" not in a  # globex: metadata
        s = rows[chunks[0].id]
        assert s["gen_ai.usage.output_tokens"] == chunks[-1].usage.completion_tokens and "tunelab.adapter" not in s
        assert s["gen_ai.response.model"] == "tiny"
        assert rows[t.id]["gen_ai.operation.name"] == "text_completion" and rows[t.id]["tunelab.outcome"] == "ok"
    finally:
        srv.stop()


def echo_server(world, store) -> Server:
    """The server over a FakeEngine that answers with the last user message (so the answer holds the secrets)."""
    from tunelab.models import load_tokenizer

    engine = FakeEngine(tokenizer=load_tokenizer("smollm2-135m-instruct"))
    return Server(ServeService(engine, "fake", world / "adapters", Keys.load(world / "keys.yaml"),
                               request_log=store))


def test_content_only_for_tenants_that_asked_redacted_and_each_reads_its_own(world, tmp_path):
    store = RequestLog.open(tmp_path / "log.sqlite")
    srv = echo_server(world, store)
    try:
        msgs = [{"role": "user", "content": SECRET}]
        a = srv.client(ACME).chat.completions.create(model="acme-bot", messages=msgs)
        g = srv.client(GLOBEX).chat.completions.create(model="globex-bot", messages=msgs)
        assert "jane.doe@example.com" in a.choices[0].message.content  # the client gets the answer unredacted
        redacted = ("Ship [ORDER] to [EMAIL], phone [PHONE], card [CARD], on 2026-12-07.")
        row = logs(srv, ACME)[a.id]
        assert json.loads(row["gen_ai.input.messages"]) == [{"role": "user", "content": redacted}]
        assert row["gen_ai.output.messages"] == redacted
        assert store.get(a.id).answer == redacted  # and so it is stored
        assert store.get(g.id).prompt is None and store.get(g.id).answer is None
        assert list(logs(srv, ACME)) == [a.id]  # each tenant reads only its own rows
        assert list(logs(srv, GLOBEX, tenant="acme")) == [g.id]  # asking for another's changes nothing
        assert list(logs(srv, ADMIN)) == [a.id, g.id] and list(logs(srv, ADMIN, tenant="acme")) == [a.id]
        assert list(logs(srv, ADMIN, adapter="globex-bot")) == [g.id]
        assert httpx.get(srv.url + "/v1/logs").status_code == 401
    finally:
        srv.stop()


def test_postgresql_log_down_mid_load_costs_no_request(world):
    pgserver = pytest.importorskip("pgserver")
    from pgserver._commands import pg_ctl
    from test_requestlog import pg_folder

    folder = pg_folder()
    pg = pgserver.get_server(folder, cleanup_mode="stop")
    srv = echo_server(world, RequestLog.open(pg.get_uri()))
    ok, failed, stop = [], [], threading.Event()

    def client(i):
        c = srv.client(ACME)
        while not stop.is_set():
            try:
                ok.append(c.chat.completions.create(model="acme-bot", messages=[{"role": "user",
                                                                                 "content": f"q {i}"}]).id)
            except Exception as e:  # noqa: BLE001 - counted: there must be none
                failed.append(e)
    threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
    try:
        for t in threads:
            t.start()
        while len(ok) < 60:
            time.sleep(0.05)
        pg_ctl(["-w", "-m", "fast", "stop"], pgdata=pg.pgdata, user=pg.system_user)  # the store goes away
        n = len(ok)
        while len(ok) < n + 120:
            time.sleep(0.05)
        stop.set()
        for t in threads:
            t.join(30)
        assert not failed and dropped(srv) > 0  # every request answered; the lost rows are counted
        pg.ensure_postgres_running()
        srv.service.logs.writer.flush()
        back = RequestLog.open(pg.get_uri())
        assert back.count() + dropped(srv) == len(ok)  # each row written or counted as dropped, none twice
        rid = srv.client(ACME).chat.completions.create(model="acme-bot", messages=[{"role": "user",
                                                                                  "content": "back"}]).id
        for _ in range(100):  # the writer reconnects by itself
            if back.get(rid) is not None:
                break
            time.sleep(0.1)
        assert back.get(rid) is not None
        back.close()
    finally:
        stop.set()
        srv.stop()
        pg.cleanup()
        shutil.rmtree(folder, ignore_errors=True)


def test_sigkill_under_load_keeps_every_answered_row_whole(world, tmp_path):
    import os
    import signal
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    db = tmp_path / "log.sqlite"
    proc = subprocess.Popen([sys.executable, "-m", "tunelab", "serve", "--model", str(world / "model"),
                             "--adapters", str(world / "adapters"), "--keys", str(world / "keys.yaml"),
                             "--port", str(port), "--log", str(db)], env={**os.environ, "HF_HUB_OFFLINE": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    answered, lock = {}, threading.Lock()

    def client(i):
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=ACME, max_retries=0, timeout=60)
        for j in range(1000):
            ask = f"question {i}/{j}"
            try:
                r = c.chat.completions.create(model="acme-bot", messages=[{"role": "user", "content": ask}],
                                              max_tokens=3 + j % 5)
            except Exception:  # noqa: BLE001 - the server was killed
                return
            with lock:
                answered[r.id] = (r, ask)

    try:
        wait_for_health(proc, port)
        threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        while len(answered) < 48:
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)  # mid-load: requests in flight, rows in the writer's queue
        proc.wait(30)
        for t in threads:
            t.join(60)
    finally:
        if proc.poll() is None:
            proc.kill()
    store = RequestLog.open(db)
    assert store._conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    rows = {r.response_id: r for r in store.rows()}  # every row parses (flags JSON, types)
    assert set(answered) <= set(rows)  # every answered request's row is there
    redact = redactor((("order", "ORD-\\d+"),))
    for rid, (r, ask) in answered.items():
        row = rows[rid]
        assert (row.tenant, row.model, row.adapter, row.outcome) == ("acme", "acme-bot", "acme-bot", "ok")
        assert (row.input_tokens, row.output_tokens) == (r.usage.prompt_tokens, r.usage.completion_tokens)
        assert row.finish_reason == r.choices[0].finish_reason and row.latency_s > 0
        assert json.loads(row.prompt) == [{"role": "user", "content": ask}]
        assert row.answer == redact(r.choices[0].message.content)
