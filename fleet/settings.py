"""Operator settings (env prefix LORAFLEET_) and the functions that build clients from them."""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from fleet.catalog import BaseModelSpec, Catalog, read_catalog_file
from fleet.quotas import TenantQuota

if TYPE_CHECKING:
    import redis

    from fleet.objectstore import ObjectStore

logger = logging.getLogger(__name__)

__all__ = ["Settings", "make_redis", "check_redis_client", "check_redis_login", "make_object_store", "load_catalog"]

MIB = 1024 * 1024
REDIS_SOCKET_TIMEOUT_S = 30.0
MAX_BLOCK_S = 10.0  # longest blocking Redis call fleet makes; below REDIS_SOCKET_TIMEOUT_S
# A command that cannot reach Redis is retried with exponential backoff (0.2 s doubling, capped at 2 s,
# each wait jittered down to half) for 8.5-17 s in all, so a Redis restart or failover is ridden out.
REDIS_RETRIES = 10
REDIS_BACKOFF_BASE_S = 0.1
REDIS_BACKOFF_CAP_S = 2.0


class Settings(BaseSettings):
    """Everything an operator configures. Create once at the edge (CLI, app factory) and pass down.

    Every field reads `LORAFLEET_<FIELD>` from the environment, e.g. `LORAFLEET_REDIS_URL`.
    `LORAFLEET_CATALOG` takes inline JSON `{"name": {"path": ..., "quantization": ..., "max_rank": ...}}`;
    `LORAFLEET_CATALOG_FILE` names a JSON file with the same shape (entries inline win on a clash).
    """

    model_config = SettingsConfigDict(env_prefix="LORAFLEET_", extra="ignore")

    redis_url: str = "redis://127.0.0.1:6379/0"
    data_dir: Path = Path("./var")

    object_store: Literal["local", "s3"] = "local"
    s3_endpoint_url: str | None = None
    s3_bucket: str | None = None
    s3_prefix: str = ""
    s3_region: str = "us-east-1"
    # Optional explicit credentials; when unset, boto3's usual chain (AWS_* env, instance profile) is used.
    # Explicit ones travel with the settings to Ray workers, whose environment may lack AWS_*.
    s3_access_key_id: str | None = None
    s3_secret_access_key: SecretStr | None = None

    admin_key: SecretStr | None = None

    lease_ms: int = Field(default=15_000, ge=100, description="How long a claim lives without a heartbeat.")
    heartbeat_ms: int = Field(default=3_000, ge=10, description="How often a dispatcher renews its lease.")
    max_attempts: int = Field(default=3, ge=1, description="Attempts before a job that keeps dying fails.")
    max_upload_bytes: int = Field(default=512 * MIB, ge=1)
    events_max_len: int = Field(default=10_000, ge=10, description="Cap of each job's event stream.")
    idempotency_ttl_s: int = Field(default=24 * 3600, ge=1)

    # Retention (fleet.retention, run by dispatchers): what a finished job leaves behind, and for how long.
    retention_job_days: float = Field(
        default=30, gt=0, description="A finished job's record, events and checkpoints are deleted this long after."
    )
    retention_checkpoint_days: float = Field(
        default=7, gt=0, description="A finished job's checkpoints but the last are deleted this long after."
    )
    retention_upload_grace_s: int = Field(
        default=3600, ge=0, description="Adapter uploads no committed manifest names are swept this long after."
    )
    retention_events_max_len: int = Field(
        default=1000, ge=10, description="A finished job's event stream is trimmed to this many newest events."
    )
    retention_batch_size: int = Field(default=500, ge=1, description="Most jobs each clean-up stage handles per run.")

    catalog: dict[str, BaseModelSpec] = Field(default_factory=dict)
    catalog_file: Path | None = None

    # Dispatchers (workers): where Ray is and how each job is spread over it.
    ray_address: str | None = Field(
        default=None, description="Ray cluster to join (host:port or 'auto'); None starts a local one."
    )
    use_gpu: bool = Field(
        default=False, description="The accelerators are real GPUs; else logical ones, and ranks train on the CPU."
    )
    train_resources_per_worker: dict[str, float] = Field(
        default_factory=dict,
        description='Ray resources each Train worker asks for besides its accelerators (the job\'s '
                    'gpus_per_worker), e.g. {"CPU": 2} or a custom node label {"a100": 1}.',
    )
    train_max_failures: int = Field(default=1, ge=0, description="Worker-group restarts Ray Train may do.")
    ray_storage_path: str | None = Field(
        default=None,
        description="Where Ray Train persists a run's checkpoints and final adapter, reachable from every Ray "
                    "node: a shared filesystem path, or s3://BUCKET/PREFIX (reached with the s3_* endpoint and "
                    "credentials). None: '<s3_prefix>ray/' in the object store's bucket with object_store='s3', "
                    "else '<data_dir>/objects/ray' (the local object store's root, shared on one machine or "
                    "over NFS). Each run's folder is removed when its attempt ends.",
    )
    max_concurrent_jobs: int = Field(
        default=1, ge=1,
        description="Most jobs one dispatcher runs at once (each on its own thread); the scheduler in Redis "
                    "admits only what fits the cluster, so raise it to the cluster's size.",
    )
    pause_grace_s: float = Field(
        default=60.0, gt=0,
        description="How long a pause waits for the training loop to record its checkpoint before the run is killed.",
    )
    max_infra_faults: int = Field(
        default=5, ge=0,
        description="Times a job is handed back after an object-store or Ray node fault before it fails.",
    )

    # Scheduling (fleet.scheduling): quotas, fair share, and what a "GPU" is on this cluster.
    default_quota: TenantQuota = Field(
        default_factory=TenantQuota,
        description='Quota of every tenant without one of its own; LORAFLEET_DEFAULT_QUOTA as JSON, e.g. '
                    '{"nominal_gpus": 4, "max_queued_jobs": 100}.',
    )
    fair_share_half_life_s: float = Field(
        default=3600.0, ge=0,
        description="Half-life of the decayed GPU usage fair sharing compares; 0: current usage only.",
    )
    legacy_job_gpus: int = Field(
        default=1, ge=1,
        description="GPUs each job that a release before the scheduler started holds (that release's "
                    "TRAIN_WORKERS_PER_JOB): counted once, when the scheduler first builds its state in Redis.",
    )
    starvation_guard_s: float = Field(
        default=300.0, ge=0,
        description="Once the job the policy would admit first has waited this long without fitting, free GPUs "
                    "are held for it (no smaller job backfills past it) until it fits; 0: off.",
    )
    co_training_max_group: int = Field(
        default=4, ge=1, le=64,
        description="Most jobs co-trained in one process on one shared base model (docs/scheduling.md#co-training); "
                    "1: every job trains alone.",
    )
    co_training_memory_gib: float | None = Field(
        default=None, gt=0,
        description="Accelerator memory a co-training group may fill (GiB of its one device): members join only "
                    "while the estimate (workers/co_training_plan.py) fits. Unset: with use_gpu, the smallest GPU "
                    "the dispatcher's node sees; on CPU logical accelerators (or a dispatcher that sees no GPU) "
                    "not checked. Set it where dispatchers run apart from the GPUs.",
    )
    accelerator_resource: str = Field(
        default="GPU", min_length=1,
        description="Ray resource a job's GPUs are counted in (a custom logical resource on CPU clusters).",
    )
    placement_timeout_s: float = Field(
        default=120.0, gt=0,
        description="How long a job's gang reservation (Ray placement group) may wait before it is handed back.",
    )
    local_accelerators: int = Field(
        default=4, ge=0, description="Logical accelerators the local Ray node of `lorafleet up` declares.",
    )

    # Webhooks (fleet.webhook_delivery): how events are delivered to tenants' endpoints.
    webhook_allow_private: bool = Field(
        default=False,
        description="Allow webhook URLs that resolve to private, loopback or link-local addresses.",
    )
    webhook_timeout_s: float = Field(default=10.0, gt=0, le=60, description="Connect and read timeout of a delivery.")
    webhook_backoff_base_s: float = Field(
        default=5.0, gt=0, description="Delay before the first retry; doubles after each failed attempt (with jitter)."
    )
    webhook_backoff_max_s: float = Field(default=6 * 3600, gt=0, description="Longest delay between two attempts.")
    webhook_retry_window_s: float = Field(
        default=72 * 3600, gt=0, description="An event not delivered this long after its first attempt is dropped."
    )
    webhook_log_max_len: int = Field(default=100, ge=1, description="Delivery attempts kept per endpoint.")
    webhook_deliverer_in_api: bool = Field(
        default=True,
        description="Run a webhook deliverer thread in each API process (`lorafleet webhooks` runs one alone).",
    )

    # Observability (docs/operations.md): each dispatcher's own Prometheus endpoint, and the log format.
    metrics_port: int = Field(
        default=0, ge=0, le=65535,
        description="Port of a dispatcher's Prometheus /metrics (training series); 0: not served.",
    )
    log_format: Literal["text", "json"] = Field(
        default="text", description="Log lines as text, or one JSON object per line (with job_id and tenant_id).",
    )

    @model_validator(mode="after")
    def _check_consistency(self) -> Settings:
        problems = []
        if self.heartbeat_ms >= self.lease_ms:
            problems.append(
                f"heartbeat_ms ({self.heartbeat_ms}) must be smaller than lease_ms ({self.lease_ms}), "
                "or every lease expires before it is renewed"
            )
        if self.object_store == "s3" and not self.s3_bucket:
            problems.append("object_store='s3' needs LORAFLEET_S3_BUCKET")
        if problems:
            raise ValueError("; ".join(problems))
        return self


