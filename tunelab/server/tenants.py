"""Who may use what: API keys (stored hashed) mapped to tenants and their adapters, and the resident-adapter
LRU (pinning, loading on demand, bounded memory however many adapters are on disk)."""

from __future__ import annotations

import hashlib
import re
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from tunelab.errors import TunelabError

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def hash_key(key: str) -> str:
    """What keys.yaml stores for an API key: its SHA-256, hex."""
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class Tenant:
    name: str
    adapters: frozenset[str] | None  # None: every adapter (no keys file, or an admin)
    admin: bool = False

    def may_use(self, adapter: str) -> bool:
        return self.adapters is None or adapter in self.adapters


OPEN = Tenant("default", None, admin=True)  # no --keys: one tenant, everything allowed


@dataclass
class Keys:
    """keys.yaml:

        tenants:
          acme: {key_sha256: [<hex>, ...], adapters: [acme-support, acme-sql]}
          admin: {key_sha256: [<hex>], admin: true}

    `tunelab serve --hash-key KEY` prints the hash to put there."""

    by_hash: dict[str, Tenant] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | Path | None) -> Keys | None:
        if path is None:
            return None
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise TunelabError(f"{path}: cannot read the keys file ({e}).") from None
        keys = cls()
        for name, spec in (data.get("tenants") or {}).items():
            if not isinstance(spec, dict) or not spec.get("key_sha256"):
                raise TunelabError(f"{path}: tenant {name!r} needs key_sha256 (a list of SHA-256 hex digests of "
                                   "its API keys; `tunelab serve --hash-key KEY` prints one).")
            hashes = spec["key_sha256"] if isinstance(spec["key_sha256"], list) else [spec["key_sha256"]]
            admin = bool(spec.get("admin", False))
            tenant = Tenant(str(name), None if admin else frozenset(spec.get("adapters") or []), admin)
            for h in hashes:
                if not re.fullmatch(r"[0-9a-f]{64}", str(h)):
                    raise TunelabError(f"{path}: tenant {name!r}: {h!r} is not a SHA-256 hex digest.")
                keys.by_hash[str(h)] = tenant
        return keys

    def tenant(self, authorization: str | None) -> Tenant | None:
        """The tenant of an `Authorization: Bearer KEY` header, None when it names no known key."""
        if not authorization or not authorization.lower().startswith("bearer "):
            return None
        return self.by_hash.get(hash_key(authorization[7:].strip()))


