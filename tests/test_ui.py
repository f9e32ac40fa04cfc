"""The web UI over HTTP (no browser): every page answers, the binding rule, tenant isolation of pages, data and
reviews, eval compare with paired deltas, and a job stopped and resumed from its checkpoint."""

import json
import os
import re
import time
from pathlib import Path

import pytest

pytest.importorskip("multipart", reason="the UI needs the ui extra: pip install -e '.[ui]'")

from fastapi.testclient import TestClient  # noqa: E402

from tunelab.errors import TunelabError  # noqa: E402
from tunelab.runs import layout, record_eval, record_training_run  # noqa: E402
from tunelab.server.auth import Keys, hash_key  # noqa: E402
from tunelab.ui import UiContext, build_ui  # noqa: E402
from tunelab.ui.access import Access, check_binding  # noqa: E402

ADMIN, ACME, GLOBEX = "sk-admin-key", "sk-acme-key", "sk-globex-key"
PAGES = ["runs", "train", "evaluate", "playground", "serve", "review", "monitor"]


def fake_run(folder, name: str, task: str = "orders-json") -> int:
    """A registered run folder holding an adapter `name` (weights are not read by the UI)."""
    folder = folder / name
    folder.mkdir(parents=True)
    (folder / layout.ADAPTER_CONFIG).write_text("{}")
    (folder / layout.ADAPTER_WEIGHTS).write_bytes(name.encode())
    layout.write_run_json(folder, {"base_model": {"spec": "tiny-base", "hash": "b" * 64}, "method": "lora",
                                   "data": {"train": {"path": f"/data/{name}.jsonl", "sha256": hash_key(name),
                                                      "task": task}},
                                   "metrics": {"steps": 5}, "recipe": {"method": "lora"}})
    return record_training_run(folder)


def fake_eval(folder, name: str, adapter, scores: list[float]) -> int:
    rows = [{"id": f"ex{i}", "input": f"q{i}", "reference": "a", "output": "a" if s else "b",
             "scores": {"json_exact": s}, "failure": None if s else "format"} for i, s in enumerate(scores)]
    mean = sum(scores) / len(scores)
    meta = {"task": "orders-json", "split": "test", "model": name, "adapter": str(adapter), "n": len(rows),
            "primary_metric": "json_exact", "metrics": {"json_exact": {"score": mean, "ci95": [mean - 0.1, mean + 0.1],
                                                                        "n": len(rows)}},
            "base_model": "tiny-base", "provenance": {"base_model": {"spec": "tiny-base", "hash": "b" * 64}}}
    out = layout.write_eval_folder(folder / name, meta, rows)
    return record_eval(out)


@pytest.fixture()
def world(tmp_path, monkeypatch):
    """A registry with one adapter of acme's and one of globex's, an eval of each, a keys file, a request log."""
    monkeypatch.setenv("TUNELAB_REGISTRY", str(tmp_path / "registry.sqlite"))
    monkeypatch.setenv("TUNELAB_HOME", str(tmp_path / "home"))
    keys = tmp_path / "keys.yaml"
    keys.write_text(f"""tenants:
  ops: {{key_sha256: [{hash_key(ADMIN)}], admin: true}}
  acme: {{key_sha256: [{hash_key(ACME)}], adapters: [acme-a]}}
  globex: {{key_sha256: [{hash_key(GLOBEX)}], adapters: [globex-b]}}
""")
    ids = {"acme-a": fake_run(tmp_path / "runs", "acme-a"), "globex-b": fake_run(tmp_path / "runs", "globex-b")}
    ids["eval-acme"] = fake_eval(tmp_path / "evals", "eval-acme", tmp_path / "runs" / "acme-a", [1, 1, 0, 1])
    ids["eval-globex"] = fake_eval(tmp_path / "evals", "eval-globex", tmp_path / "runs" / "globex-b", [0, 0, 1, 0])
    from tunelab.ops.requestlog import LogRow, RequestLog

    log = RequestLog.open(tmp_path / "requests.sqlite")
    log.write([LogRow(f"chatcmpl-{t}", time.time() - 60, t, m, adapter=m, prompt=json.dumps(
        [{"role": "user", "content": f"{t} question"}]), answer=f"{t} answer", latency_s=0.2)
        for t, m in (("acme", "acme-a"), ("globex", "globex-b"))])
    log.close()
    ctx = UiContext(Access(Keys.load(keys)), tmp_path / "runs", log_url=str(tmp_path / "requests.sqlite"))
    yield {"client": TestClient(build_ui(ctx)), "ids": ids, "tmp": tmp_path}
    from tunelab.ui import jobs

    for job in jobs.all_jobs():  # a failed test leaves no training behind
        jobs.stop(job)


