"""The drift monitor over a request log (tunelab.ops.monitor): an adapter's reference is its run folder's data and
its eval; handbook questions sent to an orders adapter alert, orders like its test split do not (seeded);
metadata-only rows still give the length signal; `tunelab monitor` exits 1 on an alert and 0 without, writes the
report, and the server's /metrics exports the latest verdicts."""

import json
import time

import pytest

from tunelab.ops.drift import Signal, decide
from tunelab.ops.monitor import assess, parse_duration, reference_for_adapter, token_counter
from tunelab.ops.requestlog import LogRow, RequestLog
from tunelab.runs import layout
from tunelab.tasks import load_task

pytest.importorskip("sentence_transformers")  # the bundled MiniLM (the rag extra)
N = 40


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, tiny_model_dir):
    """A run folder as `tunelab train` leaves it (run.json: a base with the bundled tokenizer, 80 orders-json
    train rows, 40 validation rows) and an eval folder on 40 test rows; the window pools: 40 other test rows and
    40 handbook questions."""
    root = tmp_path_factory.mktemp("monitor")
    orders = load_task("orders-json")
    test = orders.examples("test")
    data = {}
    for split, rows in (("train", orders.examples("train", limit=80)), ("validation", orders.examples("validation",
                                                                                                       limit=N))):
        layout.write_jsonl(root / f"{split}.jsonl", rows)
        data[split] = {"path": str(root / f"{split}.jsonl"), "sha256": "x", "task": "orders-json"}
    run = root / "orders-run"
    base = {"spec": str(tiny_model_dir), "path": str(tiny_model_dir)}  # the bundled tokenizer, in a folder
    layout.write_json(run / layout.RUN_JSON, {"base_model": base, "data": data,
                                             "system_prompt": orders.spec.system_prompt, "method": "lora"})
    ref = reference_for_adapter(run)  # no eval yet: lengths counted with the base's tokenizer
    rows = [{"id": ex["id"], "input": orders.prompt(ex), "output": orders.reference(ex), "finish_reason": "stop",
             "input_tokens": ref.parts["train"].input_tokens[0], "scores": {"schema_valid": 1.0}} for ex in test[:N]]
    layout.write_eval_folder(root / "eval", {"task": "orders-json", "split": "test"}, rows)
    handbook = load_task("handbook-qa")
    return {"run": run, "eval": root / "eval", "null": [orders.prompt(ex) for ex in test[N:2 * N]],
            "planted": [handbook.prompt(ex) for ex in handbook.examples("test", limit=N)],
            "system": orders.spec.system_prompt}


ANSWER = '{"customer":"Ann Lee","email":null,"order_date":"2025-01-02","currency":"EUR","items":[{"product":"Mug",' \
         '"quantity":2,"unit_price":4.5}],"shipping":null,"notes":null}'  # valid against schema.json


def rows(texts, system, count, t0, content=True, adapter="orders"):
    return [LogRow(f"chatcmpl-{adapter}-{t0}-{i}", t0 + i, "acme", adapter, adapter, input_tokens=count(t),
                   output_tokens=50, latency_s=0.5 + 0.01 * (i % 7), answer=ANSWER if content else None,
                   prompt=json.dumps([{"role": "system", "content": system}, {"role": "user", "content": t}])
                   if content else None) for i, t in enumerate(texts)]


@pytest.fixture(scope="module")
def reference(adapter):
    return reference_for_adapter(adapter["run"], [adapter["eval"]]), token_counter("smollm2-135m-instruct",
                                                                                  adapter["system"])


def test_the_reference_is_the_run_folders_data_and_its_eval(reference):
    ref, count = reference
    assert {k: len(p.prompts) for k, p in ref.parts.items()} == {"train": 80, "validation": N, "eval:eval": N}
    assert ref.schema["type"] == "object" and len(ref.parts["validation"].input_tokens) == N
    assert ref.outputs() == [ref.parts["eval:eval"]]  # rates compare with the adapter's own outputs


def test_the_registry_names_the_run_folder_and_its_evals(adapter, tmp_path, monkeypatch):
    """Without --run: the registry's adapter of that name, and the evals recorded as made from it."""
    from tunelab.errors import TunelabError
    from tunelab.ops.monitor import resolve_run_folder
    from tunelab.runs import record_eval, record_training_run

    monkeypatch.setenv("TUNELAB_REGISTRY", str(tmp_path / "registry.sqlite"))
    with pytest.raises(TunelabError, match="--run"):
        resolve_run_folder("orders-run")
    record_training_run(adapter["run"])
    rows = layout.read_eval_folder(adapter["eval"])[1]
    layout.write_eval_folder(tmp_path / "later-eval", {"task": "orders-json", "split": "test", "base_model": "x",
                                                       "adapter": str(adapter["run"])}, rows)
    record_eval(tmp_path / "later-eval")
    folder = resolve_run_folder("orders-run")
    assert folder == adapter["run"].resolve()
    assert sorted(reference_for_adapter(folder).parts) == ["eval:later-eval", "train", "validation"]


