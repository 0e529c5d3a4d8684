"""Per-tenant quotas in Kueue's terms (nominal quota, borrowing limit, weight, job limits) and their store."""

from __future__ import annotations

import redis
from pydantic import BaseModel, ConfigDict, Field

from fleet import keys
from fleet import queue_scripts as lua

__all__ = ["TenantQuota", "QuotaStore", "QUOTA_FIELDS"]


class TenantQuota(BaseModel):
    """What a tenant may hold and queue. GPUs are the scheduler's accelerators (Ray logical ones on CPU).

    - `nominal_gpus`: guaranteed share; work within it is admitted before borrowing work and may
      reclaim borrowed capacity by preemption.
    - `borrowing_limit_gpus`: how far above nominal the tenant may run on idle capacity (None: any).
    - `max_gpus_per_job`, `max_running_jobs`, `max_queued_jobs`: limits (None: none but the cluster's).
    - `weight`: fair-sharing weight; the share score is decayed usage / weight.
    """

    model_config = ConfigDict(extra="forbid")

    nominal_gpus: int = Field(0, ge=0)
    borrowing_limit_gpus: int | None = Field(None, ge=0)
    max_gpus_per_job: int | None = Field(None, ge=1)
    max_running_jobs: int | None = Field(None, ge=0)
    max_queued_jobs: int | None = Field(None, ge=0)
    weight: float = Field(1.0, gt=0)

    def to_redis_hash(self) -> dict[str, str]:
        """Flat fields for HSET; a None limit is left out, so the Lua reads it as absent (no limit)."""
        return {name: repr(value) for name, value in self.model_dump().items() if value is not None}

    @classmethod
    def from_redis_hash(cls, fields: dict[str, str]) -> TenantQuota:
        return cls.model_validate({k: v for k, v in fields.items() if k in cls.model_fields})


QUOTA_FIELDS: tuple[str, ...] = tuple(TenantQuota.model_fields)


class QuotaStore:
    """Quotas in Redis: hash `quota:{tenant}` per explicitly set tenant, plus the default every other
    tenant gets (written here at construction, so the scheduler's Lua reads the same default)."""

    def __init__(self, client: redis.Redis, *, default: TenantQuota) -> None:
        self.redis = client
        self.default = default
        if self.redis.hgetall(keys.default_quota()) != default.to_redis_hash():
            self._write(keys.default_quota(), default, reindex=())  # () : every tenant (those on the default)

    def _write(self, key: str, quota: TenantQuota | None, *, reindex: tuple[str, ...]) -> None:
        """Replace (None: delete) a quota hash and re-index the tenants it applies to, in one transaction,
        so no decision ever sees the new quota with the old index or the reverse."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.delete(key)
        if quota is not None:
            pipe.hset(key, mapping=quota.to_redis_hash())
        pipe.eval(lua.REINDEX, 0, "", *reindex)
        pipe.execute()

    def get(self, tenant_id: str) -> TenantQuota:
        """The tenant's quota; the default when none is set."""
        fields = self.redis.hgetall(keys.quota(tenant_id))
        return TenantQuota.from_redis_hash(fields) if fields else self.default

    def set(self, tenant_id: str, quota: TenantQuota) -> TenantQuota:
        """Set a tenant's quota; its queued work is re-indexed at once under the new limits."""
        self._write(keys.quota(tenant_id), quota, reindex=(tenant_id,))
        return quota

    def reset(self, tenant_id: str) -> None:
        """Back to the default quota."""
        self._write(keys.quota(tenant_id), None, reindex=(tenant_id,))

    def list(self) -> dict[str, TenantQuota]:
        """The explicitly set quotas, by tenant id."""
        prefix = keys.quota("")
        out: dict[str, TenantQuota] = {}
        for key in self.redis.scan_iter(match=f"{prefix}*", count=500):
            fields = self.redis.hgetall(key)
            if fields:
                out[key[len(prefix):]] = TenantQuota.from_redis_hash(fields)
        return dict(sorted(out.items()))
