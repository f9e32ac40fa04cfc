"""Versioned prompts: registered by hash; an eval names the prompt versions it used; an alias's system prompt."""

import json

import pytest

from tunelab.errors import TunelabError
from tunelab.ops.prompts import (
    alias_prompt,
    prompt_version,
    register_prompt,
    register_task_prompts,
    set_alias_prompt,
)
from tunelab.runs import lineage, show
from tunelab.tasks.task import load_task


@pytest.fixture(autouse=True)
def registry(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNELAB_REGISTRY", str(tmp_path / "registry.sqlite"))


def test_task_prompts_register_by_hash_and_a_change_is_a_new_version(tmp_path):
    task = load_task("orders-json")
    first = register_task_prompts(task)
    assert set(first) == {"system", "template"} and first["system"].version == prompt_version(task.spec.system_prompt)
    assert register_task_prompts(task)["system"].id == first["system"].id  # the same text: the same row
    changed = register_prompt("system", task.spec.system_prompt + "\nAnswer in one line.")
    assert changed.version != first["system"].version and changed.id != first["system"].id
    shots = task.examples("train", limit=2)
    assert register_task_prompts(task, shots)["few_shot"].version == prompt_version(shots)
    with pytest.raises(TunelabError, match="role"):
        register_prompt("banner", "x")


def test_an_eval_names_the_prompt_versions_it_used(tmp_path):
    from tunelab.evaluate.harness import Variant, run_variants
    from tunelab.infer.testing import FakeEngine

    task = load_task("orders-json")
    run_variants(FakeEngine(), task, [Variant("base", None, None, False)], tmp_path / "eval", limit=2, few_shot=1,
                 model_label="fake", write_html=False)
    meta = json.loads((tmp_path / "eval" / "base" / "metrics.json").read_text())
    versions = meta["provenance"]["prompts"]
    shots = task.examples("train")[:1]
    expected = register_task_prompts(task, [s for s in task.examples("train") if s.get("id") in
                                            meta["provenance"]["few_shot_ids"]] or shots)
    assert versions == {role: pv.version for role, pv in expected.items()}
    tree = lineage(str(tmp_path / "eval" / "base"))
    by_role = {n["role"]: n["hash"][:12] for n in tree["parents"] if n["kind"] == "prompt"}
    assert by_role == {"system_prompt": versions["system"], "few_shot": versions["few_shot"]}


def test_an_alias_system_prompt_change_is_recorded():
    assert alias_prompt("orders") is None
    a = set_alias_prompt("orders", "You extract orders.")
    assert set_alias_prompt("orders", "You extract orders.").version == a.version  # no change, no new entry
    b = set_alias_prompt("orders", "You extract orders as JSON.")
    now = alias_prompt("orders")
    assert now["version"] == b.version != a.version and now["text"] == "You extract orders as JSON."
    assert [h["version"] for h in now["history"]] == [a.version, b.version]
    roles = {p["role"]: p["hash"][:12] for p in show(now["id"])["made_from"]}
    assert roles == {"now": b.version, "previous": a.version}


def test_prompts_commands(tunelab, tmp_path):
    (tmp_path / "p.txt").write_text("Be brief.")
    code, out, err = tunelab("prompts", "alias", "orders", "--file", tmp_path / "p.txt")
    assert code == 0 and prompt_version("Be brief.") in out and "Be brief." in out, err
    code, out, err = tunelab("prompts", "register", "orders-json", "--json")
    assert code == 0 and json.loads(out)["template"]["version"] == prompt_version("{message}")


def test_runs_compare_shows_a_prompt_change(tmp_path, tunelab):
    from tunelab.evaluate.harness import Variant, run_variants
    from tunelab.infer.testing import FakeEngine
    from tunelab.runs import compare

    task = load_task("orders-json")
    for name, shots in (("zero", 0), ("one", 1)):
        run_variants(FakeEngine(), task, [Variant("base", None, None, False)], tmp_path / name, limit=1,
                     few_shot=shots, model_label="fake", write_html=False)
    c = compare([str(tmp_path / "zero" / "base"), str(tmp_path / "one" / "base")])
    assert c["prompts"]["system"][0] == c["prompts"]["system"][1] == prompt_version(task.spec.system_prompt)
    assert c["prompts"]["few_shot"][0] is None and len(c["prompts"]["few_shot"][1]) == 12
    code, out, err = tunelab("runs", "compare", tmp_path / "zero" / "base", tmp_path / "one" / "base")
    assert code == 0 and "prompt: few_shot" in out and c["prompts"]["few_shot"][1] in out, err
