"""`tunelab eval` as a new user runs it: your own JSONL (--data), length buckets, tables that fit 80 columns."""

import json

import pytest
from conftest import single_thread

from tunelab.tasks import load_task

one_thread = pytest.fixture(autouse=True, scope="module")(single_thread)


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _widest(text):
    """The widest line of the tables (not the report paths, which are never wrapped, so they can be pasted)."""
    return max(len(line) for line in text.splitlines() if not line.startswith("report: "))


def test_eval_own_chat_data(tunelab, tiny_model_dir, tmp_path):
    data = _jsonl(tmp_path / "My Data.jsonl", [
        {"messages": [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": f"Say {w}."},
                      {"role": "assistant", "content": w}]} for w in ("yes", "no", "maybe")])
    out_dir = tmp_path / "ev"
    code, out, err = tunelab("eval", "--data", data, "--metric", "exact_match", "--metric", "contains",
                             "--model", tiny_model_dir, "--out", out_dir, "--by-length", "30")
    assert code == 0, err
    meta = json.loads((out_dir / "base" / "metrics.json").read_text())
    assert (meta["task"], meta["n"], meta["primary_metric"]) == ("my-data", 3, "exact_match")
    assert list(meta["metrics"]) == ["exact_match", "contains"]
    assert meta["provenance"]["data"]["path"] == str(data.resolve())
    rows = [json.loads(line) for line in (out_dir / "base" / "predictions.jsonl").read_text().splitlines()]
    assert [(r["id"], r["input"], r["reference"]) for r in rows] == [
        ("line-1", "Say yes.", "yes"), ("line-2", "Say no.", "no"), ("line-3", "Say maybe.", "maybe")]
    assert [b["bucket"] for b in meta["by_length"]["metrics"]["exact_match"]] == ["0-29", "30+"]
    assert sum(b["n"] for b in meta["by_length"]["metrics"]["exact_match"]) == 3
    assert "exact_match by input tokens" in " ".join(out.split()) and _widest(out) <= 80


def test_eval_own_prompt_completion_sql(tunelab, tiny_model_dir, tmp_path):
    shop = load_task("shop-sql")
    ex = shop.examples("test", limit=2)
    data = _jsonl(tmp_path / "sql.jsonl", [{"prompt": shop.prompt(e), "completion": shop.reference(e)} for e in ex])
    code, _, err = tunelab("eval", "--data", data, "--metric", "sql_exec", "--db", shop.db_path,
                           "--model", tiny_model_dir, "--out", tmp_path / "ev")
    assert code == 0, err
    rows = [json.loads(line) for line in (tmp_path / "ev" / "base" / "predictions.jsonl").read_text().splitlines()]
    assert [r["reference"] for r in rows] == [shop.reference(e) for e in ex]
    assert all(r["scores"]["sql_exec"] == 0.0 and r["explanations"]["sql_exec"] for r in rows)  # random model


@pytest.mark.parametrize("rows, args, needle", [
    ([{"prompt": "a", "completion": "b"}, "{oops"], ["--metric", "exact_match"], "bad.jsonl:2: malformed JSON"),
    ([{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                    {"role": "user", "content": "and?"}]}], ["--metric", "exact_match"],
     "bad.jsonl:1: the row must end with the assistant's answer"),
    ([{"prompt": "a", "completion": "b"}], ["--metric", "sql_exec"], "needs --db"),
    ([{"prompt": "a", "completion": "b"}], ["--metric", "bleu_score"], "Unknown metric 'bleu_score'"),
    ([{"prompt": "a", "completion": "b"}], [], "needs at least one --metric"),
    ([{"prompt": "a", "completion": "b"}], ["--metric", "exact_match", "--by-length", "512,256"], "increasing"),
])
def test_eval_own_data_errors_before_any_model_loads(tunelab, tmp_path, monkeypatch, rows, args, needle):
    from tunelab.evaluate import harness

    monkeypatch.setattr(harness, "load_engine", lambda *a, **k: pytest.fail("a model was loaded"))
    path = tmp_path / "bad.jsonl"
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    code, _, err = tunelab("eval", "--data", path, *args)
    assert code == 2 and needle in " ".join(err.split()), err


def test_task_and_data_together_is_an_error(tunelab, tmp_path):
    code, _, err = tunelab("eval", "--task", "orders-json", "--data", tmp_path / "x.jsonl")
    assert code == 2 and "not both" in err
    code, _, err = tunelab("eval", "--task", "orders-json", "--metric", "exact_match")
    assert code == 2 and "go with --data" in err


def test_eval_tables_fit_80_columns_when_not_a_tty(tunelab, tiny_model_dir, tmp_path):
    """Long adapter folder names and many metrics: the table is cut to 80 columns in a log or a pipe."""
    import shutil

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    adapter = tmp_path / "a-really-long-adapter-folder-name-from-a-sweep-lr2e-4-r16"
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                   LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM")).save_pretrained(adapter)
    task = shutil.copytree(load_task("orders-json").dir, tmp_path / "orders-json")
    (task / "task.yaml").write_text((task / "task.yaml").read_text().replace("max_new_tokens: 200",
                                                                             "max_new_tokens: 8"))
    code, out, err = tunelab("eval", "--task", task, "--model", tiny_model_dir, "--adapter", adapter, "--limit", 2,
                             "--out", tmp_path / "ev")
    assert code == 0, err
    assert _widest(out) <= 80, out
    assert "a-really-long" in out and "field_f1" in out
