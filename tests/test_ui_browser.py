"""The web UI in a real browser (Playwright driving Debian's Chromium) on loopback: every page loads without
console errors, fits 1280 px and labels its inputs; a 5-step training's chart gains points and a reload mid-way
shows the same run; the playground's adapter answers valid JSON under a schema; a tenant logs in to its own.

Screenshots go to $TUNELAB_UI_SHOTS when set (docs/img for docs/ui.md), else to the test's temporary folder."""

import json
import os
import time
from pathlib import Path

import pytest

pytest.importorskip("multipart", reason="the UI needs the ui extra: pip install -e '.[ui]'")

from conftest import Server  # noqa: E402
from test_ui import ACME, ADMIN, GLOBEX, fake_eval, fake_run  # noqa: E402

from tunelab.server.auth import Keys, hash_key  # noqa: E402
from tunelab.ui import UiContext, build_ui  # noqa: E402
from tunelab.ui.access import Access  # noqa: E402

CHROMIUM = Path("/usr/bin/chromium")
WIDTH = 1280
PAGES = ["runs", "train", "evaluate", "playground", "serve", "review", "monitor"]
SCHEMA = {"type": "object", "required": ["name", "qty"], "properties": {
    "name": {"type": "string"}, "qty": {"type": "integer"}}, "additionalProperties": False}


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="the browser tests need `pip install playwright` "
                                                                 "(the dev extra)")
    if not CHROMIUM.exists():
        pytest.skip(f"no browser at {CHROMIUM}: `apt-get install -y chromium` (as root; `make test` does it) to "
                    "run the UI's browser tests")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def world(tmp_path_factory, tokenizer):
    """A tiny model (wide enough that a training step takes a visible moment), one random LoRA adapter, a keys
    file, a registry with runs and evals of two tenants, and the UI serving them on a loopback port."""
    import torch
    from peft import LoraConfig, get_peft_model

    from tunelab.infer import load_engine
    from tunelab.models import tiny_model
    from tunelab.server import ServeService

    root = tmp_path_factory.mktemp("ui")
    old = {k: os.environ.get(k) for k in ("TUNELAB_REGISTRY", "TUNELAB_HOME")}
    os.environ["TUNELAB_REGISTRY"], os.environ["TUNELAB_HOME"] = str(root / "registry.sqlite"), str(root / "home")
    model, _ = tiny_model("llama", tokenizer=tokenizer, hidden_size=256, intermediate_size=512, num_hidden_layers=4)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    torch.manual_seed(0)
    get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                     init_lora_weights=False)).save_pretrained(root / "adapters" / "acme-a")
    import shutil

    for version in ("v1", "v2"):  # an alias with two versions for the Serve page's canary
        shutil.copytree(root / "adapters" / "acme-a", root / "adapters" / f"orders@{version}")
    (root / "keys.yaml").write_text(f"""tenants:
  ops: {{key_sha256: [{hash_key(ADMIN)}], admin: true}}
  acme: {{key_sha256: [{hash_key(ACME)}], adapters: [acme-a]}}
  globex: {{key_sha256: [{hash_key(GLOBEX)}], adapters: [globex-b]}}
""")
    fake_run(root / "registered", "acme-a")
    fake_run(root / "registered", "globex-b")
    fake_eval(root / "evals", "base", "", [0, 1, 0, 0, 1, 0, 0, 0])
    fake_eval(root / "evals", "acme-a", root / "registered" / "acme-a", [1, 1, 0, 1, 1, 1, 0, 1])

    _traffic(root / "requests.sqlite")

    def service():
        engine = load_engine(str(root / "model"), dtype="fp32", kind="batched")
        return ServeService(engine, "tiny", root / "adapters", Keys.load(root / "keys.yaml"), default_max_tokens=48)

    ctx = UiContext(Access(Keys.load(root / "keys.yaml")), root / "runs", make_service=service,
                    log_url=str(root / "requests.sqlite"))
    srv = Server(None, app=build_ui(ctx))
    yield {"root": root, "url": srv.url}
    srv.stop()
    from tunelab.ui import jobs

    for job in jobs.all_jobs():  # a failed test leaves no training behind
        jobs.stop(job)
    if ctx.service is not None:
        ctx.service.close()
    for k, v in old.items():
        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def _traffic(path) -> None:
    """A day of logged requests for the Serve, Review and Monitor pages (and their screenshots)."""
    import random

    from tunelab.ops.requestlog import LogRow, RequestLog

    rng, now, rows = random.Random(0), time.time(), []
    for i in range(120):
        t, m = ("acme", "acme-a") if i % 3 else ("globex", "globex-b")
        rows.append(LogRow(f"chatcmpl-{i:04d}", now - 86000 + i * 700, t, m, adapter=m, output_tokens=20,
                           outcome="length_closed" if rng.random() < 0.1 else "ok", latency_s=0.2 + rng.random(),
                           flags=["refusal"] if rng.random() < 0.05 else [],
                           prompt=json.dumps([{"role": "user", "content": f"Order {i}: {i % 5 + 1} pens"}]),
                           answer=json.dumps({"item": "pen", "qty": i % 5 + 1})))
    log = RequestLog.open(path)
    log.write(rows)
    log.close()


