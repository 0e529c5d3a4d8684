"""`/v1/fine_tuning/jobs`: create (validated, idempotent), list, get, cancel/pause/resume, events, checkpoints."""

from __future__ import annotations

import logging
import re
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from fleet.capacity import CapacityStore
from fleet.catalog import Catalog
from fleet.estimate import JobEstimate
from fleet.events import event_stream_id
from fleet.exceptions import InvalidRequest, NotFound
from fleet.files import FileStore
from fleet.job_spec import JobSpec, LoraSpec, Quantization
from fleet.jobs import Job, JobStatus
from fleet.queue import CreatedJob, JobStore
from fleet.quotas import QuotaStore
from fleet.registry import AdapterRegistry
from fleet.sweeps import with_live_children
from service.deps import (
    CapacityDep,
    CatalogDep,
    CurrentTenant,
    FilesDep,
    JobsDep,
    QuotasDep,
    RedisDep,
    RegistryDep,
    SettingsDep,
)
from service.errors import APIError
from service.events_stream import event_stream_response
from service.job_estimate import estimate_validated_job
from service.job_resources import checked_resources
from service.lora_request import resolve_lora
from service.objects import checkpoint_object, event_object, job_object, list_envelope
from service.openapi import TENANT_ERRORS, error_responses
from service.rank_sweeps import after_cancel, check_rank_sweep, create_rank_sweep, refuse_pause_of_parent
from service.routes.files import MIN_TRAINING_EXAMPLES, examples_in
from service.schemas import JobCreateRequest, LoraRequest

__all__ = ["router", "render_job"]

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/fine_tuning/jobs", tags=["fine-tuning"], responses=TENANT_ERRORS)

_MAX_IDEMPOTENCY_KEY_CHARS = 255
_EVENT_ID = re.compile(r"^(ftevent-)?[0-9]{1,20}-[0-9]{1,20}$")


def render_job(jobs: JobStore, job: Job) -> dict[str, Any]:
    """The job object, with its queue position when it waits in the queue (a running rank sweep: with
    its children's current statuses)."""
    position = jobs.queue_position(job.id) if job.status == JobStatus.QUEUED else None
    job = with_live_children(jobs.redis, job)
    return job_object(job, queue_position=position)


def _require_file(files: FileStore, tenant_id: str, file_id: str, *, param: str, min_examples: int = 1) -> None:
    """400 naming `param` unless `file_id` is one of the tenant's validated fine-tune files."""
    try:
        record = files.get_file(tenant_id, file_id)
    except NotFound:
        raise InvalidRequest(
            f"File {file_id!r} does not exist. Upload it first with POST /v1/files (purpose 'fine-tune').",
            param=param,
            code="file_not_found",
        ) from None
    if record.purpose != "fine-tune":
        raise InvalidRequest(
            f"File {file_id!r} has purpose {record.purpose!r}; upload the dataset with purpose 'fine-tune'.",
            param=param,
            code="invalid_file_purpose",
        )
    if record.status == "error":
        raise InvalidRequest(
            f"File {file_id!r} failed validation: {record.status_details}.", param=param, code="invalid_file"
        )
    n_examples = examples_in(record)
    if n_examples is not None and n_examples < min_examples:
        raise InvalidRequest(
            f"Training file {file_id!r} has {n_examples} example{'s' if n_examples != 1 else ''}; at least "
            f"{min_examples} are required (a smaller file can serve as validation_file).",
            param=param,
            code="too_few_examples",
        )


def _check_idempotency_key(key: str | None) -> str | None:
    if key is None:
        return None
    key = key.strip()
    if not key or len(key) > _MAX_IDEMPOTENCY_KEY_CHARS or not key.isprintable():
        raise APIError(
            400,
            f"Idempotency-Key must be 1-{_MAX_IDEMPOTENCY_KEY_CHARS} printable characters.",
            param="Idempotency-Key",
            code="invalid_idempotency_key",
        )
    return key


# The create route answers a JSONResponse itself, documented as FastAPI documents `-> dict`: with the
# response model FastAPI infers from `-> dict` it validates the returned dict in one more threadpool
# hand-off per request (a sync route), then walks it with jsonable_encoder; together ~15 % of the API's
# CPU per submission (bench/api_submit.py).
_JOB_OBJECT = {"description": "Successful Response", "content": {"application/json": {"schema": {
    "type": "object", "additionalProperties": True, "title": "Response Create Job V1 Fine Tuning Jobs Post"}}}}


