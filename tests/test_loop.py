"""tunelab loop: each step resumes after a kill, a failed gate stops with the reason and the numbers."""

import json

import pytest
import yaml

from tunelab.errors import TunelabError
from tunelab.ops import rollout
from tunelab.ops.loop import STEPS, GateFailed, Loop, LoopConfig, gate
from tunelab.ops.requestlog import LogRow, RequestLog
from tunelab.ops.review import Review, save_review
from tunelab.runs import layout, lineage, record_training_run


def _adapter(folder, train_path, tag: str):
    folder.mkdir(parents=True, exist_ok=True)
    layout.write_json(folder / "adapter_config.json", {"peft_type": "LORA", "r": 2})
    (folder / "adapter_model.safetensors").write_bytes(tag.encode())
    layout.write_json(folder / "run.json", {"base_model": {"spec": "tiny"}, "method": "lora", "data": {
        "train": {"path": str(train_path), "sha256": layout.file_sha256(train_path)}}})
    (folder / "recipe.yaml").write_text(yaml.safe_dump({"data": {"train": str(train_path)}, "method": "lora",
                                                        "output_dir": str(folder)}))


class FakeTrainer:
    def __init__(self):
        self.calls = 0

    def __call__(self, recipe_path, overrides):
        self.calls += 1
        recipe = yaml.safe_load(recipe_path.read_text())
        out = layout.Path(recipe["output_dir"])
        _adapter(out, layout.Path(recipe["data"]["train"]), f"v2 {overrides}")
        return out


class FakeEvaluator:
    def __init__(self, golden_new=None, traffic_new=None):
        self.calls = 0
        self.golden_new, self.traffic_new = golden_new, traffic_new

    def __call__(self, old, new, data, config, out_dir):
        self.calls += 1
        n = data["heldout_rows"]
        golden_old = [1.0, 0.0] * 10
        return {"golden": {"metric": "exact_match", "old": golden_old, "new": self.golden_new or golden_old},
                "traffic": {"metric": "exact_match", "old": [0.0] * n, "new": self.traffic_new or [1.0] * n},
                "probes": {"general": False, "safety": False}}


def _reviewed_log(path, order):
    """Six requests and their corrections, logged and reviewed in `order` (indices into the names)."""
    names = ["Kim", "Lou", "Max", "Ned", "Oli", "Pam"]
    log = RequestLog.open(path)
    log.write([LogRow(response_id=f"chatcmpl-{i}", ts=100.0 + k, tenant="acme", model="orders",
                      adapter="orders@v1", version="v1", answer="{}",
                      prompt=json.dumps([{"role": "user", "content": f"ORDER// {names[i]} x{i + 1} apples"}]))
               for k, i in enumerate(order)])
    for i in order:
        save_review(log, f"chatcmpl-{i}", Review("correct", correction=json.dumps({"name": names[i], "qty": i + 1}),
                                                 reviewer="ann"))
    log.close()
    return path


@pytest.fixture()
def setup(tmp_path, chat_file, monkeypatch):
    monkeypatch.setenv("TUNELAB_REGISTRY", str(tmp_path / "registry.sqlite"))
    root = tmp_path / "adapters"
    _adapter(root / "orders@v1", chat_file, "v1")
    record_training_run(root / "orders@v1")
    test = tmp_path / "test.jsonl"
    layout.write_jsonl(test, [{"messages": [{"role": "user", "content": "Zed wants 9 pears."},
                                            {"role": "assistant", "content": '{"name":"Zed","qty":9}'}]}])
    _reviewed_log(tmp_path / "requests.sqlite", range(6))
    return LoopConfig(folder=root / "orders@v1", out=tmp_path / "loop", log=tmp_path / "requests.sqlite",
                      test=test, train_overrides=["train.max_steps=2"])


