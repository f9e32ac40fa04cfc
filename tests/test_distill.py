"""`tunelab data distill`: a local teacher (tiny model) and an endpoint teacher (tunelab's server through the
openai SDK), the task's filters, dedup and length limits, retries on 429/5xx, and runs killed and resumed."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")

from conftest import Server  # noqa: E402

from tunelab.distill import Answer, EndpointTeacher, Filters, LocalTeacher, distill, input_key, task_checks  # noqa: E402
from tunelab.errors import TunelabError  # noqa: E402
from tunelab.infer import Request, SamplingParams, load_engine  # noqa: E402
from tunelab.infer.testing import FakeEngine  # noqa: E402
from tunelab.runs import lineage, roots, show  # noqa: E402
from tunelab.server import Keys, ServeService, hash_key  # noqa: E402
from tunelab.tasks import canonical_json, load_task  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = [f"Name {n} things that are {c}." for n in (2, 3, 4) for c in ("red", "round", "cold", "loud")]


def write_prompts(path, questions, style="messages"):
    rows = [{"id": f"q{i}", "messages": [{"role": "user", "content": q}]} if style == "messages"
            else {"prompt": q} for i, q in enumerate(questions)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read(path):
    return [json.loads(x) for x in Path(path).read_text().splitlines()]


@pytest.fixture(scope="module")
def tiny_engine(tiny_model_dir):
    return load_engine(str(tiny_model_dir), dtype="fp32", device="cpu")


def tiny_teacher(tiny_engine, tiny_model_dir, batch_size=4):
    from tunelab.models import identity

    return LocalTeacher(tiny_engine, {"source": "local", **identity(str(tiny_model_dir))}, batch_size=batch_size)


# --- inputs -------------------------------------------------------------------------------------------------
def test_prompts_from_messages_or_prompt_and_errors_name_the_line(tmp_path, tiny_engine, tiny_model_dir):
    from tunelab.distill.collect import read_prompts

    f = tmp_path / "in.jsonl"
    f.write_text(json.dumps({"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "q"},
                                          {"role": "assistant", "content": "old answer"}]}) + "\n"
                 + json.dumps({"prompt": "p"}) + "\n")
    rows = read_prompts(f)
    assert [m for _, _, m in rows] == [[{"role": "system", "content": "S"}, {"role": "user", "content": "q"}],
                                       [{"role": "user", "content": "p"}]]
    f.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"text": "no prompt"}) + "\n")
    with pytest.raises(TunelabError, match=r"in.jsonl:2: the row has neither 'messages' nor 'prompt'"):
        distill(tiny_teacher(tiny_engine, tiny_model_dir), f, tmp_path / "out.jsonl")
    assert not (tmp_path / "out.jsonl.part").exists()  # nothing asked, nothing written


# --- local teacher ------------------------------------------------------------------------------------------
def test_local_teacher_with_adapter_rows_and_registry(tmp_path, tiny_model_dir, tokenizer):
    """A tiny model with a LoRA adapter answers; every kept row is the engine's own answer in the chat format
    train reads, records the teacher (weights hash, adapter), and the file is registered with its parents."""
    import torch
    from peft import LoraConfig, get_peft_model

    from tunelab.data import read_chat_file
    from tunelab.models import tiny_model

    torch.manual_seed(0)
    pm = get_peft_model(tiny_model("llama", tokenizer=tokenizer)[0],
                        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    pm.save_pretrained(tmp_path / "adapter")
    inputs = write_prompts(tmp_path / "in.jsonl", QUESTIONS[:5], style="prompt")
    out = tmp_path / "out.jsonl"
    r = distill(str(tiny_model_dir), inputs, out, adapter=tmp_path / "adapter", max_new_tokens=6, min_length=0,
                keep_truncated=True, dtype="fp32", device="cpu", batch_size=2)
    rows = read(out)
    assert r.kept == len(rows) == 5 and r.asked == 5 and r.resumed == 0 and not (tmp_path / "out.jsonl.part").exists()
    ref = load_engine(str(tiny_model_dir), [tmp_path / "adapter"], dtype="fp32", device="cpu")
    want = ref.generate([Request([{"role": "user", "content": q}], adapter="adapter-1",
                                 params=SamplingParams(max_new_tokens=6))
                         for q in QUESTIONS[:5]])
    assert [row["messages"][-1]["content"] for row in rows] == [c.text.strip() for c in want]
    assert [row["messages"][0]["content"] for row in rows] == QUESTIONS[:5]
    assert read_chat_file(out).format == "chat" and len(read_chat_file(out)) == 5
    who = rows[0]["distill"]["teacher"]
    assert who["source"] == "local" and who["hash"] and who["adapter"] == str((tmp_path / "adapter").resolve())
    assert rows[2]["distill"]["source"] == "in.jsonl:3" and rows[0]["distill"]["filters"]["answer_tokens"] >= 0
    made = {p["role"]: p for p in show(r.dataset_id)["made_from"]}
    assert set(made) == {"prompts", "teacher", "teacher_adapter"}
    assert made["teacher"]["kind"] == "base_model" and made["teacher"]["hash"] == who["hash"]
    assert made["teacher_adapter"]["path"] == who["adapter"] and show(r.dataset_id)["meta"]["teacher"] == who
    assert {x["role"] for x in roots(lineage(r.dataset_id))["dataset"]} == {"prompts"}


class Crash(Exception):
    pass


class CrashAfter:
    """A teacher that stops (like a killed process) after `n` answers."""

    def __init__(self, inner, n):
        self.inner, self.n, self.identity = inner, n, inner.identity

    def answer(self, items, gen):
        for i, a in enumerate(self.inner.answer(items, gen)):
            if i == self.n:
                raise Crash
            yield a


class Recording:
    """A teacher that notes the keys it was asked for."""

    def __init__(self, inner):
        self.inner, self.identity, self.asked = inner, inner.identity, []

    def answer(self, items, gen):
        self.asked += [k for k, _ in items]
        yield from self.inner.answer(items, gen)


def test_interrupted_run_resumes_without_duplicates_or_losses(tmp_path, tiny_engine, tiny_model_dir):
    """Stopped after 5 answers (and a half-written line, as a kill mid-write leaves), the next run asks only
    for the other prompts and writes the same file an uninterrupted run writes."""
    inputs = write_prompts(tmp_path / "in.jsonl", QUESTIONS)
    opts = dict(max_new_tokens=5, min_length=0, keep_truncated=True, show_progress=False)
    whole = distill(tiny_teacher(tiny_engine, tiny_model_dir), inputs, tmp_path / "whole.jsonl", **opts)
    out = tmp_path / "out.jsonl"
    with pytest.raises(Crash):
        distill(CrashAfter(tiny_teacher(tiny_engine, tiny_model_dir, batch_size=3), 5), inputs, out, **opts)
    part = tmp_path / "out.jsonl.part"
    assert not out.exists() and len(part.read_text().splitlines()) == 1 + 5
    with open(part, "a") as f:
        f.write('{"key": "half a li')
    teacher = Recording(tiny_teacher(tiny_engine, tiny_model_dir))
    r = distill(teacher, inputs, out, **opts)
    assert r.resumed == 5 and r.asked == len(QUESTIONS) - 5 == len(teacher.asked)
    done_before = {input_key([{"role": "user", "content": q}]) for q in QUESTIONS[:5]}
    assert not done_before & set(teacher.asked)  # nothing asked twice
    assert out.read_bytes() == (tmp_path / "whole.jsonl").read_bytes() and whole.kept == r.kept
    assert not part.exists()
    ids = sorted(row["id"] for row in read(out) + read(r.rejected))
    assert ids == sorted(f"q{i}" for i in range(len(QUESTIONS)))  # every prompt once, kept or dropped


def test_resume_refuses_another_teacher_and_out_is_never_overwritten(tmp_path, tiny_engine, tiny_model_dir):
    inputs = write_prompts(tmp_path / "in.jsonl", QUESTIONS[:4])
    out = tmp_path / "out.jsonl"
    with pytest.raises(Crash):
        distill(CrashAfter(tiny_teacher(tiny_engine, tiny_model_dir), 2), inputs, out, max_new_tokens=5)
    with pytest.raises(TunelabError, match=r"out.jsonl.part holds answers of another run .*temperature"):
        distill(tiny_teacher(tiny_engine, tiny_model_dir), inputs, out, max_new_tokens=5, temperature=0.7)
    r = distill(tiny_teacher(tiny_engine, tiny_model_dir), inputs, out, max_new_tokens=5)
    assert r.kept == 0 and r.dropped == {"truncated": 4}  # a tiny random model never stops by itself
    before = out.read_bytes()
    with pytest.raises(TunelabError, match="exists; choose another --out"):
        distill(tiny_teacher(tiny_engine, tiny_model_dir), inputs, out, max_new_tokens=5)
    assert out.read_bytes() == before


# --- filters ------------------------------------------------------------------------------------------------
def test_sql_task_keeps_queries_that_run(tokenizer):
    task = load_task("shop-sql")
    f = Filters(tokenizer, task_checks(task))
    assert set(f.checks) == {"sql_valid"}
    msgs = [{"role": "user", "content": "How many customers?"}]
    ok, why = f.results(1, msgs, Answer("a", "SELECT count(*) FROM customers WHERE deleted_at IS NULL"))
    assert why is None and ok["sql_valid"] == 1.0
    bad, why = f.results(2, msgs, Answer("b", "SELECT count(*) FROM clients"))
    assert bad["sql_valid"] == 0.0 and why == "sql_valid: no such table: clients"
    _, why = f.results(3, [{"role": "user", "content": "how  many CUSTOMERS?"}],
                       Answer("c", "select COUNT(*) from customers where deleted_at is null"))
    assert why == "duplicate: the same prompt and answer as input line 1"
    _, why = f.results(4, msgs, Answer("d", "", finish_reason="stop"))
    assert why.startswith("sql_valid")  # an empty query fails the task's check before the length check
    assert set(task_checks(load_task("orders-json"))) == {"json_valid", "schema_valid"}
    assert task_checks(load_task("handbook-qa")) == {}


@pytest.fixture()
def orders(tmp_path, tokenizer, monkeypatch):
    """Six orders-json prompts (one a case/space variant of another) and a tunelab server whose engine answers
    each with a fixed reply: good, not JSON, off-schema, good again (dup), very long, cut off."""
    task = load_task("orders-json")
    ex = task.examples("train")[:5]
    good = canonical_json(ex[0]["output"])
    long = json.loads(canonical_json(ex[3]["output"]))
    long["notes"] = " ".join(["supercalifragilistic"] * 150)
    replies = [good, "Sure! Here is the order: {customer: Cora", json.dumps({"customer": "Cora"}),
               canonical_json(ex[2]["output"]), json.dumps(long), " ".join(["word"] * 300)]
    prompts = [task.messages(e) for e in ex]
    variant = [prompts[0][0], {"role": "user", "content": "  " + prompts[0][1]["content"].upper()}]
    prompts = prompts[:1] + prompts[1:] + [variant]
    replies = replies[:5] + [replies[0]]  # the variant gets the first reply: a duplicate after normalising
    by_user = {" ".join(p[-1]["content"].casefold().split()): r for p, r in zip(prompts, replies)}
    prompts.append([prompts[1][0], {"role": "user", "content": "Cut me off."}])
    by_user["cut me off."] = " ".join(["word"] * 300)
    inputs = tmp_path / "orders.jsonl"
    inputs.write_text("".join(json.dumps({"messages": p}) + "\n" for p in prompts))
    engine = FakeEngine(lambda q: by_user[" ".join(q.prompt[-1]["content"].casefold().split())], tokenizer=tokenizer)
    (tmp_path / "keys.yaml").write_text(f"tenants:\n  lab: {{key_sha256: [{hash_key('sk-lab')}]}}\n")
    srv = Server(ServeService(engine, "teacher-x", keys=Keys.load(tmp_path / "keys.yaml")))
    monkeypatch.setenv("OPENAI_API_KEY", "sk-lab")
    yield srv, inputs, engine
    srv.stop()


def test_endpoint_teacher_through_server_filters_json_dups_and_length(orders, tmp_path):
    srv, inputs, engine = orders
    r = distill("openai:teacher-x", inputs, tmp_path / "out.jsonl", base_url=srv.url + "/v1", task="orders-json",
                max_length=900, concurrency=3, show_progress=False)
    kept, dropped = read(r.out), read(r.rejected)
    assert r.prompts == 7 and r.kept == 2 and len(dropped) == 5 and len(engine.requests) == 7
    assert [k["messages"][-1]["content"] for k in kept][0] == canonical_json(load_task("orders-json").examples(
        "train")[0]["output"])
    why = [d["distill"]["dropped"] for d in dropped]
    assert why[0].startswith("json_valid: ") and why[1].startswith("schema_valid: ")
    assert why[2].startswith("too long: ") and int(why[2].split()[2]) > 900
    assert why[3] == "duplicate: the same prompt and answer as input line 1"
    assert why[4] == "truncated: the teacher hit max_new_tokens"
    assert r.dropped == {"json_valid": 1, "schema_valid": 1, "too long": 1, "duplicate": 1, "truncated": 1}
    f = kept[0]["distill"]
    assert f["teacher"] == {"source": "openai", "model": "teacher-x", "base_url": srv.url + "/v1"}
    assert f["filters"]["json_valid"] == f["filters"]["schema_valid"] == 1.0 and f["filters"]["row_tokens"] <= 900
    assert f["attempts"] == 1 and "sk-lab" not in r.out.read_text()
    made = {p["role"]: p for p in show(r.dataset_id)["made_from"]}
    assert made["teacher"]["name"] == "openai:teacher-x" and made["prompts"]["path"] == str(inputs.resolve())


def test_bad_key_stops_at_once(orders, tmp_path, monkeypatch):
    srv, inputs, engine = orders
    monkeypatch.setenv("OPENAI_API_KEY", "sk-wrong")
    t0 = time.time()
    with pytest.raises(TunelabError, match="answered 401 .*set OPENAI_API_KEY"):
        distill("openai:teacher-x", inputs, tmp_path / "out.jsonl", base_url=srv.url + "/v1", show_progress=False)
    assert time.time() - t0 < 20 and not engine.requests
    monkeypatch.delenv("OPENAI_API_KEY")
    with pytest.raises(TunelabError, match="OPENAI_API_KEY, which is not set"):
        distill("openai:teacher-x", inputs, tmp_path / "out2.jsonl", base_url=srv.url + "/v1")


# --- retries ------------------------------------------------------------------------------------------------
def flaky(app, statuses: list[int]):
    """The app behind a front that answers the next chat requests with these statuses (429 with Retry-After)."""
    from starlette.responses import JSONResponse

    async def front(scope, receive, send):
        if scope["type"] == "http" and scope["path"].endswith("/chat/completions") and statuses:
            status = statuses.pop(0)
            body = {"error": {"message": f"busy ({status})", "type": "rate_limit_error", "param": None, "code": None}}
            await JSONResponse(body, status, headers={"Retry-After": "0"} if status == 429 else None)(
                scope, receive, send)
            return
        await app(scope, receive, send)

    return front


def test_429_and_5xx_are_retried_and_the_run_completes(tmp_path, tokenizer):
    from tunelab.server import build_app

    service = ServeService(FakeEngine(lambda q: "ok: " + q.prompt[-1]["content"], tokenizer=tokenizer), "t")
    statuses = [429, 503, 429, 502]
    srv = Server(service, app=flaky(build_app(service), statuses))
    try:
        inputs = write_prompts(tmp_path / "in.jsonl", QUESTIONS[:6])
        teacher = EndpointTeacher("t", srv.url + "/v1", api_key="k", concurrency=2, retries=3, backoff=0.01)
        r = distill(teacher, inputs, tmp_path / "out.jsonl", show_progress=False)
        rows = read(r.out)
        assert r.kept == 6 and r.retries == 4 and not statuses
        assert sum(x["distill"]["attempts"] for x in rows) == 6 + 4
        assert [x["messages"][-1]["content"] for x in rows] == ["ok: " + q for q in QUESTIONS[:6]]
        # a server that stays busy past the retries: the run stops, keeps what it has, and the next run finishes
        statuses.extend([429] * 4)
        teacher = EndpointTeacher("t", srv.url + "/v1", api_key="k", concurrency=1, retries=1, backoff=0.01)
        out = tmp_path / "again.jsonl"
        with pytest.raises(TunelabError, match=r"2 prompts got no answer after 2 attempts each .*busy \(429\).*"
                                               r"4 answers so far"):
            distill(teacher, inputs, out, show_progress=False)
        assert not out.exists()
        r = distill(teacher, inputs, out, show_progress=False)
        assert r.resumed == 4 and r.asked == 2
        assert [x["messages"] for x in read(out)] == [x["messages"] for x in rows]
    finally:
        srv.stop()


def test_backoff_doubles_with_jitter_and_retry_after_wins(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "k")
    t = EndpointTeacher("m", "http://127.0.0.1:9/v1", backoff=1.0, max_backoff=5.0)
    for attempt, full in ((1, 1.0), (2, 2.0), (3, 4.0), (4, 5.0), (9, 5.0)):
        waits = [t.delay(attempt, None) for _ in range(50)]
        assert all(full / 2 <= w <= full for w in waits) and len(set(waits)) > 1
    assert t.delay(1, 3.0) == 3.0 and t.delay(1, 99.0) == 5.0 and t.delay(3, 0.0) == 0.0


# --- a real kill ----------------------------------------------------------------------------------------------
def test_killed_cli_process_resumes(tmp_path, tokenizer, monkeypatch):
    """`tunelab data distill` in a subprocess, killed (SIGKILL) while it waits on a slow server; the next
    run asks exactly the prompts the part file lacks and every prompt ends in the file once, in order."""
    def slow(q):
        time.sleep(0.25)
        return "answer: " + q.prompt[-1]["content"]

    engine = FakeEngine(slow, tokenizer=tokenizer)
    srv = Server(ServeService(engine, "slow"))
    try:
        inputs = write_prompts(tmp_path / "in.jsonl", QUESTIONS)
        out, part = tmp_path / "out.jsonl", tmp_path / "out.jsonl.part"
        env = {**os.environ, "OPENAI_API_KEY": "k", "PYTHONPATH": str(ROOT)}
        cmd = [sys.executable, "-m", "tunelab.cli", "data", "distill", "--teacher", "openai:slow", "--base-url",
               srv.url + "/v1", "--inputs", str(inputs), "--out", str(out), "--concurrency", "2"]
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if part.exists() and len(part.read_bytes().splitlines()) >= 1 + 4:
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.stdout.read().decode()
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        answered = len(part.read_bytes().splitlines()) - 1
        assert 4 <= answered < len(QUESTIONS) and not out.exists()
        asked_before = -1
        while asked_before != len(engine.requests):  # the killed process's requests in flight still finish
            asked_before = len(engine.requests)
            time.sleep(0.75)
        monkeypatch.setenv("OPENAI_API_KEY", "k")
        r = distill("openai:slow", inputs, out, base_url=srv.url + "/v1", show_progress=False)
        assert r.resumed == answered and r.asked == len(engine.requests) - asked_before == len(QUESTIONS) - answered
        rows = read(out)
        assert [x["id"] for x in rows] == [f"q{i}" for i in range(len(QUESTIONS))]
        assert [x["messages"][-1]["content"] for x in rows] == ["answer: " + q for q in QUESTIONS]
    finally:
        srv.stop()


# --- the bundled model ----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_bundled_model_distills_orders(tmp_path):
    """SmolLM2 as teacher on orders-json prompts: what is kept is schema-valid JSON; the rest says why not."""
    import jsonschema

    task = load_task("orders-json")
    inputs = tmp_path / "in.jsonl"
    inputs.write_text("".join(json.dumps({"messages": task.messages(e)}) + "\n" for e in task.examples("train")[:3]))
    r = distill("smollm2-135m-instruct", inputs, tmp_path / "out.jsonl", task="orders-json", show_progress=False)
    assert r.kept + sum(r.dropped.values()) == 3
    for row in read(r.out):
        jsonschema.validate(json.loads(row["messages"][-1]["content"]), task.schema())
    assert all(d["distill"]["dropped"] for d in read(r.rejected))