def test_planted_traffic_alerts_and_traffic_like_the_test_split_does_not(adapter, reference):
    from tunelab.ops.monitor import default_embedder

    ref, count = reference
    embed = default_embedder()
    null = assess(rows(adapter["null"], adapter["system"], count, 0), ref, embed=embed, seed=0)
    planted = assess(rows(adapter["planted"], adapter["system"], count, 0), ref, embed=embed, seed=0)
    verdict = {s.name: s for s in planted}
    assert verdict["input_embeddings"].verdict == "alert" and verdict["prompt_length"].verdict == "alert"
    assert verdict["input_embeddings"].p_value == pytest.approx(1 / 1001)
    assert [s.name for s in null if s.verdict == "alert"] == []
    quiet = {s.name: s for s in null}
    assert quiet["input_embeddings"].p_value > 0.05 and "closest to eval:eval" in quiet["input_embeddings"].note
    assert quiet["schema_failures"].verdict == "ok" and quiet["refusals"].verdict == "ok"
    assert quiet["latency"].verdict == "info"  # nothing before the window to compare with
    # metadata-only rows: no embeddings, the prompt length still alerts
    meta = {s.name: s for s in assess(rows(adapter["planted"], adapter["system"], count, 0, content=False), ref,
                                      embed=embed)}
    assert meta["input_embeddings"].verdict == "skipped" and meta["prompt_length"].verdict == "alert"


def test_holm_keeps_a_lone_weak_signal_from_alerting():
    """p = 0.004 alerts on its own at alpha 0.01, not among three tested signals (Holm: 3 x 0.004 > 0.01);
    skipped and info signals do not count."""
    def signals(p):
        return [Signal("a", "ok", p_value=p), Signal("b", "ok", p_value=0.5), Signal("c", "ok", p_value=0.3),
                Signal("d", "skipped"), Signal("e", "info", value=1.0)]

    weak = {s.name: s for s in decide(signals(0.004), 0.01)}
    assert weak["a"].verdict == "ok" and weak["a"].p_adjusted == pytest.approx(0.012)
    assert weak["d"].verdict == "skipped" and weak["e"].verdict == "info"
    assert decide(signals(0.003), 0.01)[0].verdict == "alert"
    assert decide([Signal("a", "ok", p_value=0.004)], 0.01)[0].verdict == "alert"


def test_parse_duration():
    assert parse_duration("24h") == 86400 and parse_duration("1d12h") == 129600 and parse_duration("90s") == 90
    with pytest.raises(Exception, match="24h, 30m, 7d"):
        parse_duration("yesterday")


def test_tunelab_monitor_exits_1_on_an_alert_and_metrics_export_it(adapter, reference, tmp_path, monkeypatch,
                                                                    tunelab, tokenizer):
    ref, count = reference
    monkeypatch.setenv("TUNELAB_HOME", str(tmp_path / "home"))
    log = RequestLog.open(tmp_path / "requests.sqlite")
    now = time.time() - 1000
    log.write(rows(adapter["planted"], adapter["system"], count, now, adapter="orders-a")
              + rows(adapter["null"], adapter["system"], count, now, adapter="orders-b"))
    log.close()
    args = ["--run", adapter["run"], "--eval", adapter["eval"], "--log", tmp_path / "requests.sqlite", "--since", "1h"]
    code, out, err = tunelab("monitor", "orders-a", *args, "--html")
    assert code == 1, err
    assert "ALERT" in out and "input_embeddings" in out and "report.html" in out
    code, out, err = tunelab("monitor", "orders-b", *args, "--json")
    assert code == 0, err
    assert json.loads(out)["alert"] is False
    code, out, err = tunelab("monitor", "orders-c", *args)  # no traffic at all: nothing to alert on
    assert code == 0 and "skipped" in out

    import httpx2 as httpx
    from conftest import Server

    from tunelab.infer.testing import FakeEngine
    from tunelab.server import ServeService

    srv = Server(ServeService(FakeEngine(tokenizer=tokenizer), "fake"))
    try:
        m = httpx.get(srv.url + "/metrics").text
    finally:
        srv.stop()
    assert 'tunelab_drift_alert{adapter="orders-a",signal="input_embeddings"} 1.0' in m
    assert 'tunelab_drift_alert{adapter="orders-b",signal="input_embeddings"} 0.0' in m
    assert 'tunelab_drift_alerting{adapter="orders-a"} 1.0' in m and 'tunelab_drift_alerting{adapter="orders-b"} 0.0' in m
    assert 'tunelab_drift_p_value{adapter="orders-b",signal="prompt_length"}' in m
