"""The request log's store (SQLite WAL and PostgreSQL), its writer (batches, drops, retention), redaction, the
keys.yaml fields `log` and `redact`, and the OTLP spans (the SDK's in-memory exporter)."""

import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from tunelab.errors import TunelabError
from tunelab.ops.logwriter import LogWriter, Retention
from tunelab.ops.redact import Redactor, luhn, redactor
from tunelab.ops.requestlog import LogRow, RequestLog, attributes
from tunelab.server.auth import Keys, hash_key


def row(i: int, tenant: str = "acme", **kw) -> LogRow:
    return LogRow(f"chatcmpl-{i:04d}", 1000.0 + i, tenant, kw.pop("model", "orders"), **kw)


def check_store(log: RequestLog) -> None:
    """What both stores must do: rows by tenant / model / adapter / time, atomic batches, feedback only on a
    tenant's own responses, retention."""
    log.write([row(1, flags=["regex"], input_tokens=5, output_tokens=7, finish_reason="length",
                   outcome="length_closed", grammar="json_object", prompt="p", answer="a"),
               row(2, "globex", model="sql", adapter="sql@v2", version="v2", temperature=0.5, seed=3),
               row(3, user="ab" * 32)])
    log.write([row(3)])  # a retried row is kept once, as first written
    assert [r.response_id for r in log.rows()] == ["chatcmpl-0001", "chatcmpl-0002", "chatcmpl-0003"]
    assert [r.response_id for r in log.rows(tenant="acme")] == ["chatcmpl-0001", "chatcmpl-0003"]
    assert [r.response_id for r in log.rows(adapter="sql@v2")] == ["chatcmpl-0002"]
    assert [r.response_id for r in log.rows(model="orders", since=1002, until=1004)] == ["chatcmpl-0003"]
    assert [r.response_id for r in log.rows(limit=2)] == ["chatcmpl-0002", "chatcmpl-0003"]
    assert log.get("chatcmpl-0001") == row(1, flags=["regex"], input_tokens=5, output_tokens=7,
                                           finish_reason="length", outcome="length_closed", grammar="json_object",
                                           prompt="p", answer="a")
    assert log.get("chatcmpl-0003").user == "ab" * 32 and log.get("nope") is None
    with pytest.raises(Exception, match="(?i)null"):  # a row without a tenant: the batch fails as a whole
        log.write([row(4), row(5, tenant=None)])
    assert log.count() == 3 and log.get("chatcmpl-0004") is None

    assert not log.add_feedback("chatcmpl-0001", "globex", score=1.0)  # another tenant's response
    assert not log.add_feedback("chatcmpl-9999", "acme", score=1.0)
    assert log.add_feedback("chatcmpl-0001", "acme", score=0.0, label="wrong", comment="qty is 3",
                            correction='{"qty": 3}')
    assert log.add_feedback("chatcmpl-0002", None, label="good")  # an admin rates any
    with pytest.raises(TunelabError, match="score or a label"):
        log.add_feedback("chatcmpl-0001", "acme")
    fb = log.feedback(tenant="acme")
    assert len(fb) == 1 and fb[0]["score"] == 0.0 and fb[0]["label"] == "wrong"
    assert fb[0]["explanation"] == "qty is 3" and fb[0]["correction"] == '{"qty": 3}'
    assert fb[0]["outcome"] == "length_closed" and fb[0]["response_ts"] == 1001.0 and fb[0]["name"] == "user_feedback"
    assert [f["version"] for f in log.feedback(adapter="sql@v2")] == ["v2"]

    assert log.prune(max_age_s=10, now=1012.5) == 2  # older than 1002.5: rows 1 and 2, and their feedback
    assert [r.response_id for r in log.rows()] == ["chatcmpl-0003"] and log.feedback() == []
    log.write([row(i, prompt="x" * 1000) for i in range(10, 20)])  # ~1200 bytes each
    log.prune(max_bytes=5000)
    assert [r.response_id for r in log.rows()] == [f"chatcmpl-{i:04d}" for i in range(16, 20)]


