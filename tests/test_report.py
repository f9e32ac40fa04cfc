"""The comparison report: two fake eval runs -> report.md with the right deltas, a self-contained report.html."""

import json
import re

import pytest

from tunelab.errors import TunelabError
from tunelab.evaluate.report import build, compare_dirs, find_runs, load_run, write_report

INPUTS = ["Extract: pen x2", "Extract: ink x5", "Extract: <b>ruler</b>", "Extract: crème x1"]
REFS = ['{"item": "pen", "qty": 2}', '{"item": "ink", "qty": 5}', '{"item": "ruler", "qty": 1}',
        '{"item": "crème", "qty": 1}']


def _run_folder(folder, label, outputs, scores, failures, adapter=None):
    folder.mkdir(parents=True)
    rows = [
        {"id": f"ex{i}", "input": INPUTS[i], "reference": REFS[i], "output": out,
         "scores": {"json_exact": s, "json_valid": 1.0 if out.startswith("{") else 0.0}, "failure": f}
        for i, (out, s, f) in enumerate(zip(outputs, scores, failures))
    ]
    (folder / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    n = len(rows)
    counts = {c: sum(r["failure"] == c for r in rows) for c in ("format", "content", "knowledge", "refusal")}
    metrics = {
        "task": "orders", "split": "test", "model": label, "adapter": adapter,
        "metrics": {
            "json_exact": {"score": sum(scores) / n, "ci95": [0.0, 0.75], "n": n},
            "json_valid": {"score": sum(r["scores"]["json_valid"] for r in rows) / n, "ci95": [0.25, 1.0], "n": n},
        },
        "failures": counts,
    }
    (folder / "metrics.json").write_text(json.dumps(metrics), encoding="utf-8")
    return folder


@pytest.fixture()
def evals(tmp_path):
    adapter = tmp_path / "runs" / "lora" / "adapter"
    adapter.mkdir(parents=True)
    log = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5, "val_loss": 1.7}, {"step": 3, "loss": 1.1}]
    (adapter.parent / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log) + '{"step": 4, "lo')
    root = tmp_path / "eval"
    # baseline right on ex0 only (0.25); adapter right on ex1 and ex2 (0.50): 2 fixed, 1 broken, delta +0.250
    _run_folder(root / "a-base", "base", ['{"item": "pen", "qty": 2}', "Sure! ink", "<script>alert(1)</script>",
                                          "I'm sorry, I can't."],
                [1.0, 0.0, 0.0, 0.0], [None, "format", "format", "refusal"])
    _run_folder(root / "b-lora", "lora", ['{"item": "pen", "qty": 3}', '{"item": "ink", "qty": 5}',
                                          '{"item": "ruler", "qty": 1}', '{"item": "creme", "qty": 1}'],
                [0.0, 1.0, 1.0, 0.0], ["content", None, None, "content"], adapter=str(adapter))
    return root


def test_find_and_load_runs(evals):
    assert [p.name for p in find_runs(evals)] == ["a-base", "b-lora"]
    assert find_runs(evals / "a-base") == [evals / "a-base"]
    run = load_run(evals / "b-lora")
    assert run["model"] == "lora" and len(run["predictions"]) == 4
    assert [r["step"] for r in run["train_log"]] == [1, 2, 3]  # half-written last line skipped
    assert load_run(evals / "a-base")["train_log"] is None
    with pytest.raises(TunelabError, match="no eval results"):
        find_runs(evals.parent / "runs")


def test_build_flips_and_deltas(evals):
    data = build([load_run(p) for p in find_runs(evals)])
    assert data["primary"] == "json_exact"
    flip = data["flips"][0]
    assert [b["id"] for b, _ in flip["fixed"]] == ["ex1", "ex2"] and [b["id"] for b, _ in flip["broken"]] == ["ex0"]
    exact = data["table"][0]
    assert exact["metric"] == "json_exact" and exact["deltas"][0]["delta"] == pytest.approx(0.25)
    lo, hi = exact["deltas"][0]["ci95"]  # paired diffs [-1, 1, 1, 0]
    assert -1 <= lo < 0.25 < hi <= 1
    assert data["table"][1]["deltas"][0]["delta"] == pytest.approx(0.75)  # json_valid 0.25 -> 1.0


