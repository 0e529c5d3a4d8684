"""Every Redis key lorafleet uses, built in this one module (prefix "lf:"); nowhere else spells a key."""

from __future__ import annotations

__all__ = [
    "PREFIX",
    "job",
    "job_events",
    "job_checkpoints",
    "job_publication",
    "sweep",
    "active_sweeps",
    "sweeps_handed_over",
    "job_seq",
    "tenant_jobs",
    "idempotency",
    "finished_jobs",
    "checkpoints_to_prune",
    "uploads_to_sweep",
    "retention_indexes",
    "queue",
    "queue_tenants",
    "running_per_tenant",
    "leases",
    "wakeup",
    "job_status_counts",
    "sched_tenant",
    "sched_cluster",
    "sched_config",
    "sched_bucket_prefix",
    "sched_buckets",
    "sched_holding",
    "sched_backoff",
    "sched_unfit",
    "sched_unfit_tenants",
    "sched_running_jobs",
    "sched_running_holders",
    "sched_co_group",
    "sched_co_member_of",
    "quota",
    "default_quota",
    "capacity",
    "capacity_nodes",
    "throughput",
    "tenant",
    "tenants",
    "tenant_names",
    "tenant_keys",
    "api_key_by_hash",
    "api_key",
    "file",
    "tenant_files",
    "adapters",
    "adapter_versions",
    "adapter_version_seq",
    "webhook_outbox",
    "webhook_endpoint",
    "tenant_webhooks",
    "webhook_delivery",
    "webhook_due",
    "webhook_log",
]

PREFIX = "lf:"


# --- jobs -----------------------------------------------------------------------------------------
def job(job_id: str) -> str:
    """Hash: one job's record (see fleet.jobs for the fields)."""
    return f"{PREFIX}job:{job_id}"


def job_events(job_id: str) -> str:
    """Stream: the job's events (log lines, metrics), capped."""
    return f"{PREFIX}job:{job_id}:events"


def job_checkpoints(job_id: str) -> str:
    """Hash: step number → checkpoint JSON."""
    return f"{PREFIX}job:{job_id}:checkpoints"


def job_publication(job_id: str) -> str:
    """Hash: the adapter version this job published (or is publishing); makes publishing idempotent."""
    return f"{PREFIX}job:{job_id}:publication"


def sweep(parent_job_id: str) -> str:
    """Hash: a rank sweep's coordination state (fleet.sweeps): its children, each succeeded child's
    candidate adapter, and who finishes it. Deleted once the parent job ends."""
    return f"{PREFIX}sweep:{parent_job_id}"


def active_sweeps() -> str:
    """Set: parent job ids of the rank sweeps not yet finished (what housekeeping looks at)."""
    return f"{PREFIX}sweeps:active"


def sweeps_handed_over() -> str:
    """Set: parent job ids of rank sweeps whose last child the API ended (a cancel): a dispatcher's next
    maintenance tick finishes them, so the API never publishes (fleet.sweeps)."""
    return f"{PREFIX}sweeps:handed_over"


def job_seq() -> str:
    """Counter: global creation sequence of jobs; orders listings (newest first) without ties."""
    return f"{PREFIX}jobs:seq"


def tenant_jobs(tenant_id: str) -> str:
    """Sorted set: a tenant's job ids scored by creation sequence."""
    return f"{PREFIX}tenant:{tenant_id}:jobs"


def idempotency(tenant_id: str, idempotency_key: str) -> str:
    """Hash {job_id, body_sha256}: an Idempotency-Key's outcome, scoped per tenant, expiring."""
    return f"{PREFIX}idem:{tenant_id}:{idempotency_key}"


# --- retention (fleet.retention): finished jobs by finished_at, one index per delayed clean-up -----
def finished_jobs() -> str:
    """Sorted set: finished job ids scored by finished_at (s); their records expire after retention_job_days."""
    return f"{PREFIX}retention:jobs"


def checkpoints_to_prune() -> str:
    """Sorted set: finished job ids by finished_at (s) whose intermediate checkpoints are not yet deleted."""
    return f"{PREFIX}retention:checkpoints"


def uploads_to_sweep() -> str:
    """Sorted set: finished job ids by finished_at (s) whose uncommitted adapter uploads are not yet swept."""
    return f"{PREFIX}retention:uploads"


def retention_indexes() -> list[str]:
    """The three retention indexes, in the order the Lua scripts take them as KEYS."""
    return [finished_jobs(), checkpoints_to_prune(), uploads_to_sweep()]


# --- queue and scheduling -------------------------------------------------------------------------
def queue(tenant_id: str) -> str:
    """Sorted set: a tenant's queued job ids, head first, scored by (priority desc, queue_seq asc)
    (fleet.sched_scripts: a job handed back or preempted returns at its place)."""
    return f"{PREFIX}queue:{tenant_id}"