@router.post("", response_model=None, responses={200: _JOB_OBJECT, **error_responses(429)})
def create_job(
    body: JobCreateRequest,
    response: Response,
    tenant: CurrentTenant,
    jobs: JobsDep,
    files: FilesDep,
    catalog: CatalogDep,
    registry: RegistryDep,
    quotas: QuotasDep,
    capacity: CapacityDep,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
) -> JSONResponse:
    """Create a fine-tuning job; it is queued at once (files were validated at upload).

    With `Idempotency-Key`, a retry with the same body returns the same job (header
    `Idempotent-Replayed: true`); the same key with another body is a 409. A job asking for more GPUs
    than the tenant's `max_gpus_per_job` or the whole cluster is a 400; a tenant at its
    `max_queued_jobs` quota gets a 429 with `Retry-After`. The response's `queue_position` is null:
    retrieve the job for its estimated position.
    """
    key = _check_idempotency_key(idempotency_key)
    tenant_id = tenant.tenant_id
    assert tenant_id is not None  # CurrentTenant guarantees it
    request_body = body.model_dump(mode="json", exclude_unset=True)
    # A replay answers with the original job before anything is checked again: what the first request
    # named may have changed since (e.g. its training file deleted once the job was queued).
    replayed = jobs.find_replay(tenant_id, key, request_body) if key is not None else None
    if replayed is not None:
        response.headers["Idempotent-Replayed"] = "true"
        return JSONResponse(job_object(replayed), headers=response.headers)
    fields = _validated_fields(body, tenant_id=tenant_id, files=files, catalog=catalog, registry=registry,
                               quotas=quotas, capacity=capacity)
    if body.rank_sweep is not None:  # a parent job and one child per rank (fleet.sweeps)
        created = CreatedJob(*create_rank_sweep(body, fields, tenant_id=tenant_id, jobs=jobs, registry=registry,
                                                catalog=catalog, idempotency_key=key, request_body=request_body))
    else:
        created = jobs.create_job(
            tenant_id,
            **fields,
            idempotency_key=key,
            request_body=request_body,
        )
    if not created.created:
        response.headers["Idempotent-Replayed"] = "true"
    else:
        logger.info("tenant %s created job %s on %s", tenant_id, created.job.id, created.job.model)
    # No queue_position here: the estimate replays the scheduler's policy (fleet.scheduler_view), which
    # cost more than the rest of a submission; GET the job for it (docs/api.md).
    return JSONResponse(job_object(created.job), headers=response.headers)


def _continued_adapter(body: JobCreateRequest, *, tenant_id: str, catalog: Catalog,
                       registry: AdapterRegistry) -> tuple[str, str, LoraSpec, Quantization] | None:
    """For `model` naming one of the tenant's adapter versions ("<name>:v<N>" or "<name>" = latest),
    as OpenAI accepts a fine-tuned model to fine-tune further: (version ref, its base model, its LoRA
    spec, its quantization). None when `model` is a catalog base model; 400 naming `model` when it is
    neither."""
    if body.model in catalog:
        return None
    try:
        version = registry.get_version(tenant_id, body.model)
        manifest = registry.read_manifest(tenant_id, version.ref)
    except (NotFound, InvalidRequest):
        available = ", ".join(catalog.names()) or "(none configured)"
        raise InvalidRequest(
            f"Unknown model {body.model!r}. Available base models: {available}; or continue one of your "
            "adapter versions by naming it as '<name>:v<N>' (GET /v1/adapters).",
            param="model", code="model_not_found",
        ) from None
    base = manifest.base_model
    if base not in catalog:
        raise InvalidRequest(
            f"Adapter {version.ref} was trained on base model {base!r}, which this server does not offer "
            f"(available: {', '.join(catalog.names())}); it cannot be trained further here.",
            param="model", code="model_not_found",
        )
    if body.lora is not None:
        raise InvalidRequest(
            f"Continuing {version.ref} keeps its LoRA shape (r, alpha, target modules); omit the 'lora' block.",
            param="lora", code="invalid_lora",
        )
    lora = _lora_block_of(manifest.lora_config)
    try:  # an imported adapter's config may not fit what this server trains
        shape = LoraSpec(**{k: v for k, v in lora.items() if k in LoraSpec.model_fields})
        catalog.check_rank(base, shape.r)
    except (ValidationError, InvalidRequest) as e:
        raise InvalidRequest(f"Adapter {version.ref} cannot be trained further here: {e}", param="model",
                             code="invalid_adapter") from e
    return version.ref, base, shape, lora.get("quantization") or catalog.get(base).quantization


