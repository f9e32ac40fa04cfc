"""The `tunelab` command line: commands, JSON outputs, one-paragraph errors (tracebacks only with --debug)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import single_thread

from tunelab.errors import TunelabError

COMMANDS = ["tasks", "models", "data", "generate", "train", "eval", "score", "runs", "serve", "ui", "monitor", "rollout",
            "feedback", "review", "loop", "upgrade", "prompts"]
TASKS = ["general", "handbook-qa", "orders-json", "safety", "shop-sql"]


one_thread = pytest.fixture(autouse=True, scope="module")(single_thread)


def _subprocess(*args, cwd=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "tunelab.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=120)


def test_help_lists_the_commands():
    exe = Path(sys.executable).parent / "tunelab"  # the installed console script
    res = subprocess.run([str(exe) if exe.exists() else "tunelab", "--help"], capture_output=True, text=True,
                         env={**os.environ, "COLUMNS": "200"}, timeout=60)
    assert res.returncode == 0, res.stderr
    for cmd in COMMANDS:
        assert f" {cmd} " in res.stdout, cmd
    assert "--debug" in res.stdout


def test_tasks_json(tunelab):
    code, out, _ = tunelab("tasks", "--json")
    rows = json.loads(out)
    assert code == 0 and [r["name"] for r in rows] == TASKS
    for r in rows:
        assert Path(r["path"], "task.yaml").is_file() and r["primary_metric"] in r["metrics"]
        assert "test" in r["splits"]
        for split in r["splits"].values():
            lines = [line for line in Path(split["path"]).read_text().splitlines() if line.strip()]
            assert split["size"] == len(lines) > 0
    code, out, _ = tunelab("tasks")
    assert code == 0 and all(t in out for t in TASKS)


def test_models(tunelab, tokenizer):  # the tokenizer fixture converts the bundled model
    code, out, _ = tunelab("models", "--json")
    rows = json.loads(out)
    assert code == 0 and rows[0]["name"] == "smollm2-135m-instruct" and Path(rows[0]["path"]).is_file()
    assert rows[0]["dtype"] == "Q4_1"
    cached = [r for r in rows if r["kind"] == "cached HF folder"]  # the conversion made by the tokenizer fixture
    assert cached and all((Path(r["path"]) / "config.json").is_file() for r in cached)
    code, out, _ = tunelab("models")
    assert code == 0 and "smollm2-135m-instruct" in out


def test_data_check_names_the_broken_line(tunelab, chat_file, tiny_model_dir, tmp_path, monkeypatch):
    lines = chat_file.read_text().splitlines()
    bad = tmp_path / ("long-folder-name-" * 3) / ("deeper-" * 6) / "bad.jsonl"  # longer than the terminal
    bad.parent.mkdir(parents=True)
    bad.write_text("\n".join(lines[:6] + ['{"messages": [{"role": "user", "content": "hi"}'] + lines[6:10]) + "\n")
    monkeypatch.setenv("COLUMNS", "80")
    code, out, err = tunelab("data", "check", bad, "--model", tiny_model_dir)
    assert code == 2 and f"{bad}:7:" in err and "malformed JSON" in err  # file:line never wrapped in two
    assert "Traceback" not in err + out


def test_data_check_good_file(tunelab, chat_file, tiny_model_dir):
    code, out, err = tunelab("data", "check", chat_file, "--model", tiny_model_dir)
    assert code == 0, err
    for word in ("format", "rows", "64", "p50", "p90", "p99", "exact duplicates"):
        assert word in out, word
    code, out, _ = tunelab("data", "check", chat_file, "--model", tiny_model_dir, "--json")
    report = json.loads(out)
    assert (report["rows"], report["format"], report["duplicates"]) == (64, "chat", 8)  # rows repeat after 56
    assert report["lengths"]["p50"] <= report["lengths"]["p90"] <= report["lengths"]["p99"] <= report["lengths"]["max"]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture()
def score_files(tmp_path):
    refs = _write_jsonl(tmp_path / "refs.jsonl", [{"id": i, "reference": r} for i, r in enumerate("abcd")])
    preds = _write_jsonl(tmp_path / "preds.jsonl", [{"id": i, "output": o} for i, o in reversed(list(enumerate("abcx")))])
    other = _write_jsonl(tmp_path / "other.jsonl", [{"id": i + 10, "output": "a"} for i in range(4)])
    return preds, refs, other


def test_score_json(tunelab, score_files):
    preds, refs, _ = score_files
    code, out, err = tunelab("score", "exact_match", "--predictions", preds, "--references", refs, "--json")
    assert code == 0, err
    res = json.loads(out)
    assert set(res) == {"metric", "score", "n", "ci95"}
    assert (res["metric"], res["score"], res["n"]) == ("exact_match", 0.75, 4)  # paired by id, not line
    assert res["ci95"][0] <= 0.75 <= res["ci95"][1]
    code, out, _ = tunelab("score", "exact_match", "--predictions", preds, "--references", refs)
    assert code == 0 and "exact_match: 0.7500" in out and "n=4" in out


def test_mismatched_ids_is_a_clean_error(tunelab, score_files):
    _, refs, other = score_files
    code, out, err = tunelab("score", "exact_match", "--predictions", other, "--references", refs)
    assert code == 2
    assert "error:" in err and "ids do not match" in err and "4 reference ids have no prediction" in err
    assert "Traceback" not in err + out


def test_debug_shows_the_traceback(score_files):
    _, refs, other = score_files
    res = _subprocess("--debug", "score", "exact_match", "--predictions", other, "--references", refs)
    assert res.returncode != 0
    assert "Traceback (most recent call last)" in res.stderr and "TunelabError" in res.stderr
    assert "ids do not match" in res.stderr
    res = _subprocess("score", "exact_match", "--predictions", other, "--references", refs)
    assert res.returncode == 2 and "Traceback" not in res.stderr and "ids do not match" in res.stderr


def test_debug_in_process_reraises(tunelab, score_files):
    _, refs, other = score_files
    with pytest.raises(TunelabError, match="ids do not match"):
        tunelab("--debug", "score", "exact_match", "--predictions", other, "--references", refs)


def test_generate_streams(tunelab, untied_dir, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunelab.infer.api import StepEngine  # the batched engine's, or llama.cpp's where it is installed

    pieces, real_stream = [], StepEngine.stream

    def recording_stream(*a, **k):
        for piece in real_stream(*a, **k):
            pieces.append(piece)
            yield piece

    monkeypatch.setattr(StepEngine, "stream", recording_stream)
    code, out, err = tunelab("generate", "--model", untied_dir, "hi", "--max-new-tokens", 5, "--dtype", "fp32")
    assert code == 0, err
    tok = AutoTokenizer.from_pretrained(untied_dir)
    model = AutoModelForCausalLM.from_pretrained(untied_dir, dtype=torch.float32)
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                     return_tensors="pt", return_dict=True)
    ids = model.generate(**prompt, max_new_tokens=5, do_sample=False)[0, prompt["input_ids"].shape[1]:]
    assert len(ids) == 5
    expected = tok.decode(ids, skip_special_tokens=True)
    assert expected.strip() and out == expected + "\n"
    assert len(pieces) > 1 and "".join(pieces) == expected  # streamed, not printed at the end


def test_generate_with_json_schema(tunelab, untied_dir, tmp_path):
    import xgrammar as xgr

    from tunelab.infer.grammar import compile_grammar
    from tunelab.models import load_tokenizer

    schema = {"type": "object", "properties": {"name": {"type": "string"}, "qty": {"type": "integer"}},
              "required": ["name", "qty"], "additionalProperties": False}
    (tmp_path / "s.json").write_text(json.dumps(schema))
    code, out, err = tunelab("generate", "--model", untied_dir, "Ada wants 3 apples.", "--max-new-tokens", 8,
                             "--json-schema", tmp_path / "s.json")
    assert code == 0, err
    matcher = xgr.GrammarMatcher(compile_grammar(load_tokenizer(str(untied_dir)), schema=schema))
    assert out.startswith('{"name":"') and matcher.accept_string(out.rstrip("\n"))  # a random model, on the grammar
    code, _, err = tunelab("generate", "--model", untied_dir, "hi", "--json-schema", tmp_path / "missing.json")
    assert code == 2 and "cannot read JSON Schema" in err and "missing.json" in err


def test_train_unknown_key_names_the_nearest(tunelab):
    code, out, err = tunelab("train", "train.lrr=1e-4")
    assert code == 2 and "unknown key 'train.lrr'" in err and "did you mean 'lr'" in err
    assert "Traceback" not in err + out
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "orders-json-lora.yaml"
    code, _, err = tunelab("train", recipe, "lora.rr=8")
    assert code == 2 and "orders-json-lora.yaml" in err and "did you mean 'r'" in err


def test_eval_needs_a_task(tunelab):
    code, _, err = tunelab("eval")
    assert code == 2 and "needs --task" in err


def test_eval_writes_reports(tunelab, tiny_model_dir, tmp_path):
    out_dir = tmp_path / "ev"
    code, out, err = tunelab("eval", "--task", "orders-json", "--model", tiny_model_dir, "--limit", 3,
                             "--out", out_dir)
    assert code == 0, err
    for f in ("base/predictions.jsonl", "base/metrics.json", "report.md", "report.html"):
        assert (out_dir / f).is_file(), f
    assert len((out_dir / "base" / "predictions.jsonl").read_text().splitlines()) == 3
    meta = json.loads((out_dir / "base" / "metrics.json").read_text())
    assert meta["n"] == 3 and meta["base_model"] == str(tiny_model_dir)
    assert "field_f1" in out and "n=3" in out and "report.html" in out


def test_memory_measure_runs_the_trainers_code_path_on_its_device(tunelab, tiny_model_dir, chat_file, tmp_path):
    """`tunelab memory --measure` measures where `tunelab train` would run and what it would run there: on a
    CPU the fast paths (fused layers and head, padding-free packed rows) unless train.fast_paths=off."""
    from tunelab.config.recipe import load_recipe, save_recipe

    got = {}
    for fast in ("auto", "off"):
        path = tmp_path / f"{fast}.yaml"
        save_recipe(load_recipe(None, [f"model.spec={tiny_model_dir}", "data.task=null", f"data.train={chat_file}",
                                       "train.batch_size=2", "train.max_length=64", "train.precision=fp32",
                                       f"train.fast_paths={fast}"]), path)
        code, out, err = tunelab("memory", "--measure", path, "--json")
        assert code == 0, err
        got[fast] = json.loads(out)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    assert got["auto"]["measured_on"] == {"device": device, "fast_paths": device == "cpu", "flat": device == "cpu"}
    assert got["off"]["measured_on"] == {"device": device, "fast_paths": False, "flat": False}
    for fast in got.values():
        assert fast["weights"]["measured"] > 0 and fast["total"]["measured"] >= fast["weights"]["measured"]
    assert got["auto"]["total"]["estimate"] == got["off"]["total"]["estimate"]  # the estimate models PEFT's ops
    if device == "cpu":  # the fused paths keep less for backward, and never build the (B, T, V) logits
        assert got["auto"]["activations"]["measured"] < got["off"]["activations"]["measured"]
        assert got["auto"]["logits"]["measured"] < got["off"]["logits"]["measured"]
    code, out, _ = tunelab("memory", "--measure", tmp_path / "auto.yaml")
    assert code == 0 and f"({device}, " in out


def test_third_party_noise_stays_out_unless_debug(tmp_path, tiny_model_dir, tokenizer):
    """Merging an adapter imports peft, whose bitsandbytes import logs "Skipping publisher trust check ..." and
    "Failed to load CPU gemm_4bit_forward ..." (issue 27.7): the CLI shows only tunelab's output."""
    from peft import LoraConfig, get_peft_model

    from tunelab.models import tiny_model

    pm = get_peft_model(tiny_model("llama", tokenizer=tokenizer)[0],
                        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    pm.save_pretrained(tmp_path / "adapter")
    res = _subprocess("export", tmp_path / "adapter", "--model", tiny_model_dir, "--out", tmp_path / "hf",
                      "--format", "hf", cwd=tmp_path)
    assert res.returncode == 0 and "wrote hf export" in res.stdout, res.stderr
    for noise in ("publisher trust", "gemm_4bit", "it/s]", "Loading weights"):
        assert noise not in res.stderr, res.stderr


def test_printed_commands_are_never_wrapped(tunelab, tmp_path, monkeypatch):
    """`tunelab export` prints the command that serves the export; in a log or a pipe (80 columns) the
    command stays on one line of its own, so it can be pasted (issue 27.8)."""
    import tunelab.export as export_mod

    long_dir = tmp_path / ("a-long-folder-name-" * 4) / "export"
    command = f"llama-server -m {long_dir}/model-f16.gguf --lora {long_dir}/adapter-f16.gguf --port 8080"

    class Result:
        def text(self):
            return f"wrote gguf export {long_dir}: model-f16.gguf\n  {command}"

    monkeypatch.setattr(export_mod, "export", lambda *a, **k: Result())
    code, out, err = tunelab("export", "src", "--out", long_dir)
    assert code == 0, err
    assert command in out.splitlines() or f"  {command}" in out.splitlines(), out