def _as(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def test_every_page_answers_for_an_admin(world):
    c = world["client"]
    for page in PAGES:
        r = c.get(f"/ui/{page}", headers=_as(ADMIN))
        assert r.status_code == 200, (page, r.text[:300])
        assert "<nav" in r.text and 'src="/ui/static/ui.js"' in r.text and "https://" not in r.text
    assert c.get("/ui/static/ui.js").status_code == 200
    r = c.get(f"/ui/runs/{world['ids']['acme-a']}", headers=_as(ADMIN))
    assert r.status_code == 200 and "Lineage" in r.text and "tiny-base" in r.text and "Evaluate" in r.text


def test_without_a_key_the_login_page_and_a_session_cookie(world):
    c = world["client"]
    r = c.get("/ui/runs")
    assert r.status_code == 401 and 'name="key"' in r.text
    assert c.get("/ui/api/jobs/x").status_code == 401
    assert c.get("/ui/runs", headers=_as("sk-wrong")).status_code == 401
    r = c.post("/ui/login", data={"key": "sk-wrong"}, follow_redirects=False)
    assert r.status_code == 401
    r = c.post("/ui/login", data={"key": ACME}, follow_redirects=False)
    assert r.status_code == 303 and "tunelab_ui" in r.cookies
    page = c.get("/ui/runs")  # the cookie now
    assert page.status_code == 200 and "acme" in page.text


def test_a_tenant_sees_only_its_own_runs_evals_and_logs(world):
    c, ids = world["client"], world["ids"]
    runs = c.get("/ui/runs", headers=_as(ACME)).text
    assert "acme-a" in runs and "globex-b" not in runs
    assert c.get(f"/ui/runs/{ids['globex-b']}", headers=_as(ACME)).status_code == 404
    assert c.get(f"/ui/runs/{ids['acme-a']}", headers=_as(ACME)).status_code == 200
    evals = c.get("/ui/evaluate", headers=_as(ACME)).text
    assert "eval-acme" in evals and "eval-globex" not in evals
    assert c.get(f"/ui/evaluate/report/{ids['eval-globex']}", headers=_as(ACME)).status_code == 404
    assert c.get(f"/ui/evaluate/compare?a={ids['eval-acme']}&b={ids['eval-globex']}",
                 headers=_as(ACME)).status_code == 404
    for page in ("review", "serve", "monitor"):
        text = c.get(f"/ui/{page}", headers=_as(ACME)).text
        assert "globex" not in text, page
    assert "acme question" in c.get("/ui/review", headers=_as(ACME)).text
    # training and actions are an admin's
    assert c.get("/ui/train", headers=_as(ACME)).status_code == 403
    assert c.post(f"/ui/runs/{ids['acme-a']}/action", data={"action": "export"}, headers=_as(ACME)).status_code == 403
    admin = c.get("/ui/runs", headers=_as(ADMIN)).text
    assert "acme-a" in admin and "globex-b" in admin


def test_a_review_is_stored_for_ones_own_response_and_becomes_a_training_row(world, tunelab):
    """Correct one answer on the Review page (rubric: the format requirement failed); another tenant's response
    is a 404; `tunelab data from-logs` turns the correction into a chat row that names its request."""
    from tunelab.ops.requestlog import RequestLog
    from tunelab.ops.review import parse_explanation

    c = world["client"]
    page = c.get("/ui/review", headers=_as(ACME)).text
    assert 'action="/ui/review/chatcmpl-acme"' in page and "globex" not in page and "acme question" in page
    form = {"verdict": "correct", "correction-chatcmpl-acme": '{"fixed": true}', "comment-chatcmpl-acme": "qty",
            "rubric-0": "1", "rubric-1": "1", "rubric-3": "1", "adapter": "acme-a"}
    assert c.post("/ui/review/chatcmpl-globex", data={**form, "verdict": "reject"},
                  headers=_as(ACME)).status_code == 404
    assert c.post("/ui/review/chatcmpl-acme", data={**form, "verdict": "maybe"}, headers=_as(ACME)).status_code == 400
    r = c.post("/ui/review/chatcmpl-acme", data=form, headers=_as(ACME), follow_redirects=False)
    assert r.status_code == 303
    fb = RequestLog.open(world["tmp"] / "requests.sqlite").feedback()
    assert [(f["response_id"], f["label"], f["correction"]) for f in fb] == [("chatcmpl-acme", "correct",
                                                                              '{"fixed": true}')]
    e = parse_explanation(fb[0]["explanation"])
    assert e["comment"] == "qty" and e["reviewer"] == "ui:acme" and e["rubric"]["required format"] is False
    page = c.get("/ui/review", headers=_as(ACME)).text
    assert 'action="/ui/review/chatcmpl-acme"' not in page and "1 correct" in page  # off the queue, counted
    out = world["tmp"] / "from-logs.jsonl"
    code, _, err = tunelab("data", "from-logs", "acme-a", "--run", world["tmp"] / "runs" / "acme-a", "--log",
                           world["tmp"] / "requests.sqlite", "--out", out)
    assert code == 0, err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["messages"][-1] == {"role": "assistant", "content": '{"fixed": true}'}
    assert "chatcmpl-acme" in json.dumps(rows[0]["origin"])


def test_compare_shows_paired_deltas_with_their_ci(world):
    c, ids = world["client"], world["ids"]
    r = c.get(f"/ui/evaluate/compare?a={ids['eval-globex']}&b={ids['eval-acme']}", headers=_as(ADMIN))
    assert r.status_code == 200
    assert "0.500" in r.text and "paired 95% CI" in r.text  # 0.75 - 0.25, paired over the 4 examples
    full = c.get(f"/ui/evaluate/compare?a={ids['eval-globex']}&b={ids['eval-acme']}&full=1", headers=_as(ADMIN))
    assert full.status_code == 200 and "eval-acme" in full.text


def test_a_non_loopback_address_needs_keys_with_an_admin(tmp_path):
    check_binding("127.0.0.1", None)
    check_binding("::1", None)
    with pytest.raises(TunelabError, match="--keys"):
        check_binding("0.0.0.0", None)
    keys = tmp_path / "keys.yaml"
    keys.write_text(f"tenants:\n  acme: {{key_sha256: [{hash_key(ACME)}], adapters: [a]}}\n")
    with pytest.raises(TunelabError, match="admin"):
        check_binding("0.0.0.0", Keys.load(keys))


def test_train_check_names_bad_rows_by_line(world, tiny_model_dir):
    bad = world["tmp"] / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
                   '{"messages": [oops\n')
    c = world["client"]
    with open(bad, "rb") as f:
        r = c.post("/ui/train/check", headers=_as(ADMIN), files={"upload": ("bad.jsonl", f)},
                   data={"name": "r1", "model": str(tiny_model_dir), "task": "", "overrides": ""})
    assert r.status_code == 200 and ":2: malformed JSON" in r.text
    r = c.post("/ui/train/check", headers=_as(ADMIN), data={"name": "r1", "model": str(tiny_model_dir),
                                                           "task": "orders-json", "overrides": "train.max_steps=5"})
    assert "Memory estimate" in r.text and "available on this cpu" in r.text and "Lint" in r.text


