"""`lorafleet jobs ...`: estimate, create, list, inspect, steer and follow fine-tuning jobs (follow = live progress)."""

from __future__ import annotations

import inspect
import json
import time
import uuid
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from service.client import APIClientError, LorafleetClient
from service.console import (
    DEFAULT_BASE_URL,
    ApiKey,
    BaseUrl,
    JsonOutput,
    call,
    connect,
    console,
    duration,
    err_console,
    fail,
    print_json,
    status_text,
    when,
)

__all__ = ["jobs_app"]

jobs_app = typer.Typer(help="Create, inspect, steer and follow fine-tuning jobs.", no_args_is_help=True)


def _parse_metadata(pairs: list[str]) -> dict[str, str]:
    metadata = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            fail(f"--metadata takes KEY=VALUE, got {pair!r}")
        metadata[key] = value
    return metadata


def _parse_ranks(value: str) -> list[int]:
    """`--rank-sweep 8,16,32` → [8, 16, 32]; the server checks the ranks themselves (count, range)."""
    try:
        return [int(part) for part in value.split(",") if part.strip()]
    except ValueError:
        fail(f"--rank-sweep takes comma-separated whole numbers like 8,16,32, got {value!r}")


def _number_or_auto(value: str | None, kind: type) -> Any:
    if value is None or value == "auto":
        return value
    try:
        return kind(value)
    except ValueError:
        fail(f"expected a number or 'auto', got {value!r}")


@jobs_app.command("create")
def jobs_create(
    model: Annotated[str, typer.Option(help="Base model name (see GET /v1/models).")],
    training_file: Annotated[str, typer.Option(help="A file id, or a local JSONL path to upload first.")],
    validation_file: Annotated[str | None, typer.Option(help="A file id or local path.")] = None,
    suffix: Annotated[str | None, typer.Option(help="Adapter name (default: derived from the job).")] = None,
    seed: Annotated[int | None, typer.Option()] = None,
    n_epochs: Annotated[str | None, typer.Option(help="Epochs or 'auto'.")] = None,
    batch_size: Annotated[str | None, typer.Option(help="Batch size or 'auto'.")] = None,
    learning_rate_multiplier: Annotated[str | None, typer.Option(help="Multiplier or 'auto'.")] = None,
    r: Annotated[int | None, typer.Option("--r", help="LoRA rank.")] = None,
    alpha: Annotated[float | None, typer.Option(help="LoRA alpha.")] = None,
    dropout: Annotated[float | None, typer.Option(help="LoRA dropout.")] = None,
    target_modules: Annotated[
        str | None, typer.Option(help="Comma-separated module names, or 'all-linear'.")
    ] = None,
    use_rslora: Annotated[bool, typer.Option("--rslora", help="Scale by α/√r (rsLoRA).")] = False,
    rank_sweep: Annotated[str | None, typer.Option(
        help="Comma-separated LoRA ranks, e.g. 8,16,32: one child job per rank, the best by validation loss "
             "published (needs --validation-file; omit --r).")] = None,
    quantization: Annotated[str | None, typer.Option(help="nf4, int8 or none.")] = None,
    gpus: Annotated[int | None, typer.Option(help="GPUs: that many workers of one GPU each.")] = None,
    workers: Annotated[int | None, typer.Option(help="Ray Train workers (with --gpus-per-worker).")] = None,
    gpus_per_worker: Annotated[int | None, typer.Option(help="GPUs each worker holds.")] = None,
    priority: Annotated[str | None, typer.Option(help="low, normal or high (among your own jobs).")] = None,
    co_training: Annotated[bool, typer.Option(
        "--co-training/--no-co-training",
        help="Whether the job may train in one process with other jobs on the same base model.")] = True,
    metadata: Annotated[list[str] | None, typer.Option(help="KEY=VALUE; repeatable.")] = None,
    idempotency_key: Annotated[
        str | None, typer.Option(help="Retry-safe key (default: a fresh one per invocation).")
    ] = None,
    follow: Annotated[bool, typer.Option("--follow", help="Follow the job until it finishes.")] = False,
    base_url: BaseUrl = DEFAULT_BASE_URL,
    api_key: ApiKey = None,
    as_json: JsonOutput = False,
) -> None:
    """Create a fine-tuning job (uploading local files first)."""
    with connect(base_url, api_key) as client:
        body = _job_body(client, model=model, training_file=training_file, validation_file=validation_file,
                         suffix=suffix, seed=seed, n_epochs=n_epochs, batch_size=batch_size,
                         learning_rate_multiplier=learning_rate_multiplier, r=r, alpha=alpha, dropout=dropout,
                         target_modules=target_modules, use_rslora=use_rslora, rank_sweep=rank_sweep,
                         quantization=quantization, gpus=gpus, workers=workers, gpus_per_worker=gpus_per_worker,
                         priority=priority, co_training=co_training, metadata=metadata)
        job = call(client.create_job, body, idempotency_key=idempotency_key or f"cli-{uuid.uuid4()}")
        if as_json:
            print_json(job)
        else:
            gang = job.get("resources") or {}
            console.print(f"Created job [bold]{job['id']}[/] on {job['model']} "
                          f"({gang.get('workers', 1)} × {gang.get('gpus_per_worker', 1)} GPU, {job.get('priority')} "
                          f"priority): {status_text(job['status'])}.")
            for child in (job.get("rank_sweep") or {}).get("children", []):  # a rank sweep: its child jobs
                console.print(f"  r={child['rank']}: child job {child['id']}")
        if follow:
            _follow(client, job["id"])


