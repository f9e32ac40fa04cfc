"""tunelab.evaluate.harness on tiny models: output files, mixed-adapter batches, constrained decoding, checks."""

import json
import shutil

import jsonschema
import pytest
import torch
from conftest import single_thread

from tunelab.errors import TunelabError
from tunelab.evaluate import harness
from tunelab.evaluate.harness import (
    EvalJob,
    Variant,
    evaluate_task,
    generate_all,
    primary_metric,
    run_together,
    run_variants,
    score_variant,
)
from tunelab.infer import Request, load_engine
from tunelab.infer.grammar import compile_grammar
from tunelab.models import identity, tiny_model
from tunelab.tasks import load_task

TASK_METRICS = ["json_valid", "schema_valid", "json_exact", "field_f1"]


one_thread = pytest.fixture(autouse=True, scope="module")(single_thread)


def _save(model, tok, folder):
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def untied_dir(tmp_path_factory, tokenizer):
    """A tiny random Llama with its own output head: greedy outputs are varied text, not one repeated token."""
    model, tok = tiny_model("llama", tokenizer=tokenizer, tie_word_embeddings=False)
    return _save(model, tok, tmp_path_factory.mktemp("untied"))


def _lora_adapter(base_dir, folder, seed=1, hidden=None):
    """A LoRA on q/v of the tiny model at `base_dir` (or of a fresh tiny model with `hidden`), lora_B random."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    if hidden is None:
        model = AutoModelForCausalLM.from_pretrained(base_dir)
    else:
        from tunelab.models import load_tokenizer

        model, _ = tiny_model("llama", tokenizer=load_tokenizer(str(base_dir)), hidden_size=hidden,
                              tie_word_embeddings=False)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                  task_type="CAUSAL_LM"))
    torch.manual_seed(seed)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)  # PEFT starts B at zero (a no-op adapter); make it change outputs
    peft_model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def adapter_dir(untied_dir, tmp_path_factory):
    return _lora_adapter(untied_dir, tmp_path_factory.mktemp("adapters") / "lora-a")


@pytest.fixture(scope="module")
def orders_short(tmp_path_factory):
    """The orders-json task folder with max_new_tokens 48 instead of 200 (random models never stop early)."""
    folder = shutil.copytree(load_task("orders-json").dir, tmp_path_factory.mktemp("task") / "orders-json")
    spec = (folder / "task.yaml").read_text()
    assert "max_new_tokens: 200" in spec
    (folder / "task.yaml").write_text(spec.replace("max_new_tokens: 200", "max_new_tokens: 48"))
    return folder


@pytest.fixture(scope="module")
def eval_out(untied_dir, adapter_dir, orders_short, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    result = evaluate_task(str(orders_short), model=str(untied_dir), adapters=[adapter_dir], limit=4, out=out,
                           dtype="fp32")
    return out, result


def _rows(folder):
    return [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]


def test_eval_writes_a_folder_per_model(eval_out):
    out, result = eval_out
    task = load_task("orders-json")
    examples = task.examples("test", limit=4)
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["base", "lora-a"]
    assert list(result.metrics) == ["base", "lora-a"]
    for label in ("base", "lora-a"):
        meta = json.loads((out / label / "metrics.json").read_text())
        assert (meta["task"], meta["split"], meta["n"], meta["model"]) == ("orders-json", "test", 4, label)
        assert meta["primary_metric"] == "field_f1" and meta["constrained"] is False
        assert list(meta["metrics"]) == TASK_METRICS
        rows = _rows(out / label)
        assert len(rows) == 4
        for name, m in meta["metrics"].items():
            lo, hi = m["ci95"]
            assert m["n"] == 4 and 0.0 <= lo <= m["score"] <= hi <= 1.0
            assert m["score"] == pytest.approx(sum(r["scores"][name] for r in rows) / 4)
        assert set(meta["failures"]) == {"format", "content", "knowledge", "refusal"}
        assert sum(meta["failures"].values()) == sum(r["failure"] is not None for r in rows)
        for row, ex in zip(rows, examples):
            assert set(row) - {"explanations"} == {"id", "input", "reference", "output", "scores", "failure",
                                                   "finish_reason", "new_tokens", "input_tokens"}
            assert row["input_tokens"] > 20 and ("explanations" in row) == (row["scores"]["json_exact"] < 1)
            assert row["finish_reason"] in ("stop", "length")
            assert (row["id"], row["input"]) == (ex["id"], ex["message"])
            assert json.loads(row["reference"]) == ex["output"]
            assert set(row["scores"]) == set(TASK_METRICS)
    assert json.loads((out / "lora-a" / "metrics.json").read_text())["adapter"].endswith("lora-a")
    md, html = (out / "report.md").read_text(), (out / "report.html").read_text()
    for label in ("base", "lora-a"):
        assert label in md and label in html
    base, tuned = _rows(out / "base"), _rows(out / "lora-a")
    assert all(b["output"] != t["output"] for b, t in zip(base, tuned))  # the adapter is really applied


def test_mixed_adapter_batches_match_each_model_alone(untied_dir, adapter_dir):
    task = load_task("orders-json")
    examples = task.examples("test", limit=4)
    both = load_engine(str(untied_dir), [adapter_dir], dtype="fp32")
    variants = [Variant("base"), Variant("lora-a", "adapter-1", str(adapter_dir))]
    together = generate_all(both, task, examples, variants, [], batch_size=8, max_new_tokens=32,
                            show_progress=False)  # one batch: 4 base rows + 4 adapter rows
    base_alone = generate_all(load_engine(str(untied_dir), dtype="fp32"), task, examples, [Variant("base")], [],
                              batch_size=4, max_new_tokens=32, show_progress=False)
    # the generate-based engine (PEFT), the adapter's rows alone
    plain = load_engine(str(untied_dir), [adapter_dir], dtype="fp32", kind="generate", batch_size=4)
    adapter_alone = generate_all(plain, task, examples, [Variant("lora-a", "adapter-1")], [], batch_size=4,
                                 max_new_tokens=32, show_progress=False)
    assert together["base"] == base_alone["base"]
    assert together["lora-a"] == adapter_alone["lora-a"]
    assert all(a != b for a, b in zip(together["base"], together["lora-a"]))
    assert all(len(o) > 10 for o in together["base"] + together["lora-a"])


# ---- constrained decoding ---------------------------------------------------------------------------

def _matcher(tokenizer, schema):
    import xgrammar as xgr

    return xgr.GrammarMatcher(compile_grammar(tokenizer, schema=schema))


def test_grammar_accepts_every_reference_in_key_order(tokenizer):
    """The grammar must allow the exact reference text: compact separators, keys in the schema's order."""
    task = load_task("orders-json")
    for ex in task.examples("test", limit=20):
        m = _matcher(tokenizer, task.schema())
        assert m.accept_string(task.reference(ex)), task.reference(ex)
        assert m.is_completed()