def _page(browser, world, key=ADMIN):
    """A 1280-px page logged in with `key`, recording console errors and uncaught exceptions."""
    page = browser.new_page(viewport={"width": WIDTH, "height": 900})
    page.errors = []
    page.on("console", lambda m: page.errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: page.errors.append(str(e)))
    page.goto(world["url"] + "/ui/login")
    page.fill("#f-key", key)
    page.press("#f-key", "Enter")  # the keyboard submits the form
    page.wait_for_url("**/ui/runs")
    return page


def _shot(page, name: str, tmp_path) -> None:
    folder = Path(os.environ.get("TUNELAB_UI_SHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(folder / f"ui-{name}.png"), full_page=False)


def _usable(page) -> None:
    """No sideways scrolling at 1280 px, and every visible input, select and textarea has a label."""
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= WIDTH, f"{page.url} is {width} px wide"
    unlabelled = page.evaluate("""() => [...document.querySelectorAll('input, select, textarea')]
        .filter(e => e.type !== 'hidden' && !(e.labels && e.labels.length)).map(e => e.name)""")
    assert not unlabelled, f"{page.url}: inputs without a label: {unlabelled}"


def test_every_page_loads_without_console_errors(browser, world, tmp_path):
    page = _page(browser, world)
    for name in PAGES:
        r = page.goto(f"{world['url']}/ui/{name}")
        assert r.status == 200, (name, page.inner_text("main")[:500])
        assert page.locator("h1").count() == 1 and page.locator("nav a.here").inner_text().lower() == name
        _usable(page)
        _shot(page, name, tmp_path)
    page.goto(f"{world['url']}/ui/evaluate")
    page.click("button:has-text('Compare')")
    assert "paired 95% CI" in page.content()
    _usable(page)
    _shot(page, "compare", tmp_path)
    page.goto(f"{world['url']}/ui/runs?kind=adapter")
    page.click("td a >> nth=0")
    assert "Lineage" in page.content()
    _usable(page)
    assert page.errors == [], page.errors


def test_training_chart_gains_points_and_a_reload_shows_the_same_run(browser, world, chat_file, tmp_path):
    page = _page(browser, world)
    page.goto(f"{world['url']}/ui/train")
    page.fill("#f-name", "ui-five-steps")
    page.fill("#f-model", str(world["root"] / "model"))
    page.select_option("#f-task", "")
    page.set_input_files("#f-upload", str(chat_file))
    page.fill("#f-overrides", "\n".join([
        "train.max_steps=5", "train.batch_size=2", "train.effective_batch=2", "train.max_length=256",
        "validation.every=1", "checkpoint_every=2", "train.precision=fp32", "train.threads=1", "lora.r=8"]))
    page.reload()  # what was typed survives a refresh (the file input excepted: browsers never refill it)
    assert page.input_value("#f-name") == "ui-five-steps" and "train.max_steps=5" in page.input_value("#f-overrides")
    page.set_input_files("#f-upload", str(chat_file))
    page.focus("#f-name")
    for _ in range(12):  # every control is reached with Tab, in order, up to the Start button
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.textContent") == "Start training":
            break
    else:
        raise AssertionError("Tab never reached the Start training button")
    page.click("button:has-text('Check data')")
    assert "Data check" in page.content() and "Memory estimate" in page.content()
    assert "64 rows" in page.content()
    _usable(page)
    page.click("button:has-text('Start training')")
    page.wait_for_url("**/ui/jobs/**")
    _usable(page)
    page.wait_for_function("document.querySelectorAll('#chart circle.loss').length > 0", timeout=240_000)
    first = page.locator("#chart circle.loss").count()
    status = page.locator("#job-status").inner_text()
    page.reload()  # mid-run (5 steps): the same job, its points read back from the run folder
    after = page.locator("#chart circle.loss").count()
    assert after >= first and page.locator("#job-status").inner_text() in (status, "finished")
    _shot(page, "training", tmp_path)
    page.wait_for_function("document.getElementById('job-status').textContent === 'finished'", timeout=240_000)
    page.wait_for_function("document.querySelectorAll('#chart circle.loss').length === 5", timeout=10_000)
    assert first < 5, "the chart showed every point at once: no live update was seen"
    assert page.locator("#chart circle.val_loss").count() >= 5
    assert (world["root"] / "runs" / "ui-five-steps" / "run.json").is_file()
    page.wait_for_selector("h2:has-text('Results')", timeout=20_000)  # the page reloads once the run ends
    assert page.locator("a:has-text('adapter ui-five-steps')").count() == 1
    _shot(page, "trained", tmp_path)
    assert page.errors == [], page.errors


def test_playground_adapter_with_a_schema_answers_valid_json(browser, world, tmp_path):
    import jsonschema

    page = _page(browser, world, ACME)
    page.goto(f"{world['url']}/ui/playground")
    boxes = page.locator("input[name=models]")
    assert sorted(boxes.evaluate_all("b => b.map(x => x.value)")) == ["acme-a", "tiny"]  # not globex's
    for value in ("tiny", "acme-a"):
        page.check(f"input[name=models][value='{value}']")
    page.fill("#f-message", "Ada wants 3 apples.")
    page.fill("#f-schema", json.dumps(SCHEMA))
    page.fill("#f-seed", "7")
    page.click("#send")
    page.wait_for_function("document.querySelectorAll('.pane[data-done]').length === 2", timeout=180_000)
    for model in ("tiny", "acme-a"):
        pane = page.locator(f".pane[data-model='{model}']")
        text = pane.locator("pre").inner_text()
        jsonschema.validate(json.loads(text), SCHEMA)
        assert pane.locator(".badge").inner_text() == "valid JSON"
    _usable(page)
    _shot(page, "playground-chat", tmp_path)
    assert page.errors == [], page.errors


def test_a_tenant_sees_only_its_own_in_the_browser(browser, world):
    page = _page(browser, world, ACME)
    text = page.content()
    assert "acme-a" in text and "globex-b" not in text
    r = page.goto(f"{world['url']}/ui/train")
    assert r.status == 403 and "needs an admin key" in page.content()
    page.errors.clear()  # the browser logs that 403 as a console error
    page.goto(f"{world['url']}/ui/evaluate")
    assert "eval" in page.content() and "globex" not in page.content()
    page.goto(f"{world['url']}/ui/review")  # globex's rows are not offered; the keyboard picks the verdict
    assert "globex" not in page.content()
    form = page.locator("form.review").first
    rid = form.get_attribute("action").rsplit("/", 1)[1]
    page.keyboard.press("c")
    assert form.locator("input[value=correct]").is_checked()
    form.locator("textarea").fill('{"item": "pen", "qty": 9}')
    form.locator("button").click()
    page.wait_for_url("**/ui/review?adapter=acme-a")
    from tunelab.ops.requestlog import RequestLog

    fb = [f for f in RequestLog.open(world["root"] / "requests.sqlite").feedback() if f["response_id"] == rid]
    assert [(f["label"], f["correction"], f["tenant"]) for f in fb] == [("correct", '{"item": "pen", "qty": 9}', "acme")]
    assert page.errors == [], page.errors


def test_a_canary_split_set_on_the_serve_page_is_what_rollout_status_reports(browser, world, tunelab):
    page = _page(browser, world)
    page.goto(f"{world['url']}/ui/playground")  # the playground loads the served model: the Serve page shows it
    page.goto(f"{world['url']}/ui/serve")
    page.fill("#f-weights-orders", "v1=80 v2=20")
    page.click("button:has-text('Set split')")
    page.wait_for_url("**/ui/serve")
    assert page.inner_text("#split-orders") == "v1=80 v2=20"
    code, out, err = tunelab("rollout", "status", "orders", "--log", world["root"] / "requests.sqlite", "--json")
    assert code == 0, err
    assert json.loads(out)["weights"] == {"v1": 80, "v2": 20}
    _usable(page)
    assert page.errors == [], page.errors