def test_the_ui_command_serves_loopback_and_refuses_other_addresses_without_keys(tunelab, tmp_path):
    import socket
    import subprocess
    import sys
    import urllib.request

    code, _, err = tunelab("ui", "--host", "0.0.0.0")
    assert code == 2 and "--keys" in err
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "tunelab", "ui", "--port", str(port)], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        for _ in range(1200):  # 2 minutes: the import of torch and transformers is slow on a busy machine
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as r:
                    page = r.read().decode()
                break
            except OSError:
                time.sleep(0.1)
        else:
            raise AssertionError(proc.stdout.read1().decode() if proc.poll() is not None else "no answer in 2 min")
        assert r.url.endswith("/ui/runs") and "<h1>Runs</h1>" in page
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_a_training_job_stops_and_resumes_from_its_checkpoint(world, tiny_model_dir, chat_file):
    """The job runs in a session of its own (the UI could go away); Stop kills its process group, Resume starts
    `tunelab train RECIPE --resume` from the run's saved recipe: every step is in the log once, in order. Then the
    registered adapter's Export action writes an HF model folder."""
    from tunelab.ui import jobs

    out = world["tmp"] / "runs" / "stop-resume"
    job = jobs.launch("train", ["train", f"model.spec={tiny_model_dir}", "data.task=null", f"data.train={chat_file}",
                                f"output_dir={out}", "train.max_steps=12", "train.batch_size=2",
                                "train.effective_batch=2", "train.max_length=256", "validation.every=null",
                                "checkpoint_every=2", "train.precision=fp32", "train.threads=1"], out)
    assert jobs.status(job) == "running" and os.getsid(job.pid) == job.pid  # its own session

    def steps():
        return [r["step"] for r in layout.read_train_log(out) if "loss" in r]

    deadline = time.time() + 120
    while len(steps()) < 4 and jobs.status(job) == "running" and time.time() < deadline:
        time.sleep(0.1)
    assert jobs.stop(jobs.load(job.id)) == "stopped", jobs.log_tail(job)
    assert len(steps()) < 12 and not (out / layout.RUN_JSON).exists()
    c = world["client"]
    state = c.get(f"/ui/api/jobs/{job.id}", headers=_as(ADMIN)).json()
    assert state["status"] == "stopped" and state["can_resume"] and len(state["loss"]) == len(steps())
    assert c.post(f"/ui/jobs/{job.id}/resume", headers=_as(ADMIN), follow_redirects=False).status_code == 303
    job = jobs.load(job.id)
    while jobs.status(job) == "running" and time.time() < deadline + 120:
        time.sleep(0.2)
    assert jobs.status(job) == "finished", jobs.log_tail(job)
    assert steps() == list(range(1, 13)) and (out / layout.RUN_JSON).is_file() and job.resumes == 1
    # the Runs page's Export runs `tunelab export` on the registered adapter, as a job too
    from tunelab.runs import list_artifacts

    aid = next(r["id"] for r in list_artifacts("adapter") if r["path"] == str(out.resolve()))
    r = c.post(f"/ui/runs/{aid}/action", data={"action": "export", "format": "hf"}, headers=_as(ADMIN),
               follow_redirects=False)
    export = jobs.load(r.headers["location"].rsplit("/", 1)[1])
    assert export.args[:2] == ["export", str(out.resolve())]
    while jobs.status(export) == "running" and time.time() < deadline + 240:
        time.sleep(0.2)
    assert jobs.status(export) == "finished", jobs.log_tail(export)
    assert (Path(export.out) / "config.json").is_file()