def _lora_block_of(config: dict[str, Any]) -> dict[str, Any]:
    """A version's LoRA config as a job's `lora` block: trained versions store ours already; imported
    ones store the PEFT adapter_config.json fields (lora_alpha, lora_dropout, ...)."""
    if "lora_alpha" not in config:
        return dict(config)
    peft_names = {"r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout", "target_modules": "target_modules",
                  "use_rslora": "use_rslora", "use_dora": "use_dora"}
    return {ours: config[theirs] for theirs, ours in peft_names.items() if theirs in config}


def _validated_fields(body: JobCreateRequest, *, tenant_id: str, files: FileStore, catalog: Catalog,
                      registry: AdapterRegistry, quotas: QuotaStore, capacity: CapacityStore) -> dict:
    """Everything checked against the catalog, the tenant's files and quota and the cluster's size; the
    keyword arguments of create_job."""
    continued = _continued_adapter(body, tenant_id=tenant_id, catalog=catalog, registry=registry)
    _require_file(files, tenant_id, body.training_file, param="training_file", min_examples=MIN_TRAINING_EXAMPLES)
    if body.validation_file is not None:
        _require_file(files, tenant_id, body.validation_file, param="validation_file")
    if continued is None:
        base_model, init_adapter = body.model, None
        lora_request = body.lora
        if body.rank_sweep is not None and (lora_request is None or lora_request.r is None):
            # Each child trains one of the swept ranks (check_rank_sweep checks them against max_rank): check
            # the rest of the shape at r=1, which every base model allows, not at the default r.
            lora_request = (lora_request or LoraRequest()).model_copy(update={"r": 1})
        lora, quantization = resolve_lora(lora_request, model=body.model, catalog=catalog)
    else:
        init_adapter, base_model, lora, quantization = continued
    resources = checked_resources(body.resources, tenant_id=tenant_id, base_model=base_model, catalog=catalog,
                                  quotas=quotas, capacity=capacity)
    # The one place a request becomes a JobSpec: OpenAI's hyperparameters (method block or top level),
    # our `lora` (resolved against the catalog), `resources` (checked above) and `priority`.
    spec = JobSpec(lora=lora, quantization=quantization, hyperparameters=body.effective_hyperparameters(),
                   resources=resources, priority=body.priority, co_training=body.co_training)
    return {
        "model": body.model,
        "training_file": body.training_file,
        "validation_file": body.validation_file,
        "suffix": body.suffix,
        "seed": body.seed,
        "metadata": body.metadata,
        "spec": spec,
        "base_model": base_model,
        "init_adapter": init_adapter,
    }


def _metadata_filter(request: Request) -> dict[str, str] | None:
    """`metadata[k]=v` query parameters → {k: v} (every pair must match)."""
    wanted: dict[str, str] = {}
    for name, value in request.query_params.multi_items():
        if name.startswith("metadata[") and name.endswith("]") and len(name) > len("metadata[]"):
            wanted[name[len("metadata["):-1]] = value
        elif name == "metadata":
            raise APIError(
                400,
                "Filter on metadata with metadata[KEY]=VALUE query parameters (e.g. ?metadata[team]=nlp).",
                param="metadata",
                code="invalid_metadata_filter",
            )
    return wanted or None


@router.get("")
def list_jobs(
    request: Request,
    tenant: CurrentTenant,
    jobs: JobsDep,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    status: JobStatus | None = None,
) -> dict:
    """The tenant's jobs, newest first; `after` is the last id of the previous page."""
    page, has_more = jobs.list_jobs(
        tenant.tenant_id, after=after, limit=limit, metadata=_metadata_filter(request), status=status
    )
    # One snapshot of the queues places every queued job of the page (not one read of every queue per job).
    positions = jobs.queue_positions(page)
    return list_envelope([job_object(job, queue_position=positions.get(job.id)) for job in page], has_more=has_more)


@router.get("/{job_id}")
def retrieve_job(job_id: str, tenant: CurrentTenant, jobs: JobsDep) -> dict:
    return render_job(jobs, jobs.get_job(tenant.tenant_id, job_id))


@router.post("/{job_id}/cancel")
def cancel_job(job_id: str, tenant: CurrentTenant, jobs: JobsDep, registry: RegistryDep) -> dict:
    """Cancel: immediate for a waiting job; a running one stops within seconds and publishes nothing.
    Cancelling a rank sweep cancels its children."""
    job = jobs.request_cancel(tenant.tenant_id, job_id)
    return render_job(jobs, after_cancel(jobs, registry, tenant.tenant_id, job))


@router.post("/{job_id}/pause")
def pause_job(job_id: str, tenant: CurrentTenant, jobs: JobsDep) -> dict:
    """Pause: a queued job leaves the queue; a running one checkpoints and stops."""
    refuse_pause_of_parent(jobs.get_job(tenant.tenant_id, job_id), "paused")
    return render_job(jobs, jobs.request_pause(tenant.tenant_id, job_id))