def jobs_estimate(**options: Any) -> None:
    """Estimate a job before running it (the options of `jobs create`): parameters, adapter size, peak
    memory, tokens and duration, each with its assumption. Creates nothing. With --rank-sweep: each
    child's figures too, and the sweep's (the largest child's memory, all children's tokens)."""
    base_url, api_key, as_json = options.pop("base_url"), options.pop("api_key"), options.pop("as_json")
    with connect(base_url, api_key) as client:
        estimate = call(client.estimate_job, _job_body(client, **options))
    if as_json:
        print_json(estimate)
        return
    table = Table("figure", "estimate", "assumption", title=f"Estimate for {estimate['model']} "
                  f"({estimate['workers']} worker(s), quantization {estimate['quantization']})")
    memory = estimate["peak_memory_bytes"]
    rows = [("trainable parameters", _count_text(estimate["trainable_parameters"]["value"]),
             estimate["trainable_parameters"]["assumption"]),
            ("adapter file", _bytes_text(estimate["adapter_file_bytes"]["value"]),
             estimate["adapter_file_bytes"]["assumption"]),
            ("peak memory per worker", _bytes_text(memory["value"]), memory["assumption"])]
    rows += [(f"  {part.replace('_', ' ')}", _bytes_text(memory[part]["value"]), memory[part]["assumption"])
             for part in ("base_weights", "adapter_weights", "gradients", "optimizer_state", "activations",
                          "loss_logits", "reserve")]
    rows += [("training tokens", _count_text(estimate["training_tokens"]["value"]),
              estimate["training_tokens"]["assumption"]),
             ("duration", duration(estimate["duration_s"]["value"]) if estimate["duration_s"]["value"] is not None
              else "unknown", estimate["duration_s"]["assumption"])]
    for child in estimate.get("rank_sweep") or []:  # a rank sweep: each child's own figures
        rows.append((f"child r={child['rank']}", f"{_count_text(child['trainable_parameters']['value'])} params, "
                     f"{_bytes_text(child['peak_memory_bytes']['value'])} peak",
                     f"adapter file {_bytes_text(child['adapter_file_bytes']['value'])}"))
    for row in rows:
        table.add_row(*row)
    console.print(table)


# `jobs estimate` takes exactly the options of `jobs create` but the create-only ones: its signature is
# create's, so an option added to create reaches estimate too (typer reads `__signature__`).
_CREATE_SIGNATURE = inspect.signature(jobs_create, eval_str=True)
jobs_estimate.__signature__ = _CREATE_SIGNATURE.replace(parameters=[  # type: ignore[attr-defined]
    p for name, p in _CREATE_SIGNATURE.parameters.items() if name not in ("idempotency_key", "follow")])
jobs_app.command("estimate")(jobs_estimate)


def _count_text(value: int | None) -> str:
    return "unknown" if value is None else f"{value:,}"


def _bytes_text(value: int | None) -> str:
    if value is None:
        return "unknown"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if value >= size:
            return f"{value / size:.1f} {unit}"
    return f"{value} B"