def test_serve_ui_mounts_the_pages_and_the_playground_chats_through_the_server(world, tokenizer):
    """`tunelab serve --ui`: the UI at /ui of the server's app, its playground on the server's own service (the
    tenant's adapters only), the API beside it unchanged; off loopback without keys the mount is refused."""
    from tunelab.infer.testing import FakeEngine
    from tunelab.rag import build_index
    from tunelab.server import ServeService, build_app
    from tunelab.ui import mount_ui

    corpus = world["tmp"] / "corpus.jsonl"
    corpus.write_text(json.dumps({"id": "a", "title": "Leave", "text": "Everyone gets 27 days of annual leave."}) + "\n")
    index = build_index(corpus, world["tmp"] / "idx", kind="bm25")
    keys = Keys.load(world["tmp"] / "keys.yaml")
    service = ServeService(FakeEngine(tokenizer=tokenizer), "fake", world["tmp"] / "runs", keys,
                           indexes={"handbook": index})
    try:
        app = build_app(service)
        mount_ui(app, "127.0.0.1")
        c = TestClient(app)
        assert c.get("/ui/runs", headers=_as(ACME)).status_code == 200
        page = c.get("/ui/playground", headers=_as(ACME)).text
        assert 'value="acme-a"' in page and "globex-b" not in page
        body = {"model": "acme-a", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 4}
        r = c.post("/ui/api/chat", json=body, headers=_as(ACME))
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]
        assert c.post("/ui/api/chat", json={**body, "model": "globex-b"}, headers=_as(ACME)).status_code == 404
        assert 'value="handbook"' in page  # the playground's retrieval indexes are the server's
        streamed = c.post("/ui/api/chat", headers=_as(ACME), json={
            **body, "messages": [{"role": "user", "content": "How much annual leave?"}], "max_tokens": 64,
            "rag_index": "handbook", "stream": True})
        assert streamed.headers["content-type"].startswith("text/event-stream")
        assert "27" in streamed.text and streamed.text.rstrip().endswith("data: [DONE]")
        assert c.get("/v1/models", headers=_as(ACME)).status_code == 200
        with pytest.raises(TunelabError, match="--keys"):
            mount_ui(build_app(ServeService(FakeEngine(tokenizer=tokenizer), "fake")), "0.0.0.0")
    finally:
        service.close()


