"""Forgetting and safety verdicts: flagged only when the paired-bootstrap CI of the change excludes zero."""

import json

import pytest

from tunelab.cli.eval_tables import render_result
from tunelab.evaluate.harness import Variant, regression_checks
from tunelab.evaluate.regression import paired_change
from tunelab.infer.testing import FakeEngine
from tunelab.tasks import load_task

VARIANTS = [Variant("base"), Variant("noisy", "adapter-1", "/noisy"), Variant("worse", "adapter-2", "/worse")]


def _engine():
    """Base answers the even general items and refuses exactly the harmful probes. `noisy` loses 10 of the
    base's right answers and gains 5 (-2.5 points, inside the noise of 200 items) and answers 1 harmful
    probe; `worse` loses 40 right answers (-20 points), answers 15 harmful probes and refuses 12 benign."""
    general = {load_task("general").prompt(ex): (i, ex["answer"])
               for i, ex in enumerate(load_task("general").examples("test"))}
    safety = {load_task("safety").prompt(ex): ex["should_refuse"] for ex in load_task("safety").examples("test")}

    def respond(q):
        user = q.prompt[-1]["content"]
        if user in general:
            i, answer = general[user]
            right = i % 2 == 0
            if q.adapter == "adapter-1" and (i % 20 == 0 or i % 40 == 1):
                right = not right
            if q.adapter == "adapter-2" and i % 4 == 0 and i < 160:
                right = False
            return answer if right else "I am not sure about that."
        k = sorted(safety).index(user)
        refuse = safety[user]
        if q.adapter == "adapter-1" and refuse and k == min(j for j, p in enumerate(sorted(safety)) if safety[p]):
            refuse = False
        if q.adapter == "adapter-2":
            harmful = [j for j, p in enumerate(sorted(safety)) if safety[p]]
            benign = [j for j, p in enumerate(sorted(safety)) if not safety[p]]
            refuse = (refuse and k not in harmful[:15]) or k in benign[:12]
        return "I'm sorry, but I can't help with that." if refuse else "Sure, here is how."

    engine = FakeEngine(respond)
    engine.add_adapter("adapter-1", "/noisy")
    engine.add_adapter("adapter-2", "/worse")
    return engine


@pytest.fixture(scope="module")
def checks(tmp_path_factory):
    out = tmp_path_factory.mktemp("regression")
    return out, regression_checks(_engine(), VARIANTS, out, limit=None, batch_size=8, general=True, safety=True)


def test_forgetting_needs_a_drop_beyond_noise(checks):
    out, summary = checks
    rows = summary["general"]["models"]
    assert rows["base"]["score"] == 0.5 and rows["noisy"]["delta_points"] == -2.5
    assert rows["worse"]["delta_points"] == -20.0
    lo, hi = rows["noisy"]["ci95_points"]
    assert lo < 0 < hi and rows["noisy"]["forgetting"] is False  # a raw 2.5-point drop is noise here
    lo, hi = rows["worse"]["ci95_points"]
    assert lo < hi < -2.0 and rows["worse"]["forgetting"] is True
    assert json.loads((out / "regression.json").read_text())["general"] == summary["general"]


def test_safety_rates_with_cis_and_a_worse_flag(checks):
    _, summary = checks
    rows = summary["safety"]["models"]
    base, noisy, worse = rows["base"], rows["noisy"], rows["worse"]
    assert (base["refusal"]["rate"], base["over_refusal"]["rate"]) == (1.0, 0.0)
    assert base["refusal"]["n"] == base["over_refusal"]["n"] == 40
    lo, hi = worse["refusal"]["ci95"]
    assert lo < worse["refusal"]["rate"] == 25 / 40 < hi
    assert noisy["refusal"]["delta_points"] == -2.5 and noisy["worse"] is False
    assert worse["refusal"]["worse"] and worse["over_refusal"]["worse"] and worse["worse"]
    assert worse["over_refusal"]["delta_points"] == 30.0 and worse["over_refusal"]["ci95_points"][0] > 0


def test_the_tables_show_the_cis(checks):
    from io import StringIO

    from rich.console import Console

    from tunelab.evaluate.harness import EvalResult

    _, summary = checks
    buf = StringIO()
    render_result(EvalResult(out_dir=None, metrics={}, extra=summary), Console(file=buf, width=80))
    text = buf.getvalue()
    assert "[-25.5,-14.0]" in text and "-2.5" in text and "YES" in text and "0.62 [0.47,0.78]" in text
    assert max(len(line) for line in text.splitlines()) <= 80


def test_paired_change_directions():
    assert paired_change([1.0] * 50, [0.0] * 50, 2.0)["worse"] is True
    assert paired_change([0.0] * 50, [1.0] * 50, 2.0, "higher")["worse"] is True
    assert paired_change([1.0] * 50, [1.0] * 49 + [0.0], 2.0)["worse"] is False  # CI reaches 0
    assert paired_change([1.0] * 1000, [1.0] * 990 + [0.0] * 10, 2.0)["worse"] is False  # real, but 1 point
    with pytest.raises(ValueError):
        paired_change([1.0], [1.0, 0.0], 2.0)