@functools.cache
def _outage_retry_class() -> type:
    """redis-py's Retry, except that a refused login is raised at once: redis-py's AuthenticationError
    is a ConnectionError, but no wait fixes a wrong password (retrying it held every caller ~17 s)."""
    import redis
    from redis.retry import Retry

    class OutageRetry(Retry):
        def call_with_retry(self, do, fail, is_retryable=None, with_failure_count=False):
            def retryable(error: Exception) -> bool:
                if isinstance(error, redis.AuthenticationError):
                    return False
                return is_retryable is None or is_retryable(error)

            return super().call_with_retry(do, fail, retryable, with_failure_count)

    return OutageRetry


def make_redis(settings: Settings) -> redis.Redis:
    """A Redis client for `settings.redis_url`, decoding responses to str as fleet's stores expect.

    Connection and timeout errors, and READONLY replies (a failover in progress), are retried
    (REDIS_RETRIES times, exponential backoff with jitter, 8.5-17 s in all): a Redis restart is waited
    out. Only a longer outage raises ConnectionError, which callers treat as "Redis is away", never as a
    failure of the job they work on. Retried writes are safe: every fleet write is idempotent or fenced
    (a claim whose reply was lost only leaves a lease that expires and requeues the job).
    """
    import redis
    from redis.backoff import EqualJitterBackoff

    # READONLY is what a replica answers during a failover until it is promoted: retried like an outage.
    transient = (redis.ConnectionError, redis.TimeoutError, redis.exceptions.ReadOnlyError)

    # Blocking reads (BLPOP in wait_for_work, XREAD for SSE) block at most MAX_BLOCK_S, well inside
    # the socket timeout; redis-py's default of 5 s would cut a 5 s BLPOP off.
    retry = _outage_retry_class()(EqualJitterBackoff(base=REDIS_BACKOFF_BASE_S, cap=REDIS_BACKOFF_CAP_S),
                                  retries=REDIS_RETRIES, supported_errors=transient)
    return redis.Redis.from_url(
        settings.redis_url, decode_responses=True, health_check_interval=30,
        socket_timeout=REDIS_SOCKET_TIMEOUT_S, socket_connect_timeout=5,
        retry=retry, retry_on_error=list(transient),
    )


