"""Who may use what: API keys (stored hashed) mapped to tenants and their adapters, and the resident-adapter
LRU (pinning, loading on demand, bounded memory however many adapters are on disk)."""

from __future__ import annotations

import hashlib
import re
from collections import OrderedDict
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
    evicted first, `pinned` never. Every engine call goes through `run` (the engine thread)."""

    def __init__(self, root: str | Path | None, engine, run, capacity: int = 8, pinned: list[str] = ()):
        self.root = Path(root).resolve() if root else None
        self.engine, self.run, self.capacity = engine, run, capacity
        self.pinned = set(pinned)
        self.resident: OrderedDict[str, Path] = OrderedDict()
        self.loads = self.evictions = 0

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

    def ensure(self, name: str, rel: str | None = None) -> None:
        """Make `name` resident (loading it, and evicting the least recently used unpinned one if full)."""
        if name in self.resident:
            self.resident.move_to_end(name)
            return
        path = self.path(name, rel)
        if not (path / "adapter_model.safetensors").is_file():
            raise TunelabError(f"adapter {name!r} has no adapter_model.safetensors: only safetensors adapters are "
                               "served (pickled .bin files are never loaded).")
        if hasattr(self.engine, "model"):  # trained on another base (run.json), or another hidden size: refused
            from tunelab.infer.hf import check_adapter

            check_adapter(path, getattr(self.engine, "spec", None), self.engine.model.config)
        while len(self.resident) >= self.capacity:
            self._evict()
        self.run(lambda: self.engine.add_adapter(name, str(path)))
        self.resident[name] = path
        self.loads += 1

    def _evict(self) -> None:
        from tunelab.server.scheduler import Overloaded

        for victim in list(self.resident):
            if victim in self.pinned:
                continue
            try:
                self.run(lambda v=victim: self.engine.remove_adapter(v))
            except TunelabError:  # in use by requests in flight
                continue
            del self.resident[victim]
            self.evictions += 1
            return
        raise Overloaded(f"all {len(self.resident)} resident adapters are pinned or in use; retry shortly")

    def unload(self, name: str) -> None:
        if name not in self.resident:
            raise KeyError(name)
        self.run(lambda: self.engine.remove_adapter(name))
        del self.resident[name]
        self.pinned.discard(name)
