"""`lorafleet admin quota ...` (read, set and reset a tenant's quota) and `lorafleet admin cluster` (who
runs, borrows and waits): the operator's admin key."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table

from service.console import DEFAULT_BASE_URL, AdminKey, BaseUrl, JsonOutput, call, connect, console, fail, print_json

__all__ = ["quota_app", "QUOTA_FIELDS", "cluster"]

quota_app = typer.Typer(help="Tenants' quotas: GPUs, borrowing, job limits, fair-share weight.", no_args_is_help=True)

# The quota's fields, in the order they are shown, with what each means.
QUOTA_FIELDS: dict[str, str] = {
    "nominal_gpus": "GPUs guaranteed to the tenant (may reclaim them by preemption)",
    "borrowing_limit_gpus": "GPUs it may run above nominal on idle capacity",
    "max_gpus_per_job": "largest job it may submit, in GPUs",
    "max_running_jobs": "jobs it may run at once",
    "max_queued_jobs": "jobs it may have waiting",
    "weight": "fair-sharing weight",
}

TenantId = Annotated[str, typer.Argument(help="Tenant id (from list-tenants).")]
# A limit given on the command line: a number, or "none" for no limit.
Limit = Annotated[str | None, typer.Option(metavar="N|none")]


def _limit(flag: str, value: str) -> int | None:
    if value.lower() == "none":
        return None
    try:
        return int(value)
    except ValueError:
        fail(f"{flag} takes a whole number or 'none', got {value!r}")


def _show(quota: dict[str, Any]) -> None:
    source = "the default quota" if quota.get("is_default") else "its own quota"
    table = Table("field", "value", "meaning", title=f"Tenant {quota['tenant_id']}: {source}")
    for name, meaning in QUOTA_FIELDS.items():
        value = quota.get(name)
        table.add_row(name, "no limit" if value is None else str(value), meaning)
    console.print(table)


def _print(quota: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print_json(quota)
    else:
        _show(quota)


@quota_app.command("get")
def quota_get(tenant_id: TenantId, base_url: BaseUrl = DEFAULT_BASE_URL, api_key: AdminKey = None,
              as_json: JsonOutput = False) -> None:
    """Show a tenant's quota (the default one when none is set)."""
    with connect(base_url, api_key) as client:
        quota = call(client.get_quota, tenant_id)
    _print(quota, as_json)


@quota_app.command("set")
def quota_set(
    tenant_id: TenantId,
    nominal_gpus: Annotated[int | None, typer.Option(help="GPUs guaranteed to the tenant.")] = None,
    borrowing_limit: Limit = None,
    max_gpus_per_job: Limit = None,
    max_running: Limit = None,
    max_queued: Limit = None,
    weight: Annotated[float | None, typer.Option(help="Fair-sharing weight (> 0).")] = None,
    base_url: BaseUrl = DEFAULT_BASE_URL,
    api_key: AdminKey = None,
    as_json: JsonOutput = False,
) -> None:
    """Change the given fields of a tenant's quota; the others keep their current values."""
    changes: dict[str, Any] = {}
    if nominal_gpus is not None:
        changes["nominal_gpus"] = nominal_gpus
    for field, flag, value in (("borrowing_limit_gpus", "--borrowing-limit", borrowing_limit),
                               ("max_gpus_per_job", "--max-gpus-per-job", max_gpus_per_job),
                               ("max_running_jobs", "--max-running", max_running),
                               ("max_queued_jobs", "--max-queued", max_queued)):
        if value is not None:
            changes[field] = _limit(flag, value)
    if weight is not None:
        changes["weight"] = weight
    if not changes:
        fail("nothing to set: give at least one of --nominal-gpus, --borrowing-limit, --max-gpus-per-job, "
             "--max-running, --max-queued, --weight")
    with connect(base_url, api_key) as client:
        current = call(client.get_quota, tenant_id)
        quota = call(client.set_quota, tenant_id, {**{k: current.get(k) for k in QUOTA_FIELDS}, **changes})
    _print(quota, as_json)


@quota_app.command("reset")
def quota_reset(tenant_id: TenantId, base_url: BaseUrl = DEFAULT_BASE_URL, api_key: AdminKey = None,
                as_json: JsonOutput = False) -> None:
    """Put a tenant back on the default quota."""
    with connect(base_url, api_key) as client:
        quota = call(client.reset_quota, tenant_id)
    _print(quota, as_json)


def _limit_text(value: Any) -> str:
    return "-" if value is None else str(value)


def cluster(base_url: BaseUrl = DEFAULT_BASE_URL, api_key: AdminKey = None, as_json: JsonOutput = False) -> None:
    """Show the cluster: nodes and GPUs, then each tenant that runs or waits, what it borrows and why it waits."""
    with connect(base_url, api_key) as client:
        view = call(client.cluster)
    if as_json:
        print_json(view)
        return
    totals = view["totals"]
    gpus = "unknown (no dispatcher has reported the nodes)" if totals["gpus"] is None else str(totals["gpus"])
    console.print(f"GPUs: {gpus}; allocated {totals['allocated']}; free {_limit_text(totals['free'])}; "
                  f"being preempted {totals['being_preempted']}")
    nodes = Table("node", "address", "GPUs", "alive", title="Nodes")
    for node in view["nodes"]:
        nodes.add_row(node["node_id"], node["address"] or "-", str(node["gpus"]), "yes" if node["alive"] else "no")
    console.print(nodes)
    tenants = Table("tenant", "nominal", "borrow limit", "weight", "running", "GPUs", "borrowed", "queued",
                    "share", "waiting because", title="Tenants")
    for t in view["tenants"]:
        quota = t["quota"]
        tenants.add_row(t.get("tenant_name") or t["tenant_id"], str(quota["nominal_gpus"]),
                        _limit_text(quota["borrowing_limit_gpus"]), f"{quota['weight']:g}", str(t["running_jobs"]),
                        str(t["running_gpus"]), str(t["borrowed_gpus"]), str(t["queued_jobs"]),
                        f"{t['share_score']:.3g}", t["waiting_reason"] or "-")
    console.print(tenants)
