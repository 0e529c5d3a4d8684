"""The `lorafleet` command line: run the stack, and talk to a running API over HTTP (typer + rich)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from service import cli_local
from service.cli_admin import cluster, quota_app
from service.cli_jobs import jobs_app
from service.cli_ranks import rank_report_table, rank_sweep_table
from service.console import (
    DEFAULT_BASE_URL,
    AdminKey,
    ApiKey,
    BaseUrl,
    JsonOutput,
    call,
    connect,
    console,
    print_json,
    when,
)

__all__ = ["app"]

app = typer.Typer(
    name="lorafleet",
    help="Multi-tenant LoRA fine-tuning: run the local stack, manage tenants, files, jobs and adapters.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
admin_app = typer.Typer(help="Tenants, API keys and quotas (needs the operator's admin key).", no_args_is_help=True)
files_app = typer.Typer(help="Upload and list training files.", no_args_is_help=True)
adapters_app = typer.Typer(help="List and download published adapter versions.", no_args_is_help=True)
app.add_typer(admin_app, name="admin")
admin_app.add_typer(quota_app, name="quota")
admin_app.command("cluster")(cluster)
app.add_typer(files_app, name="files")
app.add_typer(jobs_app, name="jobs")
app.add_typer(adapters_app, name="adapters")

# --- the local stack: `up`, `serve`, `worker`, `model make-tiny` (they start processes) ------------------
cli_local.register(app)


# --- webhooks: a standalone deliverer (the API runs one too; any number may run at once) ------------------
@app.command("webhooks")
def webhooks(
    consumer: Annotated[str | None, typer.Option(help="Name in the outbox's consumer group; default host-pid.")] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning")] = "info",
) -> None:
    """Deliver webhook events (settings from LORAFLEET_* variables) until SIGTERM/Ctrl-C."""
    import signal
    import threading

    from fleet.settings import make_redis
    from fleet.webhook_delivery import Deliverer

    cli_local._configure_logging(log_level)
    settings = cli_local._settings()
    client = make_redis(settings)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        Deliverer(client, settings, consumer=consumer).run(stop)
    finally:
        client.close()


# --- admin --------------------------------------------------------------------------------------------
@admin_app.command("create-tenant")
def admin_create_tenant(
    name: Annotated[str, typer.Argument(help="Unique tenant (team) name.")],
    base_url: BaseUrl = DEFAULT_BASE_URL,
    api_key: AdminKey = None,
    as_json: JsonOutput = False,
) -> None:
    """Create a tenant and print its first API key (shown only once)."""
    with connect(base_url, api_key) as client:
        tenant = call(client.create_tenant, name)
    if as_json:
        print_json(tenant)
        return
    console.print(f"Created tenant [bold]{tenant['name']}[/] ({tenant['id']}).")
    console.print("API key (shown once, store it now):")
    console.print(tenant["api_key"], highlight=False, soft_wrap=True)


@admin_app.command("list-tenants")
def admin_list_tenants(
    base_url: BaseUrl = DEFAULT_BASE_URL, api_key: AdminKey = None, as_json: JsonOutput = False
) -> None:
    """List every tenant."""
    with connect(base_url, api_key) as client:
        page = call(client.list_tenants)
    if as_json:
        print_json(page)
        return
    table = Table("id", "name", "created")
    for tenant in page["data"]:
        table.add_row(tenant["id"], tenant["name"], when(tenant.get("created_at")))
    console.print(table)


@admin_app.command("issue-key")
def admin_issue_key(
    tenant_id: Annotated[str, typer.Argument(help="Tenant id (from create-tenant / list-tenants).")],
    role: Annotated[str, typer.Option(help="member or admin.")] = "member",
    base_url: BaseUrl = DEFAULT_BASE_URL,
    api_key: AdminKey = None,
    as_json: JsonOutput = False,
) -> None:
    """Issue another API key for a tenant (shown only once)."""
    with connect(base_url, api_key) as client:
        key = call(client.issue_key, tenant_id, role=role)
    if as_json:
        print_json(key)
        return
    console.print(f"Key {key['id']} ({key['role']}) for tenant {key['tenant_id']}; shown once:")
    console.print(key["api_key"], highlight=False, soft_wrap=True)


@admin_app.command("revoke-key")
def admin_revoke_key(
    key_id: Annotated[str, typer.Argument(help="Key id (not the secret).")],
    base_url: BaseUrl = DEFAULT_BASE_URL,
    api_key: AdminKey = None,
) -> None:
    """Revoke an API key; requests with it get 401 from now on."""
    with connect(base_url, api_key) as client:
        call(client.revoke_key, key_id)
    console.print(f"Revoked key {key_id}.")


# --- files --------------------------------------------------------------------------------------------
@files_app.command("upload")
def files_upload(
    path: Annotated[Path, typer.Argument(exists=True, dir_okay=False, readable=True, help="A JSONL dataset.")],
    purpose: Annotated[str, typer.Option(help="File purpose.")] = "fine-tune",
    base_url: BaseUrl = DEFAULT_BASE_URL,
    api_key: ApiKey = None,
    as_json: JsonOutput = False,
) -> None:
    """Upload a dataset; it is validated on arrival and rejected with the line numbers at fault."""
    with connect(base_url, api_key) as client:
        uploaded = call(client.upload_file, path, purpose=purpose)
    if as_json:
        print_json(uploaded)
        return
    console.print(f"Uploaded {uploaded['filename']} ({uploaded['bytes']} bytes) as [bold]{uploaded['id']}[/].")


@files_app.command("list")
def files_list(base_url: BaseUrl = DEFAULT_BASE_URL, api_key: ApiKey = None, as_json: JsonOutput = False) -> None:
    """List your uploaded files."""
    with connect(base_url, api_key) as client:
        page = call(client.list_files)
    if as_json:
        print_json(page)
        return
    table = Table("id", "filename", "bytes", "purpose", "created")
    for f in page["data"]:
        table.add_row(f["id"], f["filename"], str(f["bytes"]), f["purpose"], when(f["created_at"]))
    console.print(table)


# --- adapters -----------------------------------------------------------------------------------------
@adapters_app.command("list")
def adapters_list(
    name: Annotated[str | None, typer.Argument(help="An adapter name to list its versions.")] = None,
    base_url: BaseUrl = DEFAULT_BASE_URL,
    api_key: ApiKey = None,
    as_json: JsonOutput = False,
) -> None:
    """List your adapters, or one adapter's versions."""
    with connect(base_url, api_key) as client:
        page = call(client.list_versions, name) if name else call(client.list_adapters)
    if as_json:
        print_json(page)
        return
    if name:
        table = Table("version", "id", "base model", "job", "created")
        for v in page["data"]:
            table.add_row(f"v{v['version']}", v["id"], v.get("base_model") or "-", v.get("job_id") or "-",
                          when(v.get("created_at")))
    else:
        table = Table("name", "latest", "versions", "updated")
        for a in page["data"]:
            table.add_row(a["name"], a.get("latest_ref") or "-", str(a.get("version_count", "-")),
                          when(a.get("updated_at") or a.get("created_at")))
    console.print(table)