def _job_body(client: LorafleetClient, *, model: str, training_file: str, validation_file: str | None,
              suffix: str | None, seed: int | None, n_epochs: str | None, batch_size: str | None,
              learning_rate_multiplier: str | None, r: int | None, alpha: float | None, dropout: float | None,
              target_modules: str | None, use_rslora: bool, rank_sweep: str | None, quantization: str | None,
              gpus: int | None,
              workers: int | None, gpus_per_worker: int | None, priority: str | None,
              co_training: bool, metadata: list[str] | None) -> dict[str, Any]:
    """The create (and estimate) request body from the command's options, uploading local files first."""
    training_id = _file_id(client, training_file)
    body: dict[str, Any] = {"model": model, "training_file": training_id}
    if validation_file:
        body["validation_file"] = _file_id(client, validation_file)
    if suffix:
        body["suffix"] = suffix
    if seed is not None:
        body["seed"] = seed
    hyperparameters = {
        k: v
        for k, v in {
            "n_epochs": _number_or_auto(n_epochs, int),
            "batch_size": _number_or_auto(batch_size, int),
            "learning_rate_multiplier": _number_or_auto(learning_rate_multiplier, float),
        }.items()
        if v is not None
    }
    if hyperparameters:
        body["method"] = {"type": "supervised", "supervised": {"hyperparameters": hyperparameters}}
    lora: dict[str, Any] = {"r": r, "alpha": alpha, "dropout": dropout, "quantization": quantization}
    if target_modules:
        lora["target_modules"] = [m.strip() for m in target_modules.split(",") if m.strip()]
    if use_rslora:
        lora["use_rslora"] = True
    lora = {k: v for k, v in lora.items() if v is not None}
    if lora:
        body["lora"] = lora
    if rank_sweep is not None:
        body["rank_sweep"] = _parse_ranks(rank_sweep)
    resources = {k: v for k, v in {"gpus": gpus, "workers": workers, "gpus_per_worker": gpus_per_worker}.items()
                 if v is not None}
    if resources:  # the server says what is wrong with them (e.g. --gpus with --workers)
        body["resources"] = resources
    if priority:
        body["priority"] = priority
    if not co_training:
        body["co_training"] = False
    if metadata:
        body["metadata"] = _parse_metadata(metadata)
    return body


def _file_id(client: LorafleetClient, value: str) -> str:
    """A file id as given, or the id of `value` uploaded if it names a local file."""
    path = Path(value)
    if path.is_file():
        uploaded = call(client.upload_file, path)
        err_console.print(f"Uploaded {path} as {uploaded['id']}.")  # stderr: `--json` output stays pure JSON
        return uploaded["id"]
    return value


@jobs_app.command("list")
def jobs_list(
    limit: Annotated[int, typer.Option(min=1, max=100)] = 20,
    after: Annotated[str | None, typer.Option(help="List jobs older than this job id.")] = None,
    base_url: BaseUrl = DEFAULT_BASE_URL,
    api_key: ApiKey = None,
    as_json: JsonOutput = False,
) -> None:
    """List your jobs, newest first."""
    with connect(base_url, api_key) as client:
        page = call(client.list_jobs, limit=limit, after=after)
    if as_json:
        print_json(page)
        return
    table = Table("id", "model", "status", "progress", "fine_tuned_model", "created")
    for job in page["data"]:
        table.add_row(job["id"], job["model"], status_text(job["status"]), _progress_text(job),
                      job.get("fine_tuned_model") or "-", when(job["created_at"]))
    console.print(table)
    if page.get("has_more"):
        console.print(f"More: --after {page['data'][-1]['id']}")


def _progress_text(job: dict) -> str:
    if job["status"] == "queued" and job.get("queue_position"):
        return f"#{job['queue_position']} in queue"
    progress = job.get("progress")
    if not progress or progress.get("percent") is None:
        return "-"
    return f"{progress['percent']:.0f}% (step {progress['step']}/{progress.get('total_steps') or '?'})"


@jobs_app.command("get")
def jobs_get(
    job_id: str, base_url: BaseUrl = DEFAULT_BASE_URL, api_key: ApiKey = None, as_json: JsonOutput = False
) -> None:
    """Show one job."""
    with connect(base_url, api_key) as client:
        job = call(client.get_job, job_id)
    if as_json:
        print_json(job)
        return
    table = Table(show_header=False, box=None)
    rows = [
        ("id", job["id"]), ("status", status_text(job["status"])), ("model", job["model"]),
        ("training_file", job["training_file"]), ("validation_file", job.get("validation_file") or "-"),
        ("fine_tuned_model", job.get("fine_tuned_model") or "-"), ("progress", _progress_text(job)),
        ("eta", duration((job.get("progress") or {}).get("eta_seconds")) if job["status"] == "running" else "-"),
        ("hyperparameters", json.dumps(job["hyperparameters"])), ("lora", json.dumps(job.get("lora") or {})),
        ("attempt", str(job.get("attempt", 0))), ("created", when(job["created_at"])),
        ("finished", when(job.get("finished_at"))),
    ]
    if job.get("error"):
        error = job["error"]
        rows.append(("error", f"[red]{error['message']}[/] (param: {error.get('param') or '-'})"))
    for name, value in rows:
        table.add_row(f"[bold]{name}[/]", value)
    console.print(table)


