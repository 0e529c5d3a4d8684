"""fleet: the shared, light state layer (jobs, queue, tenants, files, object store, adapter registry).

Imported by both the HTTP service and the dispatcher; imports no torch, no Ray, nothing from
service/ or workers/. Build stores from one `Settings` at the edge:

    settings = Settings()
    r = make_redis(settings)
    store = make_object_store(settings)
    jobs = JobStore(r, max_attempts=settings.max_attempts, events_max_len=settings.events_max_len,
                    fair_share_half_life_s=settings.fair_share_half_life_s)
    quotas = QuotaStore(r, default=settings.default_quota)   # writes the default quota the scheduler reads
    capacity = CapacityStore(r)                               # dispatchers record Ray's nodes in it
    tenants = TenantStore(r, admin_key=settings.admin_key.get_secret_value() if settings.admin_key else None)
    files = FileStore(r, store, max_upload_bytes=settings.max_upload_bytes)
    registry = AdapterRegistry(r, store)
    catalog = load_catalog(settings)

Rank sweeps (a parent job, a child per rank, the best published once): `SweepStore(jobs, registry)`
(fleet.sweeps). Dispatchers use `jobs.leases` (claim = the scheduler's admission, fenced writes; see fleet.leases and
docs/scheduling.md) and call
`run_retention(r, store, settings)` periodically (fleet.retention).
"""

from fleet.capacity import CapacityStore, NodeCapacity
from fleet.catalog import BaseModelSpec, Catalog
from fleet.checkpoints import checkpoint_prefix, download_checkpoint, upload_checkpoint
from fleet.events import EventLog
from fleet.exceptions import (
    CancelRequested,
    Conflict,
    FencedOut,
    FleetError,
    IdempotencyConflict,
    InvalidRequest,
    InvalidState,
    NotFound,
    PauseWithdrawn,
    PayloadTooLarge,
    QuotaExceeded,
)
from fleet.fencing import Fence
from fleet.files import FileObject, FileStore
from fleet.jobs import (
    ALLOWED_TRANSITIONS,
    TERMINAL_STATUSES,
    Checkpoint,
    ControlSignal,
    Event,
    Job,
    JobError,
    JobStatus,
    Progress,
)
from fleet.leases import Claim, ExpiredLease, Lease
from fleet.objectstore import LocalObjectStore, ObjectStore, S3ObjectStore
from fleet.peft_format import PeftAdapterInfo, validate_peft_adapter_dir
from fleet.queue import CreatedJob, JobStore
from fleet.quotas import QuotaStore, TenantQuota
from fleet.registry import (
    AdapterRegistry,
    AdapterSummary,
    AdapterVersion,
    CompletedPublication,
    Manifest,
    adapter_name_for_job,
    format_adapter_ref,
    parse_adapter_ref,
    validate_adapter_name,
)
from fleet.resources import PriorityClass, Resources
from fleet.retention import RetentionReport, run_retention
from fleet.scheduler_view import ClusterView, QueueEstimate, cluster_view
from fleet.scheduling import QueueSnapshot, TenantQueue
from fleet.settings import Settings, load_catalog, make_object_store, make_redis
from fleet.sweeps import SweepStore
from fleet.tenants import ApiKey, Principal, Tenant, TenantStore

__all__ = [
    "AdapterRegistry",
    "AdapterSummary",
    "AdapterVersion",
    "adapter_name_for_job",
    "ALLOWED_TRANSITIONS",
    "ApiKey",
    "BaseModelSpec",
    "CancelRequested",
    "Catalog",
    "Checkpoint",
    "checkpoint_prefix",
    "Claim",
    "CompletedPublication",
    "CapacityStore",
    "ClusterView",
    "cluster_view",
    "Conflict",
    "ControlSignal",
    "CreatedJob",
    "download_checkpoint",
    "Event",
    "EventLog",
    "ExpiredLease",
    "Fence",
    "FencedOut",
    "FileObject",
    "FileStore",
    "FleetError",
    "format_adapter_ref",
    "IdempotencyConflict",
    "InvalidRequest",
    "InvalidState",
    "Job",
    "JobError",
    "JobStatus",
    "JobStore",
    "Lease",
    "load_catalog",
    "LocalObjectStore",
    "make_object_store",
    "make_redis",
    "Manifest",
    "NotFound",
    "ObjectStore",
    "parse_adapter_ref",
    "PauseWithdrawn",
    "PayloadTooLarge",
    "QuotaExceeded",
    "PeftAdapterInfo",
    "Principal",
    "Progress",
    "QueueSnapshot",
    "RetentionReport",
    "QuotaStore",
    "QueueEstimate",
    "Resources",
    "PriorityClass",
    "NodeCapacity",
    "TenantQuota",
    "run_retention",
    "SweepStore",
    "S3ObjectStore",
    "Settings",
    "Tenant",
    "TenantQueue",
    "TenantStore",
    "TERMINAL_STATUSES",
    "upload_checkpoint",
    "validate_adapter_name",
    "validate_peft_adapter_dir",
]
