"""Every HTML report read in a 1280 px browser window (headless Chromium): nothing wider than the window, every
model's column in view, a score's CI on one line under it, one baseline, the demo's verdicts at the top, once."""

import json
from pathlib import Path

import numpy as np
import pytest

from tunelab.evaluate.report import build, title, write_report
from tunelab.ladder.recommend import recommend
from tunelab.ladder.report import render
from tunelab.ladder.results import LadderResult, RungResult
from tunelab.ladder.rungs import BY_NAME

CHROMIUM = Path("/usr/bin/chromium")
WIDTH = 1280


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="the page checks need `pip install playwright` "
                                                                 "(the dev extra)")
    if not CHROMIUM.exists():
        pytest.skip(f"no browser at {CHROMIUM}: `apt-get install -y chromium` (as root) to run the page checks")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        yield b
        b.close()


def _open(browser, path: Path):
    page = browser.new_page(viewport={"width": WIDTH, "height": 900})
    page.goto(path.resolve().as_uri())
    return page


def _fits(page) -> None:
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= page.evaluate("window.innerWidth") == WIDTH, f"the page is {width} px wide"


def _ci_lines(page) -> list[int]:
    """Lines of text in each cell holding a score and its CI."""
    return page.evaluate("""() => [...document.querySelectorAll('td.num')].filter(td => td.querySelector('.ci'))
        .map(td => { const r = document.createRange(); r.selectNodeContents(td);
                     return new Set([...r.getClientRects()].map(x => Math.round(x.top))).size; })""")


def _eval_run(label, outputs, adapter=None):
    rows = [{"id": f"ex{i}", "input": f"Extract order {i}", "reference": '{"item": "pen"}', "output": out,
             "scores": {"json_exact": float(out == '{"item": "pen"}')}, "failure": None if out == '{"item": "pen"}'
             else "format"} for i, out in enumerate(outputs)]
    n = len(rows)
    return {"task": "orders-json", "split": "test", "model": label, "adapter": adapter, "n": n,
            "metrics": {m: {"score": 0.5, "ci95": [0.25, 0.75], "n": n}
                        for m in ("json_valid", "schema_valid", "json_exact", "field_f1")},
            "failures": {"format": sum(r["failure"] == "format" for r in rows)}, "predictions": rows,
            "provenance": {"data": {"path": "/x/tasks/orders-json/test.jsonl", "task": "orders-json"}}}


def test_eval_report_with_a_long_unbroken_output_fits_the_window(browser, tmp_path):
    """One output of 3,000 characters without a space (a model that never stopped) used to make the page
    2,737 px wide and push the adapter's column out of view."""
    long = "x" * 3000
    runs = [_eval_run("base", [long, '{"item": "pen"}', "nope"]),
            _eval_run("orders-lora-r16-long-adapter-name", ['{"item": "pen"}'] * 3, adapter="/runs/lora")]
    _, html = write_report(runs, tmp_path / "report")
    page = _open(browser, html)
    _fits(page)
    right = page.evaluate("""() => Math.max(...[...document.querySelectorAll('th')]
        .filter(th => th.textContent === 'orders-lora-r16-long-adapter-name')
        .map(th => th.getBoundingClientRect().right))""")
    assert right <= WIDTH, f"the adapter's column ends at {right} px"
    assert max(_ci_lines(page)) <= 2


def _rung(name, p, failures, seed=0):
    rng = np.random.default_rng(seed + sum(name.encode()))
    scores = (rng.random(64) < p).astype(float).tolist()
    r = BY_NAME[name]
    metrics = {m: {"score": p, "ci95": [max(0.0, p - 0.1), min(1.0, p + 0.1)], "n": 64}
               for m in ("json_valid", "schema_valid", "json_exact", "field_f1")}
    return RungResult(name, r.label, r.cost, metrics, scores, failures, latency_s=1.25, peak_rss_mb=2048.0,
                      train_seconds=300.0 if "lora" in name else None)


def _ladder(tmp_path, task="orders-json"):
    rs = [_rung("prompt", 0.05, {"format": 60, "content": 4}), _rung("few-shot", 0.2, {"format": 40, "content": 11}),
          _rung("constrained", 0.25, {"content": 48}), _rung("lora", 0.6, {"format": 2, "content": 24}),
          _rung("lora+constrained", 0.65, {"content": 22})]
    return LadderResult(tmp_path / task, task, "json_exact", rs, recommend(rs, primary="json_exact"),
                        {"bm25": "no corpus"})


def test_ladder_report_fits_with_cis_on_one_line_and_one_baseline(browser, tmp_path):
    res = _ladder(tmp_path)
    rec = res.recommendation
    assert {d["a"] for d in rec.diffs} == {"few-shot"}  # the paired differences and the reasons: one baseline
    assert all(" vs prompt" not in r for r in rec.reasons)
    page_html = render(res)
    assert page_html.count("Paired differences against few-shot") == 1
    path = tmp_path / "ladder.html"
    path.write_text(page_html)
    page = _open(browser, path)
    _fits(page)
    assert max(_ci_lines(page)) <= 2


def test_demo_page_starts_with_each_verdict_once(browser, tmp_path):
    from tunelab.demo import write_page

    results = {"orders-json": _ladder(tmp_path), "handbook-qa": _ladder(tmp_path, "handbook-qa")}
    results["handbook-qa"].recommendation.headline = "Use retrieval (hybrid), do not finetune: facts."
    path = write_page(results, tmp_path)
    text = path.read_text()
    for res in results.values():
        assert text.count(res.recommendation.headline) == 1, res.recommendation.headline
    page = _open(browser, path)
    _fits(page)
    first = page.evaluate("() => { const t = document.querySelector('table'); "
                          "return [t.textContent, t.getBoundingClientRect().bottom]; }")
    assert all(r.recommendation.headline in first[0] for r in results.values())
    assert first[1] < 600, first  # both verdicts in the first screen


def test_failure_legend_covers_no_bar():
    from tunelab.evaluate._plots import stacked_figure

    # every rung fails about all 64 examples: the bars fill the axes, so a legend inside them covers one
    fig = stacked_figure("failure classes", ["prompt", "few-shot", "constrained", "lora", "lora+constrained"],
                         {"format": [60, 40, 0, 2, 0], "content": [4, 24, 60, 58, 60], "knowledge": [0] * 5,
                          "refusal": [0] * 5}, "examples")
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    ax = fig.axes[0]
    legend = ax.get_legend().get_window_extent(canvas.get_renderer())
    bars = [p.get_window_extent(canvas.get_renderer()) for p in ax.patches if p.get_height() > 0]
    assert bars and not any(legend.overlaps(b) for b in bars)


def test_eval_report_title_says_what_is_there(tmp_path):
    runs = [_eval_run("base", ["a"]), _eval_run("lora", ["b"])]
    assert title(build(runs)) == "Eval report: base vs lora on orders-json (test split), 1 example"
    for r in runs:  # `tunelab eval --data test.jsonl`: the task is named after the file, its one split is test
        r.update(task="test", provenance={"data": {"path": "/home/me/data/test.jsonl", "task": "test"}})
    assert title(build(runs)) == "Eval report: base vs lora on test.jsonl, 1 example"
    md, html = write_report(runs, tmp_path)
    assert "Eval report: test (test)" not in md.read_text() + html.read_text()
    assert json.dumps(title(build(runs)))[1:-1] in html.read_text()