def test_a_canary_split_moved_in_the_ui_is_what_rollout_status_reports(world, tunelab):
    c = world["client"]
    form = {"action": "set", "weights-orders": "v1=70 v2=30"}
    assert c.post("/ui/serve/rollout/orders", data=form, headers=_as(ACME)).status_code == 403
    r = c.post("/ui/serve/rollout/orders", data=form, headers=_as(ADMIN), follow_redirects=False)
    assert r.status_code == 303
    page = c.get("/ui/serve", headers=_as(ADMIN)).text
    shown = re.search(r'id="split-orders">([^<]*)<', page).group(1)
    code, out, err = tunelab("rollout", "status", "orders", "--log", world["tmp"] / "requests.sqlite", "--json")
    assert code == 0, err
    status = json.loads(out)
    assert status["weights"] == {"v1": 70, "v2": 30} and shown == "v1=70 v2=30"
    assert status["decision"] in page and "orders" not in c.get("/ui/serve", headers=_as(ACME)).text
    c.post("/ui/serve/rollout/orders", data={"action": "promote", "promote-orders": "v2"}, headers=_as(ADMIN))
    code, out, _ = tunelab("rollout", "status", "orders", "--log", world["tmp"] / "requests.sqlite", "--json")
    assert json.loads(out)["weights"] == {"v2": 100}


def test_monitor_shows_each_tenants_own_drift_alerts(world):
    from tunelab.ops.drift import Signal
    from tunelab.ops.monitor import MonitorReport, monitor_dir

    now = time.time()
    for adapter, verdict in (("acme-a", "alert"), ("globex-b", "ok")):
        sig = Signal("input_embeddings", verdict, n=200, n_reference=500, value=0.031, ci=(0.02, 0.04),
                     p_value=0.001, p_adjusted=0.004, method="MMD permutation")
        MonitorReport(adapter=adapter, since=now - 86400, until=now, rows=200, content_rows=200, alpha=0.01,
                      reference="train+test", signals=[sig]).write(monitor_dir(adapter))
    c = world["client"]
    page = c.get("/ui/monitor", headers=_as(ACME)).text
    assert "ALERT: input_embeddings" in page and "0.0310" in page and "[0.0200, 0.0400]" in page
    assert "globex" not in page
    assert "Drift monitor" in c.get("/ui/monitor/report/acme-a", headers=_as(ACME)).text
    assert c.get("/ui/monitor/report/globex-b", headers=_as(ACME)).status_code == 404
    assert "globex-b" in c.get("/ui/monitor", headers=_as(ADMIN)).text


def test_the_review_queue_puts_flagged_and_low_rated_answers_first(world):
    from tunelab.ops.requestlog import LogRow, RequestLog

    log = RequestLog.open(world["tmp"] / "requests.sqlite")
    now = time.time()
    log.write([LogRow("chatcmpl-old-flagged", now - 3000, "acme", "acme-a", adapter="acme-a", flags=["refusal"],
                      prompt="[]", answer="I cannot help"),
               LogRow("chatcmpl-old-rated", now - 2000, "acme", "acme-a", adapter="acme-a", prompt="[]", answer="x"),
               LogRow("chatcmpl-new", now, "acme", "acme-a", adapter="acme-a", prompt="[]", answer="fine")])
    log.add_feedback("chatcmpl-old-rated", "acme", score=0.0)
    log.close()
    page = world["client"].get("/ui/review", headers=_as(ACME)).text
    order = re.findall(r'action="/ui/review/([^"]+)"', page)
    assert order[:2] == ["chatcmpl-old-flagged", "chatcmpl-old-rated"]
    assert set(order[2:]) == {"chatcmpl-new", "chatcmpl-acme"}  # the random share
    assert "why: flagged" in page and "why: low_feedback" in page