@pytest.mark.parametrize("step", STEPS)
def test_a_kill_at_each_step_resumes_there(setup, monkeypatch, step):
    trainer, evaluator = FakeTrainer(), FakeEvaluator()
    real = getattr(Loop, f"step_{step}")
    kills = []

    def killed(self):
        if not kills:
            kills.append(step)
            raise RuntimeError("killed")
        return real(self)

    monkeypatch.setattr(Loop, f"step_{step}", killed)
    with pytest.raises(RuntimeError, match="killed"):
        Loop(setup, trainer, evaluator).run()
    state = json.loads((setup.out / "loop.json").read_text())
    assert state["steps"][step]["status"] == "failed" and "killed" in state["steps"][step]["error"]
    assert [s for s in STEPS if state["steps"].get(s, {}).get("status") == "done"] == list(STEPS[:STEPS.index(step)])
    report = Loop(setup, trainer, evaluator).run()
    assert trainer.calls == 1 and evaluator.calls == 1  # nothing done before the kill is done again
    assert report["to"] == "orders@v2" and report["gate"]["passed"]
    assert report["data"]["reviewed_rows"] == 6 and report["data"]["heldout_rows"] == 2
    train_rows = layout.read_jsonl(report["data"]["train"])
    assert len(train_rows) == 64 + 4 * 2  # the adapter's own rows + the reviewed ones, twice
    v2 = setup.root / "orders@v2"
    assert (v2 / "adapter_model.safetensors").read_bytes() == b"v2 ['train.max_steps=2']"
    assert [e["action"] for e in rollout.history("orders")] == ["set"]
    assert rollout.get("orders").weights == {"v1": 90.0, "v2": 10.0}
    tree = lineage(str(v2))
    seen = set()
    stack = [tree]
    while stack:
        n = stack.pop()
        seen.add((n["role"], n["name"]))
        stack += n["parents"]
    # v2 <- run <- its training data <- the reviewed rows and v1 (whose training data it mixes in)
    assert {("train", "train.jsonl"), ("reviewed", "reviewed.jsonl"), ("adapter", "orders@v1")} <= seen
    assert Loop(setup, trainer, evaluator).run() == report  # a finished loop is a no-op


def test_a_failed_gate_stops_with_the_reason_and_the_numbers(setup):
    worse = [0.0, 0.0] * 10  # every golden example the old version got right is now wrong
    with pytest.raises(GateFailed) as e:
        Loop(setup, FakeTrainer(), FakeEvaluator(golden_new=worse)).run()
    assert "golden set (exact_match): -50.0 points" in str(e.value) and "excludes zero" in str(e.value)
    state = json.loads((setup.out / "loop.json").read_text())
    assert state["steps"]["gate"]["status"] == "failed"
    assert state["steps"]["gate"]["output"]["golden"]["delta_points"] == -50.0
    assert not (setup.root / "orders@v2").exists() and rollout.get("orders") is None
    again = FakeEvaluator()
    with pytest.raises(GateFailed, match="-50.0 points"):  # a rerun resumes at the gate on the recorded numbers
        Loop(setup, FakeTrainer(), again).run()
    assert again.calls == 0


def test_no_gain_on_the_new_traffic_fails_the_gate(setup):
    with pytest.raises(GateFailed, match=r"new traffic \(exact_match\): \+0.0 points .*not a gain over 0"):
        Loop(setup, FakeTrainer(), FakeEvaluator(traffic_new=[0.0, 0.0])).run()


def test_gate_numbers():
    same = {"golden": {"metric": "m", "old": [1.0, 0.0] * 10, "new": [1.0, 0.0] * 10},
            "traffic": {"metric": "m", "old": [0.0, 0.0], "new": [1.0, 0.0]}, "probes": {"safety": True}}
    g = gate(same)
    assert not g["passed"] and g["reasons"] == ["safety probes: the new version is flagged against the current one"]
    same["probes"] = None
    assert gate(same)["passed"] and gate(same)["traffic"]["delta_points"] == 50.0
    assert not gate(same, min_gain=60.0)["passed"]


def test_too_few_reviewed_rows_is_a_clear_error(setup, tmp_path):
    setup.log = tmp_path / "empty.sqlite"
    RequestLog.open(setup.log).close()
    with pytest.raises(TunelabError, match="review some first"):
        Loop(setup, FakeTrainer(), FakeEvaluator()).run()


