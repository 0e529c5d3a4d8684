"""A job's resources at submit: the request's, or its base model's default from the catalog, checked
against the tenant's `max_gpus_per_job`, the cluster's size and its largest node (400s naming the limit).

`max_queued_jobs` is not checked here: `JobStore.create_job` counts the queue atomically with the
create (QuotaExceeded, a 429), so two racing submissions cannot both take the last slot.
"""

from __future__ import annotations

from fleet.capacity import CapacityStore
from fleet.catalog import Catalog
from fleet.exceptions import InvalidRequest
from fleet.quotas import QuotaStore, TenantQuota
from fleet.resources import Resources

__all__ = ["resolve_resources", "check_job_size", "checked_resources"]


def resolve_resources(requested: Resources | None, *, base_model: str, catalog: Catalog) -> Resources:
    """What the job will hold: the request's `resources`, else the catalog default of its base model."""
    return requested if requested is not None else catalog.get(base_model).default_resources()


def check_job_size(resources: Resources, *, quota: TenantQuota, cluster_gpus: int, largest_node_gpus: int | None,
                   defaulted_from: str | None) -> None:
    """400 (param `resources`) when the job asks for more GPUs than the tenant may hold in one job, than
    the whole cluster has (`cluster_gpus` > 0; 0 = no dispatcher has reported the nodes yet), or more
    per worker than its largest alive node has (a worker's GPUs are one Ray bundle, placed on one node;
    `largest_node_gpus` None = not checked).

    `defaulted_from` names the base model whose catalog default the job took, so the message says why a
    request that named no resources asks for that many.
    """
    gpus = resources.total_gpus
    asks = f"The job asks for {gpus} GPU{'s' if gpus != 1 else ''}"
    if defaulted_from is not None:
        asks += f" (the default of base model {defaulted_from!r})"
    if quota.max_gpus_per_job is not None and gpus > quota.max_gpus_per_job:
        raise InvalidRequest(
            f"{asks}; your tenant's max_gpus_per_job quota is {quota.max_gpus_per_job}. Ask for at most "
            f"{quota.max_gpus_per_job} in 'resources', or ask an admin to raise the quota.",
            param="resources",
            code="max_gpus_per_job_exceeded",
        )
    if cluster_gpus > 0 and gpus > cluster_gpus:
        raise InvalidRequest(
            f"{asks}; the cluster has {cluster_gpus}, so it could never start. Ask for at most {cluster_gpus} "
            "in 'resources'.",
            param="resources",
            code="larger_than_cluster",
        )
    if largest_node_gpus is not None and resources.gpus_per_worker > largest_node_gpus:
        raise InvalidRequest(
            f"{asks} with {resources.gpus_per_worker} per worker, but a worker's GPUs must be on one node and "
            f"the largest node has {largest_node_gpus}. Ask for more workers with fewer GPUs each (e.g. "
            f'{{"gpus": {gpus}}}).',
            param="resources.gpus_per_worker",
            code="larger_than_node",
        )


def checked_resources(requested: Resources | None, *, tenant_id: str, base_model: str, catalog: Catalog,
                      quotas: QuotaStore, capacity: CapacityStore) -> Resources:
    """`resolve_resources`, then `check_job_size` with the tenant's quota and the cluster as reported now
    (its nodes are read only for a job with several GPUs per worker)."""
    resources = resolve_resources(requested, base_model=base_model, catalog=catalog)
    cluster_gpus = capacity.total_gpus()
    largest = None
    if resources.gpus_per_worker > 1 and cluster_gpus > 0:
        largest = max((node.gpus for node in capacity.nodes() if node.alive), default=0)
    check_job_size(resources, quota=quotas.get(tenant_id), cluster_gpus=cluster_gpus, largest_node_gpus=largest,
                   defaulted_from=base_model if requested is None else None)
    return resources