def test_constrained_random_model_stays_on_grammar(untied_dir, eval_out):
    """A random model never closes the JSON within the budget, but every token it emits stays on the grammar."""
    task = load_task("orders-json")
    engine = load_engine(str(untied_dir), dtype="fp32")
    examples = task.examples("test", limit=4)
    outs = generate_all(engine, task, examples, [Variant("g", constrained=True)], [], max_new_tokens=40,
                        show_progress=False)["g"]
    for o in outs:
        m = _matcher(engine.tokenizer, task.schema())
        assert o.startswith('{"customer":"') and m.accept_string(o), o
    for row in _rows(eval_out[0] / "base"):  # the unconstrained outputs of the same model fall off it at once
        assert not _matcher(engine.tokenizer, task.schema()).accept_string(row["output"])


@pytest.fixture(scope="module")
def closing_dir(tmp_path_factory, tokenizer):
    """A tiny bigram model that takes the shortest way out of a JSON grammar: its logits depend only on the
    previous token. After `null` it prefers EOS > `"` > `}` > `]` > `,` > `1`; after anything else
    EOS > `null` > `"` > ... ; tokens that contain a quote among other text rank last, the rest in random
    order. Unconstrained it stops at once; under the orders-json grammar it finishes in about 100 tokens."""
    model, tok = tiny_model("llama", tokenizer=tokenizer, tie_word_embeddings=False)
    inner, vocab = model.model, len(tok)
    ids = {t: tok.convert_tokens_to_ids(t) for t in ["1", ",", "]", "}", '"', "null"]}
    rank = torch.rand(vocab, generator=torch.Generator().manual_seed(0))  # (V,) in [0, 1)
    rank[torch.tensor(['"' in t and t != '"' for t in tok.convert_ids_to_tokens(list(range(vocab)))])] = -1
    other, after_null = rank.clone(), rank.clone()
    for i, t in enumerate(["1", ",", "]", "}", '"', "null"]):
        other[ids[t]] = 2 + i
        after_null[ids[t]] = 2 + i if t != "null" else -1
    other[tok.eos_token_id] = after_null[tok.eos_token_id] = 10
    e_null, e_other = torch.eye(inner.config.hidden_size)[:2]  # (H,) each: the two states of the last token
    with torch.no_grad():
        inner.embed_tokens.weight.copy_(e_other.expand(vocab, -1))
        inner.embed_tokens.weight[ids["null"]] = e_null
        for layer in inner.layers:  # layers add nothing: the last hidden state is the last token's embedding
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.lm_head.weight.copy_(other[:, None] * e_other + after_null[:, None] * e_null)  # (V, H)
    return _save(model, tok, tmp_path_factory.mktemp("closing"))


