"""The ladder's recommendation logic on fabricated rung results: the verdict follows the measurements."""

import json

import numpy as np
import pytest

from tunelab.errors import TunelabError
from tunelab.ladder import run_ladder
from tunelab.ladder.recommend import Target, recommend
from tunelab.ladder.results import RungResult, paired
from tunelab.ladder.rungs import BY_NAME, plan_rungs

N = 100


def _rung(name, p, failures=None, seed=0, groups=None):
    """A rung whose per-example primary score is 1 with probability p (fixed seed per rung)."""
    rng = np.random.default_rng(seed + sum(name.encode()))
    scores = (rng.random(N) < p).astype(float).tolist()
    lo = max(0.0, p - 0.1)
    r = BY_NAME[name]
    return RungResult(name, r.label, r.cost, {"contains": {"score": p, "ci95": [lo, min(1.0, p + 0.1)], "n": N}},
                      scores, failures or {}, groups=groups or {})


def _facts_ladder():
    """handbook-qa-like: retrieval fixes knowledge failures; LoRA helps only on facts it saw."""
    return [_rung("prompt", 0.05, {"knowledge": 95}), _rung("few-shot", 0.07, {"knowledge": 93}),
            _rung("bm25", 0.70, {"knowledge": 30}), _rung("hybrid", 0.85, {"knowledge": 15},
                  groups={"fact_in_train": {"true": {"n": 80, "score": 0.86}, "false": {"n": 20, "score": 0.8}}}),
            _rung("lora", 0.30, {"knowledge": 70},
                  groups={"fact_in_train": {"true": {"n": 80, "score": 0.37}, "false": {"n": 20, "score": 0.0}}}),
            _rung("rag+lora", 0.86, {"knowledge": 14})]


def _form_ladder():
    """orders-json-like: format failures; constrained fixes format only, LoRA fixes format and content."""
    return [_rung("prompt", 0.05, {"format": 60, "content": 35}), _rung("few-shot", 0.10, {"format": 40, "content": 50}),
            _rung("constrained", 0.12, {"format": 0, "content": 88}), _rung("lora", 0.60, {"format": 2, "content": 38}),
            _rung("lora+constrained", 0.62, {"content": 38})]


def test_facts_go_to_retrieval():
    rec = recommend(_facts_ladder())
    assert rec.verdict == "retrieval" and rec.rung == "hybrid" and not rec.finetune_justified
    assert "do not finetune" in rec.headline.lower()
    assert any("fact is not in the training data" in r for r in rec.reasons)
    assert rec.removed["hybrid"]["knowledge"] == [95, 15]


def test_form_goes_to_finetuning_with_constrained_as_partial_fix():
    rec = recommend(_form_ladder())
    assert rec.verdict == "finetune" and rec.finetune_justified and rec.rung in ("lora", "lora+constrained")
    assert any(r.startswith("constrained decoding, the cheap partial fix") for r in rec.reasons)
    assert any("content failures remain" in s for s in rec.next_steps)


def test_nothing_beats_the_prompt_inside_noise():
    rungs = [_rung("prompt", 0.50, {"content": 50}), _rung("few-shot", 0.52, {"content": 48}, seed=1),
             _rung("lora", 0.53, {"content": 47}, seed=2)]
    rec = recommend(rungs)
    assert rec.verdict in ("none", "prompting") and not rec.finetune_justified


def test_target_met_by_the_prompt_means_no_finetuning():
    rungs = _form_ladder()
    rungs[0].metrics["contains"]["ci95"] = [0.96, 0.99]
    rec = recommend(rungs, Target.parse("contains>=0.95"))
    assert rec.verdict == "prompting" and rec.cheapest_meeting_target == "prompt"
    assert "Cheapest rung meeting contains>=0.95: prompt" in rec.headline


def test_retrieval_plus_finetuning_when_both_add():
    rungs = [_rung("prompt", 0.05), _rung("hybrid", 0.45), _rung("lora", 0.40), _rung("rag+lora", 0.90)]
    rec = recommend(rungs)
    assert rec.verdict == "retrieval+finetune" and rec.rung == "rag+lora"


def test_a_retrieval_aware_lora_on_top_of_retrieval_is_recommended_when_it_adds():
    """Closed-book LoRA does not beat the prompt (facts), retrieval does, and a LoRA trained on retrieved
    passages (RAFT) beats retrieval on the same examples: retrieve and finetune on the passages."""
    rungs = [_rung("prompt", 0.02), _rung("hybrid", 0.45), _rung("lora", 0.03), _rung("rag+lora", 0.85)]
    rec = recommend(rungs)
    assert rec.verdict == "retrieval+finetune" and rec.rung == "rag+lora" and rec.finetune_justified
    assert any(r.startswith("RAG + LoRA vs hybrid RAG") for r in rec.reasons)
    rungs[-1] = _rung("rag+lora", 0.47)  # inside the noise: retrieval alone
    assert recommend(rungs).verdict == "retrieval"