def queue_tenants() -> str:
    """Sorted set: tenants that have queued jobs, scored by when their queue became non-empty (ms)."""
    return f"{PREFIX}queue:tenants"


def running_per_tenant() -> str:
    """Hash: tenant id → number of running jobs (max_running_jobs, metrics)."""
    return f"{PREFIX}queue:running"


def job_status_counts() -> str:
    """Hash: job status → how many times jobs entered it (every status change a script makes;
    Prometheus' lorafleet_job_status_changes_total)."""
    return f"{PREFIX}metrics:job_status_changes"


def leases() -> str:
    """Sorted set: running job ids scored by lease expiry (epoch ms)."""
    return f"{PREFIX}queue:leases"


def wakeup() -> str:
    """List: tokens pushed when work appears; idle dispatchers BLPOP it instead of polling."""
    return f"{PREFIX}queue:wakeup"


# --- the scheduler's state and index (fleet.sched_scripts) ----------------------------------------
def sched_tenant(tenant_id: str) -> str:
    """Hash {consumed, at_ms, gpus, preempting, slot, parked}: a tenant's decayed usage as of at_ms, the
    GPUs it holds now, those being preempted, where its queue head is indexed, and how many of its
    queued jobs are parked out of its queue (`sched_backoff`; they count against max_queued_jobs)."""
    return f"{PREFIX}sched:tenant:{tenant_id}"


def sched_cluster() -> str:
    """Hash {allocated, incoming, admissions, schema}: GPUs held by running jobs; of those, GPUs of jobs
    being preempted; admissions so far (orders running jobs by recency for preemption); "1" once state
    from before the scheduler was migrated (absent: the counters are rebuilt from the leases)."""
    return f"{PREFIX}sched:cluster"


def sched_config() -> str:
    """Hash {half_life_ms, starvation_guard_ms, legacy_job_gpus}: the fair-share half-life every process
    scores with; how long the first head in the policy's order may wait before free GPUs are held for
    it; the GPUs a job running across the upgrade from before the scheduler holds."""
    return f"{PREFIX}sched:config"


def sched_bucket_prefix() -> str:
    """Prefix of the index buckets "<prefix><tier>:<kind>:<gpus>" (sorted sets of idle tenants whose
    head job needs <gpus>; kind z: no usage left, scored by head job; kind k: by log2 usage key)."""
    return f"{PREFIX}sched:bucket:"


def sched_buckets() -> str:
    """Sorted set: the non-empty index buckets, scored by the GPUs their head jobs need."""
    return f"{PREFIX}sched:buckets"


def sched_holding() -> str:
    """Set: tenants holding GPUs now (scored directly at each decision; at most one per running job)."""
    return f"{PREFIX}sched:holding"


def sched_backoff() -> str:
    """Sorted set: queued jobs parked out of their queue, scored by when they go back (ms): a placement
    back-off's end, or +inf for a job set aside as never fitting its tenant's quota (`sched_unfit`)."""
    return f"{PREFIX}sched:backoff"


def sched_unfit(tenant_id: str) -> str:
    """Sorted set: the tenant's queued jobs set aside because they exceed its nominal quota plus its
    borrowing limit, scored by their queue score; they go back to their places when the quota changes."""
    return f"{PREFIX}sched:unfit:{tenant_id}"


def sched_unfit_tenants() -> str:
    """Set: tenants with jobs in `sched_unfit` (re-indexed with every tenant on a default-quota change)."""
    return f"{PREFIX}sched:unfit_tenants"


def sched_running_holders() -> str:
    """Hash: running job id -> "<gpus> <gpus being preempted> <tenant id>", what its attempt holds, so
    its GPUs (and a preemption under way) go back even if the job's record is gone (an eviction, an
    operator's DEL)."""
    return f"{PREFIX}sched:running_holders"


def sched_co_group(group_id: str) -> str:
    """Hash of one co-training group (fleet.co_training): `gpus` (the gang it holds once, whatever its
    size), `key` (base|quantization|gpus per worker), `mem_left` (bytes; absent: unchecked),
    `preempting` (its GPUs, while every member is being preempted: they count as incoming until the last
    is out) and `m:<job id>` -> "<milli-GPUs> <tenant id>" per member, its share of `gpus` for fair share
    and quotas."""
    return f"{PREFIX}sched:co_group:{group_id}"


def sched_co_member_of() -> str:
    """Hash: running job id -> the co-training group it trains in (absent: it trains alone)."""
    return f"{PREFIX}sched:co_member_of"


def sched_running_jobs() -> str:
    """Sorted set: running job ids in preemption order (lowest priority, then most recently admitted)."""
    return f"{PREFIX}sched:running"