def test_constrained_eval_closes_the_json(closing_dir, tmp_path):
    task = load_task("orders-json")
    res = evaluate_task("orders-json", model=str(closing_dir), limit=4, constrained=True, out=tmp_path,
                        dtype="fp32")
    assert list(res.metrics) == ["base+grammar"]
    rows = _rows(tmp_path / "base+grammar")
    assert len(rows) == 4
    for row in rows:
        jsonschema.validate(json.loads(row["output"]), task.schema())
    meta = res.metrics["base+grammar"]
    assert meta["constrained"] is True and meta["failures"]["format"] == 0
    assert meta["metrics"]["json_valid"]["score"] == 1.0 and meta["metrics"]["schema_valid"]["score"] == 1.0
    plain = generate_all(load_engine(str(closing_dir), dtype="fp32"), task, task.examples("test", limit=2),
                         [Variant("base")], [], show_progress=False)["base"]
    assert plain == ["", ""]  # without the grammar this model stops at once: the JSON is the grammar's doing


# ---- the general task, adapters that do not fit, bad splits -------------------------------------------

def test_general_task_is_scored_by_per_example_checks(untied_dir, tmp_path):
    task = load_task("general")
    assert primary_metric(task) == "check"
    examples = task.examples("test", limit=30)
    rows, summary, _ = score_variant(task, examples, [ex["answer"] for ex in examples])
    assert list(summary) == ["check"] and summary["check"]["score"] == 1.0 and summary["check"]["n"] == 30
    assert {r["scores"]["check_metric"] for r in rows} >= {"regex"}
    assert all(r["failure"] is None for r in rows)
    _, wrong, _ = score_variant(task, examples, ["I am not sure."] * len(examples))
    assert wrong["check"]["score"] == 0.0
    engine = load_engine(str(untied_dir), dtype="fp32")
    res = run_variants(engine, task, [Variant("base")], tmp_path, limit=3, max_new_tokens=4, write_html=False)
    meta = json.loads((tmp_path / "base" / "metrics.json").read_text())
    assert meta["primary_metric"] == "check" and list(meta["metrics"]) == ["check"] and meta["n"] == 3
    assert res.metrics["base"] == meta


