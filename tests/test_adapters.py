"""The adapter manager's contract, with a fake loader (no engine, no model): LRU eviction order, pinned and in-use
adapters never evicted, cold-load waiters served in arrival order and woken by a release, a stuck queue given up."""

import asyncio
import time

import pytest

from tunelab.errors import TunelabError
from tunelab.infer.adapters import AdapterBusy, AdapterManager

NAMES = ["a", "b", "c", "d"]


@pytest.fixture
def root(tmp_path):
    for n in NAMES:
        (tmp_path / n).mkdir()
        (tmp_path / n / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4}')
        (tmp_path / n / "adapter_model.safetensors").write_bytes(b"")
    return tmp_path


class FakeLoader:
    """Records loads and unloads; `busy` names adapters the 'engine' still has rows on (it refuses to unload)."""

    def __init__(self):
        self.log, self.busy, self.slots = [], set(), {}

    def load(self, name, folder, slot):
        assert slot not in self.slots.values(), f"slot {slot} is taken"
        self.log.append(("load", name))
        self.slots[name] = slot

    def unload(self, name):
        if name in self.busy:
            raise TunelabError(f"adapter {name!r} is in use by requests in flight")
        self.log.append(("unload", name))
        del self.slots[name]

    def manager(self, root, **kw) -> AdapterManager:
        return AdapterManager(root, self.load, self.unload, **kw)


def use(m: AdapterManager, name: str) -> None:
    """One request on `name`, start to end."""
    m.acquire(name)
    m.release(name)


def test_the_least_recently_used_idle_adapter_is_evicted_first(root):
    f = FakeLoader()
    m = f.manager(root, capacity=2)
    use(m, "a")
    use(m, "b")
    assert m.try_acquire("a")  # a is now the most recently used
    m.release("a")
    use(m, "c")
    assert list(m.resident) == ["a", "c"] and f.log[-2:] == [("unload", "b"), ("load", "c")]
    use(m, "d")
    assert list(m.resident) == ["c", "d"] and [x for x in f.log if x[0] == "unload"] == [("unload", "b"),
                                                                                        ("unload", "a")]
    assert m.loads == 4 and m.evictions == 2


def test_a_pinned_adapter_is_never_evicted(root):
    f = FakeLoader()
    m = f.manager(root, capacity=2)
    m.pin("a")
    for name in ("b", "c", "d", "b"):  # a is the least recently used throughout
        use(m, name)
        assert "a" in m.resident and len(m.resident) == 2
    m.acquire("b")  # held: now every slot is pinned or in use
    with pytest.raises(AdapterBusy, match="pinned or in use"):
        m.acquire("c")
    m.unpin("a")
    m.acquire("c")
    assert list(m.resident) == ["b", "c"]


def test_an_adapter_in_use_is_never_evicted(root):
    f = FakeLoader()
    m = f.manager(root, capacity=1)
    m.acquire("a")
    m.acquire("a")  # two requests on it
    with pytest.raises(AdapterBusy, match="in use"):
        m.acquire("b")
    m.release("a")
    with pytest.raises(AdapterBusy):  # one request still holds it
        m.acquire("b")
    m.release("a")
    m.acquire("b")
    assert list(m.resident) == ["b"] and dict(m.using) == {"b": 1}
    with pytest.raises(TunelabError, match="in use"):
        m.unload("b")


def test_an_engine_that_still_runs_an_adapter_keeps_it_and_the_next_is_evicted(root):
    f = FakeLoader()
    m = f.manager(root, capacity=2)
    use(m, "a")
    use(m, "b")
    f.busy.add("a")  # rows the manager was not told about
    use(m, "c")
    assert list(m.resident) == ["a", "c"] and ("unload", "b") in f.log


def test_unknown_names_and_paths_outside_the_root(root, tmp_path_factory):
    m = FakeLoader().manager(root)
    for bad in ("nope", "../a", "a/../../x", ""):
        with pytest.raises(KeyError):
            m.acquire(bad)
    with pytest.raises(TunelabError, match="outside the adapters folder"):
        m.acquire("x", "../../etc")
    (root / "pickled").mkdir()
    (root / "pickled" / "adapter_config.json").write_text("{}")
    (root / "pickled" / "adapter_model.bin").write_bytes(b"")
    with pytest.raises(TunelabError, match="pickled weights are never loaded"):
        m.acquire("pickled")
    assert m.available() == NAMES and not m.resident