@adapters_app.command("show")
def adapters_show(
    model: Annotated[str, typer.Argument(help="NAME:vN, or NAME for its latest version.")],
    base_url: BaseUrl = DEFAULT_BASE_URL,
    api_key: ApiKey = None,
    as_json: JsonOutput = False,
) -> None:
    """Show one version: where it came from, and its rank report (did the rank fit what it learned?)."""
    name, _, version = model.partition(":")
    with connect(base_url, api_key) as client:
        found = call(client.get_version, name, version or "latest")
    if as_json:
        print_json(found)
        return
    manifest = found.get("manifest") or {}
    console.print(f"[bold]{found['id']}[/]  base model {found.get('base_model') or '-'}  "
                  f"job {found.get('job_id') or '-'}  created {when(found.get('created_at'))}  "
                  f"{found.get('bytes', 0):,} bytes", highlight=False)
    sweep = manifest.get("rank_sweep")
    if sweep:
        console.print(rank_sweep_table(sweep))
    report = found.get("rank_report")
    if not report:
        console.print("No rank report (the version was imported, or published before versions carried one).")
        return
    console.print(f"Rank report: {report['summary']['message']}", highlight=False)
    console.print(rank_report_table(report))


@adapters_app.command("download")
def adapters_download(
    model: Annotated[str, typer.Argument(help="NAME:vN, or NAME for its latest version.")],
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Directory in which the NAME-vN/ folder is created.")
    ] = Path("."),
    archive: Annotated[bool, typer.Option("--archive", help="Keep the .tar.gz instead of extracting.")] = False,
    base_url: BaseUrl = DEFAULT_BASE_URL,
    api_key: ApiKey = None,
) -> None:
    """Download an adapter version (PEFT files + manifest.json): extracted to OUTPUT/NAME-vN/."""
    import tarfile

    name, _, version = model.partition(":")
    version = version or "latest"
    output.mkdir(parents=True, exist_ok=True)
    tar_path = output / f"{name}-{version}.tar.gz"
    with connect(base_url, api_key) as client:
        written = call(client.download_version, name, version, tar_path)
    if archive:
        console.print(f"Saved {tar_path} ({written} bytes).")
        return
    try:
        with tarfile.open(tar_path, "r:gz") as tar:
            folders = {Path(m.name).parts[0] for m in tar.getmembers()}
            tar.extractall(output, filter="data")
    finally:
        tar_path.unlink(missing_ok=True)
    for folder in sorted(folders):
        files = ", ".join(sorted(p.name for p in (output / folder).iterdir()))
        console.print(f"Extracted {output / folder}/: {files}")


def main() -> None:  # pragma: no cover - `python -m service.cli`
    app(prog_name="lorafleet")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