@pytest.fixture()
def no_generation(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("generation started")

    monkeypatch.setattr(harness, "generate_all", fail)


def test_adapter_for_another_base_fails_before_generation(untied_dir, adapter_dir, tmp_path, no_generation):
    other = shutil.copytree(adapter_dir, tmp_path / "trained-elsewhere")
    (other / "run.json").write_text(json.dumps({"base_model": identity("smollm2-135m-instruct")}))
    with pytest.raises(TunelabError, match="trained on 'smollm2-135m-instruct'.*--model smollm2-135m-instruct"):
        evaluate_task("orders-json", model=str(untied_dir), adapters=[other], limit=2, out=tmp_path / "e")


def test_adapter_with_other_hidden_size_fails_before_generation(untied_dir, tmp_path, no_generation):
    small = _lora_adapter(untied_dir, tmp_path / "small", hidden=32)
    with pytest.raises(TunelabError, match="does not fit base model"):
        evaluate_task("orders-json", model=str(untied_dir), adapters=[small], limit=2, out=tmp_path / "e")


def test_run_json_naming_the_same_base_another_way_is_accepted(untied_dir, adapter_dir, tmp_path):
    same = shutil.copytree(adapter_dir, tmp_path / "same-base")
    (same / "run.json").write_text(json.dumps({"base_model": identity(str(untied_dir / "config.json"))}))
    assert load_engine(str(untied_dir), [same], dtype="fp32").adapters == ["adapter-1"]


def test_not_an_adapter_folder(untied_dir, tmp_path):
    with pytest.raises(TunelabError, match="not a PEFT adapter folder"):
        load_engine(str(untied_dir), [tmp_path], dtype="fp32")


def test_bad_split_fails_before_any_model_loads(monkeypatch, tmp_path):
    def fail(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(harness, "load_engine", fail)
    with pytest.raises(TunelabError, match="no split 'tset'.*train, validation, test"):
        evaluate_task("orders-json", model="no/such-model", split="tset", out=tmp_path)
    assert not any(tmp_path.iterdir())


# ---- prompt-learning adapters next to LoRA ones -------------------------------------------------------

def _prompt_adapter(base_dir, folder, seed=2):
    """A prompt-tuning adapter (8 virtual tokens, random embeddings) for the tiny model at `base_dir`."""
    from peft import PromptTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                           PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=8))
    model.save_pretrained(folder)
    return folder