def _job_action(job_id: str, action: str, base_url: str, api_key: str | None, as_json: bool) -> None:
    with connect(base_url, api_key) as client:
        job = call(client.job_action, job_id, action)
    if as_json:
        print_json(job)
    else:
        console.print(f"{job['id']}: {status_text(job['status'])}")


@jobs_app.command("cancel")
def jobs_cancel(
    job_id: str, base_url: BaseUrl = DEFAULT_BASE_URL, api_key: ApiKey = None, as_json: JsonOutput = False
) -> None:
    """Cancel a job (a running one stops within seconds; nothing is published)."""
    _job_action(job_id, "cancel", base_url, api_key, as_json)


@jobs_app.command("pause")
def jobs_pause(
    job_id: str, base_url: BaseUrl = DEFAULT_BASE_URL, api_key: ApiKey = None, as_json: JsonOutput = False
) -> None:
    """Pause a job (a running one checkpoints and stops; resume continues from there)."""
    _job_action(job_id, "pause", base_url, api_key, as_json)


@jobs_app.command("resume")
def jobs_resume(
    job_id: str, base_url: BaseUrl = DEFAULT_BASE_URL, api_key: ApiKey = None, as_json: JsonOutput = False
) -> None:
    """Put a paused job back in the queue."""
    _job_action(job_id, "resume", base_url, api_key, as_json)


@jobs_app.command("follow")
def jobs_follow(job_id: str, base_url: BaseUrl = DEFAULT_BASE_URL, api_key: ApiKey = None) -> None:
    """Follow a job live: log lines, and a progress bar with loss and ETA, until it finishes."""
    with connect(base_url, api_key) as client:
        _follow(client, job_id)


def _follow(client: LorafleetClient, job_id: str) -> None:
    """Follow the job's live stream to its end, then report; exit code 1 unless it succeeded."""
    final = _render_stream(client, job_id)
    if final["status"] == "succeeded":
        console.print(f"[green]Job {final['id']} succeeded:[/] {final.get('fine_tuned_model')}")
        return
    if final["status"] == "failed":
        error = final.get("error") or {}
        where = f" (param: {error['param']})" if error.get("param") else ""
        console.print(f"[red]Job {final['id']} failed:[/] {error.get('message', 'unknown error')}{where}")
    else:
        console.print(f"Job {final['id']} {final['status']}.")
    raise typer.Exit(1)


_MAX_RECONNECTS = 20


def _render_stream(client: LorafleetClient, job_id: str) -> dict:
    """Log lines above a progress bar (step, loss, ETA) from the SSE stream; the finished job object.

    Reconnects from the last event id when the connection drops, so nothing is shown twice.
    """
    last_event_id: str | None = None
    status = "unknown"
    progress = Progress(
        TextColumn("[bold]{task.fields[status]}"),
        BarColumn(),
        TaskProgressColumn(),
        TextColumn("step {task.completed:.0f}/{task.fields[total_text]}"),
        TextColumn("loss {task.fields[loss]}"),
        TextColumn("ETA {task.fields[eta]}"),
        TimeElapsedColumn(),
        console=console,
    )
    with progress:
        task = progress.add_task(job_id, total=None, status="…", total_text="?", loss="-", eta="-")
        for _ in range(_MAX_RECONNECTS):
            try:
                for event in client.stream_job(job_id, last_event_id=last_event_id):
                    payload = event.json()
                    if event.event in ("job", "end"):
                        status = payload["status"]
                        p = payload.get("progress") or {}
                        total = p.get("total_steps")
                        eta = duration(p.get("eta_seconds")) if status == "running" else "-"
                        progress.update(task, status=status, completed=p.get("step", 0), total=total,
                                        total_text=str(total or "?"), eta=eta)
                        if event.event == "end":
                            return payload
                        continue
                    if event.event == "error":
                        progress.console.print(f"[yellow]{payload.get('message')}[/]")
                        break
                    if event.id:
                        last_event_id = event.id
                    if payload.get("type") == "metrics":
                        data = payload.get("data") or {}
                        loss = data.get("train_loss", data.get("loss"))
                        if "step" in data:
                            progress.update(task, completed=data["step"])
                        if isinstance(loss, int | float):
                            progress.update(task, loss=f"{loss:.4f}")
                    else:
                        style = {"warn": "yellow", "error": "red"}.get(payload.get("level"), "dim")
                        progress.console.print(f"[{style}]{when(payload.get('created_at'))}[/] "
                                               f"{payload.get('message', '')}", highlight=False)
            except APIClientError as e:
                if e.status:  # the server refused (404, 401): reconnecting will not help
                    fail(str(e))
                progress.console.print(f"[yellow]{e}; reconnecting…[/]")
            time.sleep(1.0)
    fail(f"gave up following {job_id} after {_MAX_RECONNECTS} lost connections (last status: {status})")
