"""Which adapters are resident on an engine: one manager for the LRU, pins, use counts and the cold-load queue.

The engine keeps each resident adapter's weights in a slot of its stacked LoRA weights
(tunelab.infer.lora.AdapterSlots); this manager decides which adapters those are, at most `capacity`, and
which slot each takes (the loader is told), like vLLM's LRUCacheLoRAModelManager. Who may use which adapter (tenancy) is the server's business.

A request takes its adapter with `try_acquire` (never blocks) or, when the adapter is cold,
`acquire_queued` (async: waits in arrival order for a slot, loads on a worker thread so the event loop
stays free), and gives it back with `release` once it has left the engine. An adapter some request holds
(`using`) or that is pinned is never evicted; the least recently used idle one is. Loading stalled the
event loop, and evicting asked the engine adapter by adapter, before these rules.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from pathlib import Path

from tunelab.errors import TunelabError
from tunelab.runs.adapter_folder import AdapterFolder, AdapterRoot, read_adapter_folder

Loader = Callable[[str, AdapterFolder, int], None]  # load adapter `name` from its folder into engine slot i
Unloader = Callable[[str], None]  # remove adapter `name` from the engine (TunelabError: rows still use it)


class AdapterBusy(TunelabError):
    """No resident slot can be had now (all pinned or in use), or too many requests wait for one (HTTP 429)."""


class AdapterManager:
    """Adapters under `root` resident on an engine: loaded on demand through `load`, at most `capacity` at once,
    the least recently used idle one evicted through `unload`; `pinned` ones stay.

    Thread-safe: `acquire` blocks its caller until `load` returns (the server's loader waits for the engine
    thread, ~50-500 ms), so async code calls `acquire_queued`. `_state` guards `resident`, `using` and `pinned`
    and is never held across a load; `_loading` makes loads and evictions one at a time."""

    def __init__(self, root: AdapterRoot | str | Path | None, load: Loader, unload: Unloader, capacity: int = 8,
                 max_waiting: int = 256, wait_s: float = 30.0):
        """max_waiting: requests that may wait for a slot before more get AdapterBusy. wait_s: a waiter gives
        up once no waiter got a slot for this long (the slots are pinned, or held by requests that do not end)."""
        self.root = root if isinstance(root, AdapterRoot) or root is None else AdapterRoot(root)
        self._load, self._unload = load, unload
        self.capacity, self.max_waiting, self.wait_s = capacity, max_waiting, wait_s
        self.pinned: set[str] = set()
        self.resident: OrderedDict[str, Path] = OrderedDict()  # least recently used first
        self.slots: dict[str, int] = {}  # resident adapter -> its slot in the engine's stacked weights (< capacity)
        self.using: Counter[str] = Counter()  # requests between acquire and release: never evicted
        self.loads = self.evictions = 0
        self.waiting = 0  # requests in acquire_queued
        self._state, self._loading = threading.Lock(), threading.Lock()
        self._freed: tuple[asyncio.AbstractEventLoop, asyncio.Lock, asyncio.Event] | None = None
        self._moved = 0.0  # when a waiter last got its slot

    # what there is --------------------------------------------------------------------------------------
    def available(self) -> list[str]:
        """Adapters that may be loaded (the root's scan), sorted."""
        return sorted(self.root.names()) if self.root is not None else []

    def folder(self, name: str, rel: str | None = None) -> AdapterFolder:
        """Adapter `name`'s folder (or `rel` under the root), read; KeyError when there is none."""
        if self.root is None:
            raise KeyError(name)
        folder = read_adapter_folder(self.root.folder(name, rel))
        folder.safetensors()  # pickled weights are never loaded
        return folder

    # taking and giving back -----------------------------------------------------------------------------
    def try_acquire(self, name: str) -> bool:
        """If `name` is resident, count one more request using it (never blocks); `release` it after."""
        with self._state:
            if name not in self.resident:
                return False
            self.resident.move_to_end(name)
            self.using[name] += 1
            return True

    def acquire(self, name: str, rel: str | None = None) -> None:
        """`try_acquire`, loading `name` first when it is not resident (evicting the least recently used idle
        unpinned adapter when full; AdapterBusy when there is none). Blocks until loaded."""
        if self.try_acquire(name):
            return
        with self._loading:
            if self.try_acquire(name):  # loaded while this call waited for the one before it
                return
            folder = self.folder(name, rel)
            while len(self.resident) >= self.capacity:
                self._evict()
            slot = min(set(range(self.capacity)) - set(self.slots.values()))
            self._load(name, folder, slot)
            with self._state:
                self.resident[name] = folder.path
                self.slots[name] = slot
                self.using[name] += 1
                self.loads += 1

    async def acquire_queued(self, name: str) -> None:
        """`acquire` from async code: a resident adapter at once; a cold one loads on a worker thread once a
        slot frees, waiters served in arrival order and woken by `release`. A waiter gives up (AdapterBusy) only
        when no waiter got a slot for `wait_s`; a fixed wait per request failed a steady load over more adapters
        than slots (64 clients, 64 adapters, 16 resident: 11 of 384 requests), though the queue moved."""
        if self.try_acquire(name):
            return
        loop = asyncio.get_running_loop()
        if self._freed is None or self._freed[0] is not loop:  # asyncio primitives belong to one loop
            self._freed = (loop, asyncio.Lock(), asyncio.Event())
        _, fifo, freed = self._freed
        if self.waiting >= self.max_waiting:
            raise AdapterBusy(f"{self.waiting} requests wait for a resident adapter slot; retry later")
        start = time.monotonic()
        self.waiting += 1
        try:
            async with fifo:  # asyncio.Lock is FIFO: the longest waiting request gets the next free slot
                while True:
                    freed.clear()
                    try:
                        await asyncio.to_thread(self.acquire, name)
                        self._moved = time.monotonic()
                        return
                    except AdapterBusy:
                        left = max(start, self._moved) + self.wait_s - time.monotonic()
                        if left <= 0:
                            raise
                    try:  # woken by a release; at least every 0.5 s
                        await asyncio.wait_for(freed.wait(), min(left, 0.5))
                    except (TimeoutError, asyncio.TimeoutError):  # two classes before Python 3.11
                        pass
        finally:
            self.waiting -= 1

    def release(self, name: str | None) -> None:
        """One request fewer uses `name` (any thread); at none it may be evicted and a waiter is woken."""
        if name is None:
            return
        with self._state:
            self.using[name] -= 1
            if self.using[name] > 0:
                return
            del self.using[name]
        self._wake()

    def _wake(self) -> None:
        """Wake the waiters from any thread (the engine thread releases); nothing once their loop has closed."""
        if self._freed is None:
            return
        loop, _, freed = self._freed
        try:
            loop.call_soon_threadsafe(freed.set)
        except RuntimeError:
            pass

    # pins and unloads -----------------------------------------------------------------------------------
    def pin(self, name: str, rel: str | None = None) -> None:
        """Make `name` resident and keep it so until `unpin` or `unload` (pinned at start, admin loads)."""
        self.acquire(name, rel)
        with self._state:
            self.pinned.add(name)
        self.release(name)

    def unpin(self, name: str) -> None:
        """`name` stays resident but may be evicted again."""
        with self._state:
            self.pinned.discard(name)
        self._wake()

    def unload(self, name: str) -> None:
        """Remove `name` now (KeyError when not resident, TunelabError while requests use it)."""
        with self._loading:
            with self._state:
                if name not in self.resident:
                    raise KeyError(name)
                if name in self.using:
                    raise TunelabError(f"adapter {name!r} is in use by requests in flight; unload it when they "
                                       "finish.")
            self._unload(name)
            with self._state:
                del self.resident[name]
                del self.slots[name]
                self.pinned.discard(name)
        self._wake()

    def _evict(self) -> None:
        """Unload the least recently used idle unpinned adapter (under `_loading`). A victim leaves `resident`
        before the unload, so no new request picks it meanwhile; if the engine still has rows on it (a caller
        that held no count), it goes back and the next is tried."""
        tried = set()
        while True:
            with self._state:
                victim = next((v for v in self.resident if v not in self.pinned and v not in self.using
                               and v not in tried), None)
                if victim is None:
                    raise AdapterBusy(f"all {len(self.resident)} resident adapters are pinned or in use; retry "
                                      "shortly")
                path = self.resident.pop(victim)
            try:
                self._unload(victim)
            except TunelabError:  # requests in flight use it
                with self._state:
                    self.resident[victim] = path
                    self.resident.move_to_end(victim, last=False)  # still the least recently used
                tried.add(victim)
                continue
            with self._state:
                del self.slots[victim]
            self.evictions += 1
            return
