"""The API's side of rank sweeps (fleet.sweeps): validate `rank_sweep` on create, cancel a sweep, and
refuse what a sweep's parent cannot do."""

from __future__ import annotations

from typing import Any

from fleet.catalog import Catalog
from fleet.exceptions import InvalidRequest, InvalidState
from fleet.jobs import Job
from fleet.queue import JobStore
from fleet.registry import AdapterRegistry
from fleet.sweeps import SweepStore, rank_sweep_problems
from service.schemas import JobCreateRequest

__all__ = ["check_rank_sweep", "create_rank_sweep", "after_cancel", "refuse_pause_of_parent"]


def check_rank_sweep(body: JobCreateRequest, fields: dict[str, Any], *, catalog: Catalog) -> list[int]:
    """`rank_sweep` checked against the rest of the request (one 400 naming every problem): its ranks.
    Create and the estimate both call this, so they refuse the same sweeps the same way."""
    assert body.rank_sweep is not None
    problems = rank_sweep_problems(
        body.rank_sweep, max_rank=catalog.get(fields["base_model"]).max_rank,
        has_validation_file=body.validation_file is not None,
        lora_r_given=body.lora is not None and body.lora.r is not None,
        continuing=fields["init_adapter"],
    )
    if problems:
        raise InvalidRequest(f"Invalid rank_sweep: {'; '.join(problems)}.", param="rank_sweep",
                             code="invalid_rank_sweep")
    return list(body.rank_sweep)


def create_rank_sweep(body: JobCreateRequest, fields: dict[str, Any], *, tenant_id: str, jobs: JobStore,
                      registry: AdapterRegistry, catalog: Catalog, idempotency_key: str | None,
                      request_body: Any) -> tuple[Job, bool]:
    """Check `rank_sweep` (`check_rank_sweep`), then create the parent and its children; (the parent,
    whether it was created now)."""
    ranks = check_rank_sweep(body, fields, catalog=catalog)
    return SweepStore(jobs, registry).create_sweep(tenant_id, ranks, fields=fields,
                                                   idempotency_key=idempotency_key, request_body=request_body)


def after_cancel(jobs: JobStore, registry: AdapterRegistry, tenant_id: str, job: Job) -> Job:
    """After a cancel request: a sweep's parent cancels its children too (and ends cancelled here when
    none was running: Redis only, nothing is published). A child's cancel may have ended its sweep's last
    child: the finish, which publishes the best child, is handed to the dispatchers (their next
    maintenance tick, within seconds), so this request never downloads or uploads an adapter. Returns
    the job as it is now."""
    sweeps = SweepStore(jobs, registry)
    if job.rank_sweep is not None:
        sweeps.cancel(tenant_id, job)
    elif job.parent is not None:
        sweeps.hand_over(job.parent)
    return jobs.get_job(tenant_id, job.id)


def refuse_pause_of_parent(job: Job, verb: str) -> None:
    """A sweep's parent trains nothing itself: it cannot be paused or resumed (its children can)."""
    if job.rank_sweep is not None:
        children = ", ".join(c.id for c in job.rank_sweep.children)
        raise InvalidState(f"Job {job.id} is a rank sweep; it cannot be {verb} itself. Pause or resume its "
                           f"children ({children}), or cancel the sweep.")