def test_cold_waiters_get_slots_in_arrival_order_woken_by_a_release(root):
    """Three requests wait for the one slot; each gets it right after the request before it ends (a release
    wakes the next at once, not at the next 0.5 s poll), in the order they came."""
    f = FakeLoader()
    m = f.manager(root, capacity=1, wait_s=5)
    got = []

    async def request(name, hold_s):
        await m.acquire_queued(name)
        got.append((name, time.monotonic()))
        await asyncio.sleep(hold_s)
        m.release(name)

    async def main():
        await m.acquire_queued("a")  # held until released below
        waiters = []
        for name in ("b", "c", "d"):
            waiters.append(asyncio.create_task(request(name, 0.05)))
            await asyncio.sleep(0.02)
        assert m.waiting == 3 and not got
        released = time.monotonic()
        await asyncio.to_thread(m.release, "a")  # from another thread, as the engine thread releases
        await asyncio.gather(*waiters)
        return released

    released = asyncio.run(main())
    assert [n for n, _ in got] == ["b", "c", "d"]
    assert got[0][1] - released < 0.3 and got[2][1] - released < 0.6
    assert [n for kind, n in f.log if kind == "load"] == ["a", "b", "c", "d"] and m.waiting == 0


def test_a_stuck_queue_gives_up_after_wait_s_and_a_full_one_at_once(root):
    m = FakeLoader().manager(root, capacity=1, wait_s=0.4, max_waiting=1)

    async def main():
        await m.acquire_queued("a")  # never released: the queue is stuck
        first = asyncio.create_task(m.acquire_queued("b"))
        await asyncio.sleep(0.05)
        with pytest.raises(AdapterBusy, match="1 requests wait"):  # max_waiting reached: no wait at all
            await m.acquire_queued("c")
        t = time.monotonic()
        with pytest.raises(AdapterBusy, match="pinned or in use"):
            await asyncio.wait_for(first, 5)  # a waiter that never gave up would fail here
        return time.monotonic() - t

    waited = asyncio.run(main())
    assert 0.25 <= waited < 2 and m.waiting == 0 and list(m.resident) == ["a"]


def test_a_request_arriving_as_a_slot_frees_does_not_jump_the_queue(root):
    f = FakeLoader()
    m = f.manager(root, capacity=1, wait_s=5)
    got = []

    async def request(name):
        await m.acquire_queued(name)
        got.append(name)
        await asyncio.sleep(0.02)
        m.release(name)

    async def main():
        await m.acquire_queued("a")
        waiter = asyncio.create_task(request("b"))
        await asyncio.sleep(0.05)
        m.release("a")  # the slot frees, and at that moment another request arrives
        late = asyncio.create_task(request("c"))
        await asyncio.gather(waiter, late)

    asyncio.run(main())
    assert got == ["b", "c"]


def test_each_resident_adapter_has_its_own_slot_and_a_freed_slot_is_reused(root):
    """The manager says which slot of the engine's stacked weights a load takes: within capacity, never one in
    use, the freed one after an eviction or an unload (the engine then writes that slot only)."""
    f = FakeLoader()
    m = f.manager(root, capacity=2)
    use(m, "a")
    use(m, "b")
    assert m.slots == f.slots == {"a": 0, "b": 1}
    use(m, "c")  # evicts a: c takes slot 0
    assert m.slots == f.slots == {"b": 1, "c": 0}
    m.unload("b")
    use(m, "d")
    assert m.slots == f.slots == {"c": 0, "d": 1}


def test_the_batched_engine_loads_into_the_slot_it_is_given(tmp_path, tiny_llama):
    from peft import LoraConfig, get_peft_model

    from tunelab.infer.engine import BatchEngine
    from tunelab.models import tiny_model

    model, tok = tiny_llama
    for name in ("x", "y"):
        get_peft_model(tiny_model("llama", tokenizer=tok)[0], LoraConfig(r=2, target_modules=["q_proj"])
                       ).save_pretrained(tmp_path / name)
    engine = BatchEngine(model, tok)
    engine.add_adapter("x", str(tmp_path / "x"), slot=2)
    engine.add_adapter("y", str(tmp_path / "y"))  # no slot given: the lowest free one
    assert [a.name if a else None for a in engine.lora.adapters] == ["y", None, "x"]
    with pytest.raises(TunelabError, match="slot 2 holds adapter 'x'"):
        engine.add_adapter("z", str(tmp_path / "y"), slot=2)
