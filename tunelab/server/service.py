"""One server's state, built once and kept on the app (`app.state.service`): the engine thread, the adapter
manager, and the handlers the routes in tunelab.server.app call: auth (tunelab.server.auth), models and admin
(tunelab.server.serving_models), chat and completions (tunelab.server.serving_chat), the request log and
feedback (tunelab.server.serving_logs).
"""

from __future__ import annotations

from pathlib import Path

from tunelab.errors import TunelabError
from tunelab.infer.adapters import AdapterManager
from tunelab.ops.logwriter import LogWriter
from tunelab.runs.adapter_folder import AdapterFolder, AdapterRoot
from tunelab.server.auth import Keys, Tenant, authenticate
from tunelab.server.metrics import Metrics
from tunelab.server.scheduler import Scheduler
from tunelab.server.serving_chat import ServingChat
from tunelab.server.serving_logs import ServingLogs
from tunelab.server.serving_models import ServingModels


class ServeService:
    def __init__(self, engine, base_name: str, adapters_root: AdapterRoot | str | Path | None = None,
                 keys: Keys | None = None, capacity: int = 8, pinned: list[str] = (), max_waiting: int = 256,
                 default_max_tokens: int = 256, indexes: dict | None = None, adapter_wait_s: float = 30.0,
                 engine_thread: bool = True, request_log=None, log_retention=None, log_sinks: tuple = ()):
        """adapters_root: the folder whose subfolders are the adapters (or one adapter folder); capacity of them
        resident at once, `pinned` always. indexes: name -> retrieval index folder (or RagIndex) a request may
        name in `rag_index`. adapter_wait_s: requests for cold adapters wait for resident slots, in order, and
        get 429s once none of them got one for this long (the slots are pinned or held).
        engine_thread: step the engine on a thread of its own; False: the caller runs `self.scheduler.run()`
        (`serve_http` does, on the thread that loaded the model: see tunelab.server.scheduler).
        request_log: a tunelab.ops.requestlog.RequestLog each request leaves its row in (None: no log), kept
        by `log_retention` (tunelab.ops.logwriter.Retention); log_sinks: exporters given every batch of rows
        (tunelab.ops.otel.OtelSink)."""
        self.engine, self.base_name, self.keys = engine, base_name, keys
        if indexes:
            from tunelab.rag import RagIndex, load_index

            indexes = {n: i if isinstance(i, RagIndex) else load_index(i) for n, i in indexes.items()}
        self.scheduler = Scheduler(engine, max_waiting, thread=engine_thread)
        self.adapters = AdapterManager(adapters_root, self._load_adapter, self._unload_adapter, capacity,
                                       max_waiting, adapter_wait_s)
        self.metrics = Metrics(self)
        self.models = ServingModels(base_name, self.adapters)
        self.logs = ServingLogs(None if request_log is None else LogWriter(
            request_log, on_drop=self.metrics.log_dropped.inc, on_write=self.metrics.log_written.inc,
            retention=log_retention, sinks=tuple(log_sinks)))
        self.chat = ServingChat(engine, self.scheduler, self.models, self.adapters, self.metrics,
                                default_max_tokens, indexes, self.logs)
        for name in pinned:
            try:
                self.adapters.pin(name)
            except KeyError:
                raise TunelabError(f"--pin {name}: no adapter of that name in --adapters "
                                   f"{self.adapters.root.path if self.adapters.root else '(none given)'}; it serves: "
                                   f"{', '.join(self.adapters.available()) or 'none'}.") from None

    def tenant(self, authorization: str | None) -> Tenant:
        """The tenant of a request's Authorization header (401 for an unknown key)."""
        return authenticate(self.keys, authorization)

    def _load_adapter(self, name: str, folder: AdapterFolder, slot: int) -> None:
        """Load on the engine thread, after the step in progress; refused when trained on another base (run.json),
        with another rope scaling, or for another hidden size."""
        if hasattr(self.engine, "model"):
            from tunelab.infer.hf import check_adapter

            check_adapter(folder.path, getattr(self.engine, "spec", None), self.engine.model.config)
        self.scheduler.call(lambda: self.engine.add_adapter(name, str(folder.path), slot=slot))

    def _unload_adapter(self, name: str) -> None:
        self.scheduler.call(lambda: self.engine.remove_adapter(name))

    def close(self) -> None:
        self.scheduler.close()
        self.logs.close()  # writes the rows still queued