def test_sqlite_store(tmp_path):
    log = RequestLog.open(tmp_path / "requests.sqlite")
    check_store(log)
    log.close()
    again = RequestLog.open(f"sqlite:///{tmp_path / 'requests.sqlite'}")
    assert again.count() == 4 and again._conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_default_store_is_beside_the_registry(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNELAB_REGISTRY", str(tmp_path / "reg" / "registry.sqlite"))
    assert RequestLog.open(None).url == str(tmp_path / "reg" / "requests.sqlite")


def pg_folder() -> Path:
    """A folder for pgserver's data outside pytest's: as root, pgserver runs PostgreSQL as another user, which
    must traverse the path, and a pytest session starting meanwhile makes /tmp/pytest-of-root private again."""
    return Path(tempfile.mkdtemp(prefix="tunelab-pglog-"))


@pytest.fixture(scope="module")
def pg():
    pgserver = pytest.importorskip("pgserver")
    folder = pg_folder()
    server = pgserver.get_server(folder, cleanup_mode="stop")
    yield server
    server.cleanup()
    shutil.rmtree(folder, ignore_errors=True)


def test_postgresql_store(pg):
    pg.psql("DROP TABLE IF EXISTS request_log; DROP TABLE IF EXISTS request_feedback;")
    log = RequestLog.open(pg.get_uri())
    check_store(log)
    log.close()


def test_an_unreachable_postgresql_is_a_clear_error(tmp_path):
    with pytest.raises(TunelabError, match="cannot reach the PostgreSQL request log"):
        RequestLog.open(f"postgresql://nobody@/nodb?host={tmp_path}")


class Flaky(RequestLog):
    """A real SQLite store that fails every write while `down` is set (the store unreachable)."""

    down = False

    def write(self, rows):
        self.batches = [*getattr(self, "batches", []), len(rows)]
        if self.down:
            raise OSError("store unreachable")
        super().write(rows)


def test_writer_batches_drops_when_the_store_is_down_and_keeps_retention(tmp_path):
    store, drops = Flaky.open(tmp_path / "r.sqlite"), []
    w = LogWriter(store, batch=64, on_drop=drops.append, retry_s=0.0, retention=Retention(3600, every_s=0.0))
    futs = [w.submit(LogRow(f"chatcmpl-{i}", time.time(), "acme", "m")) for i in range(200)]
    assert w.flush() and all(f.result() for f in futs) and store.count() == 200
    assert max(store.batches) > 1 and sum(store.batches) == 200  # batched, every row once
    store.down = True
    futs = [w.submit(LogRow(f"chatcmpl-down-{i}", time.time(), "acme", "m")) for i in range(30)]
    assert w.flush() and not any(f.result() for f in futs) and sum(drops) == 30 and w.failing
    store.down = False
    w.submit(LogRow("chatcmpl-old", time.time() - 7200, "acme", "m"))  # older than the retention: pruned
    assert w.submit(LogRow("chatcmpl-back", time.time(), "acme", "m")).result(5) and not w.failing
    w.submit(LogRow("chatcmpl-last", time.time(), "acme", "m")).result(5)
    assert store.get("chatcmpl-old") is None and store.count() == 202
    w.close()


def test_a_full_queue_drops_instead_of_blocking(tmp_path):
    store, gate = RequestLog.open(tmp_path / "r.sqlite"), threading.Event()
    real = store.write
    store.write = lambda rows: (gate.wait(10), real(rows))
    drops = []
    w = LogWriter(store, max_queue=4, batch=1, on_drop=drops.append)
    t0 = time.perf_counter()
    futs = [w.submit(LogRow(f"chatcmpl-{i}", 0.0, "acme", "m")) for i in range(20)]
    assert time.perf_counter() - t0 < 0.5  # submit never waits for the store
    assert sum(drops) >= 15
    gate.set()
    w.close()
    assert store.count() == sum(1 for f in futs if f.result())


def test_redaction():
    r = Redactor([("order", r"ORD-\d{6}")])
    text = ("mail jane.doe+x@example.co.uk, call +1 (555) 123-4567 or 555-123-4567 or +44 20 7946 0958, "
            "card 4111 1111 1111 1111 / 5500-0000-0000-0004, order ORD-123456 on 2026-12-07: qty 12, 19.99 EUR, "
            "ref 4111111111111112")
    assert r(text) == ("mail [EMAIL], call [PHONE] or [PHONE] or [PHONE], card [CARD] / [CARD], order [ORDER] "
                       "on 2026-12-07: qty 12, 19.99 EUR, ref 4111111111111112")  # not Luhn-valid: not a card
    assert luhn("4111111111111111") and not luhn("4111111111111112")
    assert redactor()('{"name": "widget", "qty": 3}') == '{"name": "widget", "qty": 3}'
    assert redactor((("redacted", "secret-\\w+"),))("a secret-abc b") == "a [REDACTED] b"
    with pytest.raises(TunelabError, match="is not a regular expression"):
        Redactor([("x", "(")])


def test_keys_yaml_log_and_redact(tmp_path):
    path = tmp_path / "keys.yaml"
    path.write_text(f"tenants:\n  acme: {{key_sha256: [{hash_key('a')}], log: content, redact: {{order: 'ORD-\\d+'}}}}\n"
                    f"  globex: {{key_sha256: [{hash_key('g')}], redact: ['x\\d']}}\n")
    keys = Keys.load(path)
    acme, globex = keys.tenant("Bearer a"), keys.tenant("Bearer g")
    assert acme.log == "content" and acme.redact == (("order", "ORD-\\d+"),)
    assert globex.log == "metadata" and globex.redact == (("redacted", "x\\d"),)
    path.write_text(f"tenants:\n  acme: {{key_sha256: [{hash_key('a')}], log: everything}}\n")
    with pytest.raises(TunelabError, match="tenants.acme.log: Input should be 'metadata' or 'content'"):
        Keys.load(path)
    path.write_text(f"tenants:\n  acme: {{key_sha256: [{hash_key('a')}], redact: ['ORD-(']}}\n")
    with pytest.raises(TunelabError, match=r"tenants.acme.redact: 'ORD-\(' is not a regular expression"):
        Keys.load(path)


def test_otlp_spans_carry_the_genai_attributes(tmp_path):
    pytest.importorskip("opentelemetry.sdk")
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from tunelab.ops.otel import OtelSink

    exporter = InMemorySpanExporter()
    store = RequestLog.open(tmp_path / "r.sqlite")
    w = LogWriter(store, sinks=(OtelSink(exporter),))
    w.submit(LogRow("chatcmpl-1", 1000.0, "acme", "orders", "orders@v2", "v2", 0.2, 64, 0.9, 7, 11, 5, "length",
                    "length_closed", 0.25, 0.05, "json_object", ["regex"]))
    w.submit(LogRow("cmpl-2", 1001.0, "acme", "base", outcome="blocked"))
    w.close()
    spans = exporter.get_finished_spans()
    assert [s.name for s in spans] == ["chat orders", "text_completion base"]
    a = dict(spans[0].attributes)
    assert a["gen_ai.request.model"] == "orders" and a["gen_ai.response.model"] == "orders@v2"
    assert a["gen_ai.response.id"] == "chatcmpl-1" and a["gen_ai.response.finish_reasons"] == ("length",)
    assert a["gen_ai.usage.input_tokens"] == 11 and a["gen_ai.usage.output_tokens"] == 5
    assert a["gen_ai.request.temperature"] == 0.2 and a["gen_ai.request.max_tokens"] == 64
    assert a["tunelab.version"] == "v2" and a["tunelab.outcome"] == "length_closed"
    assert spans[0].start_time == 1000 * 10**9 and spans[0].end_time - spans[0].start_time == 250_000_000
    assert not spans[0].status.is_ok or spans[0].status.status_code.name == "UNSET"
    assert spans[1].status.status_code.name == "ERROR"
    assert set(a) == {k for k in attributes(store.get("chatcmpl-1"))}


def test_the_row_of_an_exchange():
    """What the server's hook makes of a request: alias -> version, outcome from finish reasons, the grammar's
    re-samples and the output checks, the user's hash, content only for a `log: content` tenant."""
    from types import SimpleNamespace

    from tunelab.server.auth import Tenant
    from tunelab.server.schemas import ChatCompletionRequest
    from tunelab.server.serving_logs import Exchange, ServingLogs

    def done(reason="stop", grammar=None, text="mail me at a@b.io"):
        return SimpleNamespace(prompt_tokens=9, token_ids=[1, 2, 3], finish_reason=reason, text=text,
                               first_token_time=None, grammar=grammar)

    body = ChatCompletionRequest(model="orders", messages=[{"role": "user", "content": "hi"}], user="u1",
                                 response_format={"type": "json_object"})
    logs, plain = ServingLogs(), Tenant("acme", None)
    ex = Exchange("chatcmpl-1", plain, body, time.perf_counter(), 1000.0, adapter="orders@v2")
    r = logs.row(ex, [done()])
    assert (r.model, r.adapter, r.version, r.outcome, r.grammar) == ("orders", "orders@v2", "v2", "ok", "json_object")
    assert (r.input_tokens, r.output_tokens, r.prompt, r.answer) == (9, 3, None, None)
    assert r.user == __import__("hashlib").sha256(b"u1").hexdigest()
    assert logs.row(ex, [done("length_closed")]).outcome == "length_closed"
    assert logs.row(ex, [done("length_closed")]).finish_reason == "length"  # as the client saw it
    assert logs.row(ex, [done("stop", {"resampled": 1, "valid": True})]).outcome == "resampled"
    assert logs.row(ex, [done("cancelled")]).outcome == "error" and logs.row(ex, [], error=True).outcome == "error"
    ex.flags, ex.blocked = ["pii"], True
    r = logs.row(ex, [done()])
    assert (r.outcome, r.flags) == ("blocked", ["pii"])
    pinned = Exchange("chatcmpl-2", plain, body.model_copy(update={"model": "orders@v2"}), 0.0, 0.0, "orders@v2")
    assert logs.row(pinned, [done()]).version is None  # asked for the version itself: not an alias
    content = Exchange("chatcmpl-3", Tenant("acme", None, log="content"), body, 0.0, 0.0)
    r = logs.row(content, [done()])
    assert r.answer == "mail me at [EMAIL]" and r.prompt is None  # no messages recorded in this exchange


def test_otlp_without_the_extra_says_what_to_install(monkeypatch):
    from tunelab.ops.otel import OtelSink

    sink = OtelSink.otlp("http://127.0.0.1:9/v1/traces")  # installed here: builds, sends nothing until a batch
    sink.close()
    monkeypatch.setitem(sys.modules, "opentelemetry.exporter.otlp.proto.http.trace_exporter", None)
    with pytest.raises(TunelabError, match=r"--otlp needs the OTLP exporter: pip install 'tunelab\[otel\]'"):
        OtelSink.otlp("http://127.0.0.1:9/v1/traces")
    monkeypatch.setitem(sys.modules, "opentelemetry.sdk", None)
    with pytest.raises(TunelabError, match=r"needs the OpenTelemetry SDK: pip install 'tunelab\[otel\]'"):
        OtelSink.otlp("http://127.0.0.1:9/v1/traces")
