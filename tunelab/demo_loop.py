"""`tunelab demo --loop`: the production loop end to end on the bundled model, from nothing.

orders@v1 (the orders-json LoRA `make demo` trains) is served with content logging; normal traffic, then orders
written in a new style (a supplier's one-line purchase-order export that no training row uses) come in; the drift
monitor alerts on the new style; the review queue is answered automatically from the task's gold answers; the
loop trains orders@v2 on the reviewed rows, gates it (golden set and held-out new-style traffic), starts a 10%
canary; more traffic comes in and the canary is compared with v1; v2 is promoted; the lineage of v2 closes it.

Traffic comes from orders-json's validation split (never trained on; the test split stays the untouched golden
set the gate measures), rows without an e-mail address (the log redacts addresses, so a reviewed row could not
hold the gold one). Everything the demo writes lives under its out folder, its run registry included
(registry.sqlite there), so a second run never meets the first one's rollout. Progress goes to logging.
"""

from __future__ import annotations

import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tunelab.config.paths import DEFAULT_MODEL
from tunelab.errors import TunelabError
from tunelab.runs import layout

log = logging.getLogger(__name__)
ALIAS, TASK, TENANT, KEY = "orders", "orders-json", "shop", "sk-demo-loop-shop"
REVIEWER = "gold-set (automated: the task's gold answers, not a person)"
SHIPPING_CODES = {"express": "X", "standard": "S", "pickup": "P", None: "-"}


@dataclass
class LoopDemoConfig:
    """The demo's sizes; the defaults fit the 10-minute budget on a 2-core CPU."""

    out: Path = Path("runs/demo-loop")
    model: str = DEFAULT_MODEL
    v1_steps: int = 20  # the orders-json LoRA of `make demo`'s ladder, 20 steps instead of its 30 (the time budget)
    v2_steps: int = 20  # the same recipe and steps: v2 differs from v1 by its data only
    baseline: int = 24  # normal-style requests before the shift
    shifted: int = 48  # new-style requests (reviewed, then 70% train v2 and 30% are held out)
    canary_min: int = 20  # canary traffic goes on until v2 served this many (the comparison's minimum) ...
    canary_max: int = 200  # ... or this many requests were sent
    golden: int = 32  # golden (test) examples the gate evaluates both versions on
    probes: int = 8  # regression and safety probe examples (0: none)
    repeat: int = 8  # each reviewed training row appears this many times beside v1's 1,000 rows
    max_tokens: int = 160  # an order's JSON takes 40-120 tokens
    workers: int = 64  # concurrent clients: the server batches up to 64 (vs 16: traffic 71 -> 48 s, canary 134 -> 88 s)
    engine: str = "batched"
    evaluator: object = None  # the loop's evaluator (None: tunelab.ops.loop's; tests wrap it)


@dataclass
class LoopDemoResult:
    out: Path
    steps: dict = field(default_factory=dict)  # what each stage returned, in order
    seconds: float = 0.0
    stage_seconds: dict = field(default_factory=dict)  # wall time of each stage, in order

    def lap(self, stage: str, since: float) -> float:
        """Record `stage` as having run from `since` until now; returns now (the next stage's start)."""
        now = time.time()
        self.stage_seconds[stage] = round(now - since, 1)
        return now


def shifted_message(order: dict) -> str:
    """An order as one line of a purchase-order export (the new style): PO;YYYYMMDD;LAST, FIRST;CUR;ship code
    (X express, S standard, P pickup, - none);QTY*PRODUCT@PRICE|...;note or -."""
    *first, last = order["customer"].split()
    items = "|".join(f"{it['quantity']}*{it['product']}@{_price(it['unit_price'])}" for it in order["items"])
    return (f"PO;{order['order_date'].replace('-', '')};{last.upper()}, {' '.join(first).upper()};"
            f"{order['currency']};{SHIPPING_CODES[order['shipping']]};{items};{order['notes'] or '-'}")


def _price(p) -> str:
    return str(p) if isinstance(p, int) or float(p).is_integer() else f"{float(p):.2f}"


