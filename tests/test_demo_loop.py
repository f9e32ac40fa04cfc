"""`tunelab demo --loop` on a tiny model: every stage runs for real (training, the server over loopback, the
monitor, the gold-answered review queue, the loop, the canary, the promotion) and leaves its artifacts. The
bundled-model run takes longer than a slow test may: `make demo-loop` runs it (docs/serving.md)."""

import json

import pytest

pytest.importorskip("uvicorn")

from tunelab.demo_loop import LoopDemoConfig, run_loop_demo, shifted_message, traffic_rows  # noqa: E402
from tunelab.ops.loop import STEPS, evaluate_versions  # noqa: E402
from tunelab.ops.redact import redactor  # noqa: E402
from tunelab.tasks import load_task  # noqa: E402


def test_the_new_style_is_new_and_keeps_the_gold_answer():
    task = load_task("orders-json")
    normal, shifted = traffic_rows(task)
    assert len(shifted) >= 64 + 8 and len(normal) == 200  # the canary gets new-style orders nobody sent before
    order = {"customer": "Julia de la Cruz", "email": None, "order_date": "2025-06-10", "currency": "JPY",
             "items": [{"product": "Nordic Scarf", "quantity": 3, "unit_price": 12000},
                       {"product": "Blue Mug", "quantity": 1, "unit_price": 8.5}], "shipping": "pickup", "notes": None}
    assert shifted_message(order) == "PO;20250610;CRUZ, JULIA DE LA;JPY;P;3*Nordic Scarf@12000|1*Blue Mug@8.50;-"
    trained = {task.prompt(ex)[:3] for ex in task.examples("train")}
    assert "PO;" not in trained  # no training message starts like the new style
    assert all(redactor()(ex["message"]) == ex["message"] and ex["output"]["email"] is None for ex in shifted)


class LearnsNothing:
    """The real evaluation of both versions; a 2-step tiny model learns nothing, so the new style's scores of v2
    are set to a gain (and its golden scores to v1's) for the gate to pass: the gate itself is tested in
    test_loop.py."""

    def __init__(self):
        self.real = None

    def __call__(self, old, new, data, config, out_dir):
        s = evaluate_versions(old, new, data, config, out_dir)
        self.real = json.loads(json.dumps({k: s[k] for k in ("golden", "traffic")}))
        s["traffic"]["new"] = [1.0] * len(s["traffic"]["old"])
        s["golden"]["new"] = list(s["golden"]["old"])
        return s


def test_the_loop_demo_on_a_tiny_model(tmp_path, tiny_model_dir, capsys):
    import os

    before = os.environ.get("TUNELAB_REGISTRY")
    evaluator = LearnsNothing()
    cfg = LoopDemoConfig(out=tmp_path / "demo", model=str(tiny_model_dir), v1_steps=2, v2_steps=2, baseline=6,
                         shifted=24, canary_min=3, canary_max=60, golden=4, probes=0, max_tokens=8, workers=8,
                         evaluator=evaluator)
    res = run_loop_demo(cfg)
    s, out = res.steps, tmp_path / "demo"
    assert os.environ.get("TUNELAB_REGISTRY") == before  # the demo's own registry only while it ran
    assert s["registry"] == str((out / "registry.sqlite").resolve()) and (out / "registry.sqlite").is_file()
    assert (out / "adapters" / "orders@v1" / "adapter_config.json").is_file() and s["v1"]["trained"]
    assert s["traffic"]["prompt_versions"] == [s["server"]["prompt_version"]]  # every row names the prompt

    after = s["monitor"]["after the shift"]
    assert after["rows"] == 24 and after["alert"] and "input_embeddings" in after["alerts"]
    assert after["signals"]["input_embeddings"]["p_adjusted"] <= 0.01
    assert (out / "monitor" / "after the shift" / "monitor.json").is_file()

    r = s["review"]
    assert r["queued"] == 24 and r["accept"] + r["correct"] == 24 and r["no_gold"] == 0 and "drift" in r["reasons"]
    assert r["correct"] >= 20  # a tiny random model writes no right order

    lp = s["loop"]
    assert lp["passed"] and lp["data"]["reviewed_rows"] == 24 and lp["canary"] == {"v1": 90.0, "v2": 10.0}
    assert evaluator.real["traffic"]["old"] and len(evaluator.real["golden"]["old"]) == 4
    state = json.loads((out / "loop" / "loop.json").read_text())
    assert [state["steps"][k]["status"] for k in STEPS] == ["done"] * len(STEPS)
    v2 = out / "adapters" / "orders@v2"
    assert (v2 / "adapter_config.json").is_file() and lp["v2"] == str(v2)

    assert s["canary"]["requests"] <= 60 and s["rollout"]["status"]["requests"].get("v2", 0) >= 3
    assert s["rollout"]["status"]["decision"] in ("promote", "hold")
    assert s["rollout"]["promoted"] and s["rollout"]["weights"] == {"v2": 100.0}
    assert [e["action"] for e in s["rollout"]["history"]] == ["set", "promote"]

    seen, stack = set(), [s["lineage"]]
    while stack:
        n = stack.pop()
        seen.add((n["kind"], n["name"]))
        stack += n["parents"]
    assert {("dataset", "reviewed.jsonl"), ("adapter", "orders@v1")} <= seen
    saved = json.loads((out / "demo-loop.json").read_text())
    assert saved["steps"]["loop"]["passed"]
    assert list(saved["stage_seconds"]) == ["v1", "server", "traffic", "monitor", "review", "loop", "canary"]
    assert 0 < sum(saved["stage_seconds"].values()) <= saved["seconds"]  # where the demo's time went

    from tunelab.cli.ship import _render_loop  # what `tunelab demo --loop` prints from these numbers

    capsys.readouterr()
    _render_loop(s)
    text = capsys.readouterr().out
    for needle in ("drift monitor, after the shift (24 requests): ALERT on", "input embeddings (MMD) p = ",
                   "AUTOMATED from the task's gold answers", "new style (held-out reviewed rows), field_f1",
                   "golden set (test split), field_f1, n=4", "verdict: ", "promoted: orders now serves",
                   "lineage of adapter", "reviewed.jsonl"):
        assert needle in text, needle