def test_tunelab_loop_command(setup, tunelab, monkeypatch):
    import tunelab.ops.loop as loop_mod

    monkeypatch.setattr(loop_mod, "train_version", FakeTrainer())
    monkeypatch.setattr(loop_mod, "_evaluate_versions", FakeEvaluator(golden_new=[0.0, 0.0] * 10))
    args = ["loop", "orders", "--adapters", setup.root, "--log", setup.log, "--test", setup.test, "--out",
            setup.out, "--set", "train.max_steps=2"]
    code, out, err = tunelab(*args)
    assert code == 1 and "gate failed" in out and "golden: -50.0 points" in out, (out, err)
    (setup.out / "loop.json").unlink()  # start over with a version that passes
    monkeypatch.setattr(loop_mod, "_evaluate_versions", FakeEvaluator())
    code, out, err = tunelab(*args)
    assert code == 0, err
    assert "registered orders@v2" in out and "canary: v1=90, v2=10" in out
    assert loop_mod.current_folder("orders", setup.root).name == "orders@v1"  # the rollout's stable version
    rollout.promote("orders", "v2")
    assert loop_mod.current_folder("orders", setup.root).name == "orders@v2"


@pytest.mark.slow  # about 50 CPU-seconds: training, then generation for two versions and the probes
def test_the_loop_trains_and_evaluates_a_tiny_model_for_real(setup, tiny_model_dir, chat_file, tmp_path):
    from tunelab.config.recipe import load_recipe
    from tunelab.train import train

    v1 = tmp_path / "real" / "orders@v1"
    train(load_recipe(None, [f"model.spec={tiny_model_dir}", "data.task=null", f"data.train={chat_file}",
                             "train.max_steps=1", "validation.every=null", "lora.r=2", f"output_dir={v1}"]),
          show_progress=False)
    setup.folder, setup.out = v1, tmp_path / "real-loop"
    setup.probes, setup.probe_limit, setup.min_gain = True, 2, -1.0
    report = Loop(setup).run()
    assert (tmp_path / "real" / "orders@v2" / "adapter_model.safetensors").is_file()
    ev = report["evaluate"]
    assert len(ev["golden"]["new"]) == 1 and len(ev["traffic"]["old"]) == 2
    assert set(ev["probes"]) == {"general", "safety"}
    assert (layout.Path(ev["golden"]["eval"]["orders@v2"]) / "metrics.json").is_file()
    assert report["canary"]["weights"] == {"v1": 90.0, "v2": 10.0}


def test_the_held_out_rows_do_not_depend_on_the_order_reviews_came_in(setup, tmp_path):
    """Concurrent requests finish (and are logged and reviewed) in any order; the same reviews hold out the same
    rows."""
    held = []
    for order in ([0, 1, 2, 3, 4, 5], [5, 3, 1, 0, 2, 4]):
        name = "".join(map(str, order))
        c = LoopConfig(**{**setup.__dict__, "out": tmp_path / f"loop-{name}",
                          "log": _reviewed_log(tmp_path / f"requests-{name}.sqlite", order)})
        data = Loop(c, trainer=FakeTrainer(), evaluator=FakeEvaluator()).step_data()
        held.append([r["messages"] for r in layout.read_jsonl(layout.Path(data["heldout"]))])
    assert held[0] == held[1] and len(held[0]) == 2


def test_training_in_a_child_process(tiny_model_dir, chat_file, tmp_path, monkeypatch):
    """The loop demo trains v2 in a child (`python -m tunelab train`): the folder comes back trained; a trained
    folder is returned without a child; a failing child is a clear error."""
    import subprocess

    from tunelab.ops.loop import train_version_in_child

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"model": {"spec": str(tiny_model_dir)}, "method": "lora", "lora": {"r": 2},
                                      "data": {"task": None, "train": str(chat_file)},
                                      "train": {"max_steps": 1}, "validation": {"every": None},
                                      "output_dir": str(tmp_path / "v2")}))
    out = train_version_in_child(recipe, ["train.seed=3"])
    assert out == tmp_path / "v2" and (out / "adapter_model.safetensors").is_file()
    assert layout.read_json(out / "run.json")["recipe"]["train"]["seed"] == 3  # the overrides reached the child
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("a trained folder needs no child"))
    assert train_version_in_child(recipe, []) == out
    monkeypatch.undo()
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    with pytest.raises(TunelabError, match=r"tunelab train .* failed \(exit 2\)"):
        train_version_in_child(recipe, [f"data.train={bad}", f"output_dir={tmp_path / 'v3'}"])