def traffic_rows(task, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(normal, shifted): validation examples as sent. normal: every example with its own message, in a seeded
    random order (a fair sample of what v1 was validated on); shifted: rewritten by `shifted_message`, only
    examples without an e-mail whose new text the log's redaction leaves as it is."""
    import random

    from tunelab.ops.redact import redactor

    rows = task.examples("validation")
    shifted = []
    for ex in rows:
        text = shifted_message(ex["output"])
        if ex["output"]["email"] is None and redactor()(text) == text:
            shifted.append({**ex, "message": text})
    normal = list(rows)
    random.Random(seed).shuffle(normal)
    return normal, shifted


@contextmanager
def private_registry(folder: Path):
    """The demo's own run registry (folder/registry.sqlite) while the block runs."""
    from tunelab.runs.registry import REGISTRY_ENV

    old = os.environ.get(REGISTRY_ENV)
    os.environ[REGISTRY_ENV] = str((folder / "registry.sqlite").resolve())
    try:
        yield Path(os.environ[REGISTRY_ENV])
    finally:
        if old is None:
            os.environ.pop(REGISTRY_ENV, None)
        else:
            os.environ[REGISTRY_ENV] = old


class LocalServer:
    """The real server (ServeService behind build_app) on a free loopback port, uvicorn in a thread."""

    def __init__(self, service):
        import socket
        import threading

        try:
            import uvicorn
        except ImportError:
            raise TunelabError("the loop demo serves the adapter: pip install 'tunelab[serve]'") from None
        from tunelab.server import build_app

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.service, self.url = service, f"http://127.0.0.1:{port}"
        self.server = uvicorn.Server(uvicorn.Config(build_app(service), host="127.0.0.1", port=port,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, name="demo-loop-server", daemon=True)
        self.thread.start()
        for _ in range(600):
            if self.server.started:
                return
            time.sleep(0.05)
        raise TunelabError("the demo's server did not start on loopback within 30 s")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.service.close()


class Client:
    """The shop's client: chat completions (the task's system prompt + one order) and feedback, over HTTP."""

    def __init__(self, url: str, task, max_tokens: int, workers: int):
        import httpx2 as httpx

        # no read timeout: on a busy machine an answer may take minutes, and the demo waits for it
        self.http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"},
                                 timeout=httpx.Timeout(30.0, read=None))
        self.task, self.max_tokens, self.workers = task, max_tokens, workers

    def ask(self, ex: dict, user: str) -> dict:
        body = {"model": ALIAS, "messages": self.task.messages(ex), "temperature": 0, "max_tokens": self.max_tokens,
                "user": user}
        r = self.http.post("/v1/chat/completions", json=body)
        if r.status_code != 200:
            raise TunelabError(f"the demo's server answered {r.status_code}: {r.text[:300]}")
        d = r.json()
        return {"id": d["id"], "model": d["model"], "answer": d["choices"][0]["message"]["content"], "example": ex}

    def send(self, examples: list[dict], users: list[str]) -> list[dict]:
        """Every example at once (up to `workers` in flight), answers in order."""
        with ThreadPoolExecutor(self.workers) as pool:
            return list(pool.map(self.ask, examples, users))

    def feedback(self, response_id: str, score: float) -> None:
        r = self.http.post("/v1/feedback", json={"response_id": response_id, "score": score,
                                                 "comment": "scored against the gold answer by the demo"})
        if r.status_code != 200:
            raise TunelabError(f"feedback on {response_id}: {r.status_code} {r.text[:300]}")

    def close(self) -> None:
        self.http.close()


def train_v1(c: LoopDemoConfig, root: Path) -> dict:
    """orders@v1 under the demo's adapter root: the recipe of `make demo`'s orders-json LoRA (kept if there)."""
    from tunelab.ladder.climb import train_recipe
    from tunelab.tasks import load_task
    from tunelab.train import train

    folder = root / f"{ALIAS}@v1"
    if (folder / layout.ADAPTER_CONFIG).is_file() and layout.is_run_folder(folder):
        from tunelab.runs import record_training_run

        log.info(f"orders@v1: kept from an earlier run ({folder})")
        record_training_run(folder)  # into this run's registry, so v2's lineage reaches v1's data
        return {"folder": str(folder), "trained": False, "seconds": 0.0}
    t0 = time.time()
    log.info(f"orders@v1: training the orders-json LoRA ({c.v1_steps} steps, make demo's recipe) -> {folder}",
             extra={"style": "bold"})
    train(train_recipe(load_task(TASK), c.model, c.v1_steps, folder), show_progress=False)
    return {"folder": str(folder), "trained": True, "seconds": round(time.time() - t0, 1)}


def start_server(c: LoopDemoConfig, root: Path, log_path: Path, system_prompt: str) -> tuple[LocalServer, dict]:
    """The real server over `root` (aliases NAME@vN), the shop tenant logging content, and the system prompt the
    shop sends registered as the alias's (so log rows name its version)."""
    from tunelab.infer import load_engine
    from tunelab.ops.prompts import set_alias_prompt
    from tunelab.ops.requestlog import RequestLog
    from tunelab.server import Keys, ServeService, hash_key

    keys = c.out / "keys.yaml"
    keys.write_text(f"tenants:\n  {TENANT}: {{key_sha256: [{hash_key(KEY)}], adapters: [{ALIAS}], log: content}}\n",
                    encoding="utf-8")
    pv = set_alias_prompt(ALIAS, system_prompt)
    engine = load_engine(c.model, kind=c.engine)
    service = ServeService(engine, c.model, root, Keys.load(keys), default_max_tokens=c.max_tokens,
                           request_log=RequestLog.open(log_path))
    return LocalServer(service), {"keys": str(keys), "log": str(log_path), "prompt_version": pv.version}


def review_from_gold(log_path: Path, since: float, size: int, monitor_root: Path, gold: dict[str, str]) -> dict:
    """Answer the review queue (the shifted window) from the gold answers: accept an answer equal to the gold
    one (as JSON), correct any other with the gold one."""
    from tunelab.ops.monitor import last_user_text
    from tunelab.ops.requestlog import RequestLog
    from tunelab.ops.review import Review, build_queue, save_review

    store = RequestLog.open(log_path)
    try:
        queue = build_queue(store, ALIAS, since=since, size=size, random_share=0.0, monitor_root=monitor_root)
        counts = {"queued": len(queue), "accept": 0, "correct": 0, "no_gold": 0,
                  "reasons": sorted({r for it in queue for r in it.reasons})}
        for it in queue:
            ref = gold.get(last_user_text(it.row.prompt) or "")
            if ref is None:
                counts["no_gold"] += 1
                continue
            right = _same_json(it.row.answer, ref)
            review = Review("accept", rubric={"facts right": True, "required format": True}, reviewer=REVIEWER) \
                if right else Review("correct", correction=ref, reviewer=REVIEWER, rubric={
                    "facts right": False, "required format": _parses(it.row.answer)})
            save_review(store, it.row.response_id, review)
            counts[review.verdict] += 1
    finally:
        store.close()
    return counts


def _parses(text: str | None) -> bool:
    try:
        json.loads(text or "")
        return True
    except ValueError:
        return False


def _same_json(text: str | None, ref: str) -> bool:
    try:
        return json.loads(text or "") == json.loads(ref)
    except ValueError:
        return False


def monitor_windows(log_path: Path, folder: Path, windows: dict[str, tuple[float, float]], root: Path) -> dict:
    """run_monitor on each window ({name: (since, until)}) of orders@v1's traffic against what v1 was trained on;
    each report is written to root/<name>/, the last one also where the review queue reads it (root/orders)."""
    from dataclasses import asdict

    from tunelab.ops.monitor import reference_for_adapter, run_monitor
    from tunelab.ops.requestlog import RequestLog

    ref, store, out = reference_for_adapter(folder), RequestLog.open(log_path), {}
    try:
        for name, (since, until) in windows.items():
            rep = run_monitor(f"{ALIAS}@v1", store, ref, until - since, until=until)
            rep.write(root / name)
            rep.write(root / ALIAS, html=False)
            out[name] = {"alert": rep.alert, "alerts": rep.alerts, "rows": rep.rows, "report": str(root / name),
                         "signals": {s.name: {k: v for k, v in asdict(s).items() if k != "name"} for s in rep.signals}}
    finally:
        store.close()
    return out


def run_loop(c: LoopDemoConfig, root: Path, log_path: Path) -> dict:
    """tunelab.ops.loop on the reviewed rows: train v2, evaluate both, gate, register orders@v2, 10% canary."""
    from tunelab.ops.loop import GateFailed, Loop, LoopConfig, train_version_in_child

    cfg = LoopConfig(folder=root / f"{ALIAS}@v1", out=c.out / "loop", log=log_path, limit=c.golden,
                     probes=c.probes > 0, probe_limit=c.probes or None, repeat=c.repeat, canary=10.0,
                     train_overrides=[f"train.max_steps={c.v2_steps}", f"validation.every={c.v2_steps}"])
    log.info(f"the loop: orders@v2 from v1's data and the reviewed rows ({c.v2_steps} steps), then the gate "
             f"on {c.golden} golden examples and the held-out new-style rows", extra={"style": "bold"})
    try:
        report = Loop(cfg, trainer=train_version_in_child, evaluator=c.evaluator).run()  # v2 beside the server
    except GateFailed as e:
        return {"passed": False, "gate": e.result, "folder": str(cfg.out)}
    ev = report["evaluate"]
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
    numbers = {k: {"metric": ev[k]["metric"], "n": len(ev[k]["old"]), "v1": mean(ev[k]["old"]),
                   "v2": mean(ev[k]["new"]), "change": report["gate"][k]} for k in ("golden", "traffic")}
    return {"passed": True, "folder": str(cfg.out), "numbers": numbers, "probes": report["gate"]["probes"],
            "data": {k: report["data"][k] for k in ("reviewed_rows", "heldout_rows", "reviewed_train_rows",
                                                    "original_train_rows", "repeat")},
            "v2": report["register"]["folder"], "canary": report["canary"]["weights"],
            "seconds": {s: v.get("seconds") for s, v in _loop_steps(cfg.out).items()}}


def _loop_steps(folder: Path) -> dict:
    return layout.read_json(folder / "loop.json")["steps"]


def canary_traffic(c: LoopDemoConfig, client: Client, pool: list[dict], gold: dict[str, str]) -> dict:
    """Customers keep coming (each sticks to one version) until v2 served `canary_min` of them; each answer gets
    feedback scored against its gold answer (field F1), as a shop's own check would give it."""
    from tunelab.evaluate.metrics.structured import field_f1
    from tunelab.ops import rollout

    cur = rollout.get(ALIAS)
    users, to_canary = [], 0
    while to_canary < c.canary_min and len(users) < c.canary_max:
        users.append(f"customer-{len(users):04d}")
        to_canary += rollout.pick(ALIAS, rollout.sticky_key(None, users[-1]), cur.weights) != cur.stable
    examples = [pool[i % len(pool)] for i in range(len(users))]
    log.info(f"canary: {len(users)} requests from {len(users)} customers on {rollout.weights_text(cur.weights)}",
             extra={"rule": True})
    answers = client.send(examples, users)
    by_version: dict[str, list[float]] = {}
    for a in answers:
        score = field_f1(a["answer"], gold[a["example"]["message"]])
        client.feedback(a["id"], score)
        by_version.setdefault(a["model"], []).append(score)
    return {"requests": len(users), "feedback_f1": {v: sum(s) / len(s) for v, s in sorted(by_version.items())}}


def _interleave(a: list, b: list) -> list:
    out = [x for pair in zip(a, b) for x in pair]
    return out + a[len(b):] + b[len(a):]


def promote(log_path: Path, root: Path) -> dict:
    """The canary's verdict (rollout.status: the always-valid comparison with v1), then v2 promoted unless the
    verdict is rollback (a hold only says the test wants more traffic than the demo sends)."""
    from tunelab.ops import rollout

    status = rollout.status(ALIAS, log_url=log_path)
    if status["decision"] == "rollback":
        rollout.rollback(ALIAS, root=root, actor="demo")
        return {"status": status, "promoted": False, "history": rollout.history(ALIAS)}
    rollout.promote(ALIAS, "v2", root=root, actor="demo")
    return {"status": status, "promoted": True, "weights": rollout.get(ALIAS).weights,
            "history": [{k: e[k] for k in ("action", "weights", "actor")} for e in rollout.history(ALIAS)]}


def run_loop_demo(c: LoopDemoConfig | None = None) -> LoopDemoResult:
    """The whole loop (module docstring); returns every stage's numbers. Raises nothing for a failed gate: the
    result's steps["loop"]["passed"] is False and the demo stops there."""
    from tunelab.ops.requestlog import RequestLog
    from tunelab.runs import lineage
    from tunelab.tasks import load_task

    c = c or LoopDemoConfig()
    c.out.mkdir(parents=True, exist_ok=True)
    t0, res, root = time.time(), LoopDemoResult(c.out), c.out / "adapters"
    task, log_path = load_task(TASK), c.out / "requests.sqlite"
    normal, shifted = traffic_rows(task)
    if len(shifted) < c.shifted or len(normal) < c.baseline:
        raise TunelabError(f"orders-json's validation split gives {len(shifted)} new-style and {len(normal)} "
                           f"normal rows; the demo asks for {c.shifted} and {c.baseline}.")
    gold = {ex["message"]: task.reference(ex) for ex in normal + shifted}
    with private_registry(c.out) as reg:
        res.steps["registry"] = str(reg)
        res.steps["v1"] = train_v1(c, root)
        t = res.lap("v1", t0)
        server, res.steps["server"] = start_server(c, root, log_path, task.spec.system_prompt.strip())
        client = Client(server.url, task, c.max_tokens, c.workers)
        t = res.lap("server", t)
        try:
            log.info(f"traffic: {c.baseline} orders as customers write them, then {c.shifted} in the new "
                     "purchase-order style", extra={"rule": True})
            t_base = time.time()
            client.send(normal[:c.baseline], [f"early-{i}" for i in range(c.baseline)])
            t_shift = time.time()
            client.send(shifted[:c.shifted], [f"po-{i}" for i in range(c.shifted)])
            t_end = t = res.lap("traffic", t)
            store = RequestLog.open(log_path)
            rows = store.rows(since=t_base)
            store.close()
            res.steps["traffic"] = {"baseline": c.baseline, "shifted": c.shifted, "example": shifted[0]["message"],
                                    "prompt_versions": sorted({r.prompt_version or "-" for r in rows})}
            log.info("drift monitor on both windows", extra={"rule": True})
            res.steps["monitor"] = monitor_windows(log_path, root / f"{ALIAS}@v1", {
                "before the shift": (t_base, t_shift), "after the shift": (t_shift, t_end)}, c.out / "monitor")
            t = res.lap("monitor", t)
            res.steps["review"] = review_from_gold(log_path, t_shift, c.shifted, c.out / "monitor", gold)
            t = res.lap("review", t)
            res.steps["loop"] = run_loop(c, root, log_path)
            t = res.lap("loop", t)
            if res.steps["loop"]["passed"]:
                sent = {ex["id"] for ex in normal[:c.baseline] + shifted[:c.shifted]}
                fresh = _interleave(shifted[c.shifted:], [ex for ex in normal if ex["id"] not in sent])  # new orders
                res.steps["canary"] = canary_traffic(c, client, fresh, gold)
                t = res.lap("canary", t)
                res.steps["rollout"] = promote(log_path, root)
                res.steps["lineage"] = lineage(str(root / f"{ALIAS}@v2"))
        finally:
            client.close()
            server.stop()
    res.seconds = round(time.time() - t0, 1)
    layout.write_json(c.out / "demo-loop.json", {"seconds": res.seconds, "stage_seconds": res.stage_seconds,
                                                 "steps": res.steps})
    return res