@router.post("/{job_id}/resume")
def resume_job(job_id: str, tenant: CurrentTenant, jobs: JobsDep) -> dict:
    """Resume a paused job: back in the queue, continuing from its last checkpoint."""
    refuse_pause_of_parent(jobs.get_job(tenant.tenant_id, job_id), "resumed")
    return render_job(jobs, jobs.resume(tenant.tenant_id, job_id))


def _event_cursor(value: str | None, *, param: str) -> str | None:
    """An event id used as a cursor (`after`, `Last-Event-ID`); 400 unless it looks like one of ours."""
    if value is None or value == "":
        return None
    if not _EVENT_ID.fullmatch(value):
        raise InvalidRequest(f"Invalid event id {value!r} in {param}; pass the id of an event.", param=param)
    event_stream_id(value, param=param)  # numbers Redis rejects: 400 here, before any stream starts
    return value


def _wants_stream(stream: bool, accept: str | None) -> bool:
    return stream or (accept is not None and "text/event-stream" in accept and "application/json" not in accept)


@router.get("/{job_id}/events", response_model=None)
def list_events(
    job_id: str,
    request: Request,
    tenant: CurrentTenant,
    jobs: JobsDep,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 20,
    stream: bool = False,
    accept: Annotated[str | None, Header()] = None,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
) -> dict | Response:
    """The job's events, newest first (OpenAI's list); with `?stream=true` a live text/event-stream."""
    job = jobs.get_job(tenant.tenant_id, job_id)
    after = _event_cursor(after, param="after")
    if _wants_stream(stream, accept):
        resume_from = _event_cursor(last_event_id, param="Last-Event-ID") or after
        return event_stream_response(request, jobs, job, after=resume_from)
    page, has_more = jobs.list_events(job.id, after=after, limit=limit)
    return list_envelope([event_object(e) for e in page], has_more=has_more)


@router.get("/{job_id}/events/stream", response_model=None)
def stream_events(
    job_id: str,
    request: Request,
    tenant: CurrentTenant,
    jobs: JobsDep,
    after: str | None = None,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
) -> Response:
    """Live Server-Sent Events: past events (after `after`/`Last-Event-ID`), then new ones as they come."""
    job = jobs.get_job(tenant.tenant_id, job_id)
    after = _event_cursor(after, param="after")
    resume_from = _event_cursor(last_event_id, param="Last-Event-ID") or after
    return event_stream_response(request, jobs, job, after=resume_from)


@router.get("/{job_id}/checkpoints")
def list_checkpoints(
    job_id: str,
    tenant: CurrentTenant,
    jobs: JobsDep,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 10,
) -> dict:
    """The job's checkpoints, newest first (OpenAI's `fine_tuning.job.checkpoint` objects)."""
    job = jobs.get_job(tenant.tenant_id, job_id)
    checkpoints = jobs.list_checkpoints(job.id)
    if after is not None:
        ids = [c.id for c in checkpoints]
        if after not in ids:
            raise InvalidRequest(f"No checkpoint with id {after!r} to page after.", param="after")
        checkpoints = checkpoints[ids.index(after) + 1:]
    page = checkpoints[:limit]
    return list_envelope([checkpoint_object(job, c) for c in page], has_more=len(checkpoints) > limit)


@router.post("/estimate")
def estimate_job(body: JobCreateRequest, tenant: CurrentTenant, files: FilesDep, catalog: CatalogDep,
                 registry: RegistryDep, quotas: QuotasDep, capacity: CapacityDep, client: RedisDep,
                 settings: SettingsDep) -> JobEstimate:
    """What the job in the body (create's body, checked as create checks it) would cost: trainable
    parameters, adapter file, peak memory per worker, training tokens and, once a job on its base model
    has finished here, its duration. Each figure states its assumption; nothing is created or queued.
    A rank sweep gets each child's figures (`rank_sweep`) and the sweep's (fleet.estimate.estimate_sweep)."""
    tenant_id = tenant.tenant_id
    assert tenant_id is not None  # CurrentTenant guarantees it
    fields = _validated_fields(body, tenant_id=tenant_id, files=files, catalog=catalog, registry=registry,
                               quotas=quotas, capacity=capacity)
    ranks = check_rank_sweep(body, fields, catalog=catalog) if body.rank_sweep is not None else None
    return estimate_validated_job(fields, tenant_id=tenant_id, files=files, catalog=catalog, client=client,
                                  settings=settings, rank_sweep=ranks)