def test_paired_diff_and_targets():
    a, b = _rung("prompt", 0.2), _rung("lora", 0.8)
    d = paired(a, b)
    assert d.better and not d.worse and d.ci95[0] > 0.4
    assert not paired(b, a).better and paired(b, a).worse
    assert Target.parse("schema_valid >= 0.9") == Target("schema_valid", ">=", 0.9)
    with pytest.raises(TunelabError, match="METRIC>=VALUE"):
        Target.parse("schema_valid > 0.9")
    with pytest.raises(TunelabError, match="did not measure"):
        Target.parse("bleu>=0.5").met(a)


def test_rungs_that_do_not_apply_say_why():
    plan = plan_rungs(has_schema=False, has_corpus=True, can_train=True)
    assert [r.name for r in plan.rungs] == ["prompt", "few-shot", "bm25", "hybrid", "lora", "rag+lora"]
    assert "JSON Schema" in plan.skipped["constrained"]
    assert [r.name for r in plan_rungs(True, False, False, ["prompt", "constrained", "lora"]).rungs] == [
        "prompt", "constrained"]
    no_train = plan_rungs(True, False, False, has_train=False)
    assert [r.name for r in no_train.rungs] == ["prompt", "constrained"] and "few-shot" in no_train.skipped
    with pytest.raises(TunelabError, match="unknown rung"):
        plan_rungs(True, True, True, ["zero"])


