"""Log rows name the prompt version a request ran with (tunelab.ops.prompts' hash of its system prompt); a log
written before the field existed (SQLite or PostgreSQL) gets the column and keeps its rows."""

import sqlite3

import pytest

openai = pytest.importorskip("openai")

from conftest import Server  # noqa: E402
from test_requestlog import pg  # noqa: E402, F401 - the module's pgserver fixture

from tunelab.infer import load_engine  # noqa: E402
from tunelab.ops.prompts import set_alias_prompt  # noqa: E402
from tunelab.ops.requestlog import _SCHEMA, LogRow, RequestLog, attributes  # noqa: E402
from tunelab.server import Keys, ServeService, hash_key  # noqa: E402

# the request_log table as it was before prompt_version
OLD = _SCHEMA.replace(" prompt_version TEXT,", "")


def _old_rows_then_new(log: RequestLog) -> None:
    assert log.get("chatcmpl-old").prompt_version is None  # written before the field: kept, read as None
    log.write([LogRow("chatcmpl-new", 2.0, "acme", "orders", prompt_version="abcdef012345")])
    assert log.get("chatcmpl-new").prompt_version == "abcdef012345"
    assert attributes(log.get("chatcmpl-new"))["tunelab.prompt_version"] == "abcdef012345"


def test_a_sqlite_log_from_before_the_field_gets_the_column(tmp_path):
    assert "prompt_version" not in OLD
    path = tmp_path / "requests.sqlite"
    conn = sqlite3.connect(path)
    conn.executescript(OLD.format(autoid="INTEGER PRIMARY KEY"))
    conn.execute("INSERT INTO request_log (response_id, ts, tenant, model, input_tokens, output_tokens, "
                 "finish_reason, outcome, latency_s, flags, nbytes) VALUES ('chatcmpl-old', 1.0, 'acme', 'orders', "
                 "1, 1, 'stop', 'ok', 0.1, '[]', 200)")
    conn.commit()
    conn.close()
    log = RequestLog.open(path)
    _old_rows_then_new(log)
    log.close()
    RequestLog.open(path).close()  # opening it again adds nothing twice


def test_a_postgresql_log_from_before_the_field_gets_the_column(pg):  # noqa: F811
    pg.psql("DROP TABLE IF EXISTS request_log; DROP TABLE IF EXISTS request_feedback;")
    pg.psql(OLD.format(autoid="BIGSERIAL PRIMARY KEY"))
    pg.psql("INSERT INTO request_log (response_id, ts, tenant, model, input_tokens, output_tokens, finish_reason, "
            "outcome, latency_s, flags, nbytes) VALUES ('chatcmpl-old', 1.0, 'acme', 'orders', 1, 1, 'stop', 'ok', "
            "0.1, '[]', 200);")
    log = RequestLog.open(pg.get_uri())
    _old_rows_then_new(log)
    log.close()
    RequestLog.open(pg.get_uri()).close()


def test_a_served_request_names_its_prompt_version(tmp_path, tiny_model_dir):
    """Through the real server and the openai SDK: the row's prompt_version is the version the registry gave the
    alias's system prompt; a changed alias prompt is a new version; no system message, no version."""
    (tmp_path / "adapters").mkdir()
    (tmp_path / "keys.yaml").write_text(f"tenants:\n  acme: {{key_sha256: [{hash_key('sk-acme')}], log: content}}\n")
    store = RequestLog.open(tmp_path / "log.sqlite")
    engine = load_engine(str(tiny_model_dir), dtype="fp32", kind="batched")
    srv = Server(ServeService(engine, "tiny", tmp_path / "adapters", Keys.load(tmp_path / "keys.yaml"),
                              default_max_tokens=4, request_log=store))
    try:
        c = srv.client("sk-acme")

        def served(system: str | None) -> str | None:
            msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": "Hi"}]
            r = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=2, temperature=0)
            return store.get(r.id).prompt_version

        v1 = set_alias_prompt("orders", "You extract orders as JSON.")
        assert served("You extract orders as JSON.") == v1.version
        v2 = set_alias_prompt("orders", "You extract orders as compact JSON.")
        assert v2.version != v1.version and served("You extract orders as compact JSON.") == v2.version
        assert served(None) is None
    finally:
        srv.stop()