# --- quotas and capacity (fleet.quotas, fleet.capacity) -------------------------------------------
def quota(tenant_id: str) -> str:
    """Hash: a tenant's quota, flat TenantQuota fields (absent: None); missing: the default quota."""
    return f"{PREFIX}quota:{tenant_id}"


def default_quota() -> str:
    """Hash: the quota of every tenant without one of its own (Settings.default_quota)."""
    return f"{PREFIX}sched:default_quota"


def capacity() -> str:
    """Hash {total_gpus}: accelerators on alive nodes at the last report; no field: capacity unknown."""
    return f"{PREFIX}capacity"


def capacity_nodes() -> str:
    """Hash: node id → NodeCapacity JSON, as the dispatchers last read it from Ray."""
    return f"{PREFIX}capacity:nodes"


def throughput() -> str:
    """Hash: "<accelerator kind>|<base model>" → JSON {tokens_per_s_per_worker (EWMA), jobs, updated_at}:
    the training speed finished jobs measured (fleet.throughput)."""
    return f"{PREFIX}throughput"


# --- tenants and API keys -------------------------------------------------------------------------
def tenant(tenant_id: str) -> str:
    """Hash: a tenant's record."""
    return f"{PREFIX}tenant:{tenant_id}"


def tenants() -> str:
    """Sorted set: every tenant id scored by creation time."""
    return f"{PREFIX}tenants"


def tenant_names() -> str:
    """Hash: tenant name → tenant id (names are unique)."""
    return f"{PREFIX}tenant_names"


def tenant_keys(tenant_id: str) -> str:
    """Set: ids of a tenant's API keys (revoked included)."""
    return f"{PREFIX}tenant:{tenant_id}:keys"


def api_key_by_hash(key_sha256: str) -> str:
    """String: sha256 of a live raw API key → key id. Deleted on revocation."""
    return f"{PREFIX}apikey_hash:{key_sha256}"


def api_key(key_id: str) -> str:
    """Hash: an API key's record (tenant, role, hash, created/revoked times)."""
    return f"{PREFIX}apikey:{key_id}"


# --- files ----------------------------------------------------------------------------------------
def file(file_id: str) -> str:
    """String (JSON): an uploaded file's metadata."""
    return f"{PREFIX}file:{file_id}"


def tenant_files(tenant_id: str) -> str:
    """Sorted set: a tenant's file ids scored by creation time (ms)."""
    return f"{PREFIX}tenant:{tenant_id}:files"


# --- adapter registry -----------------------------------------------------------------------------
def adapters(tenant_id: str) -> str:
    """Sorted set: a tenant's adapter names scored by first creation time (ms)."""
    return f"{PREFIX}tenant:{tenant_id}:adapters"


def adapter_versions(tenant_id: str, name: str) -> str:
    """Hash: version number → version record JSON (state, job id, created_at, deleted_at)."""
    return f"{PREFIX}tenant:{tenant_id}:adapter:{name}:versions"


def adapter_version_seq(tenant_id: str, name: str) -> str:
    """Counter: the last version number allocated for an adapter (INCR allocates the next)."""
    return f"{PREFIX}tenant:{tenant_id}:adapter:{name}:seq"


def adapter_import_reservation(tenant_id: str, name: str, import_id: str) -> str:
    """String, expiring: the version number one import (its client-drawn id) reserved, so a retried
    reservation gets the same number back."""
    return f"{PREFIX}tenant:{tenant_id}:adapter:{name}:import:{import_id}"


# --- webhooks (fleet.webhooks, fleet.webhook_delivery) --------------------------------------------
def webhook_outbox() -> str:
    """Stream: events the job scripts append in the same step as the state change (consumer group)."""
    return f"{PREFIX}webhooks:outbox"


def webhook_endpoint(endpoint_id: str) -> str:
    """Hash: a webhook endpoint (tenant, url, event types JSON, secret, created_at)."""
    return f"{PREFIX}webhook:{endpoint_id}"


def tenant_webhooks(tenant_id: str) -> str:
    """Sorted set: a tenant's webhook endpoint ids scored by creation time (ms)."""
    return f"{PREFIX}tenant:{tenant_id}:webhooks"


def webhook_delivery(delivery_id: str) -> str:
    """Hash: one event's delivery to one endpoint (body, attempts, first attempt time)."""
    return f"{PREFIX}webhook_delivery:{delivery_id}"


def webhook_due() -> str:
    """Sorted set: delivery ids scored by their next attempt time (epoch ms); a claim pushes it ahead."""
    return f"{PREFIX}webhooks:due"


def webhook_log(endpoint_id: str) -> str:
    """List: an endpoint's delivery attempts (JSON), newest first, capped."""
    return f"{PREFIX}webhook:{endpoint_id}:log"