def _peft_adapter(folder, tiny_llama):
    """A real PEFT LoRA folder (adapter_config.json + weights) on the tiny model."""
    from peft import LoraConfig, get_peft_model

    get_peft_model(tiny_llama[0], LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(folder)
    return folder


def test_ladder_on_orders_json_with_a_fake_model(tmp_path, tokenizer, tiny_llama):
    """A fabricated model: garbage when prompted, valid-but-wrong JSON under the grammar, and with the adapter
    the ladder loads (a real PEFT folder) the reference on 3 orders of 4. The ladder must load that adapter,
    measure 0.75, and recommend finetuning, with the report and registry rows."""
    import json

    from tunelab.infer.testing import FakeEngine
    from tunelab.ladder import run_ladder
    from tunelab.runs import lineage
    from tunelab.tasks import load_task

    task = load_task("orders-json")
    exs = task.examples("test", limit=24)
    refs = {task.prompt(ex): i for i, ex in enumerate(exs)}

    adapter = _peft_adapter(tmp_path / "adapter", tiny_llama)

    class Engine(FakeEngine):  # remembers which folder each adapter name was loaded from
        loaded: dict[str, str] = {}

        def add_adapter(self, name, path):
            super().add_adapter(name, path)
            self.loaded = {**self.loaded, name: path}

    def respond(q):
        i = refs[q.prompt[-1]["content"]]
        if q.adapter:  # every fourth order comes back as the next one's: valid JSON, wrong content
            assert eng.loaded[q.adapter] == str(adapter)
            return task.reference(exs[i if i % 4 else (i + 1) % len(exs)])
        if q.params.grammar is not None:  # valid under the schema, but another order's content
            return task.reference(exs[(i + 1) % len(exs)])
        return "Sure! Here is the order: " + task.reference(exs[i])[:20]

    eng = Engine(respond, tokenizer=tokenizer)
    res = run_ladder("orders-json", out=tmp_path / "ladder", limit=24, adapter=adapter, engine=eng,
                     rungs=["prompt", "constrained", "lora"])
    by = {r.name: r for r in res.results}
    assert [r.name for r in res.results] == ["prompt", "constrained", "lora"]
    assert by["prompt"].failures["format"] == 24 and by["constrained"].failures["format"] == 0
    assert eng.loaded == {"ladder-lora": str(adapter)}
    assert by["lora"].metrics["json_exact"]["score"] == 0.75 and by["lora"].failures["content"] == 6
    assert by["lora"].failures.get("format", 0) == 0 and 0.75 <= by["lora"].score < 1.0  # partial credit
    assert res.recommendation.verdict == "finetune"
    data = json.loads((tmp_path / "ladder" / "ladder.json").read_text())
    assert data["recommendation"]["verdict"] == "finetune" and len(data["rungs"]) == 3
    page = (tmp_path / "ladder" / "ladder.html").read_text()
    assert "data:image/png;base64," in page and "http" not in page.replace("http-equiv", "")
    tree = lineage(str((tmp_path / "ladder").resolve()))
    assert {c["role"] for c in tree["parents"]} >= {"prompt", "constrained", "lora"}


def test_ladder_refuses_an_adapter_that_is_not_one_before_running_a_rung(tmp_path, tiny_llama):
    (tmp_path / "empty").mkdir()
    for bad in (tmp_path / "missing", tmp_path / "empty"):
        with pytest.raises(TunelabError, match="not a PEFT adapter folder .no adapter_config.json"):
            run_ladder("orders-json", out=tmp_path / "ladder", limit=2, adapter=bad, engine=object())
    assert not (tmp_path / "ladder").exists()


def test_advise_reads_failure_classes_from_an_eval_folder(tmp_path):
    from tunelab.ladder.decision_guide import advise_eval
    from tunelab.runs.layout import write_eval_folder

    write_eval_folder(tmp_path / "base", {"model": "base", "n": 50, "failures": {"knowledge": 30, "format": 2}}, [])
    adv = advise_eval(tmp_path)
    assert adv.verdict == "retrieval" and "knowledge failures dominate (30 of 32 wrong" in adv.headline
    write_eval_folder(tmp_path / "base", {"model": "base", "n": 50, "failures": {"format": 20, "content": 10}}, [])
    adv = advise_eval(tmp_path / "base")
    assert adv.verdict == "constrained+finetune" and any("few-shot" in s for s in adv.next_steps)


def test_questionnaire_says_when_not_to_finetune():
    from tunelab.ladder.decision_guide import advise_answers

    yes = dict(metrics=True, prompted=True, facts=False, general=False, maintain=True, form=True)
    assert advise_answers(yes).verdict == "finetune"
    assert advise_answers({**yes, "facts": True}).verdict == "retrieval"
    no_eval = advise_answers({**yes, "metrics": False})
    assert no_eval.verdict == "prompting" and any("metric" in r for r in no_eval.reasons)
    with pytest.raises(TunelabError, match="missing answers: form"):
        advise_answers({k: v for k, v in yes.items() if k != "form"})


def test_ladder_on_handbook_qa_recommends_retrieval(tmp_path, tiny_llama):
    """A fabricated model that answers only from a passage in its prompt or, with the adapter, from facts it
    was trained on: real BM25 and hybrid indexes retrieve the passages; the ladder must say retrieval, and
    show that LoRA scores nothing on the facts train never had."""
    from tunelab.infer.testing import FakeEngine
    from tunelab.ladder import run_ladder
    from tunelab.tasks import load_task

    task = load_task("handbook-qa")
    exs = task.examples("test", limit=40)
    by_q = {task.prompt(ex): ex for ex in exs}
    docs = {d["id"]: d["text"] for d in task.corpus()}

    def respond(q):
        ex = next(e for p, e in by_q.items() if q.prompt[-1]["content"].endswith(p))
        if docs[ex["doc_id"]][:60] in q.prompt[-1]["content"]:
            return ex["answer"]
        return ex["answer"] if q.adapter and ex["fact_in_train"] else "I do not know."

    res = run_ladder("handbook-qa", out=tmp_path / "ladder", limit=40, adapter=_peft_adapter(tmp_path / "a", tiny_llama),
                     engine=FakeEngine(respond), rungs=["prompt", "bm25", "hybrid", "lora", "rag+lora"])
    by = {r.name: r for r in res.results}
    assert by["prompt"].score == 0.0 and by["hybrid"].score >= 0.9
    assert by["lora"].groups["fact_in_train"]["false"]["score"] == 0.0
    assert res.recommendation.verdict == "retrieval" and not res.recommendation.finetune_justified
    assert any("cannot teach a fact" in r for r in res.recommendation.reasons)


@pytest.mark.slow
def test_real_ladder_on_the_bundled_model(tmp_path):
    """The bundled model on 8 orders-json test examples: prompting fails on form, the grammar fixes the form
    (no format failures, every answer schema-valid), and the report says so from the measurements."""
    from tunelab.ladder import run_ladder

    res = run_ladder("orders-json", out=tmp_path / "ladder", rungs=["prompt", "constrained"], limit=8)
    by = {r.name: r for r in res.results}
    assert by["constrained"].failures.get("format", 0) == 0
    assert by["constrained"].metrics["schema_valid"]["score"] == 1.0
    assert by["prompt"].failures.get("format", 0) > 0
    assert (tmp_path / "ladder" / "ladder.html").is_file() and res.recommendation.headline


def test_the_rag_lora_rung_trains_on_retrieved_passages(tmp_path, tiny_model_dir):
    """With a RAG + LoRA rung in the plan, the ladder's adapter trains on RAFT rows (the passages the rung's
    index retrieves, in its prompt template), and the recipe it records says so."""
    import yaml

    from tunelab.infer.testing import FakeEngine

    eng = FakeEngine(lambda q: "I do not know.")
    res = run_ladder("handbook-qa", model=str(tiny_model_dir), out=tmp_path / "ladder", limit=4, engine=eng,
                     rungs=["prompt", "lora", "rag+lora"], train_steps=2)
    assert [r.name for r in res.results] == ["prompt", "lora", "rag+lora"]
    recipe = yaml.safe_load((tmp_path / "ladder" / "adapter" / "recipe.yaml").read_text())
    data = recipe["data"]
    assert data["task"] is None and data["train"].endswith("raft-data/train.jsonl")
    first = json.loads(open(data["train"]).readline())
    assert first["messages"][1]["content"].startswith("Context:\n[1] ")
    raft = json.loads((tmp_path / "ladder" / "raft-data" / "raft.json").read_text())
    assert raft["train"]["gold_retrieved_at_k"] > 0.9 and 0.7 < raft["train"]["gold_in_context"] < 0.9
