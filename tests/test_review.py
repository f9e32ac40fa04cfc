"""The review queue: sampling by reason, reviews stored as feedback (as the web UI stores them), the terminal."""

import io
import json
import sys

import pytest

from tunelab.errors import TunelabError
from tunelab.ops.requestlog import LogRow, RequestLog
from tunelab.ops.review import Review, build_queue, reviews, save_review, summary


def _row(i: int, **kw) -> LogRow:
    prompt = json.dumps([{"role": "user", "content": f"order {i}"}])
    return LogRow(response_id=f"chatcmpl-{i:03d}", ts=1000.0 + i, tenant="acme", model="orders",
                  adapter="orders@v1", version="v1", prompt=prompt, answer=f"answer {i}", **kw)


@pytest.fixture()
def log(tmp_path):
    store = RequestLog.open(tmp_path / "requests.sqlite")
    rows = [_row(i) for i in range(40)]
    rows[3].flags = ["pii"]
    rows[7].outcome = "length_closed"
    rows.append(LogRow(response_id="chatcmpl-meta", ts=2000.0, tenant="acme", model="orders",
                       adapter="orders@v1"))  # metadata only: never reviewable
    other = _row(99)
    other.adapter = other.model = "other"
    rows.append(other)
    store.write(rows)
    store.add_feedback("chatcmpl-011", "acme", score=0.0, label="bad")
    yield store
    store.close()


def test_queue_puts_each_reason_first_then_a_seeded_random_share(log, tmp_path):
    (tmp_path / "mon" / "orders").mkdir(parents=True)
    (tmp_path / "mon" / "orders" / "monitor.json").write_text(json.dumps({"alert": True, "since": 1020.0,
                                                                           "until": 1021.0}))
    q = build_queue(log, "orders", size=10, random_share=0.5, seed=1, monitor_root=tmp_path / "mon")
    head = [(it.row.response_id, it.reasons[0]) for it in q[:5]]
    assert head[0] == ("chatcmpl-003", "flagged")
    assert head[1] == ("chatcmpl-011", "low_feedback")
    assert {h[1] for h in head[2:4]} == {"drift"}
    assert head[4] == ("chatcmpl-007", "length_closed")
    assert len(q) == 10 and all("random" in it.reasons for it in q[5:])
    ids = [it.row.response_id for it in q]
    assert len(set(ids)) == 10 and "chatcmpl-meta" not in ids and "chatcmpl-099" not in ids
    again = build_queue(log, "orders", size=10, random_share=0.5, seed=1, monitor_root=tmp_path / "mon")
    assert [it.row.response_id for it in again] == ids  # seeded
    other = build_queue(log, "orders", size=10, random_share=0.5, seed=2, monitor_root=tmp_path / "mon")
    assert [it.row.response_id for it in other] != ids


def test_reviews_are_feedback_named_review_and_leave_the_queue(log):
    save_review(log, "chatcmpl-003", Review("correct", correction='{"x":1}', rubric={"facts right": False},
                                             comment="wrong qty", reviewer="ann"))
    save_review(log, "chatcmpl-004", Review("accept", rubric={"facts right": True}, reviewer="bob"))
    log.add_feedback("chatcmpl-005", "acme", score=0.0, label="reject", comment="off topic", name="review")  # UI
    fb = [f for f in log.feedback() if f["name"] == "review"]
    assert [(f["label"], f["score"]) for f in fb] == [("correct", 0.5), ("accept", 1.0), ("reject", 0.0)]
    got = reviews(log, "orders")
    assert [(r.row.response_id, r.verdict, r.answer, r.reviewer) for r in got] == [
        ("chatcmpl-003", "correct", '{"x":1}', "ann"), ("chatcmpl-004", "accept", "answer 4", "bob"),
        ("chatcmpl-005", "reject", None, "ui:acme")]
    assert got[2].comment == "off topic"
    assert summary(got)["rubric"] == {"facts right": {"pass": 1, "n": 2}}
    ids = {it.row.response_id for it in build_queue(log, "orders", size=50)}
    assert not ids & {"chatcmpl-003", "chatcmpl-004", "chatcmpl-005"} and len(ids) == 37


def test_bad_reviews_are_refused(log):
    with pytest.raises(TunelabError, match="needs the correction"):
        save_review(log, "chatcmpl-001", Review("correct"))
    with pytest.raises(TunelabError, match="verdict"):
        save_review(log, "chatcmpl-001", Review("maybe"))
    with pytest.raises(TunelabError, match="no logged response"):
        save_review(log, "chatcmpl-001", Review("accept"), tenant="other")


def test_tunelab_review_in_a_terminal(log, tunelab, monkeypatch):
    # first item: correct it (answer, two rubric answers, comment); second: reject; then quit
    keys = "c\nthe right one\ny\nn\ny\ny\nqty wrong\nr\ny\ny\ny\ny\n\nq\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(keys))
    code, out, err = tunelab("review", "orders", "--log", log.url, "--size", "5", "--reviewer", "ann")
    assert code == 0, err
    assert "chatcmpl-003" in out and "flagged" in out and "2 reviewed" in out
    got = {r.row.response_id: r for r in reviews(log, "orders")}
    assert got["chatcmpl-003"].verdict == "correct" and got["chatcmpl-003"].correction == "the right one"
    assert got["chatcmpl-003"].rubric["facts right"] is False and got["chatcmpl-003"].reviewer == "ann"
    assert got["chatcmpl-011"].verdict == "reject"
    code, out, _ = tunelab("review", "orders", "--log", log.url, "--list", "--json")
    assert code == 0 and "chatcmpl-003" not in out and '"reasons"' in out