def test_report_files(evals, tmp_path):
    out = tmp_path / "report"
    md_path, html_path = compare_dirs([evals], out)
    assert md_path == out / "report.md" and html_path == out / "report.html"
    assert sorted(p.name for p in out.iterdir()) == ["report.html", "report.md"]  # no temp files left
    md = md_path.read_text(encoding="utf-8")
    assert "| metric | base | lora | Δ lora |" in md
    exact_row = next(line for line in md.splitlines() if line.startswith("| json_exact |"))
    assert "0.250 [0.000, 0.750]" in exact_row and "0.500 [0.000, 0.750]" in exact_row
    assert re.search(r"\| \+0\.250 \[[-+]\d\.\d{3}, \+\d\.\d{3}\] \|$", exact_row)
    assert "| json_valid | 0.250 [0.250, 1.000] | 1.000 [0.250, 1.000] | +0.750" in md
    assert "| base | 2 | 0 | 0 | 1 |" in md and "| lora | 0 | 2 | 0 | 0 |" in md
    assert "**lora**: 2 fixed, 1 broken" in md
    assert "  - broken `ex0`: `{\"item\": \"pen\", \"qty\": 2}` → `{\"item\": \"pen\", \"qty\": 3}`" in md
    assert "### ex3" in md and "crème" in md
    assert "- lora: 3 logged steps, last step 3 loss 1.1, last val_loss 1.7" in md

    html = html_path.read_text(encoding="utf-8")
    assert html.startswith("<!DOCTYPE html>")
    images = re.findall(r'<img [^>]*src="([^"]*)"', html)
    assert len(images) == 3  # one chart per metric + the loss curve
    assert all(src.startswith("data:image/png;base64,iVBORw0KGgo") for src in images)
    # self-contained: no links, scripts, stylesheets or URLs of any kind
    assert not re.search(r"https?://|<link|<script|href=|url\(", html)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html  # outputs are escaped
    assert "+0.250" in html and "2 fixed, 1 broken" in html and "Training loss" in html


def test_write_report_single_run_and_overwrite(evals, tmp_path):
    runs = [load_run(evals / "b-lora")]
    md, html = write_report(runs, tmp_path / "r", samples=1)
    assert "| metric | lora |\n" in md.read_text()  # no delta columns
    assert md.read_text().count("### ex") == 1
    write_report([load_run(evals / "a-base")], tmp_path / "r")  # replaces the files whole
    assert "| metric | base |" in md.read_text()
    with pytest.raises(TunelabError, match="No runs"):
        write_report([], tmp_path / "r")


def test_duplicate_labels_are_disambiguated(evals, tmp_path):
    run = load_run(evals / "a-base")
    md, _ = write_report([run, dict(run)], tmp_path / "r")
    assert "| metric | base | base#1 | Δ base#1 |" in md.read_text()


def test_example_groups_are_reported_per_run(evals, tmp_path):
    """metrics.json "groups" (handbook-qa's fact_in_train) become a table in both report files."""
    for name, (seen, unseen) in (("a-base", (0.5, 0.0)), ("b-lora", (0.75, 0.25))):
        path = evals / name / "metrics.json"
        m = json.loads(path.read_text())
        m["groups"] = {"fact_in_train": {"true": {"json_exact": {"score": seen, "ci95": [0.1, 0.9], "n": 3}},
                                         "false": {"json_exact": {"score": unseen, "ci95": [0.0, 0.5], "n": 1}}}}
        path.write_text(json.dumps(m))
    md, html = compare_dirs(find_runs(evals), tmp_path / "out")
    text = md.read_text()
    assert "## By example group" in text
    assert re.search(r"\| json_exact \| fact_in_train=false \| 0\.000 .*n=1 \| 0\.250 .*n=1 \|", text), text
    assert "fact_in_train=true" in html.read_text()
