"""Who is asking: keys.yaml (tenants, their hashed API keys and adapters), validated on load, and the tenant of a
request's `Authorization` header. The file's shape is documented in docs/serving.md."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from tunelab.errors import TunelabError
from tunelab.ops.checks import Check, CheckSpec, compile_checks, unique_names
from tunelab.server.schemas import ApiError

SHA256_HEX = re.compile(r"[0-9a-f]{64}")
SHAPE = ("tenants:\n    acme: {key_sha256: [<64 hex digits>], adapters: [acme-support]}\n"
         "    ops: {key_sha256: [<64 hex digits>], admin: true}\n"
         "  (`tunelab serve --hash-key KEY` prints a key's hash; see docs/serving.md)")


def hash_key(key: str) -> str:
    """What keys.yaml stores for an API key: its SHA-256, hex."""
    return hashlib.sha256(key.encode()).hexdigest()


class TenantEntry(BaseModel):
    """One tenant in keys.yaml."""

    model_config = ConfigDict(extra="forbid")

    key_sha256: list[str] = Field(min_length=1)  # SHA-256 hex digests of the tenant's API keys
    adapters: list[str] = Field(default_factory=list)  # the adapters it may use (the base is always allowed)
    admin: bool = False  # every adapter, and loading / unloading them
    log: Literal["metadata", "content"] = "metadata"  # request log: content adds the (redacted) prompt and answer
    redact: list[str] | dict[str, str] = Field(default_factory=list)  # more regexes to redact: [REDACTED] / [TAG]
    checks: list[CheckSpec] = Field(default_factory=list)  # output checks on every answer (tunelab.ops.checks)

    @field_validator("checks")
    @classmethod
    def _distinct(cls, v: list[CheckSpec]) -> list[CheckSpec]:
        return unique_names(v)

    @field_validator("redact")
    @classmethod
    def _regexes(cls, v):
        for _, pattern in _tagged(v):  # a bad regex fails on load, not at the first request
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"{pattern!r} is not a regular expression ({e})") from None
        return v

    @field_validator("key_sha256", mode="before")
    @classmethod
    def _one_or_many(cls, v):
        return [v] if isinstance(v, str) else v

    @field_validator("key_sha256")
    @classmethod
    def _hex(cls, v: list[str]) -> list[str]:
        for h in v:
            if not SHA256_HEX.fullmatch(h):
                raise ValueError(f"{h[:12] + '...' if len(h) > 12 else h!r} is not a SHA-256 hex digest; store "
                                 "the key's hash, not the key (`tunelab serve --hash-key KEY` prints it)")
        return v


class KeysFile(BaseModel):
    """keys.yaml: `tenants:` mapping each tenant's name to its keys and adapters."""

    model_config = ConfigDict(extra="forbid")

    tenants: dict[str, TenantEntry] = Field(min_length=1)


@dataclass(frozen=True)
class Tenant:
    name: str
    adapters: frozenset[str] | None  # None: every adapter (no keys file, or an admin)
    admin: bool = False
    log: str = "metadata"  # keys.yaml `log`: metadata | content
    redact: tuple[tuple[str, str], ...] = ()  # keys.yaml `redact`: (tag, regex) pairs
    checks: tuple[Check, ...] = ()  # keys.yaml `checks`, compiled: run on every answer before it leaves

    def may_use(self, adapter: str) -> bool:
        return self.adapters is None or adapter in self.adapters


OPEN = Tenant("default", None, admin=True)  # no --keys: one tenant, everything allowed


def _tagged(redact: list[str] | dict[str, str]) -> tuple[tuple[str, str], ...]:
    """keys.yaml `redact` as (tag, regex) pairs: a list's regexes become [REDACTED], a mapping's [TAG]."""
    if isinstance(redact, dict):
        return tuple(redact.items())
    return tuple(("redacted", p) for p in redact)


def _explain(path: Path, err: ValidationError) -> TunelabError:
    lines = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(the file)"
        msg = e["msg"].removeprefix("Value error, ")
        lines.append(f"unknown key {where!r}" if e["type"] == "extra_forbidden" else f"{where}: {msg}")
    return TunelabError(f"{path}: invalid keys file:\n  " + "\n  ".join(lines) + f"\nWrite it as\n  {SHAPE}")


@dataclass
class Keys:
    """The tenants of keys.yaml, by key hash."""

    by_hash: dict[str, Tenant] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | Path | None) -> Keys | None:
        """Read and validate keys.yaml (None: no keys file, everyone is one admin tenant)."""
        if path is None:
            return None
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as e:
            raise TunelabError(f"{path}: cannot read the keys file ({e}).") from None
        try:
            spec = KeysFile.model_validate(data if data is not None else {})
        except ValidationError as e:
            raise _explain(path, e) from None
        keys = cls()
        for name, entry in spec.tenants.items():
            tenant = Tenant(name, None if entry.admin else frozenset(entry.adapters), entry.admin, entry.log,
                            _tagged(entry.redact), compile_checks(entry.checks))
            for h in entry.key_sha256:
                if h in keys.by_hash and keys.by_hash[h].name != name:
                    raise TunelabError(f"{path}: tenants.{name}.key_sha256: the key {h[:12]}... is also "
                                       f"{keys.by_hash[h].name}'s; give each tenant its own keys.")
                keys.by_hash[h] = tenant
        return keys

    def tenant(self, authorization: str | None) -> Tenant | None:
        """The tenant of an `Authorization: Bearer KEY` header, None when it names no known key."""
        if not authorization or not authorization.lower().startswith("bearer "):
            return None
        return self.by_hash.get(hash_key(authorization[7:].strip()))


def authenticate(keys: Keys | None, authorization: str | None) -> Tenant:
    """The request's tenant: everyone is OPEN without a keys file; an unknown key is a 401."""
    if keys is None:
        return OPEN
    t = keys.tenant(authorization)
    if t is None:
        raise ApiError(401, "Incorrect API key provided.", "invalid_request_error", None, "invalid_api_key")
    return t