class AdapterPool:
    """Adapters under `root` that the engine loads on demand; at most `capacity` resident, least recently used
    evicted first, `pinned` never. Every engine call goes through `run` (the engine thread).

    Thread-safe: a load blocks its caller until the engine thread has done it (~50-500 ms, after the step in
    progress), so the server's handlers call `acquire` off the event loop, and first `try_acquire`, which never
    blocks, on it. A loading request used to block the event loop, which stalled every other tenant's
    requests behind each cold adapter. `using` counts the requests holding an adapter, from `acquire` until they
    leave the engine (the server releases on the scheduler's `on_end`), so an eviction picks an idle adapter
    without asking the engine; it used to ask the engine adapter by adapter, a step's wait each, and under
    load spent seconds finding every one busy. `_state` guards `resident` and `using` and is never held across
    an engine call; `_loading` makes loads and evictions one at a time (the engine thread runs them so anyway)."""

    def __init__(self, root: str | Path | None, engine, run, capacity: int = 8, pinned: list[str] = ()):
        self.root = Path(root).resolve() if root else None
        self.engine, self.run, self.capacity = engine, run, capacity
        self.pinned = set(pinned)
        self.resident: OrderedDict[str, Path] = OrderedDict()
        self.using: Counter[str] = Counter()  # requests between acquire and release: never evicted
        self.loads = self.evictions = 0
        self.on_free: Callable[[], None] | None = None  # an adapter became evictable (a slot may be had)
        self._state, self._loading = threading.Lock(), threading.Lock()

    def path(self, name: str, rel: str | None = None) -> Path:
        """The folder of adapter `name` (or `rel`) under the root; refuses names and paths that leave it."""
        if not NAME.fullmatch(name):
            raise KeyError(name)
        if self.root is None:
            raise KeyError(name)
        p = (self.root / (rel or name)).resolve()
        if self.root not in p.parents:
            raise TunelabError(f"adapter path {rel or name!r} is outside the adapters folder")
        if not p.is_dir():
            raise KeyError(name)
        return p

    def available(self) -> list[str]:
        if self.root is None:
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and NAME.fullmatch(p.name)
                      and (p / "adapter_config.json").is_file())

    def try_acquire(self, name: str) -> bool:
        """If `name` is resident, mark it used by one more request (never blocks); `release` it when the request
        has left the engine."""
        with self._state:
            if name not in self.resident:
                return False
            self.resident.move_to_end(name)
            self.using[name] += 1
            return True

    def acquire(self, name: str, rel: str | None = None) -> None:
        """`try_acquire`, loading `name` first when it is not resident (evicting the least recently used unpinned
        adapter no request is using, if full). Blocks until the engine thread has loaded it."""
        if self.try_acquire(name):
            return
        with self._loading:
            if self.try_acquire(name):  # loaded while this call waited for the one before it
                return
            path = self.path(name, rel)
            if not (path / "adapter_model.safetensors").is_file():
                raise TunelabError(f"adapter {name!r} has no adapter_model.safetensors: only safetensors adapters "
                                   "are served (pickled .bin files are never loaded).")
            if hasattr(self.engine, "model"):  # trained on another base (run.json), or another hidden size: refused
                from tunelab.infer.hf import check_adapter

                check_adapter(path, getattr(self.engine, "spec", None), self.engine.model.config)
            while len(self.resident) >= self.capacity:
                self._evict()
            self.run(lambda: self.engine.add_adapter(name, str(path)))
            with self._state:
                self.resident[name] = path
                self.using[name] += 1
                self.loads += 1

    def release(self, name: str | None) -> None:
        """One request fewer uses `name`; at none, it may be evicted, and `on_free` (any thread) says so."""
        if name is None:
            return
        with self._state:
            self.using[name] -= 1
            if self.using[name] > 0:
                return
            del self.using[name]
        if self.on_free is not None:
            self.on_free()

    def ensure(self, name: str, rel: str | None = None) -> None:
        """Make `name` resident (pinned adapters at start, admin loads)."""
        self.acquire(name, rel)
        self.release(name)

    def _evict(self) -> None:
        """Unload one adapter (under `_loading`). A victim leaves `resident` before the engine call, so no new
        request picks it meanwhile; if the engine still has rows on it (a caller that held no count), it goes back
        and the next is tried."""
        from tunelab.server.scheduler import Overloaded

        tried = set()
        while True:
            with self._state:
                victim = next((v for v in self.resident if v not in self.pinned and v not in self.using
                               and v not in tried), None)
                if victim is None:
                    raise Overloaded(f"all {len(self.resident)} resident adapters are pinned or in use; retry "
                                     "shortly")
                path = self.resident.pop(victim)
            try:
                self.run(lambda v=victim: self.engine.remove_adapter(v))
            except TunelabError:  # requests in flight use it
                with self._state:
                    self.resident[victim] = path
                    self.resident.move_to_end(victim, last=False)  # still the least recently used
                tried.add(victim)
                continue
            self.evictions += 1
            return

    def unload(self, name: str) -> None:
        with self._loading:
            with self._state:
                if name not in self.resident:
                    raise KeyError(name)
                if name in self.using:
                    raise TunelabError(f"adapter {name!r} is in use by requests in flight; unload it when they "
                                       "finish.")
            self.run(lambda: self.engine.remove_adapter(name))
            with self._state:
                del self.resident[name]
                self.pinned.discard(name)
