"""/v1/models and the admin adapter routes, and which adapter a request's model names (vLLM: OpenAIServingModels).

Tenancy lives here: which adapters a tenant sees and may use. Residency (which adapters are loaded, the LRU,
pins, the queue for a slot) is the AdapterManager's in tunelab.infer.adapters; this module only asks it and
turns its answers into HTTP errors. An alias (a name with NAME@vN folders) goes to the version
tunelab.ops.rollout's Router picks for the caller; a tenant that may use NAME may use its versions.
"""

from __future__ import annotations

import time
from contextlib import asynccontextmanager

import tunelab.server.schemas as S
from tunelab.errors import TunelabError
from tunelab.infer.adapters import AdapterBusy, AdapterManager
from tunelab.ops import rollout
from tunelab.server.auth import Tenant
from tunelab.server.schemas import ApiError, not_found, too_many


class ServingModels:
    def __init__(self, base_name: str, adapters: AdapterManager):
        self.base_name, self.adapters = base_name, adapters
        self.router = rollout.Router(adapters.root)

    @asynccontextmanager
    async def adapter_for(self, tenant: Tenant, model: str, sticky: str | None = None):
        """The adapter `model` names (None for the base; for an alias, the version the router picks for the
        caller `sticky`), resident and kept from eviction until the block ends (a request submitted inside it
        holds it again until it leaves the engine). 404 for an adapter the tenant may not use or that does not
        exist; a cold one waits for a slot (429 once the queue is stuck)."""
        name = None if model == self.base_name else self.router.resolve(model, sticky)
        if name is not None and not _may_use(tenant, name):
            raise not_found(model)
        if name is not None:
            try:
                await self.adapters.acquire_queued(name)
            except KeyError:
                raise not_found(model) from None
            except AdapterBusy as e:
                raise too_many(str(e)) from None
            except TunelabError as e:  # the folder cannot be served (pickled weights, another base...)
                raise ApiError(400, str(e), "invalid_request_error", "model") from None
        try:
            yield name
        finally:
            self.adapters.release(name)

    def list(self, tenant: Tenant) -> dict:
        """GET /v1/models: the base and the adapters this tenant may use."""
        names = [n for n in self.adapters.available() if _may_use(tenant, n)]
        now = int(time.time())
        data = [{"id": self.base_name, "object": "model", "created": now, "owned_by": "tunelab", "root": None}]
        data += [{"id": a, "object": "model", "created": now, "owned_by": tenant.name, "parent": self.base_name,
                  "versions": [f"{a}@{v}" for v in vs]} for a, vs in self.router.versions().items() if _may_use(tenant, a)]
        data += [{"id": n, "object": "model", "created": now, "owned_by": tenant.name, "parent": self.base_name,
                  "resident": n in self.adapters.resident} for n in names]
        return {"object": "list", "data": data}

    def load(self, tenant: Tenant, req: S.LoadAdapterRequest) -> str:
        """POST /v1/load_lora_adapter (admins): load and pin an adapter until it is unloaded."""
        _admin(tenant)
        try:
            self.adapters.pin(req.lora_name, req.lora_path)
        except KeyError:
            raise ApiError(404, f"no adapter folder {req.lora_path or req.lora_name!r} under the adapters root",
                           param="lora_path") from None
        except AdapterBusy as e:
            raise too_many(str(e)) from None
        except TunelabError as e:
            raise ApiError(400, str(e), param="lora_path") from None
        return f"Success: LoRA adapter '{req.lora_name}' added successfully."

    def unload(self, tenant: Tenant, req: S.UnloadAdapterRequest) -> str:
        """POST /v1/unload_lora_adapter (admins)."""
        _admin(tenant)
        try:
            self.adapters.unload(req.lora_name)
        except KeyError:
            raise ApiError(404, f"adapter {req.lora_name!r} is not loaded", param="lora_name") from None
        except TunelabError as e:
            raise ApiError(409, str(e), param="lora_name") from None
        return f"Success: LoRA adapter '{req.lora_name}' removed successfully."

    def rollout(self, tenant: Tenant, alias: str) -> dict:
        """GET /admin/rollouts/{alias} (admins): the weights, the versions this server has, the history."""
        _admin(tenant, "reading rollouts")
        cur = rollout.get(alias)
        return {"alias": alias, "versions": list(self.router.versions().get(alias, {})),
                "weights": cur.weights if cur else None, "stable": cur.stable if cur else None,
                "history": rollout.history(alias)}

    def change_rollout(self, tenant: Tenant, alias: str, req: S.RolloutRequest) -> dict:
        """POST /admin/rollouts/{alias} (admins): set weights, promote or roll back, in one registry transaction;
        this server routes by it at once, others within a second."""
        _admin(tenant, "changing rollouts")
        root, actor = self.adapters.root.path if self.adapters.root else None, f"admin:{tenant.name}"
        try:
            if req.action == "set":
                if not req.weights:
                    raise TunelabError('give the weights, e.g. {"weights": {"v1": 90, "v2": 10}}')
                r = rollout.set_weights(alias, req.weights, root=root, actor=actor)
            elif req.action == "promote":
                if not req.version:
                    raise TunelabError('give the version to promote, e.g. {"action": "promote", "version": "v2"}')
                r = rollout.promote(alias, req.version, root=root, actor=actor)
            else:
                r = rollout.rollback(alias, req.version, root=root, actor=actor)
        except TunelabError as e:
            raise ApiError(400, str(e), param="weights" if req.action == "set" else "version") from None
        self.router.invalidate()
        return {"alias": alias, "weights": r.weights, "stable": r.stable, "event": r.event}


def _admin(tenant: Tenant, what: str = "loading and unloading adapters") -> None:
    if not tenant.admin:
        raise ApiError(403, f"{what} needs an admin key", "permission_error")


def _may_use(tenant: Tenant, name: str) -> bool:
    """keys.yaml `adapters:` naming an alias allows its versions (NAME allows NAME@v1, NAME@v2, ...)."""
    return tenant.may_use(name) or tenant.may_use(rollout.split_version(name)[0])
