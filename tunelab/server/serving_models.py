"""/v1/models and the admin adapter routes, and which adapter a request's model names (vLLM: OpenAIServingModels).

Tenancy lives here: which adapters a tenant sees and may use. Residency (which adapters are loaded, the LRU,
pins, the queue for a slot) is the AdapterManager's in tunelab.infer.adapters; this module only asks it and
turns its answers into HTTP errors.
"""

from __future__ import annotations

import time
from contextlib import asynccontextmanager

import tunelab.server.schemas as S
from tunelab.errors import TunelabError
from tunelab.infer.adapters import AdapterBusy, AdapterManager
from tunelab.server.auth import Tenant
from tunelab.server.schemas import ApiError, not_found, too_many


class ServingModels:
    def __init__(self, base_name: str, adapters: AdapterManager):
        self.base_name, self.adapters = base_name, adapters

    @asynccontextmanager
    async def adapter_for(self, tenant: Tenant, model: str):
        """The adapter `model` names (None for the base), resident and kept from eviction until the block ends
        (a request submitted inside it holds it again until it leaves the engine). 404 for an adapter the tenant
        may not use or that does not exist; a cold one waits for a slot (429 once the queue is stuck)."""
        name = None if model == self.base_name else model
        if name is not None and not tenant.may_use(name):
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
        names = [n for n in self.adapters.available() if tenant.may_use(n)]
        now = int(time.time())
        data = [{"id": self.base_name, "object": "model", "created": now, "owned_by": "tunelab", "root": None}]
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


def _admin(tenant: Tenant) -> None:
    if not tenant.admin:
        raise ApiError(403, "loading and unloading adapters needs an admin key", "permission_error")