def check_redis_client(client: redis.Redis) -> None:
    """Raise ValueError unless `client` decodes responses to str, as every fleet store requires."""
    kwargs = client.connection_pool.connection_kwargs
    if not kwargs.get("decode_responses", False):
        raise ValueError(
            "fleet needs a Redis client created with decode_responses=True; "
            "build one with fleet.settings.make_redis(settings) or "
            "redis.Redis.from_url(url, decode_responses=True)."
        )


def check_redis_login(client: redis.Redis) -> None:
    """Raise ValueError when Redis refuses the login in the client's URL: a configuration error that no
    retry fixes. Called once when a process starts. An unreachable Redis is not an error here: the API
    answers 503 and dispatchers back off until it returns."""
    import redis

    try:
        client.ping()
    except redis.AuthenticationError as e:  # a subclass of ConnectionError: test it first
        kwargs = client.connection_pool.connection_kwargs
        login = f"user {kwargs['username']!r}" if kwargs.get("username") else "the default user"
        password = "with a password" if kwargs.get("password") else "without a password"
        raise ValueError(
            f"Redis refused the login of LORAFLEET_REDIS_URL ({login}, {password}): {e} "
            "Set LORAFLEET_REDIS_URL to redis://USER:PASSWORD@HOST:PORT/DB with the ACL user and password "
            "Redis was started with (docs/deploy.md)."
        ) from e
    except redis.ConnectionError as e:
        logger.warning("Redis is not reachable yet (%s); its login is checked on first use", e)


def make_object_store(settings: Settings) -> ObjectStore:
    """The configured object store: local files under data_dir/objects, or an S3 bucket."""
    from fleet.objectstore import LocalObjectStore, S3ObjectStore

    if settings.object_store == "s3":
        assert settings.s3_bucket is not None  # checked by Settings
        return S3ObjectStore(
            bucket=settings.s3_bucket,
            prefix=settings.s3_prefix,
            endpoint_url=settings.s3_endpoint_url,
            region=settings.s3_region,
            access_key_id=settings.s3_access_key_id,
            secret_access_key=(
                settings.s3_secret_access_key.get_secret_value() if settings.s3_secret_access_key else None
            ),
        )
    return LocalObjectStore(Path(settings.data_dir) / "objects")


def load_catalog(settings: Settings) -> Catalog:
    """The base model catalog: entries from `catalog_file` (if set), overridden by inline `catalog`."""
    entries: dict[str, BaseModelSpec] = {}
    if settings.catalog_file is not None:
        entries.update(read_catalog_file(settings.catalog_file))
    entries.update(settings.catalog)
    return Catalog(entries)
