"""tunelab data from-logs: reviewed answers -> chat rows with origin; redaction, dedup, golden-set refusal, lineage."""

import json

import pytest
import yaml

from tunelab.errors import TunelabError
from tunelab.ops.from_logs import from_logs
from tunelab.ops.requestlog import LogRow, RequestLog
from tunelab.ops.review import Review, save_review
from tunelab.runs import layout, record_training_run
from tunelab.tasks.task import load_task


def _prompt(text: str) -> str:
    return json.dumps([{"role": "system", "content": "Extract."}, {"role": "user", "content": text}])


@pytest.fixture()
def run_folder(tmp_path):
    """A training run folder as `tunelab train` leaves it (run.json + recipe.yaml), trained on orders-json."""
    folder = tmp_path / "orders@v1"
    folder.mkdir()
    task = load_task("orders-json")
    sources = {s: {"path": str(task.split_path(s)), "sha256": layout.file_sha256(task.split_path(s)),
                   "task": "orders-json"} for s in ("train", "validation")}
    layout.write_json(folder / "run.json", {"base_model": {"spec": "tiny"}, "method": "lora", "data": sources})
    (folder / "recipe.yaml").write_text(yaml.safe_dump({"data": {"task": "orders-json"}, "method": "lora"}))
    record_training_run(folder)
    return folder


def _log(tmp_path, texts: list[str]) -> RequestLog:
    log = RequestLog.open(tmp_path / "requests.sqlite")
    log.write([LogRow(response_id=f"chatcmpl-{i}", ts=100.0 + i, tenant="acme", model="orders", adapter="orders@v1",
                      prompt=_prompt(t), answer=f'{{"n":{i}}}') for i, t in enumerate(texts)])
    return log


def test_accepted_and_corrected_answers_become_rows_with_origin(tmp_path, run_folder, tunelab):
    train_q = load_task("orders-json").prompt(load_task("orders-json").examples("train")[0])
    log = _log(tmp_path, ["Send 2 mugs to ann@example.com", "Send 2 mugs to ann@example.com", "3 hats please",
                          "nothing useful", train_q])
    save_review(log, "chatcmpl-0", Review("accept", reviewer="ann"))
    save_review(log, "chatcmpl-1", Review("correct", correction='{"qty":2, "to":"bob@example.com"}', reviewer="bob"))
    save_review(log, "chatcmpl-2", Review("correct", correction='{"qty":3}', reviewer="ann"))
    save_review(log, "chatcmpl-3", Review("reject", reviewer="ann"))
    save_review(log, "chatcmpl-4", Review("accept", reviewer="ann"))  # already in the training data
    res = from_logs("orders", run_folder, tmp_path / "new.jsonl", log=log)
    rows = layout.read_jsonl(tmp_path / "new.jsonl")
    assert len(rows) == 2 and res.counts["in_train"] == 1 and res.counts["merged"] == 1
    assert res.counts["reject"] == 1
    mugs = rows[0]
    assert mugs["origin"]["response_ids"] == ["chatcmpl-0", "chatcmpl-1"]
    assert mugs["origin"]["reviewers"] == ["ann", "bob"]
    assert mugs["messages"][1]["content"] == "Send 2 mugs to [EMAIL]"  # redacted (the fixture logged it raw)
    assert mugs["messages"][-1] == {"role": "assistant", "content": '{"qty":2, "to":"[EMAIL]"}'}
    assert rows[1]["messages"][-1]["content"] == '{"qty":3}'
    from tunelab.data.read import read_chat_file

    assert len(read_chat_file(tmp_path / "new.jsonl").rows) == 2  # a file `tunelab train` reads
    from tunelab.runs import show

    d = show(res.dataset_id)
    assert d["meta"]["from_logs"]["adapter"] == "orders" and d["meta"]["rows"] == 2
    assert {p["role"] for p in d["made_from"]} == {"adapter", "adapter_train", "adapter_validation"}


def test_a_golden_test_question_is_refused(tmp_path, run_folder, tunelab):
    task = load_task("orders-json")
    test_q = task.prompt(task.examples("test")[0])
    log = _log(tmp_path, ["3 hats please", test_q])
    save_review(log, "chatcmpl-0", Review("accept"))
    save_review(log, "chatcmpl-1", Review("accept"))
    with pytest.raises(TunelabError, match="golden test set.*chatcmpl-1"):
        from_logs("orders", run_folder, tmp_path / "new.jsonl", log=log)
    assert not (tmp_path / "new.jsonl").exists()
    code, out, err = tunelab("data", "from-logs", "orders", "--run", run_folder, "--log", log.url, "--out",
                             tmp_path / "cli.jsonl")
    assert code == 2 and "golden test set" in err
    code, out, err = tunelab("data", "from-logs", "orders", "--run", run_folder, "--log", log.url, "--out",
                             tmp_path / "cli.jsonl", "--drop-test-overlap")
    assert code == 0, err
    assert len(layout.read_jsonl(tmp_path / "cli.jsonl")) == 1 and "1 row" in out


def test_a_tenants_own_redaction_patterns_apply(tmp_path, run_folder, tunelab):
    log = _log(tmp_path, ["Reorder ORD-12345 please, call 555-123-4567"])
    save_review(log, "chatcmpl-0", Review("correct", correction='{"ref":"ORD-12345"}'))
    keys = tmp_path / "keys.yaml"
    keys.write_text(yaml.safe_dump({"tenants": {"acme": {"key_sha256": ["a" * 64], "log": "content",
                                                         "redact": {"order_ref": "ORD-[0-9]+"}}}}))
    code, out, err = tunelab("data", "from-logs", "orders", "--run", run_folder, "--log", log.url, "--out",
                             tmp_path / "r.jsonl", "--keys", keys, "--tenant", "acme")
    assert code == 0, err
    row = layout.read_jsonl(tmp_path / "r.jsonl")[0]
    assert row["messages"][1]["content"] == "Reorder [ORDER_REF] please, call [PHONE]"
    assert row["messages"][-1]["content"] == '{"ref":"[ORDER_REF]"}'