def _plain_generate(base_dir, adapter, convs, max_new_tokens):
    """Each conversation alone through PEFT's own `generate` on a fresh copy of the base plus one adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), str(adapter)).eval()
    texts = []
    for conv in convs:
        enc = tok(tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True), return_tensors="pt",
                  add_special_tokens=False)
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
        ids = out[0, enc["input_ids"].shape[1]:].tolist()
        cut = [k for k, t in enumerate(ids) if t in (tok.eos_token_id, tok.pad_token_id)]
        texts.append(tok.decode(ids[:cut[0] + 1] if cut else ids, skip_special_tokens=True).strip())
    return texts


def test_prompt_tuning_and_lora_adapters_in_one_eval(untied_dir, adapter_dir, orders_short, tmp_path):
    """Prompt-learning adapters cannot take PEFT's adapter_names: their rows run on their own, each as PEFT
    alone gives it, while the LoRA and base rows still share batches."""
    prompt_dir = _prompt_adapter(untied_dir, tmp_path / "prompt-a")
    result = evaluate_task(str(orders_short), model=str(untied_dir), adapters=[adapter_dir, prompt_dir], limit=3,
                           out=tmp_path / "ev", dtype="fp32", batch_size=8)
    assert list(result.metrics) == ["base", "lora-a", "prompt-a"]
    task = load_task(str(orders_short))
    convs = [task.messages(ex) for ex in task.examples("test", limit=3)]
    outputs = {label: [r["output"] for r in rows] for label, rows in result.predictions.items()}
    assert outputs["prompt-a"] == _plain_generate(untied_dir, prompt_dir, convs, 48)
    # base and LoRA rows are batched as they are without the prompt adapter, and give the same outputs
    lora_only = load_engine(str(untied_dir), [adapter_dir], dtype="fp32", kind="generate", batch_size=8)
    alone = generate_all(lora_only, task, task.examples("test", limit=3),
                         [Variant("base"), Variant("lora-a", "adapter-1")], [], show_progress=False)
    assert (outputs["base"], outputs["lora-a"]) == (alone["base"], alone["lora-a"])
    assert outputs["prompt-a"] != outputs["base"] and outputs["lora-a"] != outputs["base"]


# ---- explanations per example, metrics by input length ------------------------------------------------

def test_failing_samples_keep_each_metrics_explanation(tmp_path):
    """predictions.jsonl says why each output failed (parse error, schema path, missing field) and the HTML
    report shows it next to the sample."""
    from tunelab.infer.testing import FakeEngine

    task = load_task("orders-json")
    examples = task.examples("test", limit=3)
    broken = {task.prompt(examples[0]): '{"customer": ',  # not JSON
              task.prompt(examples[1]): json.dumps({k: v for k, v in examples[1]["output"].items()
                                                    if k != "customer"})}  # a required field is missing
    engine = FakeEngine(lambda q: broken.get(q.prompt[-1]["content"], json.dumps(examples[2]["output"])))
    run_variants(engine, task, [Variant("base")], tmp_path, limit=3)
    rows = _rows(tmp_path / "base")
    assert rows[0]["explanations"]["json_valid"].startswith("not JSON")
    assert rows[1]["explanations"]["schema_valid"] == "(root): 'customer' is a required property"
    assert rows[1]["explanations"]["json_exact"] == "missing customer"
    assert "explanations" not in rows[2] and rows[2]["failure"] is None
    html = (tmp_path / "report.html").read_text()
    assert "json_exact: missing customer" in html and "not JSON" in html


def test_metrics_by_input_length(tmp_path):
    """Bucketed by prompt tokens: a model right on short prompts and wrong on long ones shows it per bucket."""
    from tunelab.infer.testing import FakeEngine

    task = load_task("orders-json")
    examples = task.examples("test", limit=12)
    engine = FakeEngine()
    lengths = [c.prompt_tokens for c in engine.generate([Request(task.messages(ex)) for ex in examples])]
    edge = sorted(lengths)[6]
    n_short = sum(n < edge for n in lengths)
    assert 0 < n_short < 12
    refs = {task.prompt(ex): json.dumps(ex["output"]) for ex in examples}
    lens = dict(zip(refs, lengths))
    engine.respond = lambda q: refs[q.prompt[-1]["content"]] if lens[q.prompt[-1]["content"]] < edge else "{}"
    res = run_variants(engine, task, [Variant("base")], tmp_path, limit=12, length_edges=[edge])
    buckets = res.metrics["base"]["by_length"]
    assert buckets["edges"] == [edge]
    short, long = buckets["metrics"]["json_exact"]
    assert (short["bucket"], long["bucket"]) == (f"0-{edge - 1}", f"{edge}+")
    assert (short["n"], long["n"]) == (n_short, 12 - n_short) and (short["score"], long["score"]) == (1.0, 0.0)
    assert [r["input_tokens"] for r in res.predictions["base"]] == lengths
    assert json.loads((tmp_path / "base" / "metrics.json").read_text())["by_length"] == buckets
    html = (tmp_path / "report.html").read_text()
    assert "By input length" in html and f"{edge}+" in html


def test_run_together_is_run_variants_on_each_job_in_one_generation(untied_dir, adapter_dir, orders_short,
                                                                    tmp_path):
    engine = load_engine(str(untied_dir), [adapter_dir], dtype="fp32")
    orders, general = load_task(str(orders_short)), load_task("general")
    variants = [Variant("base"), Variant("lora", "adapter-1", str(adapter_dir))]
    alone = [run_variants(engine, orders, variants, tmp_path / "a1", limit=3, write_html=False),
             run_variants(engine, general, variants[:1], tmp_path / "a2", limit=4, max_new_tokens=6)]
    calls = []
    generate = engine.generate
    engine.generate = lambda reqs, **kw: calls.append(len(reqs)) or generate(reqs, **kw)
    together = run_together(engine, [EvalJob(orders, variants, tmp_path / "t1", limit=3, write_html=False),
                                     EvalJob(general, variants[:1], tmp_path / "t2", limit=4, max_new_tokens=6)])
    assert calls == [2 * 3 + 4]  # one generation for both jobs
    for a, t, labels in zip(alone, together, (["base", "lora"], ["base"])):
        assert list(t.metrics) == labels
        for label in labels:
            assert [r["output"] for r in t.predictions[label]] == [r["output"] for r in a.predictions[label]]
            assert t.metrics[label]["metrics"] == a.metrics[label]["metrics"]
            assert (t.out_dir / label / "metrics.json").is_file()
    assert together[1].report is not None and together[0].report is None  # each job's write_html
