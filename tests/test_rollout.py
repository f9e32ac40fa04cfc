"""Canary rollouts through the official `openai` SDK against a server on loopback (a FakeEngine that answers with
the adapter it ran): versions NAME@vN behind one model name, weights in the registry set from the CLI while the
server runs, one version per caller, promote and rollback without dropping a request, lineage in the registry,
and `tunelab rollout status` reading the request log."""

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx2 as httpx
import pytest

openai = pytest.importorskip("openai")

from conftest import Server  # noqa: E402
from scipy.stats import binom  # noqa: E402

from tunelab.errors import TunelabError  # noqa: E402
from tunelab.infer.testing import FakeEngine  # noqa: E402
from tunelab.ops import rollout  # noqa: E402
from tunelab.server import Keys, ServeService, hash_key  # noqa: E402

ADMIN, OTHER = "sk-admin", "sk-other"
SHOP = [f"sk-shop-{i:04d}" for i in range(1000)]
MSGS = [{"role": "user", "content": "Where is order 7?"}]


@pytest.fixture()
def world(tmp_path, monkeypatch):
    """An adapter root with orders@v1, orders@v2 and billing; a keys file: `shop` (1,000 keys) may use
    `orders`, `other` only billing; a registry of its own."""
    monkeypatch.setenv("TUNELAB_REGISTRY", str(tmp_path / "registry.sqlite"))
    for name in ("orders@v1", "orders@v2", "billing"):
        folder = tmp_path / "adapters" / name
        folder.mkdir(parents=True)
        (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
        (folder / "adapter_model.safetensors").write_bytes(name.encode())  # the fake engine never reads it
    (tmp_path / "keys.yaml").write_text(f"""tenants:
  shop: {{key_sha256: [{', '.join(hash_key(k) for k in SHOP)}], adapters: [orders]}}
  other: {{key_sha256: [{hash_key(OTHER)}], adapters: [billing]}}
  ops: {{key_sha256: [{hash_key(ADMIN)}], admin: true}}
""")
    return tmp_path


def _server(world, tokenizer, **kw) -> Server:
    engine = FakeEngine(lambda q: q.adapter or "base", tokenizer=tokenizer)
    return Server(ServeService(engine, "tiny", world / "adapters", Keys.load(world / "keys.yaml"),
                               default_max_tokens=4, **kw))


def _sdk(srv, key: str):
    """The official SDK with `key` (one client per server, its connections reused; each call sends its key)."""
    if not hasattr(srv, "sdk"):
        srv.sdk = srv.client("none")
    return srv.sdk.with_options(api_key=key)


def _ask(srv, key: str, model: str = "orders", **kw) -> str:
    """The version that answered `key`'s request for `model`."""
    r = _sdk(srv, key).chat.completions.create(model=model, messages=MSGS, **kw)
    assert r.choices[0].message.content == r.model  # the version named in `model` is the one that answered
    return r.model


def test_weights_parse_and_the_sticky_pick_only_moves_callers_onto_the_later_version():
    assert rollout.parse_weights(["v1=9", "v2=1"]) == {"v1": 90.0, "v2": 10.0}
    for bad, says in ((["v1"], "VERSION=WEIGHT"), (["one=1"], "v1, v2"), (["v1=-1"], ">= 0"), (["v1=0"], "above 0")):
        with pytest.raises(TunelabError, match=says):
            rollout.parse_weights(bad)
    callers = [f"key:{i}" for i in range(2000)]
    before = {c: rollout.pick("orders", c, {"v1": 90, "v2": 10}) for c in callers}
    after = {c: rollout.pick("orders", c, {"v1": 50, "v2": 50}) for c in callers}
    assert all(after[c] == "v2" for c in callers if before[c] == "v2")  # a ramp never moves anyone back
    assert rollout.split_version("orders@v2") == ("orders", "v2") and rollout.split_version("a@b") == ("a@b", None)


def test_a_90_10_split_over_1000_keys_is_binomial_and_each_key_keeps_its_version(world, tokenizer, tunelab):
    code, out, _ = tunelab("rollout", "set", "orders", "v1=90", "v2=10", "--adapters", world / "adapters")
    assert code == 0 and "v1=90 v2=10" in out
    srv = _server(world, tokenizer)
    try:
        with ThreadPoolExecutor(8) as pool:
            first = dict(zip(SHOP, pool.map(lambda k: _ask(srv, k), SHOP)))
            again = dict(zip(SHOP[:300], pool.map(lambda k: _ask(srv, k), SHOP[:300])))
        n2 = sum(v == "orders@v2" for v in first.values())
        lo, hi = binom.ppf(0.0005, 1000, 0.1), binom.ppf(0.9995, 1000, 0.1)  # a 99.9% binomial interval
        assert lo <= n2 <= hi and n2 + sum(v == "orders@v1" for v in first.values()) == 1000, n2
        assert all(again[k] == first[k] for k in again)
        # the `user` field, when given, is the caller: one user on many keys sees one version
        assert len({_ask(srv, k, user="alice@example.com") for k in SHOP[:40]}) == 1
        # a ramp from the CLI reaches the running server; the canary's callers stay on it
        assert tunelab("rollout", "set", "orders", "v1=50", "v2=50")[0] == 0
        time.sleep(srv.service.models.router.ttl_s + 0.1)
        moved = {k: _ask(srv, k) for k in SHOP[:200]}
        assert all(moved[k] == "orders@v2" for k in moved if first[k] == "orders@v2")
        assert sum(v == "orders@v2" for v in moved.values()) > sum(first[k] == "orders@v2" for k in moved)
        # tenancy: `orders` in keys.yaml allows its versions; another tenant sees neither
        assert _ask(srv, SHOP[0], "orders@v2") == "orders@v2"
        for key, model in ((OTHER, "orders"), (OTHER, "orders@v1"), (SHOP[0], "billing")):
            with pytest.raises(openai.NotFoundError):
                _ask(srv, key, model)
        listed = {m.id: m for m in srv.client(SHOP[0]).models.list().data}
        assert {"orders", "orders@v1", "orders@v2"} <= set(listed) and "billing" not in listed
        assert listed["orders"].model_extra["versions"] == ["orders@v1", "orders@v2"]
    finally:
        srv.stop()


def test_promote_under_concurrent_traffic_drops_no_request_and_rollback_through_the_admin_api(world, tokenizer):
    rollout.set_weights("orders", ["v1=90", "v2=10"], root=world / "adapters")
    srv = _server(world, tokenizer)
    stop, results, errors = threading.Event(), [], []

    def client(i: int) -> None:
        n = 0
        while not stop.is_set():
            sent = time.time()
            try:
                results.append((sent, _ask(srv, SHOP[(i * 97 + n) % 1000])))
            except Exception as e:  # noqa: BLE001 - every failure is counted
                errors.append(repr(e))
            n += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    try:
        for t in threads:
            t.start()
        time.sleep(1.5)
        promoted = time.time()
        r = rollout.promote("orders", "v2")  # the CLI's call, from another "process" than the server's
        assert r.weights == {"v2": 100.0} and r.stable == "v2"
        time.sleep(2.0)
        stop.set()
        for t in threads:
            t.join(timeout=60)
        late = [m for sent, m in results if sent > promoted + srv.service.models.router.ttl_s + 0.2]
        early = [m for sent, m in results if sent < promoted]
        assert not errors, errors[:3]
        assert len(late) >= 20 and set(late) == {"orders@v2"}, (len(late), set(late))
        assert "orders@v1" in early
        # the admin API: an admin rolls back (this server routes by it at once); others may not
        denied = httpx.post(srv.url + "/admin/rollouts/orders", json={"action": "rollback"},
                            headers={"Authorization": f"Bearer {SHOP[0]}"})
        assert denied.status_code == 403 and "admin key" in denied.json()["error"]["message"]
        res = httpx.post(srv.url + "/admin/rollouts/orders", json={"action": "rollback", "version": "v1"},
                         headers={"Authorization": f"Bearer {ADMIN}"})
        assert res.status_code == 200 and res.json()["weights"] == {"v1": 100.0}, res.text
        assert _ask(srv, SHOP[5]) == "orders@v1"
        bad = httpx.post(srv.url + "/admin/rollouts/orders", json={"weights": {"v9": 100}},
                         headers={"Authorization": f"Bearer {ADMIN}"})
        assert bad.status_code == 400 and "orders@v9" in bad.json()["error"]["message"]
        state = httpx.get(srv.url + "/admin/rollouts/orders", headers={"Authorization": f"Bearer {ADMIN}"}).json()
        assert [e["action"] for e in state["history"]] == ["set", "promote", "rollback"]
        assert state["history"][-1]["actor"] == "admin:ops" and state["versions"] == ["v1", "v2"]
    finally:
        stop.set()
        srv.stop()


def test_promote_and_rollback_are_one_transaction_with_lineage(world, tunelab):
    from tunelab.runs import layout
    from tunelab.runs.registry import connect, upsert, write_txn

    root = world / "adapters"
    sha = layout.file_sha256(root / "orders@v2" / "adapter_model.safetensors")
    conn = connect()
    with write_txn(conn):  # orders@v2 is a copy of a trained adapter the registry knows by its weights
        trained = upsert(conn, "adapter", "/runs/orders-lora", name="orders-lora", path="/runs/orders-lora", hash=sha)
    conn.close()
    rollout.set_weights("orders", {"v1": 90, "v2": 10}, root=root)
    code, out, _ = tunelab("rollout", "promote", "orders", "v2")  # the root is remembered from `set`
    assert code == 0 and "promoted v2" in out

    def counts():
        c = connect()
        try:
            return [c.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in ("rollout_events", "artifacts",
                                                                                  "edges")]
        finally:
            c.close()

    before = counts()
    code, _, err = tunelab("rollout", "promote", "orders", "v3")
    assert code == 2 and "no adapter folder orders@v3" in err
    assert counts() == before and rollout.get("orders").weights == {"v2": 100.0}  # nothing half-written

    code, out, _ = tunelab("runs", "lineage", "orders", "--json")
    tree = json.loads(out)
    now = tree["parents"][0]
    assert tree["kind"] == "rollout" and now["role"] == "now" and "promote v2=100" in now["name"]
    roles = {p["role"]: p for p in now["parents"]}
    assert roles["serves 100%"]["id"] == trained  # the served copy is the trained adapter, by its weights
    earlier = {p["role"]: p for p in roles["previous"]["parents"]}
    assert "set v1=90 v2=10" in roles["previous"]["name"]
    assert earlier["serves 90%"]["path"] == str((root / "orders@v1").resolve())
    code, out, _ = tunelab("rollout", "history", "orders", "--json")
    assert [(e["action"], e["weights"]) for e in json.loads(out)] == [
        ("set", {"v1": 90.0, "v2": 10.0}), ("promote", {"v2": 100.0})]
    code, _, err = tunelab("rollout", "rollback", "never-set")
    assert code == 2 and "no stable version" in err


def test_status_reads_the_request_log_and_says_rollback(world, tokenizer, tunelab):
    """The server logs each request with its version (tunelab.ops.requestlog); v2 runs past max_tokens on
    every answer, so status finds it worse on finish reasons and says roll back (exit 1)."""
    from tunelab.ops.requestlog import RequestLog

    rollout.set_weights("orders", ["v1=70", "v2=30"], root=world / "adapters")
    log_path = world / "requests.sqlite"
    engine = FakeEngine(lambda q: "fine" if q.adapter == "orders@v1" else "a long answer that never ends",
                        tokenizer=tokenizer)
    srv = Server(ServeService(engine, "tiny", world / "adapters", Keys.load(world / "keys.yaml"),
                              default_max_tokens=4, request_log=RequestLog.open(log_path)))
    try:
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda k: _sdk(srv, k).chat.completions.create(model="orders", messages=MSGS), SHOP[:300]))
    finally:
        srv.stop()
    code, out, _ = tunelab("rollout", "status", "orders", "--log", log_path, "--json")
    s = json.loads(out)
    assert code == 1 and s["decision"] == "rollback" and s["version"] == "v2", s["reasons"]
    assert sum(s["requests"].values()) == 300 and s["requests"]["v2"] > 40
    length = {r["signal"]: r for r in s["comparisons"]["v2"]}["length"]
    assert length["canary"] == 1.0 and length["base"] == 0.0 and length["verdict"] == "worse"
    code, out, _ = tunelab("rollout", "status", "orders", "--log", log_path)
    assert code == 1 and "decision: rollback v2" in out and "worse on length" in out
