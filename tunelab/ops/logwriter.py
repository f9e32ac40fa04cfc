"""The request log's writer: rows wait in a bounded queue and a thread of its own writes them in batches (one
transaction each), so logging never runs on the engine thread nor fails a request.

`submit(row)` never blocks: it returns a Future that turns True once the row is committed, False once it is
dropped (the queue is full, or the store failed the batch); `on_drop(n)` counts the drops. A caller that must
not answer before its row is durable awaits the Future for a bounded time (the server does: a completed
response's row survives the server being killed); while the store is failing it does not wait at all.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass

from tunelab.ops.requestlog import LogRow, RequestLog

log = logging.getLogger(__name__)
_STOP = object()


@dataclass(frozen=True)
class Retention:
    """How long and how much the log keeps: rows older than `max_age_s`, then the oldest beyond `max_bytes`,
    are deleted every `every_s` seconds (None: no limit)."""

    max_age_s: float | None = None
    max_bytes: int | None = None
    every_s: float = 60.0


class LogWriter:
    def __init__(self, store: RequestLog, *, max_queue: int = 8192, batch: int = 512,
                 on_drop: Callable[[int], None] | None = None, on_write: Callable[[int], None] | None = None,
                 retention: Retention | None = None, sinks: tuple = (), retry_s: float = 1.0):
        """store: where rows go. max_queue: rows waiting at most (more are dropped). batch: rows per
        transaction at most. on_drop / on_write: called with the number of rows dropped / written.
        sinks: objects with `export(rows)` (tunelab.ops.otel), given every batch. retry_s: after a failed
        batch, the writer waits this long before the next try (rows queue meanwhile)."""
        self.store, self.batch, self.retention, self.sinks, self.retry_s = store, batch, retention, sinks, retry_s
        self.on_drop, self.on_write = on_drop or (lambda n: None), on_write or (lambda n: None)
        self._q: queue.Queue = queue.Queue(max_queue)
        self.failing = False  # the last batch failed (the store is down); cleared by the next success
        self.written = self.dropped = 0
        self._pruned = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="tunelab-requestlog", daemon=True)
        self._thread.start()

    def submit(self, row: LogRow) -> Future:
        """Queue `row`; never blocks. The Future says whether it was committed (True) or dropped (False)."""
        fut: Future = Future()
        try:
            self._q.put_nowait((row, fut))
        except queue.Full:
            self._dropped([fut])
        return fut

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every row submitted so far is written or dropped; False on timeout."""
        fut: Future = Future()
        try:
            self._q.put((None, fut), timeout=timeout)
            fut.result(timeout)
            return True
        except (queue.Full, TimeoutError):
            return False

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued, then stop the thread."""
        deadline = time.monotonic() + timeout
        while self._thread.is_alive() and time.monotonic() < deadline:
            try:
                self._q.put(_STOP, timeout=0.1)
                break
            except queue.Full:
                continue
        self._thread.join(max(0.0, deadline - time.monotonic()))
        for sink in self.sinks:
            if hasattr(sink, "close"):
                sink.close()

    def _run(self) -> None:
        while True:
            item = self._q.get()
            if item is _STOP:
                return
            items = [item]
            while len(items) < self.batch:
                try:
                    nxt = self._q.get_nowait()
                except queue.Empty:
                    break
                if nxt is _STOP:
                    self._write(items)
                    return
                items.append(nxt)
            self._write(items)
            self._prune()

    def _write(self, items: list) -> None:
        rows = [r for r, _ in items if r is not None]
        futs = [f for r, f in items if r is not None]
        try:
            self.store.write(rows)
        except Exception as e:  # noqa: BLE001 - the store is down or refused the batch: drop it, count it
            if not self.failing:
                log.warning("request log %s: dropping rows (%s)", self.store.url, e)
            self.failing = True
            self._dropped(futs)
            time.sleep(self.retry_s)
        else:
            if self.failing:
                log.warning("request log %s: writing again", self.store.url)
            self.failing = False
            self.written += len(rows)
            self.on_write(len(rows))
            for f in futs:
                _resolve(f, True)
        for sink in self.sinks if rows else ():
            try:
                sink.export(rows)
            except Exception as e:  # noqa: BLE001 - an exporter's failure is logged, never raised
                log.warning("request log export to %s failed: %s", type(sink).__name__, e)
        for r, f in items:
            if r is None:  # a flush marker
                _resolve(f, True)

    def _dropped(self, futs: list[Future]) -> None:
        self.dropped += len(futs)
        self.on_drop(len(futs))
        for f in futs:
            _resolve(f, False)

    def _prune(self) -> None:
        r = self.retention
        if r is None or time.monotonic() - self._pruned < r.every_s:
            return
        self._pruned = time.monotonic()
        try:
            self.store.prune(max_age_s=r.max_age_s, max_bytes=r.max_bytes)
        except Exception as e:  # noqa: BLE001 - retention waits for the next round
            log.warning("request log %s: retention failed (%s)", self.store.url, e)


def _resolve(fut: Future, ok: bool) -> None:
    try:
        fut.set_result(ok)
    except InvalidStateError:  # the waiter gave up and cancelled it
        pass
