"""POST /v1/feedback through the server (a tenant rates only its own responses; others are a 404), stored in the
shape of OTel's gen_ai.evaluation.result; `tunelab feedback export --mlflow` writes it as MLflow assessments."""

import sys

import httpx2 as httpx
import pytest

openai = pytest.importorskip("openai")

from conftest import Server  # noqa: E402

from tunelab.errors import TunelabError  # noqa: E402
from tunelab.infer.testing import FakeEngine  # noqa: E402
from tunelab.ops.requestlog import LogRow, RequestLog  # noqa: E402
from tunelab.server import Keys, ServeService, hash_key  # noqa: E402

ACME, GLOBEX, ADMIN = "sk-acme", "sk-globex", "sk-admin"


@pytest.fixture()
def server(tmp_path, tokenizer):
    (tmp_path / "keys.yaml").write_text(f"""tenants:
  acme: {{key_sha256: [{hash_key(ACME)}], log: content}}
  globex: {{key_sha256: [{hash_key(GLOBEX)}]}}
  ops: {{key_sha256: [{hash_key(ADMIN)}], admin: true}}
""")
    store = RequestLog.open(tmp_path / "log.sqlite")
    srv = Server(ServeService(FakeEngine(tokenizer=tokenizer), "fake", keys=Keys.load(tmp_path / "keys.yaml"),
                              request_log=store))
    yield srv, store
    srv.stop()


def post(srv, key: str, body: dict) -> httpx.Response:
    return httpx.post(srv.url + "/v1/feedback", json=body, headers={"Authorization": f"Bearer {key}"})


def test_feedback_only_on_your_own_responses(server):
    srv, store = server
    mine = srv.client(ACME).chat.completions.create(model="fake", messages=[{"role": "user", "content": "2+2?"}])
    theirs = srv.client(GLOBEX).chat.completions.create(model="fake", messages=[{"role": "user", "content": "x"}])
    r = post(srv, ACME, {"response_id": mine.id, "score": 0, "label": "wrong", "comment": "it is 4",
                         "correction": "4"})
    assert r.status_code == 200, r.text
    assert r.json() == {"object": "feedback", "event": "gen_ai.evaluation.result", "attributes": {
        "gen_ai.response.id": mine.id, "gen_ai.evaluation.name": "user_feedback",
        "gen_ai.evaluation.score.value": 0.0, "gen_ai.evaluation.score.label": "wrong",
        "gen_ai.evaluation.explanation": "it is 4", "tunelab.correction": "4", "tunelab.tenant": "acme"}}
    for key, rid in ((ACME, theirs.id), (GLOBEX, mine.id), (ACME, "chatcmpl-nope")):
        r = post(srv, key, {"response_id": rid, "score": 1})
        assert r.status_code == 404 and r.json()["error"]["code"] == "response_not_found"  # the same as missing
    assert post(srv, GLOBEX, {"response_id": theirs.id, "label": "good"}).status_code == 200
    assert post(srv, ADMIN, {"response_id": theirs.id, "score": 0.5, "name": "review"}).status_code == 200
    r = post(srv, ACME, {"response_id": mine.id, "comment": "no score"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "score"
    assert post(srv, ACME, {"response_id": mine.id, "score": 1, "stars": 5}).status_code == 400  # unknown field
    assert post(srv, "sk-wrong", {"response_id": mine.id, "score": 1}).status_code == 401
    fb = store.feedback()
    assert [(f["response_id"], f["tenant"], f["name"], f["score"], f["label"]) for f in fb] == [
        (mine.id, "acme", "user_feedback", 0.0, "wrong"), (theirs.id, "globex", "user_feedback", None, "good"),
        (theirs.id, "globex", "review", 0.5, None)]
    assert fb[0]["explanation"] == "it is 4" and fb[0]["correction"] == "4" and fb[0]["model"] == "fake"


def test_feedback_without_a_log_is_a_clear_404(tmp_path):
    srv = Server(ServeService(FakeEngine(), "fake"))
    try:
        r = httpx.post(srv.url + "/v1/feedback", json={"response_id": "chatcmpl-1", "score": 1})
        assert r.status_code == 404 and "--log off" in r.json()["error"]["message"]
    finally:
        srv.stop()


def rated_log(tmp_path) -> RequestLog:
    store = RequestLog.open(tmp_path / "log.sqlite")
    store.write([LogRow("chatcmpl-1", 1000.0, "acme", "orders", "orders@v2", "v2", prompt='[{"role": "user"}]',
                        answer="{}"), LogRow("chatcmpl-2", 1001.0, "globex", "sql")])
    store.add_feedback("chatcmpl-1", "acme", score=0.0, comment="empty", correction='{"qty": 3}')
    store.add_feedback("chatcmpl-2", "globex", label="good")
    return store


def test_export_to_mlflow_as_assessments(tmp_path, tunelab):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    rated_log(tmp_path).close()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ("feedback", "export", "--mlflow", "--log", tmp_path / "log.sqlite", "--tracking-uri", uri)
    code, out, err = tunelab(*args)
    assert code == 0, err
    assert "3 assessment(s) written, 2 new trace(s), 0 already there" in out
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("tunelab-feedback")
    traces = {t.info.tags["tunelab.response_id"]: t for t in client.search_traces([exp.experiment_id])}
    assert set(traces) == {"chatcmpl-1", "chatcmpl-2"}
    got = {(a.name, a.source.source_type, a.source.source_id) for a in traces["chatcmpl-1"].info.assessments}
    assert got == {("user_feedback", "HUMAN", "acme"), ("correction", "HUMAN", "acme")}
    fb = next(a for a in traces["chatcmpl-1"].info.assessments if a.name == "user_feedback")
    assert fb.feedback.value == 0.0 and fb.rationale == "empty"
    exp_ = next(a for a in traces["chatcmpl-1"].info.assessments if a.name == "correction")
    assert exp_.expectation.value == '{"qty": 3}'
    assert [a.feedback.value for a in traces["chatcmpl-2"].info.assessments] == ["good"]
    code, out, err = tunelab(*args)  # again: nothing new
    assert code == 0 and "0 assessment(s) written, 0 new trace(s), 2 already there" in out


def test_export_without_mlflow_says_what_to_install(tmp_path, monkeypatch, tunelab):
    from tunelab.ops.feedback import export_mlflow

    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if not installed
    with pytest.raises(TunelabError, match=r"needs MLflow, which is not installed: pip install 'tunelab\[tracking\]'"):
        export_mlflow(rated_log(tmp_path), f"sqlite:///{tmp_path / 'mlflow.db'}")
    code, out, err = tunelab("feedback", "export", "--log", tmp_path / "log.sqlite")
    assert code == 2 and "--mlflow" in err
