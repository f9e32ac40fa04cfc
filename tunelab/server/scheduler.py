"""One thread owns the engine: it admits requests, steps the batch and hands text to the waiting handlers.

The engine is not thread-safe, and the server's handlers run on an asyncio loop, so every engine call
(add_request, step, abort, add/remove adapter) happens on this thread; handlers get events through an asyncio
queue.
That thread is best the one that loaded the model (`Scheduler(thread=False)` + `run()`, as `serve_http`
does): torch's OpenMP pool belongs to the thread that first ran a parallel op, a second thread running ops
gets a second pool, and libgomp, counting more threads than cores, then stops spinning between parallel
regions: decode steps ran 1.4-1.7x slower on a thread of their own (2 cores).
Every engine speaks the same step protocol (tunelab.infer.Engine): the batched one shares each decoding step
between all requests in flight, the generate-based one runs one `generate` batch per step.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from tunelab.errors import TunelabError
from tunelab.infer import Completion, Request


@dataclass
class Handle:
    """A request in flight: events ("delta", str), ("done", Completion) or ("error", Exception) arrive on
    `events`, put there from the engine thread."""

    request: Request
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False  # its client went away: the engine thread drops it before the next step
    on_end: Callable[[], None] | None = None  # called once, on the engine thread, when it leaves the engine

    def put(self, kind: str, value) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))

    def end(self) -> None:
        fn, self.on_end = self.on_end, None
        if fn is not None:
            fn()


class Overloaded(TunelabError):
    """More requests waiting than the server accepts (HTTP 429)."""


class Scheduler:
    def __init__(self, engine, max_waiting: int = 256, thread: bool = True):
        """thread: run the engine loop on a thread of its own, started now; False: the caller runs `run()`."""
        self.engine, self.max_waiting = engine, max_waiting
        self._inbox: queue.Queue = queue.Queue()
        self._rows: dict[object, Handle] = {}  # the engine's handle -> ours
        self._stop = threading.Event()
        self.waiting = 0  # submitted, not yet admitted by the engine thread
        self.dropped = 0  # requests dropped because their client went away (before or while decoding)
        self._running = False
        self._thread = None
        if thread:
            self._thread = threading.Thread(target=self.run, name="tunelab-engine", daemon=True)
            self._thread.start()

    # called from handlers ------------------------------------------------------------------------------
    def submit(self, request: Request, loop: asyncio.AbstractEventLoop,
               on_end: Callable[[], None] | None = None) -> Handle:
        """Queue `request`; `on_end` runs on the engine thread once it is done, failed or dropped (not when this
        raises)."""
        if self.waiting + len(self._rows) >= self.max_waiting:
            raise Overloaded(f"{self.waiting + len(self._rows)} requests in flight; the limit is {self.max_waiting}")
        h = Handle(request, loop, on_end=on_end)
        self.waiting += 1
        self._inbox.put(("request", h))
        return h

    def call(self, fn: Callable[[], object]) -> object:
        """Run `fn` on the engine thread between steps and return its result (blocking; for admin calls).
        Before a `thread=False` scheduler's loop runs, no step can overlap, so `fn` runs here (pinned adapters)."""
        if self._thread is None and not self._running:
            return fn()
        done: queue.Queue = queue.Queue(maxsize=1)
        self._inbox.put(("call", (fn, done)))
        ok, value = done.get()
        if not ok:
            raise value
        return value

    def cancel(self, handle: Handle) -> None:
        """The client of `handle` went away (closed its stream): stop decoding for it. Without this, a client
        that disconnects keeps its row decoding to max_tokens and taking a share of every step."""
        handle.cancelled = True
        self._inbox.put(("cancel", handle))  # wakes an idle engine thread; the drop happens in _step

    def depth(self) -> int:
        return self.waiting + len(self._rows)

    def close(self) -> None:
        self._stop.set()
        self._inbox.put(("stop", None))
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)

    # the engine thread ----------------------------------------------------------------------------------
    def run(self) -> None:
        """The engine loop, on the calling thread, until `close()`."""
        self._running = True
        try:
            self._loop()
        finally:
            self._running = False

    def _loop(self) -> None:
        while not self._stop.is_set():
            busy = bool(self._rows)
            try:
                items = [self._inbox.get(block=not busy, timeout=None if not busy else 0)]
            except queue.Empty:
                items = []
            while True:
                try:
                    items.append(self._inbox.get_nowait())
                except queue.Empty:
                    break
            for kind, value in items:  # nothing here raises: a caller blocked in `call` always gets its answer
                if kind == "call":
                    fn, done = value
                    try:
                        done.put((True, fn()))
                    except Exception as e:  # handed back to the caller
                        done.put((False, e))
                elif kind == "request":
                    self.waiting -= 1
                    self._take(value)  # into the engine before a call queued after it (an eviction) runs
            try:
                self._step()
            except Exception as e:  # a failing step fails the requests in it, never the server
                self._fail_all(e)

    def _take(self, h: Handle) -> None:
        if h.cancelled:
            self.dropped += 1
            h.end()
            return
        try:
            self._rows[self.engine.add_request(h.request)] = h
        except Exception as e:  # noqa: BLE001 - this request fails (its handler answers 400 or 500), no other
            h.put("error", e)
            h.end()

    def _step(self) -> None:
        eng = self.engine
        for row, h in list(self._rows.items()):
            if h.cancelled:
                eng.abort(row)
                del self._rows[row]
                self.dropped += 1
                h.end()
        if not self._rows:
            return
        eng.step()
        for row in list(self._rows):
            h = self._rows[row]
            delta = row.new_text()
            if delta:
                h.put("delta", delta)
            if row.finished:
                h.put("done", row.completion())
                del self._rows[row]
                h.end()

    def _fail_all(self, e: Exception) -> None:
        for row, h in self._rows.items():
            try:
                self.engine.abort(row)  # nothing of it is left in the engine
            except Exception:  # noqa: BLE001, S110 - the engine is already failing; the request fails either way
                pass
            h.put("error", e)
            h.end()
        self._rows.clear()


def collect(events: list[tuple[str, object]]) -> Completion:
    """The Completion among a finished handle's events (raises the error event)."""
    for kind, value in events:
        if kind == "error":
            raise value
        if kind == "done":
            return value
    raise TunelabError("the request ended without a result")
